"""The learner's certificate metrics: source flags, plug-in bounds per source, post-update surrogate and its
standard error, the reward range, and the selection bias of the accepted-row margin."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_enumeration import _enumerate, _tables
from trm_jax import bounds, certificate

# Two sequences of lengths 3 and 2 and one padding row (inf / garbage at padding must stay out).
KL = jnp.array([[0.02, 0.08, 0.01, 9.0], [0.04, 0.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
TV = jnp.array([[0.1, 0.2, 0.05, 9.0], [0.1, 0.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
MASK = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], jnp.float32)
# rho = (2, 0.5, 1) and (1.5, 1); log pi_roll arbitrary.
ROLL = jnp.log(jnp.array([[0.2, 0.4, 0.5, 0.5], [0.2, 0.3, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]))
LEARN = ROLL + jnp.log(jnp.array([[2.0, 0.5, 1.0, 1.0], [1.5, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))


@pytest.mark.parametrize("source,has_exact,expected", [
    ("sampled", False, (0, 0, 0)), ("stored", True, (1, 1, 1)), ("topk", True, (2, 0, 1)),
    ("recompute", True, (3, 1, 1)), ("recompute", False, (3, 0, 0))])
def test_source_flags(source, has_exact, expected):
  f = certificate.source_flags(source, has_exact)
  assert (f["mismatch/source"], f["mismatch/exact"], f["bounds/plugin_valid"]) == expected
  assert f["bounds/exact"] == f["mismatch/exact"]
  with pytest.raises(ValueError, match="source"):
    certificate.source_flags("vllm", True)


def test_certificate_metrics_per_source_hand_values():
  m = jax.jit(lambda lp, rp, kl, tv: certificate.certificate_metrics(lp, rp, MASK, kl=kl, tv=tv,
                                                                     source="recompute"))(LEARN, ROLL, KL, TV)
  np.testing.assert_allclose(m["bounds/delta"], 0.08, rtol=1e-6)
  np.testing.assert_allclose(m["bounds/kl_seq"], (0.11 + 0.04) / 2, rtol=1e-6)  # padding row not counted
  np.testing.assert_allclose(m["bounds/coupling"], 4 * 0.2 * (0 + 0.2 + 0.4), rtol=1e-6)
  assert m["bounds/plugin_valid"] == 1 and m["bounds/T"] == 3 and "bounds/dbar" not in m
  # Sampled: k3 = rho - 1 - log rho and tv_est = |rho - 1| / 2 stand in: rho = 2 gives k3 = 1 - log 2.
  s = certificate.certificate_metrics(LEARN, ROLL, MASK, source="sampled")
  np.testing.assert_allclose(s["bounds/delta"], 1 - math.log(2), rtol=1e-5)
  np.testing.assert_allclose(s["bounds/eps"], 0.5, rtol=1e-5)
  k3 = [1 - math.log(2), -0.5 - math.log(0.5), 0.0, 0.5 - math.log(1.5), 0.0]
  np.testing.assert_allclose(s["bounds/kl_seq"], sum(k3) / 2, rtol=1e-5)
  assert s["bounds/plugin_valid"] == 0
  # top-k: the TV upper bound only; no KL-based statistic is logged.
  t = certificate.certificate_metrics(LEARN, ROLL, MASK, kl=KL, tv=TV, source="topk")
  assert "bounds/delta" not in t and "bounds/pinsker_marginal_kl" not in t and t["bounds/plugin_valid"] == 1
  # Reward range [-1, 1]: every bound doubles.
  w = certificate.certificate_metrics(LEARN, ROLL, MASK, kl=KL, tv=TV, source="stored", reward_range=(-1, 1))
  np.testing.assert_allclose(w["bounds/unified"], 2 * m["bounds/unified"], rtol=1e-6)


def test_post_update_metrics_hand_values():
  rewards = jnp.array([1.0, 0.5, 7.0])  # the padding row's reward must not count
  seq_mask = jnp.array([0.0, 1.0, 1.0])
  m = certificate.post_update_metrics(LEARN, ROLL, rewards, MASK, seq_mask, kl=KL, tv=TV, source="recompute")
  per_row = np.array([1.0 * (1 + -0.5 + 0), 0.5 * (0.5 + 0)])  # R_i sum_t (rho_t - 1)
  np.testing.assert_allclose(m["bounds/post/surrogate"], per_row.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["bounds/post/surrogate_se"], per_row.std(ddof=1) / math.sqrt(2), rtol=1e-5)
  assert m["bounds/post/num_sequences"] == 2 and m["bounds/accepted/num_sequences"] == 1
  pre = bounds.certificate(KL, TV, MASK)
  np.testing.assert_allclose(m["bounds/post/unified"], pre["unified"], rtol=1e-6)
  np.testing.assert_allclose(m["bounds/certified_improvement"], per_row.mean() - float(pre["unified"]), rtol=1e-5)
  # Accepted: row 1 only (delta 0.04, T = 2), surrogate 0.25.
  acc = bounds.certificate(KL, TV, MASK * jnp.array([0.0, 1.0, 0.0])[:, None])
  np.testing.assert_allclose(m["bounds/accepted/delta"], 0.04, rtol=1e-6)
  np.testing.assert_allclose(m["bounds/accepted/selected_margin"], 0.25 - float(acc["unified"]), rtol=1e-5)
  assert m["bounds/accepted/surrogate_se"] == 0.0
  wide = certificate.post_update_metrics(LEARN, ROLL, rewards, MASK, seq_mask, kl=KL, tv=TV, source="recompute",
                                         reward_range=(-2.0, 3.0))
  np.testing.assert_allclose(wide["bounds/certified_improvement"], per_row.mean() - 5 * float(pre["unified"]),
                             rtol=1e-5)


def _selected_instance():
  """A uniform-rollout policy pair (every response once: the batch is the exact expectation) with rewards
  that make J go DOWN, and the mask that keeps the rows whose R_i sum_t (rho_t - 1) > 0 (a selection that,
  like TRM's, is correlated with the surrogate)."""
  rng = np.random.default_rng(5)
  V, T = 2, 5
  for scale, _ in itertools.product((0.01, 0.03, 0.1), range(20)):
    roll, theta = _tables(rng, V, T, scale, False, uniform_rollout=True)
    rewards = rng.uniform(size=V ** T)
    ref = _enumerate(roll, theta, V, T, rewards)
    if ref["gain"] > 0:  # L'_{1-R} = -L'_R: flip the rewards so the true objective falls
      rewards = 1.0 - rewards
      ref = _enumerate(roll, theta, V, T, rewards)
    if ref["gain"] < 0:
      return ref
  raise AssertionError("no instance")


def test_only_certified_metrics_are_lower_bounds_on_the_gain():
  """Every metric named *certified* must be <= J(theta) - J(roll) when the statistics are exact. The
  accepted-row margin is positive here while J falls: under its old name
  (bounds/accepted/certified_improvement) this test fails; the whole-batch certificate passes."""
  ref = _selected_instance()
  log_rho = jnp.asarray(np.log(ref["rho"]), jnp.float32)
  per_row = ref["rewards"] * (ref["rho"] - 1.0).sum(-1)
  seq_mask = jnp.asarray(per_row > 0, jnp.float32)
  m = certificate.post_update_metrics(log_rho, jnp.zeros_like(log_rho), jnp.asarray(ref["rewards"], jnp.float32),
                                      jnp.ones_like(log_rho), seq_mask, kl=jnp.asarray(ref["ctx_kl"], jnp.float32),
                                      tv=jnp.asarray(ref["ctx_tv"], jnp.float32), source="recompute")
  np.testing.assert_allclose(m["bounds/post/surrogate"], ref["surrogate"], rtol=1e-4, atol=1e-7)
  assert float(m["bounds/accepted/selected_margin"]) > 0 > ref["gain"]  # the selection bias, shown
  certified = {k: v for k, v in m.items() if "certified" in k}
  assert certified
  for k, v in certified.items():
    assert float(v) <= ref["gain"] + 1e-6, (k, float(v), ref["gain"])
