"""Chunked learner statistics (trm_jax.logprobs): one pass per chunk, kept-set semantics, equivalences."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import logprobs as lp
from trm_jax.models import LEARNER

B, T, D, V = 2, 6, 8, 24


class _Unembed:
  """The one method token_stats uses: unembed(h, numerics) -> logits (h @ W)."""

  def __init__(self, w):
    self.w = w

  def unembed(self, h, *, numerics):
    del numerics
    return jnp.einsum("...d,dv->...v", h, self.w)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  h = rng.normal(0, 1, (B, T, D)).astype(np.float32)
  w = rng.normal(0, 1.0, (D, V)).astype(np.float32)
  w2 = (w + rng.normal(0, 0.05, (D, V))).astype(np.float32)
  tok = rng.integers(0, V, (B, T)).astype(np.int32)
  return h, w, w2, tok


def _np_logsoftmax(x):
  x = np.asarray(x, np.float64)
  m = np.max(np.where(np.isfinite(x), x, -np.inf), -1, keepdims=True)
  z = x - m
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_ref(a, b, tok, temperature):
  """float64 reference: learner logp / entropy / rollout logp / divergences without truncation."""
  la, lb = _np_logsoftmax(a / temperature), _np_logsoftmax(b / temperature)
  p, q = np.exp(la), np.exp(lb)
  g = lambda x: np.take_along_axis(x, tok[..., None], -1)[..., 0]
  return dict(learner_logp=g(lb), rollout_logp_recomputed=g(la), entropy=-(q * lb).sum(-1),
              kl=(p * (la - lb)).sum(-1), kl_reverse=(q * (lb - la)).sum(-1), tv=0.5 * np.abs(p - q).sum(-1))


def _stats(h, w, w2, tok, sampling, chunk, side="stored", jit=True, grad_logp=False):
  def fn(h, w, w2, tok):
    roll = ("stored", h @ w2) if side == "stored" else ("recompute", _Unembed(w2), h, LEARNER)
    return lp.token_stats(_Unembed(w), h, tok, learner_numerics=LEARNER, sampling=sampling, chunk=chunk,
                          rollout_side=roll, grad_logp=grad_logp)
  return (jax.jit(fn) if jit else fn)(h, w, w2, tok)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_stats_match_float64(data, temperature):
  h, w, w2, tok = data
  out = _stats(h, w, w2, tok, (temperature, 1.0, 0), chunk=4)
  ref = _np_ref(h.astype(np.float64) @ w2, h.astype(np.float64) @ w, tok, temperature)
  for k, v in ref.items():
    np.testing.assert_allclose(np.asarray(out[k]), v, rtol=2e-4, atol=1e-6, err_msg=k)


def test_jit_eager_chunked_unchunked_and_sources_agree(data):
  h, w, w2, tok = data
  s = (1.0, 0.9, 5)
  base = _stats(h, w, w2, tok, s, chunk=4)  # chunked (T = 6 = 4 + 2 padded), jitted
  for kw in (dict(chunk=T, jit=False), dict(chunk=4, side="recompute")):  # unchunked eager; other source
    out = _stats(h, w, w2, tok, s, **kw)
    for k in base:
      np.testing.assert_allclose(np.asarray(out[k]), np.asarray(base[k]), rtol=1e-5, atol=1e-7, err_msg=f"{k} {kw}")


@pytest.mark.parametrize("sampling", [(1.0, 0.7, 0), (1.3, 0.9, 6)])
def test_identical_policies_with_truncation_give_zero_divergence_and_ratio_one(data, sampling):
  """The learner on the rollout's kept set. Old code: KL 0.08, kl_reverse inf here."""
  h, w, _, tok = data
  tok = np.where(np.arange(T) % 2 == 0, np.argmax(h @ w, -1), tok).astype(np.int32)  # some surely kept
  out = _stats(h, w, w, tok, sampling, chunk=4)
  for k in ("kl", "kl_reverse", "tv"):
    assert np.all(np.asarray(out[k]) == 0.0), k
  kept_tok = np.isfinite(np.asarray(out["rollout_logp_recomputed"]))
  assert kept_tok.any()
  np.testing.assert_array_equal(np.asarray(out["learner_logp"])[kept_tok],
                                np.asarray(out["rollout_logp_recomputed"])[kept_tok])  # ratio exactly 1


