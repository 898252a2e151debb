"""Per-position divergences between the rollout and learner policies (paper Sec. 1 and 3).

Exact divergences use the FULL vocabulary distribution at each context c_t:
  KL(c_t)         = KL(pi_roll(.|c_t) || pi_theta(.|c_t))  (the paper's direction, "kl")
  KL_reverse(c_t) = KL(pi_theta(.|c_t) || pi_roll(.|c_t))
  TV(c_t)         = 1/2 sum_v |pi_theta(v|c_t) - pi_roll(v|c_t)|
Sampled estimators use only the sampled token y_t ~ pi_roll and log rho_t = log pi_theta - log pi_roll.

All functions are pure, jit/vmap safe and compute in float32. Leading axes broadcast; T is the last
axis of every per-position output, V the last axis of every logits / log-prob input.
"""
from typing import Optional

import chex
import jax
import jax.numpy as jnp

Array = chex.Array

# exp() of a float32 log ratio overflows above ~88; 20 keeps rho in [2e-9, 4.9e8], far outside any
# threshold a mask would use, while keeping rho - 1 - log rho finite.
LOG_RATIO_CLIP = 20.0


def _mask_or_ones(mask: Optional[Array], shape) -> Array:
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.broadcast_to(jnp.asarray(mask, jnp.float32), shape)


def _xlogy_ratio(p: Array, logp: Array, logq: Array) -> Array:
  """p * (logp - logq) with the convention 0 * log(0 / q) = 0 (p = 0 may carry logp = -inf)."""
  return jnp.where(p > 0, p * (logp - jnp.where(p > 0, logq, 0.0)), 0.0)


def entropy(logp: Array) -> Array:
  """Entropy of a distribution given by log-probs over the last axis: H = -sum_v p_v log p_v.

  Args:
    logp: [..., V] normalised log-probabilities (-inf allowed for zero-probability entries).

  Returns:
    [...] float32 entropy, >= 0.
  """
  logp = jnp.asarray(logp, jnp.float32)
  p = jnp.exp(logp)
  h = -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, logp, 0.0), 0.0), axis=-1)
  return jnp.maximum(h, 0.0)


def divergences_from_logprobs(rollout_logp: Array, learner_logp: Array) -> dict:
  """KL(roll||theta), KL(theta||roll) and TV over the last (vocabulary) axis.

  kl = sum_v p_roll (log p_roll - log p_theta); kl_reverse = sum_v p_theta (log p_theta - log p_roll);
  tv = 1/2 sum_v |p_theta - p_roll| (paper Sec. 1). Tiny negative values from float rounding are
  clamped to 0 and tv to [0, 1].

  Args:
    rollout_logp: [..., V] normalised log-probs of pi_roll.
    learner_logp: [..., V] normalised log-probs of pi_theta.

  Returns:
    dict of [...] float32 arrays: kl, kl_reverse, tv.
  """
  rollout_logp = jnp.asarray(rollout_logp, jnp.float32)
  learner_logp = jnp.asarray(learner_logp, jnp.float32)
  p_roll = jnp.exp(rollout_logp)
  p_theta = jnp.exp(learner_logp)
  kl = jnp.sum(_xlogy_ratio(p_roll, rollout_logp, learner_logp), axis=-1)
  kl_reverse = jnp.sum(_xlogy_ratio(p_theta, learner_logp, rollout_logp), axis=-1)
  tv = 0.5 * jnp.sum(jnp.abs(p_theta - p_roll), axis=-1)
  return dict(kl=jnp.maximum(kl, 0.0), kl_reverse=jnp.maximum(kl_reverse, 0.0),
              tv=jnp.clip(tv, 0.0, 1.0))


