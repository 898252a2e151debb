"""Per-position divergences between the rollout and learner policies (paper Sec. 1 and 3).

Exact divergences use the FULL vocabulary distribution at each context c_t:
  KL(c_t)         = KL(pi_roll(.|c_t) || pi_theta(.|c_t))  (the paper's direction, "kl")
  KL_reverse(c_t) = KL(pi_theta(.|c_t) || pi_roll(.|c_t))
  TV(c_t)         = 1/2 sum_v |pi_theta(v|c_t) - pi_roll(v|c_t)|
Sampled estimators use only the sampled token y_t ~ pi_roll and log rho_t = log pi_theta - log pi_roll.

All functions are pure, jit/vmap safe and compute in float32. Leading axes broadcast; T is the last
axis of every per-position output, V the last axis of every logits / log-prob input.
"""
import functools
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from trm_jax.vocab_reduce import (_PHI_SMALL, _phi_over_x2, _weighted_phi, logsumexp_with_value,  # noqa: F401
                                  max_last, sum_last)

Array = chex.Array

# exp() of a float32 log ratio overflows above ~88; 20 keeps rho in [2e-9, 4.9e8], far outside any
# threshold a mask would use, while keeping rho - 1 - log rho finite.
LOG_RATIO_CLIP = 20.0

# trm.divergence / trm.divergence_avg names -> the key of `sampled_estimators` they select; "exact" (None)
# is the exact full-vocabulary KL(roll||theta) of `exact_divergences` (needs the rollout distribution).
DIVERGENCES = {"exact": None, "k1": "k1", "k2": "k2", "k3": "k3", "abs_log": "abs_log_ratio",
               "tv_est": "tv_est"}


def _mask_or_ones(mask: Optional[Array], shape) -> Array:
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.broadcast_to(jnp.asarray(mask, jnp.float32), shape)


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


