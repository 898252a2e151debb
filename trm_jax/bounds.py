"""Bounds on |Error| = |J(theta) - J(roll) - L'(theta)| for a horizon of T tokens (paper Sec. 2).

Notation: delta = max_t KL(roll||theta)(c_t) over reachable contexts, eps = max_t TV(c_t),
kl_seq = KL of the sequence distributions, tv_seq = TV of the sequence distributions,
dbar[t] = E_{c_t ~ d_t^roll}[TV(c_t)]. t runs 1..T.

Every bound is built from |Error| <= sum_t 2 ||g_t||_inf ||d_t^theta - d_t^roll||_TV with
||g_t||_inf <= 2 min(1, eps, sqrt(delta/2)) and the context shift
||d_t^theta - d_t^roll||_TV <= min(1, (t-1) eps, sqrt((t-1) delta/2), tv_seq, sqrt(kl_seq/2)).

Reward range. The paper assumes R in [0, 1]; every bound here is for that range. For rewards in [lo, hi]
multiply every bound (and B*) by the width hi - lo (`reward_scale`, `scale_bounds`):
  Error_R = J_R(theta) - J_R(roll) - L'_R(theta) is linear in R. For a constant R = c, J_c(theta) - J_c(roll)
  = c - c = 0 and L'_c = c E_roll[sum_t (rho_t - 1)] = c sum_t E_{c_t ~ d_t^roll}[E_{y ~ roll}[rho_t] - 1] = 0,
  since E_{y ~ roll}[rho_t | c_t] = sum_{v in supp roll} pi_theta(v | c_t) = 1 whenever pi_theta's support
  lies in pi_roll's (always for full-vocabulary softmax; with top-p / top-k the learner is restricted to
  the rollout's kept set, so again). Hence Error_R = Error_{R - lo} = (hi - lo) Error_{R'} with
  R' = (R - lo) / (hi - lo) in [0, 1], and |Error_R| <= (hi - lo) B*. The width, not max |R|: a reward in
  [-1, 1] needs the factor 2, and an overlong penalty that reaches -1.5 the factor 2.5.
  The range is the reward function's a-priori range over ALL responses (the theorem is about the rollout
  distribution), and the R that L' uses: L' here is E_roll[R sum_t (rho_t - 1)] with the reward itself; a
  group baseline A = R - b_group is not a constant shift, so the advantage range is not the one that counts.

T may be a python int, an integer array, or per-sequence lengths broadcasting with the other arguments.
Sums over t = 1..T are taken over a static range 1..t_max with the terms t > T masked out, so they work
for traced and per-sequence T: pass `t_max` (a python int >= every T) when T is traced; when T is
concrete the default is t_max = max(T). All math is float32.
"""
from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = chex.Array


def _f32(x) -> Array:
  return jnp.asarray(x, jnp.float32)


def _static_t_max(T, t_max: Optional[int]) -> int:
  if t_max is not None:
    return int(t_max)
  try:
    return int(np.max(np.asarray(T)))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError("T is traced: pass a static python int t_max >= every T") from e


def _positions(T, t_max: int):
  """t = 1..t_max as [t_max] float32, T as [..., 1], and the mask t <= T as [..., t_max]."""
  t = jnp.arange(1, t_max + 1, dtype=jnp.float32)
  T = _f32(T)[..., None]
  return t, T, t <= T


def _sqrt_half(x: Array) -> Array:
  return jnp.sqrt(jnp.maximum(x, 0.0) / 2.0)


def classical_kl(T, delta) -> Array:
  """Classical KL bound T (T - 1) delta (paper Sec. 2, O(T^2))."""
  T = _f32(T)
  return T * (T - 1.0) * _f32(delta)


def classical_tv(T, eps) -> Array:
  """Classical TV bound 2 T (T - 1) eps^2 (paper Sec. 2, O(T^2))."""
  T = _f32(T)
  return 2.0 * T * (T - 1.0) * jnp.square(_f32(eps))


