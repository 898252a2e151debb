"""The sampling distribution (temperature, top-k, top-p), shared by the sampler and the learner.

pi_roll in the paper is the distribution the rollout engine actually samples from, so the rollout
log-probs and the learner's recomputation of pi_roll must both go through `processed_logits` /
`processed_logprobs`. Its support, the KEPT SET (top-k / nucleus), is a function of the rollout logits at
a position; the learner rebuilds it from the recomputed or stored rollout logits and renormalises its
own distribution over it (trm_jax/logprobs.py), the "keep sampling mask" semantics of vLLM / prime-rl.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Top-p looks for the nucleus among the top-W tokens (lax.top_k, O(V log W)) for W in this order and
# sorts the whole vocabulary only if the W most likely tokens hold less than top_p of the mass.
NUCLEUS_WIDTHS = (64, 1024)


def check_sampling_args(temperature: float, top_p: float, top_k: int) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")


def is_truncated(top_p: float, top_k: int) -> bool:
  """Whether top_p / top_k remove tokens (the distribution sampled from is then a truncation)."""
  return top_p < 1.0 or top_k > 0


def _nucleus_threshold(x: jax.Array, top_p: float, width: int):
  """(threshold [..., 1], fits [...]) of the top-p nucleus, looking only at the `width` largest logits.

  Sorted descending, token i is kept iff the mass strictly before it is < top_p; threshold = the
  smallest kept logit. fits: the window holds >= top_p of the mass, so no token outside it is kept and
  the threshold equals the full sort's (width = V is the full sort).
  """
  vals = jax.lax.top_k(x, width)[0]  # sorted descending; ties give equal values whatever their order
  lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
  p = jnp.exp(vals - lse)
  csum = jnp.cumsum(p, axis=-1)
  keep = csum - p < top_p  # the top-1 always stays
  threshold = jnp.min(jnp.where(keep, vals, jnp.inf), axis=-1, keepdims=True)
  fits = jnp.all(csum[..., -1] >= top_p) if width < x.shape[-1] else jnp.bool_(True)
  return threshold, fits


def nucleus_threshold(x: jax.Array, top_p: float, widths=NUCLEUS_WIDTHS) -> jax.Array:
  """The smallest logit kept by top-p, [..., 1], without sorting the vocabulary when avoidable.

  Tries a top-W prefilter for each W in `widths` (lax.cond: the next, wider one runs only if some row's
  nucleus does not fit) and falls back to the full sort. Every branch applies the same rule to the same
  sorted values, so the kept set is exactly the full sort's (tests/test_sampling.py).

  Args:
    x: [..., V] float32 logits (after temperature and top-k; -inf = excluded).
    top_p: in (0, 1).
  """
  V = x.shape[-1]
  widths = [w for w in widths if w < V]

  def attempt(i):
    if i == len(widths):
      return _nucleus_threshold(x, top_p, V)[0]
    threshold, fits = _nucleus_threshold(x, top_p, widths[i])
    return jax.lax.cond(fits, lambda: threshold, lambda: attempt(i + 1))

  return attempt(0)


def processed_logits(logits: jax.Array, temperature: float = 1.0, top_p: float = 1.0,
                     top_k: int = 0) -> jax.Array:
  """Logits [..., V] float32 of the distribution sampled from: logits / temperature, -inf outside the kept set.

  Kept set: the top_k tokens (0 = off), then the smallest set of most likely tokens whose mass reaches
  top_p (1 = off). Tokens tied with the last kept value are kept. The sampling settings are Python numbers
  (static under jit).
  """
  check_sampling_args(temperature, top_p, top_k)
  x = logits.astype(jnp.float32)
  if temperature != 1.0:
    x = x / temperature
  V = x.shape[-1]
  if 0 < top_k < V:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x >= kth, x, -jnp.inf)
  if top_p < 1.0:
    x = jnp.where(x >= nucleus_threshold(x, top_p), x, -jnp.inf)
  return x


def processed_logprobs(logits: jax.Array, temperature: float = 1.0, top_p: float = 1.0,
                       top_k: int = 0) -> jax.Array:
  """Log-probs [..., V] float32 of the distribution sampled from.

  p ∝ softmax(logits / temperature), truncated to the top_k tokens (0 = off), then to the smallest
  set of most likely tokens whose mass reaches top_p (1 = off), renormalised. Tokens tied with the
  last kept value are kept. Truncated tokens get -inf (use `jnp.where` before multiplying by p).
  temperature 1, top_p 1, top_k 0 is plain `log_softmax`. The sampling settings are Python numbers
  (static under jit).

  Args:
    logits: [..., V] raw logits (any float dtype).
    temperature: > 0.
    top_p: in (0, 1].
    top_k: >= 0.
  """
  return jax.nn.log_softmax(processed_logits(logits, temperature, top_p, top_k), axis=-1)


# Inverse-CDF sampling searches the vocabulary in blocks of this many tokens: block masses, then one block.
CDF_BLOCK = 256


def _first_above(cum: jax.Array, target: jax.Array, mass: jax.Array) -> jax.Array:
  """Index of the first entry of the running sum `cum` [B,N] above `target` [B], never one with zero
  `mass` (a rounding guard: with u < 1 the search cannot run past the last token that has mass)."""
  i = jnp.sum(cum <= target[:, None], axis=-1)
  last = cum.shape[-1] - 1 - jnp.argmax((mass > 0)[:, ::-1], axis=-1)
  return jnp.minimum(i, last).astype(jnp.int32)


def inverse_cdf(logprobs: jax.Array, u: jax.Array, block: int = CDF_BLOCK) -> jax.Array:
  """Token ids [B] int32 drawn from exp(logprobs) [B,V] with ONE uniform u [B] in [0, 1) per row.

  token = min{j : sum_{i<=j} p_i > u * sum_i p_i}: the inverse of the CDF, found in two levels (the block
  whose running mass passes the target, then the token inside it), so the work is O(V) plus two prefix
  sums of ~sqrt(V) entries, and the random bits are one word per row instead of one per vocabulary entry
  (Gumbel-max, `jax.random.categorical`). Tokens with probability 0 (top-k / top-p) are never drawn.
  """
  B, V = logprobs.shape
  nb = -(-V // block)
  p = jnp.exp(logprobs.astype(jnp.float32))
  p = jnp.pad(p, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)
  mass = jnp.sum(p, axis=-1)  # [B, nb]
  cum = jnp.cumsum(mass, axis=-1)
  target = u * cum[:, -1]
  blk = _first_above(cum, target, mass)
  before = jnp.where(blk > 0, jnp.take_along_axis(cum, jnp.maximum(blk - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
  pb = jnp.take_along_axis(p, blk[:, None, None], axis=1)[:, 0]  # [B, block]
  inner = _first_above(jnp.cumsum(pb, axis=-1), target - before, pb)
  return blk * block + inner