def _divergences_from_logits(rollout_logits: Array, learner_logits: Array) -> dict:
  # log_softmax in float32 even for bf16 logits: the divergences are differences of nearly equal
  # numbers and bf16 (8 mantissa bits) would drown them.
  return divergences_from_logprobs(
      jax.nn.log_softmax(jnp.asarray(rollout_logits, jnp.float32), axis=-1),
      jax.nn.log_softmax(jnp.asarray(learner_logits, jnp.float32), axis=-1))


def exact_divergences(rollout_logits: Array, learner_logits: Array, mask: Optional[Array] = None,
                      *, chunk_size: Optional[int] = None) -> dict:
  """Exact per-position KL(roll||theta), KL(theta||roll) and TV from full-vocabulary logits.

  The exact TRM criterion of Algorithm 1 (paper Sec. 3): divergences of the full next-token
  distributions at every context c_t, not of the sampled token.

  Args:
    rollout_logits: [..., T, V] logits of pi_roll (any float dtype).
    learner_logits: [..., T, V] logits of pi_theta (any float dtype).
    mask: optional [..., T]; positions with mask 0 return 0.
    chunk_size: if given, compute over T in chunks of this many positions (T padded to a multiple),
      so at most one [..., chunk_size, V] set of float32 temporaries is live. Same result.

  Returns:
    dict with kl, kl_reverse, tv, each [..., T] float32.
  """
  chex.assert_equal_shape([rollout_logits, learner_logits])
  if rollout_logits.ndim < 2:
    raise ValueError(f"logits need shape [..., T, V], got {rollout_logits.shape}")
  T = rollout_logits.shape[-2]
  if chunk_size is None or chunk_size >= T:
    out = _divergences_from_logits(rollout_logits, learner_logits)
  else:
    n_chunks = -(-T // chunk_size)
    pad = n_chunks * chunk_size - T
    if pad:
      widths = [(0, 0)] * (rollout_logits.ndim - 2) + [(0, pad), (0, 0)]
      rollout_logits = jnp.pad(rollout_logits, widths)
      learner_logits = jnp.pad(learner_logits, widths)

    def one_chunk(i):
      # dynamic slices of the inputs (no transposed copy); the f32 softmax temporaries are per chunk.
      sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk_size, chunk_size, axis=-2)
      return _divergences_from_logits(sl(rollout_logits), sl(learner_logits))

    stacked = jax.lax.map(one_chunk, jnp.arange(n_chunks))  # each [n_chunks, ..., chunk]

    def unchunk(x):
      x = jnp.moveaxis(x, 0, -2)
      return x.reshape(x.shape[:-2] + (n_chunks * chunk_size,))[..., :T]

    out = {k: unchunk(v) for k, v in stacked.items()}
  m = _mask_or_ones(mask, out["kl"].shape)
  return {k: jnp.where(m > 0, v, 0.0) for k, v in out.items()}