def pinsker_marginal_kl(T, delta, *, t_max: Optional[int] = None, capped: bool = True) -> Array:
  """Pinsker-Marginal KL bound 4 min(1, sqrt(delta/2)) sum_t min(1, sqrt((t-1) delta/2)) (Sec. 2).

  O(T^1.5); <= (4/3) T^1.5 delta when delta <= 2/T. `capped=False` drops both min(1, .) caps (the
  paper's "uncapped" comparison value, ~ (4/3) T^1.5 delta).
  """
  delta = _f32(delta)
  t, _, valid = _positions(T, _static_t_max(T, t_max))
  shift = _sqrt_half((t - 1.0) * delta[..., None])
  g = _sqrt_half(delta)
  if capped:
    shift, g = jnp.minimum(1.0, shift), jnp.minimum(1.0, g)
  return 4.0 * g * jnp.sum(jnp.where(valid, shift, 0.0), axis=-1)


def pinsker_marginal_tv(T, delta, eps, *, t_max: Optional[int] = None) -> Array:
  """Pinsker-Marginal TV bound 4 min(1, eps) sum_t min(1, sqrt((t-1) delta/2)) (paper Sec. 2)."""
  delta, eps = _f32(delta), _f32(eps)
  t, _, valid = _positions(T, _static_t_max(T, t_max))
  shift = jnp.minimum(1.0, _sqrt_half((t - 1.0) * delta[..., None]))
  return 4.0 * jnp.minimum(1.0, eps) * jnp.sum(jnp.where(valid, shift, 0.0), axis=-1)


def mixed_kl(T, delta, kl_seq) -> Array:
  """Mixed KL bound 4 T min(1, sqrt(delta/2)) min(1, sqrt(kl_seq/2)) (paper Sec. 2, O(T))."""
  return (4.0 * _f32(T) * jnp.minimum(1.0, _sqrt_half(_f32(delta)))
          * jnp.minimum(1.0, _sqrt_half(_f32(kl_seq))))


def mixed_tv(T, eps, tv_seq) -> Array:
  """Mixed TV bound 4 T min(1, eps) min(1, tv_seq) (paper Sec. 2, O(T))."""
  return 4.0 * _f32(T) * jnp.minimum(1.0, _f32(eps)) * jnp.minimum(1.0, _f32(tv_seq))


def coupling(T, eps, *, t_max: Optional[int] = None) -> Array:
  """Coupling bound 4 min(1, eps) sum_t min(1, (t-1) eps) (paper Sec. 2).

  Equals classical_tv when T eps <= 1; <= 4 T eps + 2 otherwise.
  """
  eps = _f32(eps)
  t, _, valid = _positions(T, _static_t_max(T, t_max))
  shift = jnp.minimum(1.0, (t - 1.0) * eps[..., None])
  return 4.0 * jnp.minimum(1.0, eps) * jnp.sum(jnp.where(valid, shift, 0.0), axis=-1)


def linear(T, eps) -> Array:
  """Linear bound 4 T eps (paper v2 / DPPO: Dbar_t = eps and future TV = 1)."""
  return 4.0 * _f32(T) * _f32(eps)


def _adaptive(dbar: Array, future, T=None) -> Array:
  """4 sum_{t <= T} dbar_t future(T - t); T defaults to the length of dbar's last axis."""
  dbar = _f32(dbar)
  L = dbar.shape[-1]
  t, T, valid = _positions(L if T is None else T, L)
  remaining = jnp.maximum(T - t, 0.0)  # tokens after position t
  return 4.0 * jnp.sum(jnp.where(valid, dbar * future(remaining), 0.0), axis=-1)


