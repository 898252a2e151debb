"""Mixture-of-experts SwiGLU block with a top-k router (the routing-flip mismatch source, paper App. A).

Two dispatches of the same function (`ModelConfig.moe_dispatch`):
  "sparse" (default): dropless, each token only through its k experts. The N*k token-expert pairs are
    sorted by expert (stable), and one grouped matmul per SwiGLU projection runs each expert over its
    own rows. TPU: `jax.lax.ragged_dot` (XLA's native grouped matmul). CPU / GPU: ragged_dot lowers there
    to a masked matmul over ALL groups (E/k times the FLOPs, checked on jax 0.10 CPU), so the pairs are
    laid out in blocks of `block` rows, each group padded to whole blocks, and one batched matmul runs
    every block against its expert's weights (FLOPs ~ N*k + E*block rows, never a dropped token).
  "dense": every expert computes every token, then the weighted combine (the exact reference).
Both combine y_t = sum_j gate_tj * expert_{e_tj}(x_t), the gates cast to the activation dtype first.

Sharding: the expert dim of the weights carries the logical axis "experts" (`sharding.LOGICAL_RULES`:
replicated today; D over fsdp, F over tensor as in the dense MLP). GSPMD does not partition the group
dim of either grouped matmul (ragged_dot's group sizes, or the gather of each block's expert weights,
are data-dependent), so with "experts" mapped to a mesh axis the weights are stored expert-sharded but
all-gathered over that axis for the layer's compute, as fsdp gathers them: memory-wise expert-parallel,
compute-wise data-parallel (every device runs its own tokens through whichever experts they pick). True
expert parallelism (tokens all-to-all to the expert's device) needs a shard_map dispatch; not here.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from trm_jax import sharding as sharding_lib
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


DISPATCHES = ("sparse", "dense")
MAX_BLOCK = 128  # rows per block of the CPU/GPU grouped matmul: larger pads more, smaller gathers more weights


def block_rows(n_pairs: int, n_experts: int) -> int:
  """Rows per block: the power of 2 nearest below n_pairs / (8 E), in [8, MAX_BLOCK].

  Padding costs at most E*(block-1) rows over the N*k real ones, so <= 1/8 more expert FLOPs whenever
  the lower clip does not bind; each block gathers one [D,F] weight copy, so blocks should not be tiny.
  """
  b = max(n_pairs // (8 * n_experts), 1)
  return int(min(max(1 << (b.bit_length() - 1), 8), MAX_BLOCK))


def expert_layout(experts: jax.Array, n_experts: int, block: int):
  """Dropless block layout of the pairs sorted by expert; `experts` [n] int32 (one per pair).

  Returns (row_pair [R]: the pair in each row, n for a padding row; pair_row [n]: the row of each
  pair; block_expert [R/block]: each block's expert), R = (n // block + E) * block, since
  sum_e ceil(size_e / block) <= n / block + E. Every block holds rows of one expert only.
  """
  n = experts.shape[0]
  order = jnp.argsort(experts, stable=True).astype(jnp.int32)
  sizes = jnp.bincount(experts, length=n_experts).astype(jnp.int32)
  padded = (sizes + block - 1) // block * block
  ends = jnp.cumsum(padded)
  sorted_e = experts[order]
  rank = jnp.arange(n, dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[sorted_e]  # place within its group
  dest = (ends - padded)[sorted_e] + rank
  n_blocks = n // block + n_experts
  row_pair = jnp.full((n_blocks * block,), n, jnp.int32).at[dest].set(order, unique_indices=True)
  pair_row = jnp.zeros((n,), jnp.int32).at[order].set(dest, unique_indices=True)
  starts = jnp.arange(n_blocks, dtype=jnp.int32) * block
  block_expert = jnp.minimum(jnp.searchsorted(ends, starts, side="right"), n_experts - 1)
  return row_pair, pair_row, block_expert.astype(jnp.int32)


def _swiglu_blocked(x, routes, w_gate, w_up, w_down):
  """Per-pair expert outputs [N*k, D] by the padded block layout (one batched matmul per projection)."""
  (N, D), k, E = x.shape, routes.shape[-1], w_gate.shape[0]
  block = block_rows(N * k, E)
  row_pair, pair_row, block_expert = expert_layout(routes.reshape(-1), E, block)
  x_pad = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])  # row N: the zero token of padding rows
  xb = x_pad[row_pair // k].reshape(-1, block, D)  # pair p is token p // k (row-major [N,k] pairs)
  g = jnp.einsum("nbd,ndf->nbf", xb, w_gate[block_expert])
  u = jnp.einsum("nbd,ndf->nbf", xb, w_up[block_expert])
  out = jnp.einsum("nbf,nfd->nbd", jax.nn.silu(g) * u, w_down[block_expert])
  return out.reshape(-1, D)[pair_row]


def _swiglu_ragged(x, routes, w_gate, w_up, w_down):
  """Per-pair expert outputs [N*k, D] by `jax.lax.ragged_dot` over the expert-sorted pairs."""
  k, E = routes.shape[-1], w_gate.shape[0]
  experts = routes.reshape(-1)
  order = jnp.argsort(experts, stable=True)
  sizes = jnp.bincount(experts, length=E).astype(jnp.int32)
  xs = x[order // k]
  h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)
  out = jax.lax.ragged_dot(h, w_down, sizes)
  return jnp.zeros_like(out).at[order].set(out, unique_indices=True)


GROUPED = {"blocked": _swiglu_blocked, "ragged": _swiglu_ragged}


def sparse_experts(x, gates, routes, w_gate, w_up, w_down, *, impl: str = "auto"):
  """Dropless top-k mixture: y_t = sum_j gates_tj * SwiGLU_{routes_tj}(x_t), each token through k experts.

  x [N,D], gates [N,k] (activation dtype), routes [N,k] int32, w_gate/w_up [E,D,F], w_down [E,F,D].
  `impl`: "blocked" | "ragged" | "auto" (ragged on TPU, blocked elsewhere; chosen when lowering, so an
  ahead-of-time TPU compile on a CPU host gets the TPU branch).
  """
  args = (x, routes, w_gate, w_up, w_down)
  if impl == "auto":
    pairs = jax.lax.platform_dependent(*args, tpu=_swiglu_ragged, default=_swiglu_blocked)
  else:
    pairs = GROUPED[impl](*args)
  return jnp.einsum("nkd,nk->nd", pairs.reshape(*routes.shape, -1), gates)


def dense_experts(x, gates, routes, w_gate, w_up, w_down):
  """The reference: every expert computes every token, combined by the one-hot weighted gates; same args."""
  combine = jnp.sum(jax.nn.one_hot(routes, w_gate.shape[0], dtype=gates.dtype) * gates[..., None], axis=-2)
  g = jnp.einsum("nd,edf->nef", x, w_gate)
  u = jnp.einsum("nd,edf->nef", x, w_up)
  y = jnp.einsum("nef,efd->ned", jax.nn.silu(g) * u, w_down)
  return jnp.einsum("ned,ne->nd", y, combine)


def _per_device(mix, x, gates, routes, w_gate, w_up, w_down):
  """`mix` on each device's own rows (jax.shard_map), under a mesh context whose batch axes divide B.

  Why: the sparse dispatch sorts all its token-expert pairs at once, and XLA does not partition that sort over
  the batch axes: every chip would sort the whole batch's pairs (2.9M at the 30B-A3B pod shape, past libtpu's
  1M-iteration limit). Here each device sorts its own rows' pairs. The experts' hidden dim F is split over
  "tensor" where it divides: SwiGLU is elementwise in F, and the down projection's partial sums over F are
  added by a psum. Returns None when there is no such mesh (the caller then runs `mix` as it is).
  """
  mesh = jax.sharding.get_abstract_mesh()
  batch = sharding_lib.BATCH
  if mesh.empty or not set(batch) <= set(mesh.axis_names) or x.shape[0] % math.prod(mesh.shape[a] for a in batch):
    return None
  tp = "tensor" if "tensor" in mesh.axis_names and w_gate.shape[-1] % mesh.shape["tensor"] == 0 else None

  def local(x, gates, routes, w_gate, w_up, w_down):
    y = mix(x, gates, routes, w_gate, w_up, w_down)
    return y if tp is None else jax.lax.psum(y, tp)

  rows = P(batch)
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, P(None, None, tp), P(None, None, tp),
                                                   P(None, tp, None)), out_specs=rows,
                       check_vma=False)(x, gates, routes, w_gate, w_up, w_down)


class MoE(nnx.Module):
  """Top-k routed SwiGLU experts, as HF's Qwen3MoeSparseMoeBlock (no shared expert).

  p = softmax(x @ W_router) over ALL experts in float32; the k largest p are kept and, when
  `norm_topk_prob`, renormalised to sum to 1; y = sum_j p_j * expert_{e_j}(x) with the weights cast
  to the activation dtype first. The router matmul runs in `Numerics.router_dtype` and the optional
  jitter is added to its logits (routing flips, paper App. A). `cfg.moe_dispatch` picks the sparse
  (each token through its k experts) or dense (all experts, E/k times the FLOPs) dispatch.
  """

  def __init__(self, cfg, *, param_dtype, rngs: nnx.Rngs, stack: int | None = None):
    D, F, E = cfg.d_model, cfg.moe_d_ff or cfg.d_ff, cfg.n_experts
    self.top_k, self.norm_topk_prob = cfg.experts_top_k, cfg.norm_topk_prob
    self.dispatch = getattr(cfg, "moe_dispatch", "sparse")
    if self.dispatch not in DISPATCHES:
      raise ValueError(f"model.moe_dispatch must be one of {DISPATCHES}, got {self.dispatch!r}")
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
    B, L, D = x.shape
    w = [numerics.w(v[...]) for v in (self.w_gate, self.w_up, self.w_down)]
    mix = sparse_experts if self.dispatch == "sparse" else dense_experts
    flat = lambda x, g, r, *w: mix(x.reshape(-1, D), g.reshape(-1, g.shape[-1]), r.reshape(-1, r.shape[-1]),
                                   *w).reshape(x.shape)
    gates = gates.astype(numerics.act)
    y = _per_device(flat, x, gates, routes, *w) if self.dispatch == "sparse" else None
    return (flat(x, gates, routes, *w) if y is None else y), routes