def test_kept_set_hand_computed():
  """V = 4, top_p = 0.7: rollout (0.5, 0.3, 0.15, 0.05) keeps {0, 1} -> (0.625, 0.375); learner
  (0.4, 0.4, 0.1, 0.1) renormalised over {0, 1} -> (0.5, 0.5)."""
  h = jnp.eye(4, dtype=jnp.float32)[None, :1]  # one position, h = e_0, so logits = W[0]
  w_roll = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] + [[0.25] * 4] * 3, jnp.float32))
  w_learn = jnp.log(jnp.array([[0.4, 0.4, 0.1, 0.1]] + [[0.25] * 4] * 3, jnp.float32))
  tok = jnp.array([[1]], jnp.int32)
  out = lp.token_stats(_Unembed(w_learn), h, tok, learner_numerics=LEARNER, sampling=(1.0, 0.7, 0), chunk=1,
                       rollout_side=("recompute", _Unembed(w_roll), h, LEARNER))
  p, q = np.array([0.625, 0.375]), np.array([0.5, 0.5])
  expect = dict(kl=(p * np.log(p / q)).sum(), kl_reverse=(q * np.log(q / p)).sum(), tv=0.125,
                learner_logp=math.log(0.5), rollout_logp_recomputed=math.log(0.375), entropy=math.log(2))
  for k, v in expect.items():
    np.testing.assert_allclose(float(out[k][0, 0]), v, rtol=1e-5, err_msg=k)
  # the gradient of the learner log-prob is that of log softmax over the kept set: onehot - q_kept
  g = jax.grad(lambda wl: lp.token_logp(_Unembed(wl), h, tok, numerics=LEARNER, temperature=1.0, chunk=1,
                                        top_p=0.7, rollout_side=("recompute", _Unembed(w_roll), h, LEARNER))[0].sum())
  np.testing.assert_allclose(np.asarray(g(w_learn))[0], [-0.5, 0.5, 0.0, 0.0], atol=1e-6)


def test_no_rollout_distribution_uses_the_learners_own_kept_set(data):
  """source = sampled: renormalised over the learner's own nucleus (= the rollout's when they agree)."""
  from trm_jax.rollout.sampling import processed_logprobs
  h, w, _, tok = data
  tok = np.where(np.arange(T) % 2 == 0, np.argmax(h @ w, -1), tok).astype(np.int32)  # some surely kept
  out = lp.token_stats(_Unembed(w), h, tok, learner_numerics=LEARNER, sampling=(0.9, 0.8, 0), chunk=4)
  ref = jnp.take_along_axis(processed_logprobs(h @ w, 0.9, 0.8, 0), tok[..., None], -1)[..., 0]
  kept = np.isfinite(np.asarray(ref))
  assert kept.any() and not kept.all()
  np.testing.assert_allclose(np.asarray(out["learner_logp"])[kept], np.asarray(ref)[kept], rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(np.asarray(out["learner_logp"])))  # outside the nucleus: finite b_tok - lse_kept


def test_exact_chunk_uses_one_exp_pass_per_side():
  """2 exp passes over [.., V] for learner logp + entropy + KL + reverse KL + TV (was 4+)."""
  a = jnp.zeros((2, 3, 4096), jnp.float32)
  tok = jnp.zeros((2, 3), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda a, b: lp.exact_chunk(a, b, tok, (1.0, 1.0, 0)))(a, a).jaxpr

  def eqns(jx):  # every equation, inside nested jit / custom_jvp calls too
    for e in jx.eqns:
      yield e
      for v in e.params.values():
        sub = getattr(v, "jaxpr", v)
        if hasattr(sub, "eqns"):
          yield from eqns(sub)

  big = [str(e.primitive) for e in eqns(jaxpr) if str(e.primitive) in ("exp", "exp2", "expm1", "log", "log1p")
         and e.outvars[0].aval.shape[-1:] == (4096,)]
  assert big == ["exp", "exp"], big