# jit: one compiled program when called eagerly (many small ops otherwise); inlined inside an outer jit.
@functools.partial(jax.jit, static_argnames=("same_support",))
def divergences_from_logits(rollout_logits: Array, learner_logits: Array, *,
                            logit_diff: Optional[Array] = None, same_support: bool = False) -> dict:
  """KL(roll||theta), KL(theta||roll), TV and the learner's entropy from two sets of logits, one lse per side.

  With a = rollout logits, b = learner logits (both already divided by the temperature; -inf outside a
  policy's support), p = softmax(a), q = softmax(b), d = b - a, m = E_p[d], x = d - m (so E_p[x] = 0),
  phi(x) = e^x - 1 - x >= 0, F = E_p[phi(x)] and q_v = p_v e^{x_v} / (1 + F):
    KL(p||q)  = log E_p[e^x] = log1p(F)
    KL(q||p)  = E_q[d] - E_p[d] - KL(p||q) = E_p[x expm1(x)] / (1 + F) - log1p(F)
    TV(p, q)  = sum_v max(0, p_v - q_v) = sum_v max(0, p_v F - p_v expm1(x_v)) / (1 + F)
    H(q)      = lse(b) - E_q[b]
  Every sum has non-negative terms (x expm1(x) >= 0), phi and expm1 come from one Taylor polynomial for
  |x| < 1/2 and from p e^x = e_b e^{max_b - max_a - m} / S_a otherwise, so nothing cancels: float32 is
  within ~1e-5 relative of float64 down to per-token KL 1e-11 at V = 152k (tests/test_divergence.py),
  where sum p (log_softmax(a) - log_softmax(b)) carries the ~1e-6 absolute rounding error of the two
  log-sum-exps (7x off at KL 1.5e-6; the paper's KL-only regime uses delta = 1e-4, Sec. 1). TV is the same
  kind of sum of non-negative terms, split at the exact sign of p_v - q_v (x_v < log1p(F)), so it needs F
  from the pass before: float32 within 1e-6 relative of float64 at TV ~ 1e-7 on peaked logits at V = 152k
  (tests/test_divergence.py), where splitting at the plain estimate lse(b) - lse(a) - m misplaced the top
  token and lost the whole TV. Where the supports differ, or the shifted exponential overflows (KL >~ 80),
  the plain forms (lse differences) are used instead.

  Passes over V per position (XLA CPU fusions; sums of several terms are ONE variadic reduction):
    | pass | reads          | computes                                                | exp | log |
    | 1    | a, b           | max_a, max_b                                            | 0   | 0   |
    | 2    | a, b           | e_a = e^{a - max_a}, e_b = e^{b - max_b}                | 2   | 0   |
    | 3    | e_a, e_b, a, b | S_a, S_b, E_q[b], E_p[d], E_q[d] (m)                    | 0   | 0   |
    | 4    | e_a, e_b, a, b | F, E_p[x expm1 x], plain TV (needs m)                   | 0   | 0   |
    | 5    | e_a, e_b, a, b | TV = sum max(0, p F - p expm1 x) (needs F)              | 0   | 0   |
  plus O(1) exp / log per position, and in the backward pass of the learner log-prob one exp of b
  (softmax, `logsumexp_with_value`).

  Args:
    rollout_logits: [..., V] float32 (a).
    learner_logits: [..., V] float32 (b).
    logit_diff: optional [..., V] b - a computed more accurately by the caller (e.g. (b_raw - a_raw) / T
      before the temperature rounds a and b); used only where both are finite.
    same_support: the caller guarantees a and b are -inf at the same entries (e.g. the learner restricted
      to the rollout's kept set); skips the support comparison.

  Returns:
    dict of [...] float32: kl, kl_reverse, tv, entropy (of q), and learner_lse = lse(b), rollout_lse = lse(a)
    (the log-prob of token v is b_v - learner_lse; only learner_lse carries a gradient).
  """
  a = jnp.asarray(rollout_logits, jnp.float32)
  b_diff = jnp.asarray(learner_logits, jnp.float32)
  a, b = jax.lax.stop_gradient((a, b_diff))
  fa, fb = a > -jnp.inf, b > -jnp.inf
  both = fa & fb
  if logit_diff is None:
    d = jnp.where(both, b - a, 0.0)
  else:
    d = jnp.where(both, jax.lax.stop_gradient(jnp.asarray(logit_diff, jnp.float32)), 0.0)
  max_a, max_b = max_last(a, b)
  e_a, e_b = jnp.exp(a - max_a), jnp.exp(b - max_b)  # 0 outside the supports
  s_a, s_b, eb_b, ea_d, eb_d = sum_last(e_a, e_b, jnp.where(fb, e_b * (b - max_b), 0.0), e_a * d, e_b * d)
  lse_a, lse_b = max_a + jnp.log(s_a), max_b + jnp.log(s_b)
  out = {"learner_lse": logsumexp_with_value(b_diff, lse_b[..., 0]), "rollout_lse": lse_a[..., 0],
         "entropy": jnp.maximum(jnp.log(s_b) - eb_b / s_b, 0.0)[..., 0]}
  m = ea_d / s_a  # E_p[d] (over the common support)
  # Second loop (needs m): p = e_a / S_a, q = e_b / S_b reuse the exps of the first.
  gap = lse_b - lse_a  # log E_p[e^d] from the two lse: the plain form, rounding error ~1e-6
  x = d - m
  p, q = e_a / s_a, e_b / s_b
  c_x = jnp.exp(gap - m)  # p e^x = q c_x
  small = jnp.abs(x) < _PHI_SMALL
  # p phi(x) and p expm1(x): x^2 poly(x) for small x, else from q c_x (no cancellation either way).
  p_x = p * x
  big = q * c_x - p
  phi_t = jnp.where(both, jnp.where(small, p_x * x * _phi_over_x2(x), big - p_x), 0.0)
  expm1_t = jnp.where(both, jnp.where(small, p_x + phi_t, big), 0.0)
  terms = [phi_t, x * expm1_t, jnp.abs(p - q)]
  if not same_support:
    terms += [(fa & ~fb).astype(jnp.float32), (fb & ~fa).astype(jnp.float32)]
  sums = sum_last(*terms)
  f, s2 = sums[:2]
  tv_plain = 0.5 * sums[2]
  # TV = sum_v max(0, p_v - q_v) = sum_v max(0, p_v F - p_v expm1(x_v)) / (1 + F) (q = p e^x / (1 + F)): a
  # sum of non-negative terms, each split at the exact sign of p - q, which needs F (this pass is the fifth).
  # Splitting at the plain estimate lse(b) - lse(a) - m instead misplaces the top token of a peaked
  # distribution when TV ~ 1e-7..1e-6 (that form was off by 100% there).
  (tv_pos,) = sum_last(jnp.where(both, jnp.maximum(p * f - expm1_t, 0.0), 0.0))
  # KL(q||p) = E_q[d] - E_p[d] - KL(p||q), and E_q[d] - E_p[d] = sum_v (q_v - p_v) d_v = E_p[x expm1(x)] / (1 + F)
  # (q = p e^x / (1 + F), E_p[x] = 0): both terms >= 0, no cancellation beyond one bit.
  kl_acc = jnp.log1p(f)
  kl_r_acc = s2 / (1.0 + f) - kl_acc
  accurate = jnp.isfinite(f) & jnp.isfinite(s2)
  kl = jnp.where(accurate, kl_acc, gap - m)
  kl_r = jnp.where(accurate, kl_r_acc, eb_d / s_b - gap)
  tv = jnp.where(accurate, tv_pos / (1.0 + f), tv_plain)
  if not same_support:
    roll_only, learner_only = sums[3] > 0, sums[4] > 0  # KL(roll||theta) = inf, KL(theta||roll) = inf
    kl = jnp.where(roll_only, jnp.inf, jnp.where(learner_only, gap - m, kl))
    kl_r = jnp.where(learner_only, jnp.inf, jnp.where(roll_only, eb_d / s_b - gap, kl_r))
    tv = jnp.where(roll_only | learner_only, tv_plain, tv)
  out.update(kl=jnp.maximum(kl, 0.0)[..., 0], kl_reverse=jnp.maximum(kl_r, 0.0)[..., 0],
             tv=jnp.clip(tv, 0.0, 1.0)[..., 0])
  return out


