"""Sampler: processed log-probs, logp == learner recomputation, cached == full kernel, EOS, determinism."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_models
from trm_jax.models import LEARNER, Numerics
from trm_jax.rollout import processed_logprobs, sample, sample_groups, sampler, sequence_inputs
from trm_jax.rollout.sampler import clip_frac

V, P, T = 32, 6, 12


def build(kind):
  return tiny_models.build(kind, vocab=V)


@pytest.fixture(scope="module")
def dense():
  return build("dense")


@pytest.fixture(scope="module")
def moe():
  return build("moe")


@pytest.fixture(scope="module")
def prompts():
  lengths = jnp.array([6, 2, 4, 1, 5, 3, 6, 2])
  mask = jnp.arange(P)[None] >= (P - lengths)[:, None]
  tok = jax.random.randint(jax.random.key(0), (len(lengths), P), 3, V)
  return jnp.where(mask, tok, 0), mask


@functools.partial(jax.jit, static_argnums=(0, 6))
def _recompute(graphdef, params, prompt, prompt_mask, response, response_mask, numerics=LEARNER):
  """The learner's view: a full forward over prompt + response; logits predicting each response token."""
  tokens, positions, valid = sequence_inputs(prompt, prompt_mask, response, response_mask)
  model = nnx.merge(graphdef, params)
  h, _, aux = model.hidden(tokens, positions, valid, numerics=numerics)
  return model.unembed(h[:, P - 1:P - 1 + T], numerics=numerics), aux.get("routes")


def recompute(graphdef, params, prompt, prompt_mask, out, temperature=1.0, top_p=1.0, top_k=0,
              numerics=LEARNER):
  """(processed log-probs of the sampled tokens [B,T], raw logits [B,T,V], routes) as the learner sees them."""
  logits, routes = _recompute(graphdef, params, prompt, prompt_mask, out.tokens, out.mask, numerics)
  lp = processed_logprobs(logits, temperature, top_p, top_k)
  return jnp.take_along_axis(lp, out.tokens[..., None], axis=-1)[..., 0], logits, routes


# ----------------------------------------------------------------------------- processed_logprobs


def test_processed_logprobs_hand_computed():
  logits = jnp.array([0.0, 1.0, 2.0, 3.0])
  np.testing.assert_allclose(processed_logprobs(logits), jax.nn.log_softmax(logits), rtol=1e-6)
  np.testing.assert_allclose(processed_logprobs(logits, temperature=2.0),
                             jax.nn.log_softmax(logits / 2), rtol=1e-6)
  # top_k=2 keeps {2, 3}: p = softmax([2, 3]).
  p = np.exp(processed_logprobs(logits, top_k=2))
  np.testing.assert_allclose(p, [0, 0, 1 / (1 + np.e), np.e / (1 + np.e)], rtol=1e-6)
  # softmax = [.032, .087, .237, .644]: top_p=0.7 keeps {3, 2}; top_p=0.6 keeps {3} alone.
  p = np.exp(processed_logprobs(logits, top_p=0.7))
  np.testing.assert_allclose(p, [0, 0, 1 / (1 + np.e), np.e / (1 + np.e)], rtol=1e-6)
  np.testing.assert_allclose(np.exp(processed_logprobs(logits, top_p=0.6)), [0, 0, 0, 1])
  # top_k first (keeps {1,2,3}, renormalised), then top_p on the renormalised mass.
  q = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()  # [.090, .245, .665]
  p = np.exp(processed_logprobs(logits, top_k=3, top_p=0.9))
  np.testing.assert_allclose(p, [0, 0, q[1] / (q[1] + q[2]), q[2] / (q[1] + q[2])], rtol=1e-6)
  with pytest.raises(ValueError, match="temperature"):
    processed_logprobs(logits, temperature=0.0)


# ----------------------------------------------------------------------------- sampler


