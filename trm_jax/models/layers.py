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
# Keys per step of the alt_order kernel's online-softmax loop (flash-attention-like): large enough
# for full MXU tiles and few loop steps, small enough that the per-step scores [B,H,L,block] are small.
ALT_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class Numerics:
  """How a forward pass is computed (a hashable static jit argument).

  Attributes:
    dtype: activation dtype, "float32" | "bfloat16".
    weight_dtype: weights are cast to this dtype before use (then computed in `dtype`).
    attention: "standard" or "alt_order" (mathematically equal, different reduction order: an online
      softmax over key blocks in reversed order with a split score contraction, see _attend_alt_order).
    router_dtype: dtype of the MoE router matmul (top-k routing flips, paper App. A).
    router_jitter: stddev of Gaussian noise added to router logits; the noise is a deterministic
      function of (layer, position, token) so the learner's recomputation sees the same jitter.
    logit_noise_scale: scale of heavy-tailed logit noise `scale * h @ W_noise`, W_noise ~ student-t.
    logit_noise_df: degrees of freedom of the student-t noise matrix.
    query_block: attend in blocks of this many queries (0 = all at once): the scores alive at once are
      [B, H, query_block, S] instead of [B, H, L, S], each block recomputed in the backward; every row's
      softmax is the same computation, so the result does not change (config learner.attention_block).
  """

  dtype: str = "float32"
  weight_dtype: str = "float32"
  attention: str = "standard"
  router_dtype: str = "float32"
  router_jitter: float = 0.0
  logit_noise_scale: float = 0.0
  logit_noise_df: float = 3.0
  query_block: int = 0

  def __post_init__(self):
    for field in ("dtype", "weight_dtype", "router_dtype"):
      if getattr(self, field) not in DTYPES:
        raise ValueError(f"Numerics.{field} must be one of {tuple(DTYPES)}, got {getattr(self, field)!r}")
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"Numerics.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
    if self.router_jitter < 0 or self.logit_noise_scale < 0 or self.logit_noise_df <= 0 or self.query_block < 0:
      raise ValueError(f"Numerics noise settings out of range: {self}")

  @property
  def act(self):
    return DTYPES[self.dtype]

  def w(self, param: jax.Array) -> jax.Array:
    """Casts a weight to `weight_dtype` (rounding it) and then to the activation dtype."""
    return param.astype(DTYPES[self.weight_dtype]).astype(self.act)


LEARNER = Numerics()


# How `dense_last` computes its weight gradient: "transposed" = x^T materialised, then a plain [D, N] x [N, F]
# matmul (a custom VJP); "autodiff" = a plain einsum, whatever JAX's transpose rule emits. Read when tracing;
# kept for the A/B (python -m experiments.benchmarks.profile --ab) and the equality tests.
WEIGHT_GRAD = "transposed"


