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
  """Top-k routed SwiGLU experts, as HF's Qwen3MoeSparseMoeBlock (no shared expert).

  p = softmax(x @ W_router) over ALL experts in float32; the k largest p are kept and, when
  `norm_topk_prob`, renormalised to sum to 1; y = sum_j p_j * expert_{e_j}(x) with the weights cast
  to the activation dtype first. The router matmul runs in `Numerics.router_dtype` and the optional
  jitter is added to its logits (routing flips, paper App. A). Dense dispatch (every expert computes
  every token, then a weighted combine) costs E/k times the FLOPs but is exact and simple.
  """

  def __init__(self, cfg, *, param_dtype, rngs: nnx.Rngs, stack: int | None = None):
    D, F, E = cfg.d_model, cfg.moe_d_ff or cfg.d_ff, cfg.n_experts
    self.top_k, self.norm_topk_prob = cfg.experts_top_k, cfg.norm_topk_prob
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    p = lambda init, shape, names: param(rngs, init, shape, names, param_dtype, stack)
    self.router = p(fan_in_init(D), (D, E), ("embed", "experts"))
    self.w_gate = p(fan_in_init(D), (E, D, F), ("experts", "embed", "mlp"))
    self.w_up = p(fan_in_init(D), (E, D, F), ("experts", "embed", "mlp"))
    self.w_down = p(fan_in_init(F, out_scale), (E, F, D), ("experts", "mlp", "embed"))

  def route(self, x, numerics: Numerics, *, layer, positions, tokens):
    """(gates [B,L,k] float32, routes [B,L,k] int32): the top-k experts and their weights."""
    rdt = DTYPES[numerics.router_dtype]
    logits = jnp.einsum("bld,de->ble", x.astype(rdt), self.router[...].astype(rdt)).astype(jnp.float32)
    if numerics.router_jitter > 0:
      logits = logits + numerics.router_jitter * router_jitter(logits.shape, layer, positions, tokens)
    gates, routes = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), self.top_k)
    if self.norm_topk_prob:
      gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return gates, routes.astype(jnp.int32)

  def __call__(self, x, numerics: Numerics, *, layer, positions, tokens):
    """x [B,L,D] -> (y [B,L,D], routes [B,L,k] int32). `layer` may be traced (scan over layers)."""
    gates, routes = self.route(x, numerics, layer=layer, positions=positions, tokens=tokens)
    gates = gates.astype(numerics.act)
    E = self.router[...].shape[-1]
    combine = jnp.sum(jax.nn.one_hot(routes, E, dtype=gates.dtype) * gates[..., None], axis=-2)  # [B,L,E]
    g = jnp.einsum("bld,edf->blef", x, numerics.w(self.w_gate[...]))
    u = jnp.einsum("bld,edf->blef", x, numerics.w(self.w_up[...]))
    y = jnp.einsum("blef,efd->bled", jax.nn.silu(g) * u, numerics.w(self.w_down[...]))
    return jnp.einsum("bled,ble->bld", y, combine), routes