# Each setting is one compiled sampler; the other tests reuse the first (temperature 0.7).
@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 1.0, 0), (1.0, 1.0, 5), (1.3, 0.8, 0)])
def test_logp_equals_recomputation(dense, prompts, temperature, top_p, top_k):
  g, params = dense
  settings = dict(temperature=temperature, top_p=top_p, top_k=top_k)
  out = sample(g, params, *prompts, jax.random.key(1), max_new_tokens=T, **settings)
  logp, _, _ = recompute(g, params, *prompts, out, temperature, top_p, top_k)
  m = out.mask > 0
  assert out.tokens.shape == out.logp.shape == out.mask.shape == (8, T)
  assert bool(jnp.all(jnp.isfinite(out.logp)))
  np.testing.assert_allclose(out.logp[m], logp[m], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(out.logp[~m], 0.0)
  if top_k:
    # Every sampled token is inside the top-k of the learner's recomputed logits.
    _, logits, _ = recompute(g, params, *prompts, out)
    kth = jax.lax.top_k(logits, top_k)[0][..., -1]
    assert bool(jnp.all(jnp.take_along_axis(logits, out.tokens[..., None], -1)[..., 0][m] >= kth[m]))


def reference_probs(logits, temperature, top_p=1.0, top_k=0, *, drop_last_kept=False):
  """float64 sampling distribution written from its definition, by hand (no trm_jax code).

  p = softmax(logits / temperature) over the top_k most likely tokens (0 = all), then over the nucleus:
  sorted descending, a token is kept iff the mass strictly before it is < top_p; renormalised each time.
  drop_last_kept: the broken variant that keeps one nucleus token too few (only to show the test's power).
  """
  x = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-x, kind="stable")
  assert np.all(np.diff(x[order]) < -1e-6), "ties would make the kept set ambiguous; pick other logits"
  p = np.zeros_like(x)
  top = order[:top_k or len(x)]
  p[top] = np.exp(x[top] - x[top].max())
  p /= p.sum()
  if top_p < 1.0:
    before = np.cumsum(p[order]) - p[order]
    assert np.min(np.abs(before - top_p)) > 1e-3, "the nucleus edge is too close to top_p for float32"
    kept = order[before < top_p][:-1 if drop_last_kept else None]
    p = np.where(np.isin(np.arange(len(x)), kept), p, 0.0)
    p /= p.sum()
  return p


# 4 prompts x G draws of the first response token per setting; each token's count must lie in its exact binomial
# [1e-7, 1 - 1e-7] quantile range (false alarm < 2e-7 per token, < 1e-4 over all 2 x 4 x 32 counts; the seed is
# fixed, so the outcome is reproducible), and truncated tokens are never drawn.
DRAWS_PER_PROMPT = 16384
ALPHA = 1e-7


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 1.0, 0), (1.3, 0.8, 12)])
def test_sampled_frequencies_match_the_softmax(dense, temperature, top_p, top_k):
  # Catches breaks of the shared processing or of the draw itself, which the logp == recomputation test cannot
  # see (both sides go through processed_logprobs): temperature applied twice or not at all, top-p keeping one
  # token too few (`csum < top_p` instead of `csum - p < top_p`) or too many, top-k off by one, top-k applied
  # after top-p, sampling from the raw instead of the processed logits. The asserts on `broken` below check that
  # the bounds are tight enough to reject the first two for these logits.
  from scipy import stats
  g, params = dense
  G = DRAWS_PER_PROMPT
  prompt = jax.random.randint(jax.random.key(3), (4, P), 3, V)
  out = sample_groups(g, params, prompt, jnp.ones((4, P), bool), jax.random.key(5), group_size=G, max_new_tokens=1,
                      temperature=temperature, top_p=top_p, top_k=top_k, eos_id=-1, return_logits=True, loop="scan")
  logits = np.asarray(out.logits[:, 0]).reshape(4, G, V)
  tokens = np.asarray(out.tokens[:, 0]).reshape(4, G)
  for i in range(4):
    np.testing.assert_array_equal(logits[i], np.broadcast_to(logits[i, 0], (G, V)))  # one distribution per prompt
    p = reference_probs(logits[i, 0], temperature, top_p, top_k)
    counts = np.bincount(tokens[i], minlength=V)
    lo, hi = stats.binom.ppf(ALPHA, G, p), stats.binom.isf(ALPHA, G, p)
    np.testing.assert_array_equal(counts[p == 0], 0)
    assert np.all((counts >= lo) & (counts <= hi)), (i, counts, np.round(G * p, 1))
    broken = [reference_probs(logits[i, 0], temperature ** 2, top_p, top_k)]
    if top_p < 1.0:
      broken.append(reference_probs(logits[i, 0], temperature, top_p, top_k, drop_last_kept=True))
    for q in broken:  # the expected counts of a broken sampler fall outside the bounds for some token
      assert np.any((G * q < lo) | (G * q > hi))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_full_and_cached_kernels_agree(kind, prompts, request):
  g, params = request.getfixturevalue(kind)
  kw = dict(max_new_tokens=T, temperature=0.9, return_logits=True, topk=4)
  cached = sample(g, params, *prompts, jax.random.key(2), kernel="cached", **kw)
  full = sample(g, params, *prompts, jax.random.key(2), kernel="full", **kw)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_array_equal(cached.mask, full.mask)
  np.testing.assert_allclose(cached.logp, full.logp, atol=1e-5)
  np.testing.assert_allclose(cached.logits, full.logits, atol=1e-5)
  # Stored rollout logits are the raw logits; top-k are those of the processed distribution.
  lp = processed_logprobs(cached.logits, 0.9)
  vals, ids = jax.lax.top_k(lp, 4)
  np.testing.assert_allclose(cached.topk_logp, vals, atol=1e-6)
  np.testing.assert_array_equal(cached.topk_ids, ids)
  _, logits, routes = recompute(g, params, *prompts, cached)
  m = cached.mask > 0
  np.testing.assert_allclose(cached.logits[m], logits[m], atol=1e-5)
  if kind == "moe":
    assert cached.routes.shape == (2, 8, T, 2)
    np.testing.assert_array_equal(cached.routes, full.routes)
    live = jnp.broadcast_to(m, cached.routes.shape[:-1])
    np.testing.assert_array_equal(cached.routes[live], routes[:, :, P:][live])
  else:
    assert cached.routes is None and full.routes is None


