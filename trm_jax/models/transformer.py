"""Decoder-only transformer policy (dense or MoE) in Flax NNX, with a KV cache and `Numerics`.

The layers' parameters are stacked (a leading "layers" axis) and the forward pass runs them with one
`lax.scan`, so compile time does not grow with depth; `ModelConfig.scan_layers=False` unrolls a Python
loop over the same parameters (for comparison). Parameter tree (logical axes in brackets):

  embed [V,D] (vocab, embed)
  layers.{attn_norm,mlp_norm}.scale [L,D]; layers.attn.{wq [L,D,H,Dh], wk/wv [L,D,K,Dh], wo [L,H,Dh,D]},
    optional layers.attn.{bq [L,H,Dh], bk/bv [L,K,Dh]} (qkv_bias), bo [L,D] (o_bias),
    {q_norm,k_norm}.scale [L,Dh] (qk_norm)
  mlp.{w_gate,w_up [Ld,D,F], w_down [Ld,F,D]}: the dense layers `cfg.dense_layers`, in order
  moe.{router [Lm,D,E], w_gate/w_up [Lm,E,D,Fm], w_down [Lm,E,Fm,D]}: the MoE layers `cfg.moe_layers`
  final_norm.scale [D]; unembedding [D,V] unless tied.

Irregular MoE layouts (HF decoder_sparse_step > 1 or mlp_only_layers) keep the two MLP stacks apart:
the scan carries each layer's row index into its stack and a `lax.cond` picks the dense or MoE branch
(both compiled once). Uniform models (all dense, all MoE) scan their MLP stack directly.
Build the model under `nnx.use_eager_sharding(False)` and place it with trm_jax.sharding.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from trm_jax import sharding as sharding_lib
from trm_jax.models.layers import (DTYPES, LEARNER, MLP, Attention, Numerics, RMSNorm, dense_last, param,
                                  write_rows)
from trm_jax.models.moe import MoE
from trm_jax.models.presets import (  # noqa: F401  (re-exported)
    ARCHS, DEFAULT_MAX_LEN, DIM_FIELDS, HF_PRESETS, KINDS, MOE_PRESET, PRESETS, ModelConfig,
    default_model_config, model_config_from)

# learner.remat: how the backward pass treats each layer's activations.
REMAT_POLICIES = {
    "none": None,  # keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input; recompute the rest
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class KVCache:
  """Keys/values of every layer [n_layers, B, S, n_kv_heads, head_dim] in time order (post-RoPE),
  key validity [B,S], each row's next slot [B] (the rows of a continuous batch sit at different slots)."""

  k: jax.Array
  v: jax.Array
  valid: jax.Array  # [B,S] bool: slot holds a real (non-pad) token
  index: jax.Array  # [B] int32: next slot to write in each row


class Layers(nnx.Module):
  """The attention half of every block, stacked over layers: attn_norm, attn, mlp_norm."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt, L = DTYPES[cfg.param_dtype], cfg.n_layers
    self.attn_norm = RMSNorm(cfg.d_model, param_dtype=pdt, rngs=rngs, eps=cfg.rms_norm_eps, stack=L)
    self.attn = Attention(cfg, param_dtype=pdt, rngs=rngs, stack=L)
    self.mlp_norm = RMSNorm(cfg.d_model, param_dtype=pdt, rngs=rngs, eps=cfg.rms_norm_eps, stack=L)


def constrain_batch_axis(x: jax.Array) -> jax.Array:
  """Shards the layer scan's hidden state [B,S,D]: B over ("data", "fsdp"), D over "tensor" (each only
  where it divides), when traced under a mesh context (`jax.sharding.use_abstract_mesh`); a no-op without
  one. The learner's update is traced under its mesh (learner.make_learner_step), so it is on there; the
  layer weights are then gathered over fsdp first (`gather_fsdp`, an XLA workaround).

  Why: XLA propagated the weights' fsdp sharding of "embed" onto the hidden state, so the remat
  residuals [L,B,S,D] were sharded on D over fsdp only, with B whole and no split over tensor
  (155 GB/chip at 8B, v5p fsdp=16 x tensor=4). Batch over fsdp alone gives the same bytes per chip;
  the extra D-over-tensor split (Megatron-style sequence parallelism, on D) divides them by `tensor`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(sharding_lib.BATCH + ("tensor",)) <= set(mesh.axis_names):
    return x
  fits = lambda dim, axes: dim % math.prod(mesh.shape[a] for a in axes) == 0
  spec = [sharding_lib.BATCH if fits(x.shape[0], sharding_lib.BATCH) else None] + [None] * (x.ndim - 1)
  if x.ndim >= 2 and fits(x.shape[-1], ("tensor",)):
    spec[-1] = "tensor"
  return jax.lax.with_sharding_constraint(x, P(*spec))