def divergences_from_logprobs(rollout_logp: Array, learner_logp: Array) -> dict:
  """KL(roll||theta), KL(theta||roll) and TV over the last (vocabulary) axis from log-probs.

  kl = sum_v p_roll (log p_roll - log p_theta); kl_reverse = sum_v p_theta (log p_theta - log p_roll);
  tv = 1/2 sum_v |p_theta - p_roll| (paper Sec. 1), computed by `divergences_from_logits` (log-probs are
  logits; the accurate logit-difference form). -inf entries are outside a policy's support.

  Args:
    rollout_logp: [..., V] log-probs of pi_roll.
    learner_logp: [..., V] log-probs of pi_theta.

  Returns:
    dict of [...] float32 arrays: kl, kl_reverse, tv.
  """
  out = divergences_from_logits(rollout_logp, learner_logp)
  return {k: out[k] for k in ("kl", "kl_reverse", "tv")}


def exact_divergences(rollout_logits: Array, learner_logits: Array, mask: Optional[Array] = None,
                      *, chunk_size: Optional[int] = None) -> dict:
  """Exact per-position KL(roll||theta), KL(theta||roll) and TV from full-vocabulary logits.

  The exact TRM criterion of Algorithm 1 (paper Sec. 3): divergences of the full next-token
  distributions at every context c_t, not of the sampled token. Float32 internally (bf16 logits are
  upcast: the divergences are differences of nearly equal numbers); see `divergences_from_logits`.

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
  fn = lambda a, b: divergences_from_logprobs(a, b)  # logits are accepted as log-probs
  if chunk_size is None or chunk_size >= T:
    out = fn(rollout_logits, learner_logits)
  else:
    n_chunks = -(-T // chunk_size)
    pad = n_chunks * chunk_size - T
    if pad:
      widths = [(0, 0)] * (rollout_logits.ndim - 2) + [(0, pad), (0, 0)]
      rollout_logits = jnp.pad(rollout_logits, widths)
      learner_logits = jnp.pad(learner_logits, widths)

    def one_chunk(i):
      # dynamic slices of the inputs (no transposed copy); the f32 temporaries are per chunk.
      sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk_size, chunk_size, axis=-2)
      return fn(sl(rollout_logits), sl(learner_logits))

    stacked = jax.lax.map(one_chunk, jnp.arange(n_chunks))  # each [n_chunks, ..., chunk]

    def unchunk(x):
      x = jnp.moveaxis(x, 0, -2)
      return x.reshape(x.shape[:-2] + (n_chunks * chunk_size,))[..., :T]

    out = {k: unchunk(v) for k, v in stacked.items()}
  m = _mask_or_ones(mask, out["kl"].shape)
  return {k: jnp.where(m > 0, v, 0.0) for k, v in out.items()}


# Relative float32 rounding of 1 - sum_S p_roll, on top of the rollout engine's own normalisation error of
# its log-probs (~1e-6 at V = 152k): the bounds treat tail_roll as known to +- this.
_TAIL_ROLL_TOL = 2e-6


@jax.jit
def topk_divergences(rollout_topk_logp: Array, rollout_topk_ids: Array, learner_logits: Array,
                     mask: Optional[Array] = None) -> dict:
  """Divergences when the rollout engine returned only its top-k log-probs (bounds, not exact).

  Let S be the k returned token ids at a position, tail_roll = 1 - sum_{v in S} p_roll(v) and
  tail_theta = sum_{v not in S} p_theta(v) (the learner's mass outside S, exact from its full logits).
  The terms over S are exact; the unseen tail is handled as follows.

  TV = 1/2 sum_S |p_theta - p_roll| + 1/2 sum_tail |p_theta - p_roll|, and the tail term satisfies
    1/2 |tail_roll - tail_theta|  <=  tail term  <=  1/2 (tail_roll + tail_theta)   (triangle inequality).
  `tv` is the UPPER bound (valid for certificates and masks: TRM-Max on it never accepts a sequence the
  exact criterion would reject); `tv_lower` the lower bound. Both are exact when the tail is empty.

  KL(roll||theta): grouping the tail into one outcome cannot increase KL (data-processing inequality):
    KL >= sum_S p_roll phi(d_v) + g(tail_roll, tail_theta),  d_v = log p_theta(v) - log p_roll(v),
    phi(x) = e^x - 1 - x >= 0,  g(r, t) = t - r + r log(r / t) >= 0
  (the grouped KL written as a sum of non-negative terms, as in `divergences_from_logits`). tail_roll is
  only known to +-2e-6 (the engine's normalisation and float32 rounding of 1 - sum_S p), so `kl_lower` takes
  the minimum of the convex g over that interval: 0 when |tail_roll - tail_theta| is within it, never +inf
  unless the learner puts exactly no mass outside S while the rollout provably does. It is exact when
  k = V, and never exceeds the exact KL (tests/test_divergence.py checks random cases against float64).
  No upper bound exists without assumptions on the tail: pi_theta may put arbitrarily little mass on
  a tail token that pi_roll samples. `kl` is the same lower bound (the best available point value); a
  TRM-Max mask on it is a heuristic, not a certificate — use `tv` with the TV criterion for a guarantee.

  Args:
    rollout_topk_logp: [..., T, K] rollout log-probs of the returned tokens (normalised over V).
    rollout_topk_ids: [..., T, K] int token ids (distinct per position).
    learner_logits: [..., T, V] learner logits (-inf allowed outside its support).
    mask: optional [..., T]; masked positions return 0.

  Returns:
    dict of [..., T] float32: kl (= kl_lower), kl_lower, tv (upper bound), tv_lower, tail_roll, tail_learner.
  """
  chex.assert_equal_shape([rollout_topk_logp, rollout_topk_ids])
  r_logp = jnp.asarray(rollout_topk_logp, jnp.float32)
  ids = jnp.asarray(rollout_topk_ids)
  learner_logp = jax.nn.log_softmax(jnp.asarray(learner_logits, jnp.float32), axis=-1)
  t_logp = jnp.take_along_axis(learner_logp, ids, axis=-1)
  p_r, p_t = jnp.exp(r_logp), jnp.exp(t_logp)
  tail_r = 1.0 - jnp.sum(p_r, -1)
  # The learner's tail summed directly (not 1 - sum_S): accurate even when it is 1e-9.
  in_s = jnp.put_along_axis(jnp.zeros(learner_logp.shape, bool), ids, True, axis=-1, inplace=False)
  tail_t = jnp.sum(jnp.where(in_s, 0.0, jnp.exp(learner_logp)), -1)

  tv_seen = 0.5 * jnp.sum(jnp.abs(p_t - p_r), -1)
  r_clip = jnp.clip(tail_r, 0.0, 1.0)
  tv_upper = jnp.clip(tv_seen + 0.5 * (r_clip + tail_t), 0.0, 1.0)
  tv_lower = jnp.clip(tv_seen + 0.5 * jnp.maximum(jnp.abs(tail_r - tail_t) - _TAIL_ROLL_TOL, 0.0), 0.0, 1.0)

  # Seen tokens: p_r phi(d) with p_r e^d = p_t (no cancellation for small d; inf where p_t = 0 < p_r).
  dv = jnp.where(p_r > 0, t_logp - r_logp, 0.0)
  small = jnp.abs(dv) < _PHI_SMALL
  kl_seen = jnp.sum(jnp.where(p_r > 0, _weighted_phi(dv, p_r, p_t, small), 0.0), -1)
  # Tail: min of the convex g(r, t) over r in [tail_r -+ tol]; its minimiser is r = t.
  r = jnp.clip(tail_t, tail_r - _TAIL_ROLL_TOL, tail_r + _TAIL_ROLL_TOL)
  # g(r, t) = r phi(u), u = log(t / r) = log1p((t - r) / r) (no cancellation); g(0, t) = t, g(r > 0, 0) = inf.
  r = jnp.maximum(r, 0.0)
  safe_r = jnp.where(r > 0, r, 1.0)
  u = jnp.log1p((tail_t - r) / safe_r)
  g = jnp.where(r > 0, _weighted_phi(u, r, tail_t, jnp.abs(u) < _PHI_SMALL), tail_t)
  kl_lower = jnp.maximum(kl_seen + jnp.maximum(g, 0.0), 0.0)

  m = _mask_or_ones(mask, tv_seen.shape)
  out = dict(kl=kl_lower, kl_lower=kl_lower, tv=tv_upper, tv_lower=tv_lower, tail_roll=r_clip,
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


def select(name: str, exact: Optional[dict], estimators: dict) -> Optional[Array]:
  """The per-position divergence a config name asks for (see DIVERGENCES): exact["kl"] for "exact" (None
  when there is no exact side), else the sampled estimator."""
  key = DIVERGENCES[name]
  if key is None:
    return exact["kl"] if exact is not None else None
  return estimators[key]


def routing_flip_frac(routes_a: Array, routes_b: Array, valid: Array) -> Array:
  """Fraction of valid (layer, token) MoE routing decisions whose top-k expert SET differs between two
  forwards (paper App. A: a routing flip is a mismatch source of its own).

  Args: routes_a, routes_b [n_moe_layers, B, L, k] int32 expert ids (order within k ignored); valid [B, L].
  Returns: scalar float32 in [0, 1] (0 when nothing is valid).
  """
  differ = jnp.any(jnp.sort(routes_a, axis=-1) != jnp.sort(routes_b, axis=-1), axis=-1)  # [n,B,L]
  w = jnp.broadcast_to(jnp.asarray(valid).astype(jnp.float32), differ.shape)
  return jnp.sum(differ * w) / jnp.maximum(jnp.sum(w), 1.0)