def test_eos_and_mask(dense, prompts):
  g, params = dense
  rng = jax.random.key(4)
  kw = dict(max_new_tokens=T, temperature=0.7)
  free = sample(g, params, *prompts, rng, eos_id=-1, pad_id=0, **kw)  # -1 never sampled
  np.testing.assert_array_equal(free.mask, 1.0)
  eos = int(free.tokens[0, 3])  # a token that certainly occurs, so at least row 0 stops early
  out = sample(g, params, *prompts, rng, eos_id=eos, pad_id=0, **kw)
  n_stopped = 0
  for i in range(free.tokens.shape[0]):
    hits = np.flatnonzero(np.asarray(free.tokens[i]) == eos)
    e = int(hits[0]) if len(hits) else T - 1
    n_stopped += bool(len(hits)) and e < T - 1
    np.testing.assert_array_equal(out.tokens[i, :e + 1], free.tokens[i, :e + 1])
    np.testing.assert_array_equal(out.tokens[i, e + 1:], 0)
    np.testing.assert_array_equal(out.mask[i], (np.arange(T) <= e).astype(np.float32))
    np.testing.assert_array_equal(out.logp[i, e + 1:], 0.0)
    np.testing.assert_allclose(out.logp[i, :e + 1], free.logp[i, :e + 1], atol=1e-6)
  assert n_stopped >= 1


def test_deterministic_given_rng(dense, prompts):
  g, params = dense
  kw = dict(max_new_tokens=T, temperature=0.7)
  a = sample(g, params, *prompts, jax.random.key(5), **kw)
  b = sample(g, params, *prompts, jax.random.key(5), **kw)
  c = sample(g, params, *prompts, jax.random.key(6), **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logp, b.logp)
  assert float(jnp.mean(a.tokens != c.tokens)) > 0.5


@pytest.mark.parametrize("kind,numerics", [("moe", LEARNER),
                                            ("dense", Numerics(dtype="bfloat16", attention="alt_order"))])
def test_sample_groups_share_prefill(kind, numerics, prompts, request):
  """One prefill per prompt, KV cache broadcast G times: same tokens / log-probs as G separate prefills."""
  g, params = request.getfixturevalue(kind)
  prompt, mask = prompts[0][:2], prompts[1][:2]
  kw = dict(max_new_tokens=T, temperature=0.7, numerics=numerics, return_logits=True)
  out = sample_groups(g, params, prompt, mask, jax.random.key(7), group_size=4, **kw)
  ref = sample(g, params, jnp.repeat(prompt, 4, 0), jnp.repeat(mask, 4, 0), jax.random.key(7), group_size=1,
               **kw)
  assert out.tokens.shape == (8, T)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.mask, ref.mask)
  np.testing.assert_allclose(out.logp, ref.logp, atol=1e-5)
  m = out.mask > 0
  np.testing.assert_allclose(out.logits[m], ref.logits[m], atol=1e-4)
  if kind == "moe":
    live = jnp.broadcast_to(m, out.routes.shape[:-1])
    np.testing.assert_array_equal(out.routes[live], ref.routes[live])
  # The G samples of one prompt differ from each other.
  assert len({tuple(np.asarray(r)) for r in out.tokens[:4]}) == 4


def test_group_size_must_divide_batch(dense, prompts):
  g, params = dense
  with pytest.raises(ValueError, match="group_size"):
    sample(g, params, *prompts, jax.random.key(0), max_new_tokens=T, group_size=3)


# ----------------------------------------------------------------------------- decoding to real lengths


def _first_stop(tokens, stop_ids):
  """Index of the first stop id in a free-running row, or None (computed with numpy, independently)."""
  hits = np.flatnonzero(np.isin(np.asarray(tokens), stop_ids))
  return int(hits[0]) if len(hits) else None