def dense_last(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., D] @ w [D, F], with the einsum's value and (up to float rounding) its gradients.

  Why a custom VJP: the weight gradient dW = sum_n x_n^T g_n is a dot contracting the token axis of both
  operands, which XLA:CPU runs as a plain (non-YNNPACK) dot after a transposed copy of g [N, F]. Materialising
  x^T [D, N] (small next to g) and multiplying it by g row-major is faster: the [256, 512] x [256, 32000]
  unembedding chunk's dW alone 74 -> 52 ms on 2 cores; the whole learner update (every projection and the
  unembedding) 1.27x faster at d 512, 4 layers, V 32000 (`python -m experiments.benchmarks.profile --ab`).
  The barrier keeps XLA from folding the transpose back into the dot. CPU only: TPU and GPU lower the plain
  einsum's dot (jax.lax.platform_dependent, chosen when lowering).
  """
  if WEIGHT_GRAD == "autodiff":
    return jnp.einsum("...d,df->...f", x, w)
  return _dense_last(x, w)


@jax.custom_vjp
def _dense_last(x, w):
  return jnp.einsum("...d,df->...f", x, w)


def _dense_last_fwd(x, w):
  return _dense_last(x, w), (x, w)


def _dense_last_bwd(res, g):
  x, w = res
  dx = jnp.einsum("...f,df->...d", g, w).astype(x.dtype)
  # CPU only (chosen when lowering): TPU / GPU keep the plain dot (no extra copy of x).
  dw = jax.lax.platform_dependent(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                                  cpu=lambda x2, g2: jax.lax.optimization_barrier(x2.T) @ g2,
                                  default=lambda x2, g2: jnp.einsum("nd,nf->df", x2, g2))
  return dx, dw.astype(w.dtype)


_dense_last.defvjp(_dense_last_fwd, _dense_last_bwd)


def param(rngs: nnx.Rngs, init, shape, names, dtype, stack: int | None = None) -> nnx.Param:
  """A parameter annotated with logical axis names (mapped to mesh axes by trm_jax.sharding).

  With `stack`, the parameter of `stack` layers is one array with a leading ("layers",) axis, which
  the transformer scans over (trm_jax/models/transformer.py).
  """
  assert len(shape) == len(names), (shape, names)
  if stack is not None:
    shape, names = (stack,) + tuple(shape), ("layers",) + tuple(names)
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


def fan_in_init(fan_in: int, scale: float = 1.0):
  return nnx.initializers.normal(stddev=scale / math.sqrt(fan_in))


class RMSNorm(nnx.Module):
  """RMSNorm as transformers computes it: y = w * cast(x * rsqrt(mean(x^2) + eps)), statistics in float32.

  The normalised x is cast back to the activation dtype BEFORE the weight multiplies it (HF's
  `Qwen3RMSNorm`: `weight * hidden.to(input_dtype)`); the last axis is normalised (d_model, or head_dim
  for the per-head q/k norm of Qwen3).
  """

  def __init__(self, dim: int, *, param_dtype, rngs: nnx.Rngs, eps: float = 1e-6, names=("embed",),
               stack: int | None = None):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), names, param_dtype, stack)
    self.eps = eps

  def __call__(self, x: jax.Array, numerics: Numerics) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return numerics.w(self.scale[...]) * xf.astype(numerics.act)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF layout: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].

  inv_freq_i = 1 / theta^(2i / Dh) (i < Dh/2); the angles are computed in float32 and cos/sin are cast
  to x's dtype before the product, as transformers does. x [B,L,N,Dh], positions [B,L].
  """
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  ang = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B,L,1,Dh/2]
  ang = jnp.concatenate([ang, ang], axis=-1)
  cos, sin = jnp.cos(ang).astype(x.dtype), jnp.sin(ang).astype(x.dtype)
  x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _attend_standard(q, k, v, mask, scale):
  """q [B,L,K,G,Dh], k/v [B,S,K,Dh], mask [B,L,S] -> [B,L,K,G,Dh]."""
  s = jnp.einsum("blkgd,bskd->bkgls", q, k).astype(jnp.float32) * scale
  m = mask[:, None, None]
  s = jnp.where(m, s, NEG_INF)
  p = jnp.where(m, jax.nn.softmax(s, axis=-1), 0.0)  # fully masked (pad) rows give 0, not NaN
  return jnp.einsum("bkgls,bskd->blkgd", p.astype(v.dtype), v)


def _by_query_blocks(fn, q, qi, block: int):
  """fn(q_rows, qi_rows) -> [B, rows, ...] over blocks of `block` queries, concatenated (Numerics.query_block).

  A `lax.map` over the blocks with each block under `jax.checkpoint`: the backward keeps only the block
  index and recomputes that block's scores. q [B,L,...], qi [L,1] query slot indices.
  """
  L = q.shape[1]
  if not block or L <= block:
    return fn(q, qi)
  n = -(-L // block)
  pad = n * block - L
  if pad:  # padded queries attend like the last real one; their rows are dropped below
    q = jnp.pad(q, ((0, 0), (0, pad)) + ((0, 0),) * (q.ndim - 2), mode="edge")
    qi = jnp.pad(qi, ((0, pad), (0, 0)), mode="edge")
  one = jax.checkpoint(lambda i: fn(jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=1),
                                    jax.lax.dynamic_slice_in_dim(qi, i * block, block, axis=0)))
  out = jax.lax.map(one, jnp.arange(n))  # [n, B, block, ...]
  out = jnp.moveaxis(out, 0, 1)
  return out.reshape(out.shape[:1] + (n * block,) + out.shape[3:])[:, :L]


