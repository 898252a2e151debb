"""Mixture-of-experts SwiGLU block with a top-k router (the routing-flip mismatch source, paper App. A)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from trm_jax.models.layers import DTYPES, Numerics, fan_in_init, param

# Fixed seed of the router jitter: the jitter must be a deterministic function of
# (layer, position, token) so that a learner recomputation under the same Numerics sees it too.
JITTER_SEED = 20251229


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3 finaliser: a cheap, well-mixing uint32 hash (wrapping arithmetic)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def router_jitter(shape, layer: int, positions: jax.Array, tokens: jax.Array) -> jax.Array:
  """Standard-normal noise [B,L,E], a deterministic function of (layer, position, token, expert).

  A counter-based hash rather than one PRNG key per token: the same values in the sampler's
  decode steps and in the learner's full recomputation, and cheap to compile.
  """
  u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)
  h = _fmix32(u32(JITTER_SEED) ^ u32(layer) * jnp.uint32(0x9E3779B9))
  h = _fmix32(h ^ u32(positions))
  h = _fmix32(h ^ u32(tokens) * jnp.uint32(0x27D4EB2F))[..., None]
  h = _fmix32(h ^ (u32(jnp.arange(shape[-1])) + jnp.uint32(1)) * jnp.uint32(0x165667B1))
  u = ((h >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1)
  return jax.scipy.special.ndtri(u).reshape(shape)


class MoE(nnx.Module):
  """Top-k routed experts: softmax over the k chosen router logits; dense dispatch over experts.

  Dense dispatch (every expert computes every token, then a weighted combine) costs E times the
  FLOPs of one expert but is exact and simple; fine at the scales this project runs.
  """

  def __init__(self, cfg, *, param_dtype, rngs: nnx.Rngs):
    D, F, E = cfg.d_model, cfg.d_ff, cfg.n_experts
    self.top_k = cfg.experts_top_k
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    self.router = param(rngs, fan_in_init(D), (D, E), ("embed", "experts"), param_dtype)
    self.w_gate = param(rngs, fan_in_init(D), (E, D, F), ("experts", "embed", "mlp"), param_dtype)
    self.w_up = param(rngs, fan_in_init(D), (E, D, F), ("experts", "embed", "mlp"), param_dtype)
    self.w_down = param(rngs, fan_in_init(F, out_scale), (E, F, D), ("experts", "mlp", "embed"),
                        param_dtype)

  def __call__(self, x, numerics: Numerics, *, layer: int, positions, tokens):
    """x [B,L,D] -> (y [B,L,D], routes [B,L,k] int32)."""
    rdt = DTYPES[numerics.router_dtype]
    logits = jnp.einsum("bld,de->ble", x.astype(rdt), self.router[...].astype(rdt)).astype(jnp.float32)
    if numerics.router_jitter > 0:
      logits = logits + numerics.router_jitter * router_jitter(logits.shape, layer, positions, tokens)
    top_vals, routes = jax.lax.top_k(logits, self.top_k)
    gates = jax.nn.softmax(top_vals, axis=-1)
    combine = jnp.sum(jax.nn.one_hot(routes, logits.shape[-1], dtype=jnp.float32) * gates[..., None],
                      axis=-2)  # [B,L,E], zero for unchosen experts
    g = jnp.einsum("bld,edf->blef", x, numerics.w(self.w_gate[...]))
    u = jnp.einsum("bld,edf->blef", x, numerics.w(self.w_up[...]))
    y = jnp.einsum("blef,efd->bled", jax.nn.silu(g) * u, numerics.w(self.w_down[...]))
    y = jnp.einsum("bled,ble->bld", y, combine.astype(y.dtype))
    return y, routes.astype(jnp.int32)