def adaptive_kl(delta, dbar, *, T=None) -> Array:
  """Adaptive KL bound 4 sum_t dbar_t min(1, sqrt((T-t) delta/2)) (paper Sec. 2, data dependent).

  Args:
    delta: [...] token-level KL maximum.
    dbar: [..., L] expected TV at positions t = 1..L under the rollout contexts.
    T: optional horizon (<= L, may be traced / per sequence); default L. Entries t > T are ignored.
  """
  d = _f32(delta)[..., None]
  return _adaptive(dbar, lambda n: jnp.minimum(1.0, _sqrt_half(n * d)), T)


def adaptive_tv(eps, dbar, *, T=None) -> Array:
  """Adaptive TV bound 4 sum_t dbar_t min(1, (T-t) eps) (paper Sec. 2). Args as adaptive_kl."""
  e = _f32(eps)[..., None]
  return _adaptive(dbar, lambda n: jnp.minimum(1.0, n * e), T)


def adaptive(delta, eps, dbar, *, T=None) -> Array:
  """Adaptive hybrid bound 4 sum_t dbar_t min(1, (T-t) eps, sqrt((T-t) delta/2)) (paper Sec. 2).

  Follows from the exact identity Error = -E_roll[R sum_t (rho_t - 1)(1 - prod_{j>t} rho_j)]; <= both
  adaptive_kl and adaptive_tv. Args as adaptive_kl.
  """
  d, e = _f32(delta)[..., None], _f32(eps)[..., None]
  return _adaptive(dbar, lambda n: jnp.minimum(jnp.minimum(1.0, n * e), _sqrt_half(n * d)), T)


def unified(T, delta, eps, kl_seq, tv_seq, dbar=None, *, t_max: Optional[int] = None) -> Array:
  """Unified bound B* = min{PM-KL, PM-TV, Mixed-KL, Mixed-TV, Coupling, Adaptive-hybrid} (Sec. 2).

  dbar=None uses the worst case allowed by the token maxima, uniform dbar_t = min(1, eps, sqrt(delta/2)):
  Dbar_t is an average of TV(c_t) <= eps, and TV(c_t) <= sqrt(KL(c_t)/2) <= sqrt(delta/2) by Pinsker, so
  this dbar dominates the true one and the Adaptive term stays a valid bound.

  Args:
    T: horizon, int or array broadcasting with the statistics.
    delta, eps, kl_seq, tv_seq: [...] statistics.
    dbar: optional [..., L] with L >= T (entries t > T are ignored).
    t_max: static python int >= T; defaults to max(T) when concrete, else dbar's length.
  """
  if t_max is None and dbar is not None:
    try:
      t_max = _static_t_max(T, None)
    except ValueError:
      t_max = dbar.shape[-1]
  t_max = _static_t_max(T, t_max)
  delta, eps = _f32(delta), _f32(eps)
  if dbar is None:
    c = jnp.minimum(jnp.minimum(1.0, eps), _sqrt_half(delta))
    dbar = c[..., None] * jnp.ones((t_max,), jnp.float32)
  candidates = [
      pinsker_marginal_kl(T, delta, t_max=t_max),
      pinsker_marginal_tv(T, delta, eps, t_max=t_max),
      mixed_kl(T, delta, kl_seq),
      mixed_tv(T, eps, tv_seq),
      coupling(T, eps, t_max=t_max),
      adaptive(delta, eps, dbar, T=T),
  ]
  out = candidates[0]
  for c in candidates[1:]:
    out = jnp.minimum(out, c)
  return out


def ln_trm_weights(T, delta, eps, *, t_max: Optional[int] = None) -> Array:
  """LN-TRM position weights w_t = min(1, (T-t) eps, sqrt((T-t) delta/2)) (paper Sec. 3).

  Returns [..., t_max] float32, zero for t > T (and w_T = 0: the last token moves no future context).
  """
  delta, eps = _f32(delta)[..., None], _f32(eps)[..., None]
  t, T, valid = _positions(T, _static_t_max(T, t_max))
  n = jnp.maximum(T - t, 0.0)
  w = jnp.minimum(jnp.minimum(1.0, n * eps), _sqrt_half(n * delta))
  return jnp.where(valid, w, 0.0)