def test_default_chunk_rule():
  # explicit learner.chunk_size wins; without rows / vocab: min(T, 128) (the historic default)
  assert lp.default_chunk(512, 48, rows=8, vocab=32768) == 48
  assert lp.default_chunk(512, 0) == 128 and lp.default_chunk(40, 0) == 40
  # small chunks of logits stay at min(T, 128): 64 rows x 64 x V 512 = 2.1M <= 4.2M elements
  assert lp.default_chunk(64, 0, rows=64, vocab=512) == 64
  # B 8, V 32768: 8 x 128 x 32768 = 33.6M > 4.2M; the largest power of two that fits is 16 (8 x 16 x 32768
  # = 4.2M), and 8 x 16 = 128 rows already meet the matmul floor
  assert lp.default_chunk(128, 0, rows=8, vocab=32768) == 16
  # B 2, V 32000: fits at 65 -> 64; floor 64 -> 64
  assert lp.default_chunk(512, 0, rows=2, vocab=32000) == 64
  # B 2, V 151936: fits at 13 -> 8, but 2 x 8 rows is below the floor of 128: 64
  assert lp.default_chunk(512, 0, rows=2, vocab=151936) == 64
  # never above min(T, 128)
  assert lp.default_chunk(8, 0, rows=1, vocab=10 ** 6) == 8


def test_default_chunk_counts_rows_per_device():
  from trm_jax import sharding as sharding_lib
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    # 32 rows over data x fsdp = 4 -> 8 per device: as B 8 on one device
    assert lp.default_chunk(128, 0, rows=32, vocab=32768) == 16


def test_logits_remat_rule():
  # always / never as named, whatever the size and learner.remat
  assert lp.logits_remat("always", "none", 1, 1, 1) and not lp.logits_remat("never", "full", 64, 4096, 10 ** 6)
  # auto: learner.remat none -> no recompute anywhere
  assert not lp.logits_remat("auto", "none", 64, 4096, 151936)
  # auto: 8 x 128 x 32768 = 2^25 logits: kept (the bench's peers shape); 9 rows exceed it: recomputed
  assert not lp.logits_remat("auto", "full", 8, 128, 32768)
  assert lp.logits_remat("auto", "full", 9, 128, 32768)
  # 2 x 512 x 32000 = 32.8M <= 33.6M kept; 2 x 512 x 151936 recomputed
  assert not lp.logits_remat("auto", "dots_saveable", 2, 512, 32000)
  assert lp.logits_remat("auto", "full", 2, 512, 151936)
  with pytest.raises(ValueError, match="learner.logits_remat"):
    lp.logits_remat("sometimes", "full", 1, 1, 1)


def test_logits_remat_counts_rows_per_device():
  from trm_jax import sharding as sharding_lib
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    # 32 rows over data x fsdp = 4 -> 8 per device: 2^25 logits, kept; 36 -> 9 per device: recomputed
    assert not lp.logits_remat("auto", "full", 32, 128, 32768)
    assert lp.logits_remat("auto", "full", 36, 128, 32768)


@pytest.mark.parametrize("sampling", [(1.0, 1.0, 0), (0.8, 0.9, 5)])
def test_chunk_logit_recompute_gives_the_same_gradient(data, sampling):
  """The backward with each chunk's logits recomputed (remat) and with them kept: the same gradient of the
  learner log-probs w.r.t. h and W (float32), and only the remat version has a checkpoint in its jaxpr."""
  h, w, w2, tok = data
  ct = np.random.default_rng(1).normal(0, 1, (B, T)).astype(np.float32)

  def loss(h, w, remat):
    logp, ent = lp.token_logp(_Unembed(w), h, tok, numerics=LEARNER, temperature=sampling[0], chunk=4,
                              remat=remat, top_p=sampling[1], top_k=sampling[2], rollout_side=("stored", h @ w2))
    return jnp.sum(logp * ct)

  grads = {r: jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(h, w, r) for r in (True, False)}
  for a, b in zip(grads[True], grads[False]):
    assert np.abs(np.asarray(a)).max() > 0
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  jaxpr = lambda r: str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(h, w, r))
  assert "remat" in jaxpr(True) and "remat" not in jaxpr(False)
