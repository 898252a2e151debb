"""Reductions over the vocabulary axis shared by the exact divergences and the learner's log-probs: sums and
maxima of several [..., V] arrays in one pass, a log-sum-exp whose value comes from such a pass, and
phi(x) = e^x - 1 - x without cancellation (paper Sec. 1: the divergences are sums over the full vocabulary).
"""
import math

import chex
import jax
import jax.numpy as jnp

Array = chex.Array


# phi(x) = e^x - 1 - x = x^2 sum_k x^k / (k+2)!  for |x| < _PHI_SMALL: Horner coefficients 1/8! .. 1/2!.
# Truncation after x^6/8! leaves < 5e-8 relative at |x| = 1/2; above it e^x - 1 - x has no cancellation
# (phi(+-1/2) > 0.1).
_PHI_COEFFS = tuple(1.0 / math.factorial(k) for k in range(8, 1, -1))
_PHI_SMALL = 0.5


def _phi_over_x2(x: Array) -> Array:
  """(e^x - 1 - x) / x^2 for |x| <= 1/2, to float32 rounding (a degree-6 Taylor polynomial)."""
  c = jnp.full_like(x, _PHI_COEFFS[0])
  for coef in _PHI_COEFFS[1:]:
    c = c * x + coef
  return c


_SUM_LANES = 128


def sum_last(*xs: Array) -> tuple:
  """Sums of several [..., V] arrays over the last axis in ONE variadic reduction (one loop over V, each
  producer fused into it), each kept as [..., 1]. Not differentiable (statistics only).

  V is viewed as [V / 128, 128]: the variadic loop sums blocks of 128 (sequentially), then the V / 128
  block sums are added by an ordinary (tree) reduction, so the float32 rounding error grows with ~128, not
  V (a plain sequential sum of 152k terms is off by ~1e-2 relative).
  """
  xs = tuple(jnp.asarray(x, jnp.float32) for x in xs)
  v = xs[0].shape[-1]
  pad = -v % _SUM_LANES
  if pad:
    xs = tuple(jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) for x in xs)
  xs = tuple(x.reshape(x.shape[:-1] + (-1, _SUM_LANES)) for x in xs)
  zeros = tuple(jnp.zeros((), jnp.float32) for _ in xs)
  outs = jax.lax.reduce(xs, zeros, lambda u, w: tuple(p + q for p, q in zip(u, w)), (xs[0].ndim - 1,))
  return tuple(jnp.sum(o, -1, keepdims=True) for o in outs)


def max_last(*xs: Array) -> tuple:
  """Maxima of several [..., V] arrays over the last axis in one variadic reduction, each [..., 1], finite
  (0 for an all -inf row). Not differentiable (used as a shift)."""
  xs = tuple(jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)) for x in xs)
  init = tuple(jnp.array(-jnp.inf, jnp.float32) for _ in xs)
  outs = jax.lax.reduce(xs, init, lambda u, w: tuple(jnp.maximum(p, q) for p, q in zip(u, w)), (xs[0].ndim - 1,))
  return tuple(jnp.where(jnp.isfinite(o), o, 0.0)[..., None] for o in outs)


@jax.custom_jvp
def logsumexp_with_value(x: Array, value: Array) -> Array:
  """Returns `value` (= logsumexp(x, -1), computed by the caller in a shared pass) with the gradient of
  logsumexp: d value = sum_v softmax(x)_v dx_v. Lets one pass over V serve the statistics and the gradient."""
  del x
  return value


@logsumexp_with_value.defjvp
def _logsumexp_with_value_jvp(primals, tangents):
  x, value = primals
  dx, _ = tangents
  # softmax from x alone (not from `value`): under remat the backward then recomputes only this, not the
  # forward's shared statistics pass.
  q = jax.nn.softmax(jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)), axis=-1)
  return value, jnp.sum(q * dx, -1)


def _weighted_phi(x: Array, w: Array, w_other_c: Array, small: Array) -> Array:
  """w * phi(x) computed without cancellation, where w * e^x = w_other_c is known exactly.

  Small |x|: w x^2 poly(x) (no exp, no cancellation). Large |x|: w e^x - w (1 + x) = w_other_c - w (1 + x),
  which stays finite when w underflows (a token the other policy likes that this one gives ~0 mass).
  """
  return jnp.where(small, w * jnp.square(x) * _phi_over_x2(x), w_other_c - w * (1.0 + x))
