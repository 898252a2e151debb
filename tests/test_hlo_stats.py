"""trm_jax.hlo_stats: collective bytes from compiled HLO, loop bodies counted trip-count times."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trm_jax import hlo_stats


def _mesh():
  return Mesh(np.array(jax.devices()[:8]), ("fsdp",))


def test_all_gather_inside_a_scan_counts_every_iteration():
  """5 layers, each gathers its [64, 64] f32 weight sharded 8 ways: 5 x 16384 B x 7/8 moved per chip.
  Catches: a while body counted once (14336 B), or the gather's group size ignored."""
  mesh = _mesh()

  def f(ws, x):
    def body(x, w):
      return x @ jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P())), None
    return jax.lax.scan(body, x, ws)[0]

  ws = jax.ShapeDtypeStruct((5, 64, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp", None)))
  x = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=NamedSharding(mesh, P()))
  out = hlo_stats.collective_bytes(jax.jit(f).lower(ws, x).compile().as_text())
  assert out["all-gather"] == 5 * 64 * 64 * 4 * 7 / 8
  assert out["reduce-scatter"] == out["all-to-all"] == 0


def test_all_reduce_of_a_sharded_contraction():
  """x [16, 64] @ w [64, 32], contraction dim over 8 devices, replicated result: one all-reduce of the
  [16, 32] f32 partial sums, 2 x 2048 B x 7/8 per chip (ring)."""
  mesh = _mesh()

  def f(x, w):
    return jax.lax.with_sharding_constraint(x @ w, NamedSharding(mesh, P()))

  x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
  w = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
  out = hlo_stats.collective_bytes(jax.jit(f).lower(x, w).compile().as_text())
  assert out["all-reduce"] == 2 * 16 * 32 * 4 * 7 / 8
  assert out["all-gather"] == 0


def test_largest_buffers_orders_by_bytes():
  text = "%a = f32[4,4]{1,0} add(...)\n%b = bf16[2,1024]{1,0} copy(...)\n%c = s32[3]{0} iota()"
  assert hlo_stats.largest_buffers(text, k=2) == [(4096, "bf16[2,1024]"), (64, "f32[4,4]")]
