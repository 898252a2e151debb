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

  Single process: a plain device_put. Multi-host: each process holds its own rows (the data
  pipeline splits by process index) and `make_array_from_process_local_data` stitches them.
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


def batch_divisor(mesh: Mesh) -> int:
  """The global batch must be a multiple of this to shard evenly."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def init_sharded(init_fn, params, mesh: Mesh):
  """Runs `init_fn(params)` (e.g. an optax init) so every output leaf lives on the whole mesh.

  Leaves shaped like a parameter inherit XLA's propagated sharding; leaves that came out on fewer
  devices (step counters, scalars) are replicated, so the state can be passed to a jit whose other
  arguments span the mesh.
  """
  out = jax.jit(init_fn)(params)
  n = mesh.devices.size

  def fix(x):
    return x if len(x.sharding.device_set) == n else jax.device_put(x, replicated(mesh))

  return jax.tree.map(fix, out)
