"""Top-p / top-k kept set without a full sort: the same nucleus as the full sort."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax.rollout import sampling


def _np_kept(x, top_p, top_k=0):
  """Reference kept set in float64 numpy by a full sort: top_k first, then the nucleus, ties kept."""
  x = np.asarray(x, np.float64)
  keep = np.isfinite(x)
  if 0 < top_k < x.shape[-1]:
    kth = np.sort(x, -1)[..., ::-1][..., top_k - 1:top_k]
    keep &= x >= kth
  xs = np.where(keep, x, -np.inf)
  if top_p < 1:
    srt = np.sort(xs, -1)[..., ::-1]
    p = np.exp(srt - srt[..., :1])
    p /= p.sum(-1, keepdims=True)
    before = np.cumsum(p, -1) - p
    thr = np.min(np.where(before < top_p, srt, np.inf), -1, keepdims=True)
    keep &= xs >= thr
  return keep


def _kept(x, top_p, top_k=0, widths=sampling.NUCLEUS_WIDTHS, per_row=False):
  fn = lambda x: sampling.processed_logits(x, 1.0, top_p, top_k)
  if widths != sampling.NUCLEUS_WIDTHS:
    def fn(x):
      x = sampling.processed_logits(x, 1.0, 1.0, top_k)
      return jnp.where(x >= sampling.nucleus_threshold(x, top_p, widths), x, -jnp.inf)
  x = jnp.asarray(x, jnp.float32)
  if per_row:  # vmap turns the cond into a per-row choice: each row's own window decides
    return np.isfinite(np.asarray(jax.jit(jax.vmap(fn))(x)))
  return np.isfinite(np.asarray(jax.jit(fn)(x)))  # one cond for the batch: the widest row decides


def _cases(V, seed=0):
  rng = np.random.default_rng(seed)
  rows = [rng.normal(0, s, V) for s in (0.1, 1.0, 3.0, 10.0, 30.0)]  # flat ... very peaked
  rows.append(np.zeros(V))  # perfectly flat: every token tied
  tied = rng.normal(0, 1, V)
  tied[np.argsort(-tied)[:40]] = 2.5  # a block of ties straddling the nucleus edge
  rows.append(tied)
  steps = np.repeat(np.arange(10.0, 0, -1), -(-V // 10))[:V]  # 10 tied plateaus
  rows.append(rng.permutation(steps))
  spike = rng.normal(0, 1, V)
  spike[7] = 40.0  # one token holds all the mass
  rows.append(spike)
  return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (0.99, 0), (0.95, 50)])
def test_nucleus_equals_full_sort(top_p, top_k):
  x = _cases(2000)
  ref = _np_kept(x, top_p, top_k)
  # default widths, narrow widths that force the fallback chain, and the full sort itself (width = V)
  for widths, per_row in ((sampling.NUCLEUS_WIDTHS, False), ((4, 16), True), ((), False)):
    got = _kept(x, top_p, top_k, widths, per_row)
    np.testing.assert_array_equal(got, ref, err_msg=f"widths={widths}")
  # float32 masses at a row's boundary can differ from float64 only on a knife edge; these cases have none
  assert ref[5].all() and ref[-1].sum() == 1


def test_processed_logprobs_renormalise_over_the_nucleus_hand_computed():
  p = np.array([0.5, 0.3, 0.15, 0.05])
  lp = sampling.processed_logprobs(jnp.log(jnp.asarray(p, jnp.float32)), top_p=0.7)
  np.testing.assert_allclose(np.exp(lp), [0.625, 0.375, 0, 0], rtol=1e-6)
  lp = sampling.processed_logprobs(jnp.log(jnp.asarray(p, jnp.float32)), top_p=0.81)
  np.testing.assert_allclose(np.exp(lp), np.array([0.5, 0.3, 0.15, 0]) / 0.95, rtol=1e-6)


def test_top_p_does_not_sort_the_vocabulary_on_the_common_path():
  """The top-level program uses lax.top_k and a cond; a full sort exists only inside the fallback branch."""
  x = jnp.zeros((2, 151936), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda x: sampling.processed_logprobs(x, 0.8, 0.9))(x).jaxpr
  top = {str(e.primitive) for e in jaxpr.eqns}
  assert "sort" not in top and "top_k" in top and "cond" in top, top
