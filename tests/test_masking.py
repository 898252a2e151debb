"""Masks and weights: hand-computed acceptance for every criterion, statistics, dispatch, stop-gradient."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import divergence, masking

# Three sequences: lengths 3, 2 and an empty (padding) row.
MASK = jnp.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], jnp.float32)
# Row 0 has rho = (1.5, 0.8, 3.0); row 1 rho = (1, 1.1); row 2 garbage (-inf) that must be ignored.
ROLL = jnp.log(jnp.array([[0.2, 0.5, 0.1], [0.3, 0.5, 0.5], [0.1, 0.1, 0.1]]))
LEARN = jnp.log(jnp.array([[0.3, 0.4, 0.3], [0.3, 0.55, 0.9], [0.0, 0.0, 0.0]]))


def _np(x):
  return np.asarray(x)


def test_trm_max_avg_and_combined():
  div = jnp.array([[0.01, 0.2, 0.03], [0.01, 0.02, 0.5], [9.0, 9.0, 9.0]])
  c = masking.trm_max(div, MASK, 0.05)
  np.testing.assert_array_equal(c.seq_mask, [0, 1, 1])  # 0.5 on row 1 is masked out
  np.testing.assert_array_equal(c.token_weight, [[0, 0, 0], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_allclose(c.stats["accept_rate"], 0.5)  # empty row not counted
  np.testing.assert_allclose(c.stats["token_accept_rate"], 2 / 5)
  c = masking.trm_avg(div, MASK, 0.05)  # means 0.08, 0.015
  np.testing.assert_array_equal(c.seq_mask, [0, 1, 1])
  c = masking.trm_avg(div, MASK, 0.1)
  np.testing.assert_array_equal(c.seq_mask, [1, 1, 1])
  # Combined: row 0 passes max (0.04 <= 0.05) but fails avg (0.03 > 0.02); row 1 fails max, passes
  # avg; row 2 passes both.
  d_max = jnp.array([[0.04, 0.0, 0.0], [0.1, 0.0, 0.0], [0.01, 0.0, 0.0]])
  d_avg = jnp.array([[0.03, 0.03, 0.03], [0.01, 0.01, 0.0], [0.01, 0.01, 0.01]])
  full = jnp.ones_like(MASK)
  np.testing.assert_array_equal(masking.trm_max(d_max, full, 0.05).seq_mask, [1, 0, 1])
  np.testing.assert_array_equal(masking.trm_avg(d_avg, full, 0.02).seq_mask, [0, 1, 1])
  np.testing.assert_array_equal(masking.trm_max_avg(d_max, d_avg, full, 0.05, 0.02).seq_mask, [0, 0, 1])


def test_ln_trm_and_ser_hand_values():
  # Row 0, T = 3, delta = 0.02, eps = 0.3: w = (min(1, .6, .1414), min(1, .3, .1), 0), Z = .2414;
  # |rho - 1| = (.5, .2, 2): W = .5 * .1414 + .2 * .1 = .0907; W / Z = .3757 (the last token is free).
  wz = (0.5 * math.sqrt(0.02) + 0.2 * 0.1) / (math.sqrt(0.02) + 0.1)
  # Row 1, T = 2: w = (min(1, .3, .1), 0): W / Z = |1 - 1| = 0.
  c = masking.ln_trm(LEARN, ROLL, MASK, 0.02, 0.3, wz + 1e-3)
  np.testing.assert_array_equal(c.seq_mask, [1, 1, 1])
  np.testing.assert_allclose(c.stats["ln_score_mean"], wz / 3, rtol=1e-5)
  c = masking.ln_trm(LEARN, ROLL, MASK, 0.02, 0.3, wz - 1e-3)
  np.testing.assert_array_equal(c.seq_mask, [0, 1, 1])
  # SER: (1/T) sum |rho - 1| = 0.9 for row 0, 0.05 for row 1.
  np.testing.assert_array_equal(masking.ser(LEARN, ROLL, MASK, 0.06).seq_mask, [0, 1, 1])
  np.testing.assert_array_equal(masking.ser(LEARN, ROLL, MASK, 0.04).seq_mask, [0, 0, 1])
  np.testing.assert_array_equal(masking.ser(LEARN, ROLL, MASK, 0.91).seq_mask, [1, 1, 1])


def test_baselines_hand_values():
  c = masking.token_tis(LEARN, ROLL, MASK, 2.0)
  np.testing.assert_allclose(c.token_weight, [[1.5, 0.8, 2.0], [1.0, 1.1, 0], [0, 0, 0]], rtol=1e-5)
  np.testing.assert_array_equal(c.seq_mask, [1, 1, 1])
  c = masking.token_mask(LEARN, ROLL, MASK, 0.9, 2.0)
  np.testing.assert_array_equal(c.token_weight, [[1, 0, 0], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_allclose(c.stats["token_accept_rate"], 3 / 5)
  c = masking.seq_tis(LEARN, ROLL, MASK, 2.0)  # prod rho = 3.6 -> capped 2; row 1: 1.1
  np.testing.assert_allclose(c.token_weight, [[2, 2, 2], [1.1, 1.1, 0], [0, 0, 0]], rtol=1e-5)
  c = masking.seq_tis(LEARN, ROLL, MASK, 5.0)
  np.testing.assert_allclose(c.token_weight[0], [3.6] * 3, rtol=1e-5)
  # geometric mean: 3.6^(1/3) = 1.5326, sqrt(1.1) = 1.0488.
  np.testing.assert_array_equal(masking.geo_mask(LEARN, ROLL, MASK, 0.5, 1.5).seq_mask, [0, 1, 1])
  np.testing.assert_array_equal(masking.geo_mask(LEARN, ROLL, MASK, 0.5, 1.6).seq_mask, [1, 1, 1])
  # (the empty row has geometric mean exp(0) = 1; it carries no tokens either way)
  c = masking.geo_mask(LEARN, ROLL, MASK, 1.05, 1.6)
  np.testing.assert_array_equal(c.seq_mask, [1, 0, 0])
  np.testing.assert_allclose(c.stats["accept_rate"], 0.5)
  c = masking.none(MASK)
  np.testing.assert_array_equal(c.token_weight, MASK)
  np.testing.assert_allclose(c.stats["accept_rate"], 1.0)
  for c in (masking.token_tis(LEARN, ROLL, MASK, 2.0), masking.seq_tis(LEARN, ROLL, MASK, 2.0)):
    assert np.all(np.isfinite(_np(c.token_weight)))


def test_accept_rate_by_length():
  out = masking.accept_rate_by_length(jnp.array([1.0, 0.0, 1.0, 1.0]), jnp.array([1, 3, 3, 0]),
                                      (1, 2, 4, 8))
  assert set(out) == {"len_1_2", "len_2_4", "len_4_8"}
  np.testing.assert_allclose([out["len_1_2"], out["len_2_4"], out["len_4_8"]], [1.0, 0.5, -1.0])
  c = masking.trm_max(jnp.zeros_like(MASK), MASK, 0.1, length_edges=(1, 3, 4))
  np.testing.assert_allclose(c.stats["accept_rate/len_1_3"], 1.0)
  np.testing.assert_allclose(c.stats["accept_rate/len_3_4"], 1.0)


def test_apply_correction_dispatch_matches_direct_calls():
  est = divergence.sampled_estimators(LEARN, ROLL, MASK)
  kw = dict(mask=MASK, learner_logp=LEARN, rollout_logp=ROLL)
  cases = [
      ("none", {}, masking.none(MASK)),
      ("max", dict(delta=0.05), masking.trm_max(est["k2"], MASK, 0.05)),
      ("avg", dict(delta_avg=0.01), masking.trm_avg(est["k3"], MASK, 0.01)),
      ("max_avg", dict(delta=0.5, delta_avg=0.01),
       masking.trm_max_avg(est["k2"], est["k3"], MASK, 0.5, 0.01)),
      ("tv", dict(eps=0.2), masking.trm_max(est["tv_est"], MASK, 0.2)),
      ("ln", dict(delta=0.02, eps=0.3, delta_w=0.3), masking.ln_trm(LEARN, ROLL, MASK, 0.02, 0.3, 0.3)),
      ("ser", dict(delta_ser=0.06), masking.ser(LEARN, ROLL, MASK, 0.06)),
      ("tis", dict(cap=2.0), masking.token_tis(LEARN, ROLL, MASK, 2.0)),
      ("token_mask", dict(low=0.9, high=2.0), masking.token_mask(LEARN, ROLL, MASK, 0.9, 2.0)),
      ("seq_is", dict(cap=2.0), masking.seq_tis(LEARN, ROLL, MASK, 2.0)),
      ("geo_mask", dict(low=0.5, high=1.5), masking.geo_mask(LEARN, ROLL, MASK, 0.5, 1.5)),
  ]
  assert {c[0] for c in cases} == set(masking.THRESHOLDS)
  for name, th, direct in cases:
    got = jax.jit(lambda: masking.apply_correction(name, **kw, **th))()
    np.testing.assert_allclose(got.token_weight, direct.token_weight, rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(got.seq_mask, direct.seq_mask, err_msg=name)
  # Exact divergences take precedence over the sampled fallback.
  div = jnp.array([[0.0, 0.0, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
  got = masking.apply_correction("max", **kw, div=div, delta=0.1)
  np.testing.assert_array_equal(got.seq_mask, [1, 0, 1])
  with pytest.raises(ValueError, match="unknown correction"):
    masking.apply_correction("clip", **kw)
  with pytest.raises(ValueError, match="missing"):
    masking.apply_correction("max_avg", **kw, delta=0.1)
  with pytest.raises(ValueError, match="unexpected"):
    masking.apply_correction("max", **kw, delta=0.1, cap=2.0)


def test_weights_are_stop_gradient():
  def total(lp):
    c = masking.apply_correction("tis", mask=MASK, learner_logp=lp, rollout_logp=ROLL, cap=2.0)
    return jnp.sum(c.token_weight) + jnp.sum(c.seq_mask)
  g = jax.grad(total)(LEARN)
  assert np.all(_np(g) == 0.0)


def test_proximal_weight_hand_values():
  """Decoupled PPO's untruncated rollout -> proximal IS weight pi_prox/pi_roll, 0 off the mask, finite on
  garbage (-inf) padding, stop-gradient."""
  w = masking.proximal_weight(LEARN, ROLL, MASK)
  np.testing.assert_allclose(w, [[1.5, 0.8, 3.0], [1.0, 1.1, 0], [0, 0, 0]], rtol=1e-5)
  g = jax.grad(lambda lp: masking.proximal_weight(lp, ROLL, MASK).sum())(LEARN)
  assert np.all(_np(g) == 0)
  assert set(masking.IS_BASELINES) == {"tis", "seq_is"}