def _attend_alt_order(q, k, v, mask, scale, block: int | None = None):
  """Same maths as `_attend_standard`, another floating-point reduction order.

  Mimics a different inference kernel (paper App. A: paged vs flash attention): an online softmax
  (flash-attention style) over key blocks of `block` (default ALT_BLOCK) keys, visited last block
  first; per block the score contraction is split over two halves of head_dim and the unnormalised
  p @ v is rounded to the activation dtype; the running (max m, sum l, out o) are float32:
    m' = max(m, max_j s_j), l' = l e^(m-m') + sum_j e^(s_j-m'), o' = o e^(m-m') + sum_j e^(s_j-m') v_j,
  result o / l. Memory is O(B H L (Dh + block)) (no [.., L, S/block, Dh] per-block outputs).
  q [B,L,K,G,Dh], k/v [B,S,K,Dh], mask [B,L,S] -> [B,L,K,G,Dh].
  """
  B, L, K, G, Dh = q.shape
  S = k.shape[1]
  C = min(block or ALT_BLOCK, S)
  nb = -(-S // C)
  pad = nb * C - S
  if pad:  # padded keys are masked out
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))
  half = Dh // 2
  q_hi, q_lo = q[..., half:], q[..., :half]

  def step(i, carry):
    m, l, o = carry
    start = (nb - 1 - i) * C  # reversed block order
    kb = jax.lax.dynamic_slice_in_dim(k, start, C, axis=1)
    vb = jax.lax.dynamic_slice_in_dim(v, start, C, axis=1)
    mb = jax.lax.dynamic_slice_in_dim(mask, start, C, axis=2)[:, None, None]  # [B,1,1,L,C]
    s = (jnp.einsum("blkgd,bskd->bkgls", q_hi, kb[..., half:]).astype(jnp.float32)
         + jnp.einsum("blkgd,bskd->bkgls", q_lo, kb[..., :half]).astype(jnp.float32)) * scale
    s = jnp.where(mb, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    alpha = jnp.exp(m - m_new)  # 1 while a row has seen only masked keys (m = m_new = NEG_INF)
    p = jnp.where(mb, jnp.exp(s - m_new[..., None]), 0.0)
    pv = jnp.einsum("bkgls,bskd->bkgld", p.astype(v.dtype), vb).astype(jnp.float32)
    return m_new, l * alpha + jnp.sum(p, axis=-1), o * alpha[..., None] + pv

  init = (jnp.full((B, K, G, L), NEG_INF, jnp.float32), jnp.zeros((B, K, G, L), jnp.float32),
          jnp.zeros((B, K, G, L, Dh), jnp.float32))
  _, l, o = jax.lax.fori_loop(0, nb, step, init)
  out = o / jnp.maximum(l, 1e-30)[..., None]  # fully masked rows: 0 / tiny = 0
  return jnp.einsum("bkgld->blkgd", out).astype(v.dtype)


def write_rows(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """buf [B,S,...] with new [B,L,...] written at slots index[b] .. index[b]+L-1 of each row b.

  One token (decoding) is a per-row scatter, so rows may sit at different slots; several tokens
  (prefill) are one dynamic_update_slice at row 0's index (all rows of a prefill start together).
  """
  new = new.astype(buf.dtype)
  if new.shape[1] == 1:
    return buf.at[jnp.arange(buf.shape[0]), index].set(new[:, 0], mode="promise_in_bounds")
  return jax.lax.dynamic_update_slice(buf, new, (0, index[0]) + (0,) * (buf.ndim - 2))


class Attention(nnx.Module):
  """Grouped-query causal self-attention with RoPE, key padding and an optional KV cache.

  Options of `ModelConfig` (as transformers computes them): `qkv_bias` (Qwen2: q/k/v projections with
  bias), `o_bias` (Qwen3 with attention_bias=True), `qk_norm` (Qwen3: RMSNorm over head_dim of each
  q and k head, after the projection and before RoPE). Scores are scaled by 1/sqrt(head_dim).
  """

  def __init__(self, cfg, *, param_dtype, rngs: nnx.Rngs, stack: int | None = None):
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.n_heads, self.n_kv_heads, self.head_dim, self.rope_theta = H, K, Dh, cfg.rope_theta
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)  # keeps the residual stream O(1) at init
    p = lambda init, shape, names: param(rngs, init, shape, names, param_dtype, stack)
    self.wq = p(fan_in_init(D), (D, H, Dh), ("embed", "heads", "head_dim"))
    self.wk = p(fan_in_init(D), (D, K, Dh), ("embed", "kv_heads", "head_dim"))
    self.wv = p(fan_in_init(D), (D, K, Dh), ("embed", "kv_heads", "head_dim"))
    self.wo = p(fan_in_init(H * Dh, out_scale), (H, Dh, D), ("heads", "head_dim", "embed"))
    zeros = nnx.initializers.zeros
    self.bq = p(zeros, (H, Dh), ("heads", "head_dim")) if cfg.qkv_bias else None
    self.bk = p(zeros, (K, Dh), ("kv_heads", "head_dim")) if cfg.qkv_bias else None
    self.bv = p(zeros, (K, Dh), ("kv_heads", "head_dim")) if cfg.qkv_bias else None
    self.bo = p(zeros, (D,), ("embed",)) if cfg.o_bias else None
    norm = lambda: RMSNorm(Dh, param_dtype=param_dtype, rngs=rngs, eps=cfg.rms_norm_eps, names=("head_dim",),
                           stack=stack)
    self.q_norm = norm() if cfg.qk_norm else None
    self.k_norm = norm() if cfg.qk_norm else None

  def _proj(self, x, w, b, numerics):
    w = numerics.w(w[...])
    y = dense_last(x, w.reshape(w.shape[0], -1)).reshape(*x.shape[:-1], *w.shape[1:])
    return y if b is None else y + numerics.w(b[...])

  def __call__(self, x, positions, key_valid, numerics: Numerics, cache_kv=None, index=None, segments=None):
    """x [B,L,D]; key_valid [B,S] (S = L, or the cache length); cache_kv: this layer's (k, v) cache
    [B,S,K,Dh] or None, written at `index` [B] (per row); segments: [B,L] int32 segment ids of packed
    rows (no cache): a query attends only to earlier keys of its own segment.
    Returns (y [B,L,D], (k, v) [B,L,K,Dh] of the L new tokens, post-RoPE)."""
    B, L, _ = x.shape
    q = self._proj(x, self.wq, self.bq, numerics)
    k = self._proj(x, self.wk, self.bk, numerics)
    v = self._proj(x, self.wv, self.bv, numerics)
    if self.q_norm is not None:
      q, k = self.q_norm(q, numerics), self.k_norm(k, numerics)
    q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
    new_kv = (k, v)
    qi, offset = jnp.arange(L)[:, None], jnp.zeros((B, 1, 1), jnp.int32)
    if cache_kv is None:
      kj = jnp.arange(L)[None, :]
    else:
      # Cache slots are in time order, so causality is a comparison of slot indices (per row: rows of a
      # continuous batch sit at different positions).
      ck, cv = cache_kv
      k, v = write_rows(ck, k, index), write_rows(cv, v, index)
      offset = index[:, None, None]
      kj = jnp.arange(k.shape[1])[None, :]
    G = self.n_heads // self.n_kv_heads
    qg = q.reshape(B, L, self.n_kv_heads, G, self.head_dim)
    attend = _attend_alt_order if numerics.attention == "alt_order" else _attend_standard
    k, v = k.astype(q.dtype), v.astype(q.dtype)

    def rows(q_rows, qi_rows):  # some queries against every key; the mask [B, rows, S] is built per block
      mask = (kj[None] <= qi_rows[None] + offset) & key_valid[:, None, :]
      if segments is not None:
        mask &= jnp.take(segments, qi_rows[:, 0], axis=1)[:, :, None] == segments[:, None, :]
      return attend(q_rows, k, v, mask, 1.0 / math.sqrt(self.head_dim))

    o = _by_query_blocks(rows, qg, qi, numerics.query_block)
    o = o.reshape(B, L, self.n_heads, self.head_dim)
    wo = numerics.w(self.wo[...])
    y = dense_last(o.reshape(*o.shape[:-2], -1), wo.reshape(-1, wo.shape[-1]))
    if self.bo is not None:
      y = y + numerics.w(self.bo[...])
    return y, new_kv


class MLP(nnx.Module):
  """SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), as HF's Qwen3MLP."""

  def __init__(self, cfg, d_ff: int, *, param_dtype, rngs: nnx.Rngs, stack: int | None = None):
    D, F = cfg.d_model, d_ff
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    self.w_gate = param(rngs, fan_in_init(D), (D, F), ("embed", "mlp"), param_dtype, stack)
    self.w_up = param(rngs, fan_in_init(D), (D, F), ("embed", "mlp"), param_dtype, stack)
    self.w_down = param(rngs, fan_in_init(F, out_scale), (F, D), ("mlp", "embed"), param_dtype, stack)

  def __call__(self, x, numerics: Numerics):
    g = dense_last(x, numerics.w(self.w_gate[...]))
    u = dense_last(x, numerics.w(self.w_up[...]))
    return dense_last(jax.nn.silu(g) * u, numerics.w(self.w_down[...]))
