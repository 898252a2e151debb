"""Decoder-only transformer policy (dense or MoE) in Flax NNX, with a KV cache and `Numerics`.

Parameters carry logical axis names (vocab, embed, heads, kv_heads, head_dim, mlp, experts); build the
model under `nnx.use_eager_sharding(False)` and place it with trm_jax.sharding.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, struct

from trm_jax.models.layers import DTYPES, LEARNER, MLP, Attention, Numerics, RMSNorm, param
from trm_jax.models.moe import MoE

KINDS = ("dense", "moe")

# Presets; parameter counts exclude the embeddings (vocabularies here are character level).
PRESETS = {
    # ~80k: unit tests and laptop smoke runs.
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128),
    # ~3M.
    "small": dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=768),
    # ~75M.
    "base": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64, d_ff=2048),
    # ~0.76B (+ embeddings), a Llama-like 1B shape.
    "1b": dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128, d_ff=5632),
}
MOE_PRESET = dict(n_experts=8, experts_top_k=2, moe_every=1)
DIM_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")
DEFAULT_MAX_LEN = 16384


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static shape of the policy network."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  max_len: int = DEFAULT_MAX_LEN
  rope_theta: float = 10000.0
  kind: str = "dense"
  n_experts: int = 0
  experts_top_k: int = 0
  moe_every: int = 1  # layer i is MoE iff i % moe_every == moe_every - 1
  param_dtype: str = "float32"
  tie_embeddings: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"model.kind must be one of {KINDS}, got {self.kind!r}")
    if self.param_dtype not in DTYPES:
      raise ValueError(f"model.param_dtype must be one of {tuple(DTYPES)}, got {self.param_dtype!r}")
    for f in ("vocab_size",) + DIM_FIELDS + ("max_len",):
      if getattr(self, f) <= 0:
        raise ValueError(f"model.{f} must be positive, got {getattr(self, f)}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                       f"({self.n_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
    if self.kind == "moe":
      if not 0 < self.experts_top_k <= self.n_experts:
        raise ValueError(f"model.experts_top_k must be in [1, n_experts={self.n_experts}], "
                         f"got {self.experts_top_k}")
      if not 0 < self.moe_every <= self.n_layers:
        raise ValueError(f"model.moe_every must be in [1, n_layers], got {self.moe_every}")

  def is_moe_layer(self, i: int) -> bool:
    return self.kind == "moe" and i % self.moe_every == self.moe_every - 1

  @property
  def n_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.n_layers))


def default_model_config() -> ml_collections.ConfigDict:
  """The `model` config subtree; dimension fields of 0 take the value of the `size` preset."""
  c = ml_collections.ConfigDict()
  c.size = "tiny"  # tiny | small | base | 1b | custom (custom: every dimension field must be set)
  c.kind = "dense"  # dense | moe
  c.d_model = 0  # residual width
  c.n_layers = 0  # transformer blocks
  c.n_heads = 0  # query heads
  c.n_kv_heads = 0  # key/value heads (grouped-query attention)
  c.head_dim = 0  # per-head width; 0 with d_model/n_heads overridden -> d_model // n_heads
  c.d_ff = 0  # SwiGLU hidden width (per expert for MoE)
  c.n_experts = 0  # MoE experts (preset 8)
  c.experts_top_k = 0  # experts chosen per token (preset 2)
  c.moe_every = 0  # an MoE block every k layers (preset 1: every layer)
  c.param_dtype = "float32"  # float32 | bfloat16: storage dtype of the parameters
  c.max_len = 0  # longest prompt + response the model accepts (preset 16384)
  c.rope_theta = 10000.0  # RoPE base
  c.tie_embeddings = False  # unembedding = embedding transpose
  return c


def model_config_from(cfg_model, vocab_size: int) -> ModelConfig:
  """Builds a `ModelConfig` from the `model` config subtree; explicit nonzero fields override the preset."""
  get = lambda k, d=0: cfg_model.get(k, d) if hasattr(cfg_model, "get") else getattr(cfg_model, k, d)
  size = get("size", "tiny")
  if size == "custom":
    dims = {}
    for f in DIM_FIELDS:
      if not get(f) and f != "head_dim":  # head_dim may follow from d_model // n_heads
        raise ValueError(f"model.{f} must be set (nonzero) when model.size='custom'")
  elif size in PRESETS:
    dims = dict(PRESETS[size])
  else:
    raise ValueError(f"model.size must be one of {tuple(PRESETS) + ('custom',)}, got {size!r}")
  for f in DIM_FIELDS:
    if get(f):
      dims[f] = int(get(f))
  if not get("head_dim") and (get("d_model") or get("n_heads") or size == "custom"):
    dims["head_dim"] = dims["d_model"] // dims["n_heads"]
  kind = get("kind", "dense")
  moe = {}
  if kind == "moe":
    moe = {f: int(get(f) or MOE_PRESET[f]) for f in MOE_PRESET}
  return ModelConfig(
      vocab_size=int(vocab_size), kind=kind, max_len=int(get("max_len") or DEFAULT_MAX_LEN),
      rope_theta=float(get("rope_theta") or 10000.0), param_dtype=get("param_dtype", "float32"),
      tie_embeddings=bool(get("tie_embeddings", False)), **dims, **moe)


@struct.dataclass
class KVCache:
  """Per-layer keys/values [B, S, n_kv_heads, head_dim] in time order, key validity [B,S], next slot."""

  k: tuple
  v: tuple
  valid: jax.Array  # [B,S] bool: slot holds a real (non-pad) token
  index: jax.Array  # int32 scalar: next slot to write; rows share it because prompts are left padded


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)); x + mlp_or_moe(norm(x))."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    pdt = DTYPES[cfg.param_dtype]
    self.layer = layer
    self.attn_norm = RMSNorm(cfg.d_model, param_dtype=pdt, rngs=rngs)
    self.attn = Attention(cfg, param_dtype=pdt, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, param_dtype=pdt, rngs=rngs)
    self.is_moe = cfg.is_moe_layer(layer)
    self.mlp = MoE(cfg, param_dtype=pdt, rngs=rngs) if self.is_moe else MLP(cfg, param_dtype=pdt, rngs=rngs)

  def __call__(self, x, positions, tokens, key_valid, numerics, cache_kv=None, index=None):
    a, kv = self.attn(self.attn_norm(x, numerics), positions, key_valid, numerics, cache_kv, index)
    x = x + a
    h = self.mlp_norm(x, numerics)
    routes = None
    if self.is_moe:
      m, routes = self.mlp(h, numerics, layer=self.layer, positions=positions, tokens=tokens)
    else:
      m = self.mlp(h, numerics)
    return x + m, kv, routes


def logit_noise_matrix(d_model: int, vocab_size: int, df: float) -> jax.Array:
  """Fixed student-t(df) matrix [D,V] / sqrt(D), generated in-graph from a fixed key (recomputable).

  Bailey's polar method without rejection: for (U, W) uniform, cos(2 pi U) sqrt(df (W^(-2/df) - 1))
  is exactly student-t(df); unlike `jax.random.t` (gamma rejection loops) it compiles in no time.
  """
  k1, k2 = jax.random.split(jax.random.key(0x7E57))
  w = jax.random.uniform(k1, (d_model, vocab_size), jnp.float32, jnp.finfo(jnp.float32).tiny, 1.0)
  u = jax.random.uniform(k2, (d_model, vocab_size), jnp.float32)
  t = jnp.cos(2 * jnp.pi * u) * jnp.sqrt(df * (w ** (-2.0 / df) - 1.0))
  return t / math.sqrt(d_model)


class Transformer(nnx.Module):
  """Decoder-only LM: embedding, n_layers x (GQA attention + SwiGLU or MoE), final RMSNorm, unembedding."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = DTYPES[cfg.param_dtype]
    self.embed = param(rngs, nnx.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model),
                       ("vocab", "embed"), pdt)
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, param_dtype=pdt, rngs=rngs)
    if not cfg.tie_embeddings:
      self.unembedding = param(rngs, nnx.initializers.normal(1.0 / math.sqrt(cfg.d_model)),
                               (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)

  def init_cache(self, batch: int, max_len: int, numerics: Numerics = LEARNER) -> KVCache:
    """An empty KV cache with `max_len` slots, stored in the activation dtype of `numerics`."""
    c = self.cfg
    shape = (batch, max_len, c.n_kv_heads, c.head_dim)
    zeros = lambda: jnp.zeros(shape, numerics.act)
    return KVCache(k=tuple(zeros() for _ in range(c.n_layers)), v=tuple(zeros() for _ in range(c.n_layers)),
                   valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

  def hidden(self, tokens, positions, valid, *, numerics: Numerics = LEARNER, cache: KVCache | None = None):
    """Final hidden states (after the final norm).

    Args:
      tokens: [B,L] int32. positions: [B,L] int32 (RoPE positions, counting valid tokens only).
      valid: [B,L] bool, False on padding (never attended to as a key).
      numerics: how to compute (see `Numerics`).
      cache: optional `KVCache`; the L tokens are written at `cache.index` and attend to the cache.
    Returns:
      (h [B,L,D] in numerics.dtype, updated cache or None, aux) with aux["routes"]
      [n_moe_layers, B, L, top_k] int32 for MoE models (aux is {} for dense).
    """
    x = self.embed[...].astype(DTYPES[numerics.weight_dtype]).astype(numerics.act)[tokens]
    valid = valid.astype(bool)
    if cache is not None:
      key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
    else:
      key_valid = valid
    new_k, new_v, routes = [], [], []
    for i, block in enumerate(self.blocks):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      idx = None if cache is None else cache.index
      x, (k, v), r = block(x, positions, tokens, key_valid, numerics, kv, idx)
      new_k.append(k)
      new_v.append(v)
      if r is not None:
        routes.append(r)
    h = self.final_norm(x, numerics)
    if cache is not None:
      cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=key_valid,
                      index=cache.index + tokens.shape[1])
    aux = {"routes": jnp.stack(routes)} if routes else {}
    return h, cache, aux

  def unembed(self, h, *, numerics: Numerics = LEARNER) -> jax.Array:
    """Logits [..., V] float32 from hidden states [..., D].

    The backend's heavy-tailed logit noise (`scale * h @ W_noise`) is added here; it is a
    deterministic function of h so the learner can recompute the rollout distribution exactly.
    """
    w = self.embed[...].T if self.cfg.tie_embeddings else self.unembedding[...]
    h = h.astype(numerics.act)
    logits = jnp.einsum("...d,dv->...v", h, numerics.w(w)).astype(jnp.float32)
    if numerics.logit_noise_scale > 0:
      noise = logit_noise_matrix(self.cfg.d_model, self.cfg.vocab_size, numerics.logit_noise_df)
      logits = logits + numerics.logit_noise_scale * jnp.einsum(
          "...d,dv->...v", h.astype(jnp.float32), noise)
    return logits

  def __call__(self, tokens, positions, valid, *, numerics: Numerics = LEARNER) -> jax.Array:
    """Logits [B,L,V] float32 of a full (uncached) forward."""
    h, _, _ = self.hidden(tokens, positions, valid, numerics=numerics)
    return self.unembed(h, numerics=numerics)


def positions_from_valid(valid: jax.Array) -> jax.Array:
  """RoPE positions [B,L] int32 counting valid tokens only (0 for left padding)."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)

