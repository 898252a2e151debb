"""Transformer building blocks (RMSNorm, RoPE, grouped-query attention, SwiGLU) and `Numerics`.

`Numerics` says how a forward pass is computed. The learner always runs `LEARNER` (float32, no noise);
a rollout backend runs another `Numerics` to reproduce the training/inference mismatch sources of the
paper's App. A (section 1 of the spec): lower precision, a different attention reduction order,
MoE router precision / jitter, heavy-tailed logit noise.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_KINDS = ("standard", "alt_order")
# Finite "minus infinity" for masked attention scores: -inf would turn fully masked rows
# (left padding) into NaN.
NEG_INF = -1e30
# Key-block size of the alt_order attention kernel (a flash-attention-like blocked softmax).
ALT_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class Numerics:
  """How a forward pass is computed (a hashable static jit argument).

  Attributes:
    dtype: activation dtype, "float32" | "bfloat16".
    weight_dtype: weights are cast to this dtype before use (then computed in `dtype`).
    attention: "standard" or "alt_order" (mathematically equal, different reduction order: split
      score contraction, blocked softmax with per-block max, blocks combined in reversed order).
    router_dtype: dtype of the MoE router matmul (top-k routing flips, paper App. A).
    router_jitter: stddev of Gaussian noise added to router logits; the noise is a deterministic
      function of (layer, position, token) so the learner's recomputation sees the same jitter.
    logit_noise_scale: scale of heavy-tailed logit noise `scale * h @ W_noise`, W_noise ~ student-t.
    logit_noise_df: degrees of freedom of the student-t noise matrix.
  """

  dtype: str = "float32"
  weight_dtype: str = "float32"
  attention: str = "standard"
  router_dtype: str = "float32"
  router_jitter: float = 0.0
  logit_noise_scale: float = 0.0
  logit_noise_df: float = 3.0

  def __post_init__(self):
    for field in ("dtype", "weight_dtype", "router_dtype"):
      if getattr(self, field) not in DTYPES:
        raise ValueError(f"Numerics.{field} must be one of {tuple(DTYPES)}, got {getattr(self, field)!r}")
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"Numerics.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
    if self.router_jitter < 0 or self.logit_noise_scale < 0 or self.logit_noise_df <= 0:
      raise ValueError(f"Numerics noise settings out of range: {self}")

  @property
  def act(self):
    return DTYPES[self.dtype]

  def w(self, param: jax.Array) -> jax.Array:
    """Casts a weight to `weight_dtype` (rounding it) and then to the activation dtype."""
    return param.astype(DTYPES[self.weight_dtype]).astype(self.act)


LEARNER = Numerics()


def param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
  """A parameter annotated with logical axis names (mapped to mesh axes by trm_jax.sharding)."""
  assert len(shape) == len(names), (shape, names)
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


def fan_in_init(fan_in: int, scale: float = 1.0):
  return nnx.initializers.normal(stddev=scale / math.sqrt(fan_in))


class RMSNorm(nnx.Module):
  """RMSNorm, statistics in float32 whatever the activation dtype (as inference engines do)."""

  def __init__(self, dim: int, *, param_dtype, rngs: nnx.Rngs, eps: float = 1e-6):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array, numerics: Numerics) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(DTYPES[numerics.weight_dtype]).astype(jnp.float32)
    return (xf * scale).astype(numerics.act)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (half-split form). x [B,L,N,Dh], positions [B,L]; computed in float32."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  ang = positions.astype(jnp.float32)[..., None, None] * freq  # [B,L,1,half]
  sin, cos = jnp.sin(ang), jnp.cos(ang)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _attend_standard(q, k, v, mask, scale):
  """q [B,L,K,G,Dh], k/v [B,S,K,Dh], mask [B,L,S] -> [B,L,K,G,Dh]."""
  s = jnp.einsum("blkgd,bskd->bkgls", q, k).astype(jnp.float32) * scale
  m = mask[:, None, None]
  s = jnp.where(m, s, NEG_INF)
  p = jnp.where(m, jax.nn.softmax(s, axis=-1), 0.0)  # fully masked (pad) rows give 0, not NaN
  return jnp.einsum("bkgls,bskd->blkgd", p.astype(v.dtype), v)


def _attend_alt_order(q, k, v, mask, scale):
  """Same maths as `_attend_standard`, another floating-point reduction order.

  Mimics a different inference kernel (paper App. A: paged vs flash attention): the score
  contraction is split over two halves of head_dim, the softmax is computed blockwise over keys
  with a per-block max (flash-attention style) and the blocks are combined in reversed order.
  """
  half = q.shape[-1] // 2
  s = (jnp.einsum("blkgd,bskd->bkgls", q[..., half:], k[..., half:]).astype(jnp.float32)
       + jnp.einsum("blkgd,bskd->bkgls", q[..., :half], k[..., :half]).astype(jnp.float32)) * scale
  S = k.shape[1]
  nb = -(-S // ALT_BLOCK)
  pad = nb * ALT_BLOCK - S
  m = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))[:, None, None]
  s = jnp.pad(s, ((0, 0),) * 4 + ((0, pad),))
  v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  s = jnp.where(m, s, NEG_INF)
  B, K, G, L, _ = s.shape
  sb = s.reshape(B, K, G, L, nb, ALT_BLOCK)
  mb = m.reshape(m.shape[:3] + (L, nb, ALT_BLOCK))
  blk_max = jnp.max(sb, axis=-1)  # [B,K,G,L,nb]
  pb = jnp.where(mb, jnp.exp(sb - blk_max[..., None]), 0.0)
  blk_sum = jnp.sum(pb, axis=-1)
  vb = v.reshape(B, nb, ALT_BLOCK, K, v.shape[-1])
  blk_out = jnp.einsum("bkglnc,bnckd->bkglnd", pb.astype(v.dtype), vb).astype(jnp.float32)
  gmax = jnp.max(blk_max, axis=-1, keepdims=True)
  w = jnp.exp(blk_max - gmax)[..., ::-1]  # reversed block order for the final sums
  denom = jnp.sum(blk_sum[..., ::-1] * w, axis=-1)
  out = jnp.sum(blk_out[..., ::-1, :] * w[..., None], axis=-2)
  out = out / jnp.maximum(denom, 1e-30)[..., None]  # fully masked rows: 0 / tiny = 0
  return jnp.einsum("bkgld->blkgd", out).astype(v.dtype)


class Attention(nnx.Module):
  """Grouped-query causal self-attention with RoPE, key padding and an optional KV cache."""

  def __init__(self, cfg, *, param_dtype, rngs: nnx.Rngs):
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.n_heads, self.n_kv_heads, self.head_dim, self.rope_theta = H, K, Dh, cfg.rope_theta
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)  # keeps the residual stream O(1) at init
    self.wq = param(rngs, fan_in_init(D), (D, H, Dh), ("embed", "heads", "head_dim"), param_dtype)
    self.wk = param(rngs, fan_in_init(D), (D, K, Dh), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.wv = param(rngs, fan_in_init(D), (D, K, Dh), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.wo = param(rngs, fan_in_init(H * Dh, out_scale), (H, Dh, D), ("heads", "head_dim", "embed"),
                    param_dtype)

  def __call__(self, x, positions, key_valid, numerics: Numerics, cache_kv=None, index=None):
    """x [B,L,D]; key_valid [B,S] (S = L, or the cache length). Returns (y [B,L,D], (k, v))."""
    B, L, _ = x.shape
    q = jnp.einsum("bld,dhe->blhe", x, numerics.w(self.wq[...]))
    k = jnp.einsum("bld,dhe->blhe", x, numerics.w(self.wk[...]))
    v = jnp.einsum("bld,dhe->blhe", x, numerics.w(self.wv[...]))
    q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
    qi = jnp.arange(L)[:, None]
    if cache_kv is None:
      kj = jnp.arange(L)[None, :]
    else:
      # Cache slots are in time order, so causality is a comparison of slot indices.
      ck, cv = cache_kv
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
      qi = qi + index
      kj = jnp.arange(k.shape[1])[None, :]
    mask = (kj <= qi)[None] & key_valid[:, None, :]  # [B,L,S]
    G = self.n_heads // self.n_kv_heads
    qg = q.reshape(B, L, self.n_kv_heads, G, self.head_dim)
    attend = _attend_alt_order if numerics.attention == "alt_order" else _attend_standard
    o = attend(qg, k.astype(q.dtype), v.astype(q.dtype), mask, 1.0 / math.sqrt(self.head_dim))
    o = o.reshape(B, L, self.n_heads, self.head_dim)
    y = jnp.einsum("blhe,hed->bld", o, numerics.w(self.wo[...]))
    return y, (k, v)


class MLP(nnx.Module):
  """SwiGLU feed-forward block."""

  def __init__(self, cfg, *, param_dtype, rngs: nnx.Rngs):
    D, F = cfg.d_model, cfg.d_ff
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    self.w_gate = param(rngs, fan_in_init(D), (D, F), ("embed", "mlp"), param_dtype)
    self.w_up = param(rngs, fan_in_init(D), (D, F), ("embed", "mlp"), param_dtype)
    self.w_down = param(rngs, fan_in_init(F, out_scale), (F, D), ("mlp", "embed"), param_dtype)

  def __call__(self, x, numerics: Numerics):
    g = jnp.einsum("bld,df->blf", x, numerics.w(self.w_gate[...]))
    u = jnp.einsum("bld,df->blf", x, numerics.w(self.w_up[...]))
    return jnp.einsum("blf,fd->bld", jax.nn.silu(g) * u, numerics.w(self.w_down[...]))
