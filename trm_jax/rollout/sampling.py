"""The sampling distribution (temperature, top-k, top-p), shared by the sampler and the learner.

pi_roll in the paper is the distribution the rollout engine actually samples from, so the rollout
log-probs and the learner's recomputation of pi_roll must both go through `processed_logprobs`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_sampling_args(temperature: float, top_p: float, top_k: int) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")


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
  check_sampling_args(temperature, top_p, top_k)
  x = logits.astype(jnp.float32)
  if temperature != 1.0:
    x = x / temperature
  V = x.shape[-1]
  if 0 < top_k < V:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x >= kth, x, -jnp.inf)
  if top_p < 1.0:
    srt = jnp.sort(x, axis=-1)[..., ::-1]
    p = jax.nn.softmax(srt, axis=-1)
    mass_before = jnp.cumsum(p, axis=-1) - p
    # Keep a sorted token if the mass strictly before it is below top_p (the top-1 always stays).
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x >= threshold, x, -jnp.inf)
  return jax.nn.log_softmax(x, axis=-1)