def topk_divergences(rollout_topk_logp: Array, rollout_topk_ids: Array, learner_logits: Array,
                     mask: Optional[Array] = None) -> dict:
  """Divergences when the rollout engine returned only its top-k log-probs (bounds, not exact).

  Let S be the k returned token ids at a position, tail_roll = 1 - sum_{v in S} p_roll(v) and
  tail_theta = 1 - sum_{v in S} p_theta(v) (the learner's mass outside S, exact from its full logits).
  The terms over S are exact; the unseen tail is handled as follows.

  TV = 1/2 sum_S |p_theta - p_roll| + 1/2 sum_tail |p_theta - p_roll|, and the tail term satisfies
    1/2 |tail_roll - tail_theta|  <=  tail term  <=  1/2 (tail_roll + tail_theta)   (triangle inequality).
  `tv` is the UPPER bound (valid for certificates and masks: TRM-Max on it never accepts a sequence the
  exact criterion would reject); `tv_lower` the lower bound. Both are exact when the tail is empty.

  KL(roll||theta): `kl_lower` = sum_S p_roll log(p_roll/p_theta) + tail_roll log(tail_roll/tail_theta).
  Grouping the tail into one outcome cannot increase KL (log-sum / data-processing inequality), so this is
  a LOWER bound of the exact KL; it is exact when k = V or when pi_theta is proportional to pi_roll on the
  tail. No upper bound exists without assumptions on the tail: pi_theta may put arbitrarily little mass on
  a tail token that pi_roll samples, making the true KL arbitrarily large. `kl` is the same lower bound
  (the best available point value); a TRM-Max mask on it is a heuristic, not a certificate — use `tv`
  with the TV criterion when a guarantee is needed.

  Args:
    rollout_topk_logp: [..., T, K] rollout log-probs of the returned tokens (normalised over V).
    rollout_topk_ids: [..., T, K] int token ids (distinct per position).
    learner_logits: [..., T, V] learner logits.
    mask: optional [..., T]; masked positions return 0.

  Returns:
    dict of [..., T] float32: kl, kl_lower, tv, tv_lower, tail_roll, tail_learner.
  """
  chex.assert_equal_shape([rollout_topk_logp, rollout_topk_ids])
  r_logp = jnp.asarray(rollout_topk_logp, jnp.float32)
  learner_logp = jax.nn.log_softmax(jnp.asarray(learner_logits, jnp.float32), axis=-1)
  t_logp = jnp.take_along_axis(learner_logp, rollout_topk_ids, axis=-1)
  p_r, p_t = jnp.exp(r_logp), jnp.exp(t_logp)
  tail_r = jnp.clip(1.0 - jnp.sum(p_r, -1), 0.0, 1.0)
  tail_t = jnp.clip(1.0 - jnp.sum(p_t, -1), 0.0, 1.0)
  # Rounding leaves ~1e-7 of "tail" even when k = V; treat it as empty so k = V is exact.
  tiny = 1e-6
  tail_r = jnp.where(tail_r < tiny, 0.0, tail_r)
  tail_t = jnp.where(tail_t < tiny, 0.0, tail_t)

  tv_seen = 0.5 * jnp.sum(jnp.abs(p_t - p_r), -1)
  tv_upper = jnp.clip(tv_seen + 0.5 * (tail_r + tail_t), 0.0, 1.0)
  tv_lower = jnp.clip(tv_seen + 0.5 * jnp.abs(tail_r - tail_t), 0.0, 1.0)

  kl_seen = jnp.sum(_xlogy_ratio(p_r, r_logp, t_logp), -1)
  safe_t = jnp.where(tail_t > 0, tail_t, 1.0)
  safe_r = jnp.where(tail_r > 0, tail_r, 1.0)
  kl_tail = jnp.where(tail_r > 0,
                      jnp.where(tail_t > 0, tail_r * (jnp.log(safe_r) - jnp.log(safe_t)), jnp.inf),
                      0.0)
  kl_lower = jnp.maximum(kl_seen + kl_tail, 0.0)

  m = _mask_or_ones(mask, tv_seen.shape)
  out = dict(kl=kl_lower, kl_lower=kl_lower, tv=tv_upper, tv_lower=tv_lower, tail_roll=tail_r,
             tail_learner=tail_t)
  return {k: jnp.where(m > 0, v, 0.0) for k, v in out.items()}


