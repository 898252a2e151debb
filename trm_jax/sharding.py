"""Mesh from config, logical-axis rules, and host-local -> global arrays.

maxtext / flax-gemma style: parameters carry logical axis names (`vocab, embed, heads, ...`), a
table of rules maps them to mesh axes, and the same model runs on 1 device or a pod by changing
`config.mesh` alone. The batch axis is sharded over ("data", "fsdp"): fsdp shards parameters AND
batch, data shards only the batch, tensor shards heads / mlp / vocab.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Logical axis -> mesh axis. None = replicated.
LOGICAL_RULES = {
    "batch": BATCH,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": None,
    "layers": None,  # the stacked (scanned) layer axis: every device runs every layer
}


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Builds the ("data", "fsdp", "tensor") mesh; one axis may be -1 and takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if n % known:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide {n} devices")
  sizes = [n // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
                     f"but {n} are present; set one axis to -1 to auto-fill")
  # Auto axes: XLA's sharding propagation places intermediates (GSPMD, as maxtext does); jax >= 0.7
  # defaults to Explicit axes, which would demand a sharding rule for every op.
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_mesh(spec: P, rules=LOGICAL_RULES) -> P:
  """Maps one PartitionSpec of logical names to mesh axes."""
  return P(*[rules.get(name) if name is not None else None for name in spec])


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Drops mesh axes that do not divide a dimension, so tiny test models shard on 8 devices."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
    size = math.prod(mesh.shape[a] for a in names) if names else 1
    out.append(axes if size and dim % size == 0 else None)
  return P(*out)


def state_shardings(state: nnx.State | Any, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for an nnx.State (or any pytree with nnx.Variable leaves) from logical names."""
  specs = nnx.get_partition_spec(state)

  def one(spec, leaf):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
    if not isinstance(spec, P):
      spec = P()
    return NamedSharding(mesh, _fit(logical_to_mesh(spec, rules), np.shape(value), mesh))

  return jax.tree.map(one, specs, state, is_leaf=lambda x: isinstance(x, (nnx.Variable, P)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over ("data", "fsdp"); the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(tree, mesh: Mesh):
  """Host-local numpy arrays -> global jax arrays sharded on the batch axis.

  Single process: a plain device_put. Multi-process: each process holds exactly its rows of the
  global batch, `host_rows(mesh, B)` in increasing order (the data pipeline reads those), and
  `make_array_from_process_local_data` stitches them into one global array.
  """
  def put(x):
    if x is None:
      return None
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    sharding = batch_sharding(mesh, x.ndim) if x.ndim else replicated(mesh)
    if jax.process_count() == 1 or isinstance(x, jax.Array):
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, tree)


def host_rows(mesh: Mesh, global_batch: int, process_index: int | None = None) -> np.ndarray:
  """The rows of a [global_batch, ...] batch-sharded array that `process_index`'s devices hold, sorted.

  A TPU mesh need not give a host a contiguous block (jax.make_mesh orders devices by the physical
  torus, and hosts own 2x2 chip tiles), so the data pipeline reads exactly these rows, and every
  process count sees the same global batch. Default process: this one.
  """
  p = jax.process_index() if process_index is None else process_index
  div = batch_divisor(mesh)
  if global_batch % div:
    raise ValueError(f"global batch {global_batch} must be a multiple of the mesh's data*fsdp = {div}")
  index_map = batch_sharding(mesh, 1).devices_indices_map((global_batch,))
  rows = set()
  for device, (sl,) in index_map.items():
    if device.process_index == p:
      rows.update(range(*sl.indices(global_batch)))
  if not rows:
    raise ValueError(f"process {p} holds no device of the mesh")
  return np.array(sorted(rows), np.int64)


def host_group_rows(mesh: Mesh, num_prompts: int, group_size: int, process_index: int | None = None):
  """(prompt_rows, expand) for a batch of num_prompts prompts each repeated group_size times.

  This process reads prompts `prompt_rows` of the global prompt batch; `local[expand]` is then exactly
  its rows `host_rows(mesh, num_prompts * group_size)` of the repeated batch, even when a group of G
  responses spans devices or processes.
  """
  rows = host_rows(mesh, num_prompts * group_size, process_index) // group_size
  prompt_rows = np.unique(rows)
  return prompt_rows, np.searchsorted(prompt_rows, rows)


def constrain_batch(tree, mesh: Mesh, batch: int):
  """Inside jit: every leaf whose leading axis is the global batch `batch` is sharded on it, so a program's
  [B, T(, V)] outputs are not gathered onto every device (the plan tool found them replicated)."""
  def one(x):
    if getattr(x, "ndim", 0) and x.shape[0] == batch:
      return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))
    return x

  return jax.tree.map(one, tree)


def batch_divisor(mesh: Mesh) -> int:
  """The global batch must be a multiple of this to shard evenly."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def opt_shardings(init_fn, params, mesh: Mesh):
  """Shardings of `init_fn(params)` (an optax init): every parameter-shaped tree (Adam's mu, nu, ...) gets
  its parameter's sharding, the rest (step counters) is replicated.

  Left to XLA's propagation, `zeros_like(param)` comes out REPLICATED (zeros do not depend on the
  input's data), i.e. a full fp32 copy of mu and nu on every chip: 8 bytes per parameter per chip.
  `params`: arrays or ShapeDtypeStructs carrying shardings.
  """
  return optax.tree_utils.tree_map_params(
      init_fn, lambda _, s: s, jax.eval_shape(init_fn, params), jax.tree.map(lambda x: x.sharding, params),
      transform_non_params=lambda _: replicated(mesh))


def init_sharded(init_fn, params, mesh: Mesh):
  """Runs `init_fn(params)` (e.g. an optax init) with every output leaf on the whole mesh: parameter-
  shaped state sharded like its parameter (`opt_shardings`), the rest replicated, so the state can be
  passed to a jit whose other arguments span the mesh."""
  return jax.jit(init_fn, out_shardings=opt_shardings(init_fn, params, mesh))(params)