@pytest.mark.parametrize("kind,kernel", [("moe", "cached"), ("dense", "full")])
def test_while_loop_matches_scan(kind, kernel, prompts, request):
  """The early-exit while loop gives the fixed-length scan's tokens, mask, log-probs, logits and routes."""
  g, params = request.getfixturevalue(kind)
  rng = jax.random.key(11)
  kw = dict(max_new_tokens=T, temperature=0.7, kernel=kernel, return_logits=True, topk=3)
  free = sample(g, params, *prompts, rng, eos_id=[-1, -1], loop="scan", **kw)  # same program as `scan`
  stops = [int(free.tokens[0, 2]), int(free.tokens[1, 1])]
  scan = sample(g, params, *prompts, rng, eos_id=stops, loop="scan", **kw)
  loop = sample(g, params, *prompts, rng, eos_id=stops, loop="while", **kw)
  np.testing.assert_array_equal(loop.tokens, scan.tokens)
  np.testing.assert_array_equal(loop.mask, scan.mask)
  np.testing.assert_array_equal(loop.logp, scan.logp)
  np.testing.assert_array_equal(loop.clipped, scan.clipped)
  m = np.asarray(loop.mask) > 0
  np.testing.assert_array_equal(np.asarray(loop.logits)[m], np.asarray(scan.logits)[m])
  np.testing.assert_array_equal(np.asarray(loop.topk_ids)[m], np.asarray(scan.topk_ids)[m])
  if kind == "moe":
    live = np.broadcast_to(m, loop.routes.shape[:-1])
    np.testing.assert_array_equal(np.asarray(loop.routes)[live], np.asarray(scan.routes)[live])


def test_stop_ids_and_clip_frac(dense, prompts):
  """Any of several stop ids ends a row; rows without one are `clipped`; the loop exits when all stopped."""
  g, params = dense
  rng = jax.random.key(12)
  kw = dict(max_new_tokens=T, temperature=0.7, return_logits=True)
  free = sample(g, params, *prompts, rng, eos_id=[-1, -1], **kw)
  np.testing.assert_array_equal(free.clipped, True)
  assert float(clip_frac(free)) == 1.0
  stops = [int(free.tokens[0, 5]), int(free.tokens[3, 2])]
  out = sample(g, params, *prompts, rng, eos_id=stops, **kw)
  ends = [_first_stop(r, stops) for r in free.tokens]
  for i, e in enumerate(ends):
    n = T if e is None else e + 1
    np.testing.assert_array_equal(out.tokens[i, :n], free.tokens[i, :n])
    np.testing.assert_array_equal(out.tokens[i, n:], 0)
    np.testing.assert_array_equal(out.mask[i], (np.arange(T) < n).astype(np.float32))
  np.testing.assert_array_equal(out.clipped, [e is None for e in ends])
  assert float(clip_frac(out)) == pytest.approx(np.mean([e is None for e in ends]))
  # Once every row has stopped the loop exits: no logits are computed after the last stop.
  if all(e is not None for e in ends):
    last = max(ends)
    assert last < T - 1
    np.testing.assert_array_equal(out.logits[:, last + 1:], 0.0)
    assert bool(jnp.all(jnp.any(out.logits[:, :last + 1] != 0, axis=-1)))


def test_all_rows_stop_at_once_exits_early(dense, prompts):
  """Every id is a stop id: one token per row, then the loop ends (logits after step 0 never computed)."""
  g, params = dense
  out = sample(g, params, *prompts, jax.random.key(13), max_new_tokens=T, eos_id=list(range(V)),
               return_logits=True)
  np.testing.assert_array_equal(out.mask[:, 0], 1.0)
  np.testing.assert_array_equal(out.mask[:, 1:], 0.0)
  np.testing.assert_array_equal(out.clipped, False)
  assert bool(jnp.all(jnp.any(out.logits[:, 0] != 0, axis=-1)))
  np.testing.assert_array_equal(out.logits[:, 1:], 0.0)


def test_compiles_once_per_shape(dense, prompts):
  """New keys and new stop ids (same count) reuse the compiled program."""
  g, params = dense
  kw = dict(max_new_tokens=T, temperature=0.7, return_logits=True)
  sample(g, params, *prompts, jax.random.key(0), eos_id=[3, 4], **kw)
  n = sampler._sample_jit._cache_size()
  sample(g, params, *prompts, jax.random.key(1), eos_id=[5, 6], **kw)
  sample(g, params, *prompts, jax.random.key(2), eos_id=[7, 8], pad_id=1, **kw)
  assert sampler._sample_jit._cache_size() == n


def test_bad_arguments(dense, prompts):
  g, params = dense
  with pytest.raises(ValueError, match="kernel"):
    sample(g, params, *prompts, jax.random.key(0), max_new_tokens=T, kernel="paged")
  with pytest.raises(ValueError, match="top_p"):
    sample(g, params, *prompts, jax.random.key(0), max_new_tokens=T, top_p=0.0)
  with pytest.raises(ValueError, match="max_len"):
    sample(g, params, *prompts, jax.random.key(0), max_new_tokens=64)