def ln_trm_normaliser(T, delta, eps, *, t_max: Optional[int] = None) -> Array:
  """Z(T) = sum_t w_t, the LN-TRM normaliser (paper Sec. 3). Returns [...]."""
  return jnp.sum(ln_trm_weights(T, delta, eps, t_max=t_max), axis=-1)


def reward_scale(reward_range=(0.0, 1.0)) -> float:
  """The factor hi - lo that turns a bound for R in [0, 1] into one for R in [lo, hi] (module docstring)."""
  lo, hi = (float(v) for v in reward_range)
  if not hi >= lo:
    raise ValueError(f"reward_range must be (lo, hi) with hi >= lo, got {tuple(reward_range)}")
  return hi - lo


def scale_bounds(values: dict, reward_range=(0.0, 1.0)) -> dict:
  """A copy of `values` with every bound (the keys in BOUND_NAMES, B* included) multiplied by
  reward_scale(reward_range); the statistics (delta, eps, kl_seq, ...) are left as they are."""
  scale = reward_scale(reward_range)
  return {k: v * scale if k in BOUND_NAMES else v for k, v in values.items()}


BOUND_NAMES = ("classical_kl", "classical_tv", "pinsker_marginal_kl", "pinsker_marginal_tv",
               "mixed_kl", "mixed_tv", "coupling", "linear", "adaptive_kl", "adaptive_tv", "adaptive",
               "unified")


TV_BOUND_NAMES = ("classical_tv", "coupling", "linear", "mixed_tv", "adaptive_tv", "unified")


def unified_tv(T, eps, tv_seq, dbar, *, t_max: Optional[int] = None) -> Array:
  """B* from the TV-supported members only: min{Coupling, Mixed-TV, Adaptive-TV} (paper Sec. 2).

  For when only TV upper bounds are known (top-k rollouts: the KL is a lower bound there, so PM-KL,
  PM-TV, Mixed-KL and the hybrid Adaptive would not be upper bounds). tv_seq must itself be an upper bound
  (e.g. min(1, sum_t dbar_t)).
  """
  return jnp.minimum(jnp.minimum(coupling(T, eps, t_max=t_max), mixed_tv(T, eps, tv_seq)),
                     adaptive_tv(eps, dbar, T=T))


