"""Continuous batching (rollout.slots) == the static batch: tokens, log-probs, logits, top-k, routes, stops.

The static sampler (slots=0, every row decoded together) is the reference; the continuous sampler decodes
the same responses a few at a time in S slots, refilling a slot when its row stops. Lengths vary because a
stop id that the model emits often is chosen from a free-running sample.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_models
from trm_jax.rollout import sample, sample_groups

V, P, T = 32, 6, 12


@pytest.fixture(scope="module")
def dense():
  return tiny_models.build("dense", vocab=V)


@pytest.fixture(scope="module")
def moe():
  return tiny_models.build("moe", vocab=V)


@pytest.fixture(scope="module")
def prompts():
  lengths = jnp.array([6, 2, 4, 1])
  mask = jnp.arange(P)[None] >= (P - lengths)[:, None]
  tok = jax.random.randint(jax.random.key(0), (len(lengths), P), 3, V)
  return jnp.where(mask, tok, 0), mask


def _frequent_token(model, prompts, kw):
  """A token the model samples often (free-running, no stop): as a stop id it ends rows at varied lengths."""
  free = sample_groups(*model, *prompts, jax.random.key(1), group_size=3, eos_id=-1, **kw)
  return int(np.bincount(np.asarray(free.tokens).ravel(), minlength=V).argmax())


def assert_same(a, b, moe: bool):
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_array_equal(a.clipped, b.clipped)
  np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)
  m = np.asarray(a.mask) > 0
  np.testing.assert_allclose(np.asarray(a.logits)[m], np.asarray(b.logits)[m], atol=1e-5)
  np.testing.assert_allclose(np.asarray(a.topk_logp)[m], np.asarray(b.topk_logp)[m], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(a.topk_ids)[m], np.asarray(b.topk_ids)[m])
  if moe:
    live = np.broadcast_to(m, a.routes.shape[:-1])
    np.testing.assert_array_equal(np.asarray(a.routes)[live], np.asarray(b.routes)[live])


@pytest.mark.parametrize("kind,settings", [("dense", dict(temperature=0.9, top_p=0.8)),
                                           ("moe", dict(temperature=1.1, top_k=8))])
def test_continuous_equals_static(kind, settings, prompts, request):
  model = request.getfixturevalue(kind)
  kw = dict(max_new_tokens=T, return_logits=True, topk=3, **settings)
  eos = _frequent_token(model, prompts, kw)
  static = sample_groups(*model, *prompts, jax.random.key(2), group_size=3, eos_id=eos, **kw)
  lengths = np.asarray(static.mask).sum(1)
  # The case is a real test: rows stop at different lengths, some early, some run to T.
  assert len(set(lengths.tolist())) >= 3 and lengths.min() < T // 2 and np.asarray(static.clipped).any()
  for slots in (1, 5):
    cont = sample_groups(*model, *prompts, jax.random.key(2), group_size=3, eos_id=eos, slots=slots, **kw)
    assert_same(cont, static, kind == "moe")


def test_slices_keyed_by_global_row(dense, prompts):
  """first_row: a slice of rows sampled alone gives the rows the whole batch gives (rollout.microbatches)."""
  kw = dict(max_new_tokens=T, temperature=1.0)
  whole = sample_groups(*dense, *prompts, jax.random.key(3), group_size=2, **kw)
  tail = sample_groups(*dense, prompts[0][2:], prompts[1][2:], jax.random.key(3), group_size=2, first_row=4,
                       slots=2, **kw)
  np.testing.assert_array_equal(tail.tokens, whole.tokens[4:])
  np.testing.assert_allclose(tail.logp, whole.logp[4:], atol=1e-5)


def test_slots_need_the_cached_while_kernel(dense, prompts):
  with pytest.raises(ValueError, match="slots"):
    sample(*dense, *prompts, jax.random.key(0), max_new_tokens=T, slots=2, kernel="full")
  with pytest.raises(ValueError, match="slots"):
    sample(*dense, *prompts, jax.random.key(0), max_new_tokens=T, slots=2, loop="scan")


def test_inverse_cdf_matches_a_float64_search():
  """One uniform per row, two-level search == numpy's search of the float64 CDF (V not a block multiple,
  masked tokens, a row with one token left)."""
  from trm_jax.rollout.sampling import inverse_cdf
  rng = np.random.default_rng(0)
  B, Vb = 64, 700
  logits = rng.normal(size=(B, Vb)) * 3
  logits[rng.random((B, Vb)) < 0.3] = -np.inf
  logits[0, :] = -np.inf
  logits[0, 650] = 0.0
  lp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  u = rng.random(B).astype(np.float32)
  got = np.asarray(inverse_cdf(lp, jnp.asarray(u), block=64))
  p = np.exp(np.asarray(lp, np.float64))
  cum = np.cumsum(p, axis=1)
  want = np.array([np.searchsorted(cum[i], u[i] * cum[i, -1], side="right") for i in range(B)])
  near = np.array([np.min(np.abs(cum[i] - u[i] * cum[i, -1])) < 1e-5 for i in range(B)])
  assert got[0] == 650 and np.all(p[np.arange(B), got] > 0)
  np.testing.assert_array_equal(got[~near], want[~near])
  assert (~near).sum() > 50