def sampled_estimators(learner_logp: Array, rollout_logp: Array, mask: Optional[Array] = None) -> dict:
  """Sampled-token divergence estimators at each position (paper Sec. 3, sample-based fallback).

  With log rho = log pi_theta(y_t|c_t) - log pi_roll(y_t|c_t) and y_t ~ pi_roll:
    k1 = -log rho                (E_roll[k1] = KL(roll||theta), can be negative per sample)
    k2 = 1/2 (log rho)^2         (symmetric under rho <-> 1/rho; the max-filter outlier detector)
    k3 = rho - 1 - log rho       (E_roll[k3] = KL(roll||theta), >= 0; the average filter)
    abs_log_ratio = |log rho|
    tv_est = 1/2 |rho - 1|       (E_roll[tv_est] = TV(c_t) exactly)
  rho = exp(clip(log rho, -20, 20)) so it never overflows; k3 uses the same clipped log rho so it stays
  >= 0. k1, k2 and |log rho| use the unclipped log ratio. Masked positions return 0 (their inputs may
  be arbitrary, including -inf).

  Args:
    learner_logp: [..., T] log pi_theta of the sampled tokens.
    rollout_logp: [..., T] log pi_roll of the sampled tokens.
    mask: optional [..., T].

  Returns:
    dict of [..., T] float32: k1, k2, k3, abs_log_ratio, tv_est.
  """
  chex.assert_equal_shape([learner_logp, rollout_logp])
  learner_logp = jnp.asarray(learner_logp, jnp.float32)
  rollout_logp = jnp.asarray(rollout_logp, jnp.float32)
  m = _mask_or_ones(mask, learner_logp.shape)
  log_rho = jnp.where(m > 0, learner_logp - rollout_logp, 0.0)
  clipped = jnp.clip(log_rho, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
  rho = jnp.exp(clipped)
  out = dict(k1=-log_rho, k2=0.5 * jnp.square(log_rho),
             k3=jnp.maximum(rho - 1.0 - clipped, 0.0), abs_log_ratio=jnp.abs(log_rho),
             tv_est=0.5 * jnp.abs(rho - 1.0))
  return {k: jnp.where(m > 0, v, 0.0) for k, v in out.items()}


def seq_sum(x: Array, mask: Array) -> Array:
  """sum_t mask_t x_t over the last axis. Args: x, mask [..., T]. Returns [...]."""
  m = jnp.asarray(mask, jnp.float32)
  return jnp.sum(jnp.where(m > 0, jnp.asarray(x, jnp.float32) * m, 0.0), axis=-1)


def seq_mean(x: Array, mask: Array) -> Array:
  """(1/T_i) sum_t mask_t x_t with T_i = sum_t mask_t; 0 for an empty sequence (no NaN).

  Args: x, mask [..., T]. Returns [...].
  """
  n = jnp.sum(jnp.asarray(mask, jnp.float32), axis=-1)
  return seq_sum(x, mask) / jnp.maximum(n, 1.0)


def seq_max(x: Array, mask: Array) -> Array:
  """max over valid positions of the last axis; 0 for an empty sequence.

  Args: x, mask [..., T]. Returns [...].
  """
  valid = jnp.asarray(mask, jnp.float32) > 0
  m = jnp.max(jnp.where(valid, jnp.asarray(x, jnp.float32), -jnp.inf), axis=-1)
  return jnp.where(jnp.any(valid, axis=-1), m, 0.0)


def per_seq_log_ppl_gap(learner_logp: Array, rollout_logp: Array, mask: Array) -> Array:
  """|(1/T_i) sum_t (log pi_theta - log pi_roll)| per sequence (paper Sec. 4). Returns [...]."""
  chex.assert_equal_shape([learner_logp, rollout_logp])
  diff = jnp.asarray(learner_logp, jnp.float32) - jnp.asarray(rollout_logp, jnp.float32)
  return jnp.abs(seq_mean(diff, mask))


def log_ppl_gap(learner_logp: Array, rollout_logp: Array, mask: Array) -> Array:
  """Delta_PPL = (1/N) sum_i |(1/T_i) sum_t log pi_theta - (1/T_i) sum_t log pi_roll| (paper Sec. 4).

  N counts the sequences with at least one valid token (empty rows are padding); 0 if there are none.

  Args:
    learner_logp, rollout_logp, mask: [..., T]; every leading axis is averaged over.

  Returns:
    scalar float32.
  """
  gap = per_seq_log_ppl_gap(learner_logp, rollout_logp, mask)
  has = (jnp.sum(jnp.asarray(mask, jnp.float32), -1) > 0).astype(jnp.float32)
  return jnp.sum(gap * has) / jnp.maximum(jnp.sum(has), 1.0)