def certificate(kl: Optional[Array], tv: Array, mask: Array, *, surrogate: Optional[Array] = None,
                tv_only: bool = False, reward_range=(0.0, 1.0)) -> dict:
  """Plug-in estimates of delta, eps, kl_seq, tv_seq, dbar and every bound from a batch (paper Sec. 2-3).

  A plug-in estimate of each bound, NOT the bound: delta and eps below are sample maxima (lower bounds
  of the maxima over every reachable context the theorem needs), kl_seq and dbar sample means, T the
  longest response in the batch; a bound evaluated at them can be smaller than the true bound
  (trm_jax/certificate.py says what the logged numbers license).

  From exact per-position divergences of B sampled sequences (contexts c_t ~ d_t^roll):
    delta  = max over valid (b, t) of kl;  eps = max of tv  (the token maxima TRM-Max enforces on the
             samples; the theory needs them on every reachable context, which samples cannot prove);
    kl_seq = (1/N) sum_b sum_t kl   (chain rule: KL_seq = sum_t E_{d_t^roll}[KL(c_t)], unbiased);
    dbar_t = (1/N) sum_b tv[b, t]   over ALL N sequences: a sequence that has ended before t is
             deterministic after EOS under both policies, so it contributes TV = 0 at t;
    tv_seq = min(1, sum_t dbar_t, sqrt(kl_seq/2)). The sequence-level TV is not computable from samples;
             both terms are upper bounds of it (coupling / union bound over positions, and Pinsker with
             Jensen over prompts), so the Mixed-TV term of the certificate stays valid;
    T      = the longest valid length in the batch (the horizon; positions past it carry no divergence).
  N counts sequences with at least one valid token (all-masked rows are padding).

  Args:
    kl: [B, L] exact KL(roll||theta) per position.
    tv: [B, L] exact TV per position.
    mask: [B, L] valid response positions.
    surrogate: optional scalar estimate of L'(theta); adds certified_improvement = surrogate - unified.
    reward_range: (lo, hi) of the reward R that the surrogate uses; every bound is scaled by hi - lo
      (module docstring); the default (0, 1) is the paper's.
    tv_only: the KL is not an upper bound (top-k rollouts): `kl` is ignored (may be None), tv_seq =
      min(1, sum_t dbar_t) and only the TV-supported bounds TV_BOUND_NAMES are returned, with
      unified = unified_tv (min of Coupling, Mixed-TV, Adaptive-TV).

  Returns:
    dict of float32 scalars delta, eps, kl_seq, tv_seq, T and every name in BOUND_NAMES, plus dbar [L]
    (tv_only: eps, tv_seq, T, dbar and TV_BOUND_NAMES).
  """
  chex.assert_rank([tv, mask], 2)
  chex.assert_equal_shape([tv, mask])
  valid = jnp.asarray(mask, jnp.float32) > 0
  # where, not a product: a padded position may hold inf (0 * inf = NaN).
  tv = jnp.where(valid, jnp.clip(_f32(tv), 0.0, 1.0), 0.0)
  L = tv.shape[-1]
  n = jnp.maximum(jnp.sum(jnp.any(valid, axis=-1).astype(jnp.float32)), 1.0)
  eps = jnp.max(tv)
  dbar = jnp.sum(tv, axis=0) / n
  T = jnp.max(jnp.where(valid, jnp.arange(1, L + 1, dtype=jnp.float32), 0.0))
  if tv_only:
    tv_seq = jnp.minimum(1.0, jnp.sum(dbar))
    out = dict(eps=eps, tv_seq=tv_seq, T=T, dbar=dbar, classical_tv=classical_tv(T, eps),
               coupling=coupling(T, eps, t_max=L), linear=linear(T, eps), mixed_tv=mixed_tv(T, eps, tv_seq),
               adaptive_tv=adaptive_tv(eps, dbar, T=T), unified=unified_tv(T, eps, tv_seq, dbar, t_max=L))
    return _with_surrogate(scale_bounds(out, reward_range), surrogate)
  chex.assert_equal_shape([kl, tv])
  kl = jnp.where(valid, jnp.maximum(_f32(kl), 0.0), 0.0)
  delta = jnp.max(kl)
  kl_seq = jnp.sum(kl) / n
  tv_seq = jnp.minimum(jnp.minimum(1.0, jnp.sum(dbar)), _sqrt_half(kl_seq))
  out = dict(
      delta=delta, eps=eps, kl_seq=kl_seq, tv_seq=tv_seq, T=T, dbar=dbar,
      classical_kl=classical_kl(T, delta),
      classical_tv=classical_tv(T, eps),
      pinsker_marginal_kl=pinsker_marginal_kl(T, delta, t_max=L),
      pinsker_marginal_tv=pinsker_marginal_tv(T, delta, eps, t_max=L),
      mixed_kl=mixed_kl(T, delta, kl_seq),
      mixed_tv=mixed_tv(T, eps, tv_seq),
      coupling=coupling(T, eps, t_max=L),
      linear=linear(T, eps),
      adaptive_kl=adaptive_kl(delta, dbar, T=T),
      adaptive_tv=adaptive_tv(eps, dbar, T=T),
      adaptive=adaptive(delta, eps, dbar, T=T),
      unified=unified(T, delta, eps, kl_seq, tv_seq, dbar, t_max=L),
  )
  return _with_surrogate(scale_bounds(out, reward_range), surrogate)


def _with_surrogate(out: dict, surrogate) -> dict:
  if surrogate is not None:
    out["certified_improvement"] = _f32(surrogate) - out["unified"]
  return out