def constrain_kv(x: jax.Array) -> jax.Array:
  """Shards a KV-cache array [n_layers, B, S, n_kv_heads, head_dim]: B over ("data", "fsdp"), KV heads over
  "tensor" (each where it divides), under a mesh context; a no-op without one. Without it XLA kept the
  group-broadcast cache's B whole (850 GB per chip planned for the 8B pod run)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(sharding_lib.BATCH + ("tensor",)) <= set(mesh.axis_names):
    return x
  fits = lambda dim, axes: dim % math.prod(mesh.shape[a] for a in axes) == 0
  spec = (None, sharding_lib.BATCH if fits(x.shape[1], sharding_lib.BATCH) else None, None,
          "tensor" if fits(x.shape[3], ("tensor",)) else None, None)
  return jax.lax.with_sharding_constraint(x, P(*spec))


def gather_fsdp(state):
  """One layer's weights with their "fsdp" split gathered (FSDP's all-gather before use), under a mesh
  context; a no-op without one. Tensor splits stay.

  Why: with the hidden state constrained to batch over ("data", "fsdp") and D over "tensor"
  (`constrain_batch_axis`), XLA's SPMD partitioner (jax 0.10.2, Shardy and GSPMD alike) miscompiles a
  contraction over a tensor-sharded dim whose weight keeps D over "fsdp", on the mesh data=2 x fsdp=2 x
  tensor=2: it collective-permutes the batch shards of devices (data 0, fsdp 1) and (data 1, fsdp 0) to
  line them up with the weight's fsdp tiling and never permutes the result back, so those rows get each
  other's outputs. Ten-line reproduction: experiments/benchmarks/sharding_repro.py. Gathering the weight
  first leaves nothing to line up.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "fsdp" not in mesh.axis_names or mesh.shape["fsdp"] == 1:
    return state

  def drop_fsdp(axes):
    if isinstance(axes, tuple):
      axes = tuple(a for a in axes if a != "fsdp")
      return axes or None
    return None if axes == "fsdp" else axes

  def one(v):
    if not isinstance(v, nnx.Variable) or not v.get_metadata().get("out_sharding"):
      return v
    names, value = v.get_metadata()["out_sharding"], v.get_value()
    names = tuple(names)[len(names) - value.ndim:]  # a scanned stack's slice lost its leading "layers"
    spec = [drop_fsdp(sharding_lib.LOGICAL_RULES.get(n)) if n else None for n in names]
    fits = lambda dim, axes: axes is None or dim % math.prod(
        mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))) == 0
    spec = [a if fits(d, a) else None for d, a in zip(value.shape, spec)]
    return v.replace(value=jax.lax.with_sharding_constraint(value, P(*spec)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
    self.layers = Layers(cfg, rngs=rngs)
    n_dense, n_moe = len(cfg.dense_layers), len(cfg.moe_layers)
    self.mlp = MLP(cfg, cfg.d_ff, param_dtype=pdt, rngs=rngs, stack=n_dense) if n_dense else None
    self.moe = MoE(cfg, param_dtype=pdt, rngs=rngs, stack=n_moe) if n_moe else None
    self.final_norm = RMSNorm(cfg.d_model, param_dtype=pdt, rngs=rngs, eps=cfg.rms_norm_eps)
    if not cfg.tie_embeddings:
      self.unembedding = param(rngs, nnx.initializers.normal(1.0 / math.sqrt(cfg.d_model)),
                               (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)

  def init_cache(self, batch: int, max_len: int, numerics: Numerics = LEARNER) -> KVCache:
    """An empty KV cache with `max_len` slots, stored in the activation dtype of `numerics`."""
    c = self.cfg
    shape = (c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim)
    return KVCache(k=constrain_kv(jnp.zeros(shape, numerics.act)), v=constrain_kv(jnp.zeros(shape, numerics.act)),
                   valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((batch,), jnp.int32))

  def _layer_inputs(self, static: bool):
    """Per-layer inputs of the scan: layer index, stacked attention params, MLP params / stack rows."""
    c = self.cfg
    is_moe = np.array([c.is_moe_layer(i) for i in range(c.n_layers)])
    row = np.zeros(c.n_layers, np.int32)  # row of layer i in its own (dense or MoE) stack
    row[list(c.dense_layers)] = np.arange(len(c.dense_layers))
    row[list(c.moe_layers)] = np.arange(len(c.moe_layers))
    arr = (lambda x: x) if static else jnp.asarray
    xs = {"i": arr(np.arange(c.n_layers, dtype=np.int32)), "attn": nnx.state(self.layers)}
    if self.moe is None:
      xs["mlp"] = nnx.state(self.mlp)
    elif self.mlp is None:
      xs["moe"] = nnx.state(self.moe)
    else:
      xs["is_moe"], xs["row"] = arr(is_moe), arr(row)
    return xs

  def hidden(self, tokens, positions, valid, *, numerics: Numerics = LEARNER, cache: KVCache | None = None,
             remat: str = "none", segment_ids: jax.Array | None = None):
    """Final hidden states (after the final norm).

    Args:
      tokens: [B,L] int32. positions: [B,L] int32 (RoPE positions, counting valid tokens only).
      valid: [B,L] bool, False on padding (never attended to as a key).
      numerics: how to compute (see `Numerics`).
      cache: optional `KVCache`; the L tokens are written at `cache.index` and attend to the cache.
      remat: rematerialisation policy of each layer in the backward pass (`REMAT_POLICIES`).
      segment_ids: optional [B,L] int32 (no cache): packed rows, several sequences per row; a token
        attends only to earlier tokens with its own id (give positions that restart per segment).
    Returns:
      (h [B,L,D] in numerics.dtype, updated cache or None, aux) with aux["routes"]
      [n_moe_layers, B, L, top_k] int32 for MoE models (aux is {} for dense).
    """
    if remat not in REMAT_POLICIES:
      raise ValueError(f"learner.remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
    c = self.cfg
    x = self.embed[...].astype(DTYPES[numerics.weight_dtype]).astype(numerics.act)[tokens]
    valid = valid.astype(bool)
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
    key_valid = valid if cache is None else write_rows(cache.valid, valid, cache.index)
    index = None if cache is None else cache.index
    body = self._layer_body(numerics, tokens, positions, key_valid, index, segment_ids, cache)
    if remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not c.scan_layers)
    x, ys = self._run_layers(body, x)
    h = self.final_norm(x, numerics)
    routes = ys
    if cache is not None:
      # Every layer's new keys / values written once, after the layer loop: carrying the whole cache through
      # the scan made XLA copy it (all layers) in every layer of every decode step.
      routes, k, v = ys
      cache = KVCache(k=write_layers(cache.k, k, index), v=write_layers(cache.v, v, index), valid=key_valid,
                      index=cache.index + tokens.shape[1])
    aux = {}
    if self.moe is not None:
      aux["routes"] = routes if self.mlp is None else routes[np.array(c.moe_layers)]
    return h, cache, aux

  def _run_layers(self, body, carry):
    """Applies `body` over the layers: one `lax.scan` (scan_layers) or an unrolled Python loop."""
    if self.cfg.scan_layers:
      return jax.lax.scan(body, carry, self._layer_inputs(static=False))
    xs, outs = self._layer_inputs(static=True), []
    for i in range(self.cfg.n_layers):
      carry, r = body(carry, jax.tree.map(lambda a: a[i], xs))
      outs.append(r)
    return carry, jax.tree.map(lambda *ys: jnp.stack(ys), *outs)

  def _layer_body(self, numerics, tokens, positions, key_valid, index, segment_ids=None, cache=None):
    """The scan body of one layer: x, layer inputs -> new x, MoE routes (and with a cache: the new tokens'
    keys / values of this layer, which `hidden` writes into the cache after the loop).

    Pre-norm residual block x += attn(norm(x)); x += mlp_or_moe(norm(x)). Layer i reads its cache slice
    from `cache` (loop-invariant) and attends to it with the new tokens inserted.
    """
    attn_def = nnx.graphdef(self.layers)
    mlp_def = None if self.mlp is None else nnx.graphdef(self.mlp)
    moe_def = None if self.moe is None else nnx.graphdef(self.moe)
    mlp_stack = None if self.mlp is None else nnx.state(self.mlp)
    moe_stack = None if self.moe is None else nnx.state(self.moe)
    k_routes = self.cfg.experts_top_k if self.moe is not None else 0

    def dense(h, p):
      return nnx.merge(mlp_def, p)(h, numerics), jnp.zeros(h.shape[:2] + (k_routes,), jnp.int32)

    def moe(h, p, i):
      return nnx.merge(moe_def, p)(h, numerics, layer=i, positions=positions, tokens=tokens)

    def mixer(h, xs, i):
      if "mlp" in xs:
        return dense(h, xs["mlp"])
      if "moe" in xs:
        return moe(h, xs["moe"], i)
      # irregular MoE layout: index each stack by the layer's row
      take = lambda stack: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, xs["row"], keepdims=False), stack)
      if isinstance(xs["is_moe"], np.bool_):  # unrolled: the branch is known at trace time
        return moe(h, take(moe_stack), i) if xs["is_moe"] else dense(h, take(mlp_stack))
      return jax.lax.cond(xs["is_moe"], lambda h: moe(h, take(moe_stack), i),
                          lambda h: dense(h, take(mlp_stack)), h)

    def body(x, xs):
      x = constrain_batch_axis(x)
      xs = gather_fsdp(xs)
      i, lyr = xs["i"], nnx.merge(attn_def, xs["attn"])
      kv = None if cache is None else (cache.k[i], cache.v[i])
      a, (k, v) = lyr.attn(lyr.attn_norm(x, numerics), positions, key_valid, numerics, kv, index, segment_ids)
      x = x + a
      m, routes = mixer(lyr.mlp_norm(x, numerics), xs, i)
      return constrain_batch_axis(x + m), (routes if cache is None else (routes, k, v))

    return body

  def unembed(self, h, *, numerics: Numerics = LEARNER) -> jax.Array:
    """Logits [..., V] float32 from hidden states [..., D].

    The backend's heavy-tailed logit noise (`scale * h @ W_noise`) is added here; it is a
    deterministic function of h so the learner can recompute the rollout distribution exactly.
    """
    w = self.embed[...].T if self.cfg.tie_embeddings else self.unembedding[...]
    h = h.astype(numerics.act)
    logits = dense_last(h, numerics.w(w)).astype(jnp.float32)  # its weight gradient: see dense_last
    if numerics.logit_noise_scale > 0:
      noise = logit_noise_matrix(self.cfg.d_model, self.cfg.vocab_size, numerics.logit_noise_df)
      logits = logits + numerics.logit_noise_scale * jnp.einsum(
          "...d,dv->...v", h.astype(jnp.float32), noise)
    # The learner's [B, C, V] chunks: rows over data x fsdp, the vocabulary over tensor (under a mesh; XLA
    # otherwise kept V whole: 9.3 GiB per chip at the 8B pod shape). The sampler's [B, V] rows are left alone.
    return constrain_batch_axis(logits) if logits.ndim == 3 else logits

  def __call__(self, tokens, positions, valid, *, numerics: Numerics = LEARNER, remat: str = "none") -> jax.Array:
    """Logits [B,L,V] float32 of a full (uncached) forward."""
    h, _, _ = self.hidden(tokens, positions, valid, numerics=numerics, remat=remat)
    return self.unembed(h, numerics=numerics)


def write_layers(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """The layer-stacked cache buf [n_layers,B,S,...] with every layer's new keys / values [n_layers,B,L,...]
  written in place at each row's `index` (one token: a per-row scatter; several: at row 0's index)."""
  new = new.astype(buf.dtype)
  if new.shape[2] == 1:
    return buf.at[:, jnp.arange(buf.shape[1]), index].set(new[:, :, 0], mode="promise_in_bounds")
  return jax.lax.dynamic_update_slice(buf, new, (0, 0, index[0]) + (0,) * (buf.ndim - 3))


def positions_from_valid(valid: jax.Array) -> jax.Array:
  """RoPE positions [B,L] int32 counting valid tokens only (0 for left padding)."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def sequence_inputs(prompt, prompt_mask, response, response_mask=None):
  """(tokens, positions, valid) [B,P+T] of prompt + response for a full forward.

  Positions match the sampler's; the logits predicting response token t sit at slot P-1+t, i.e.
  `logits[:, P-1:P-1+T]`.
  """
  if response_mask is None:
    response_mask = jnp.ones(response.shape, bool)
  tokens = jnp.concatenate([prompt, response], axis=1).astype(jnp.int32)
  valid = jnp.concatenate([prompt_mask.astype(bool), response_mask.astype(bool)], axis=1)
  return tokens, positions_from_valid(valid), valid
