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


def test_computation_runs_counts_scan_bodies_and_profile_counts_dot_flops():
  """A 7-step scan of x [16, 32] @ w [32, 48] (+ tanh), then one [16, 48] x [48, 8] dot outside: the scan
  body runs 7 times per call; the dots' FLOPs are 7 x 2*16*32*48 and 2*16*48*8 (hand-computed)."""
  from experiments.benchmarks import profile

  def f(x, ws, v):
    y = jax.lax.scan(lambda c, w: (jnp.tanh(x @ w) + c, None), jnp.zeros((16, 48)), ws)[0]
    return y @ v

  args = (jnp.ones((16, 32)), jnp.ones((7, 32, 48)), jnp.ones((48, 8)))
  text = jax.jit(f).lower(*args).compile().as_text()
  runs = hlo_stats.computation_runs(text)
  insts = profile.parse_module(text)
  kinds = profile.classify(insts)
  dots = [(n, d) for n, d in insts.items() if d["op"] == "dot"]
  assert sorted(d["flops"] for _, d in dots) == [2 * 16 * 48 * 8, 2 * 16 * 32 * 48]
  in_loop = [d for _, d in dots if d["flops"] == 2 * 16 * 32 * 48][0]
  assert runs[in_loop["computation"]] == 7
  # a fake trace: 1 ms for every op the runtime executes (not those inside fusions) over 2 calls
  fused = {c for d in insts.values() if d["op"] == "fusion" for c in d["calls"]}
  times = {n: 1e-3 for n, d in insts.items() if d["computation"] not in fused and d["op"] != "parameter"}
  s = profile.summarize(text, times, calls=2)
  assert abs(s["dot_gflops_per_call"] * 1e9 - (7 * 2 * 16 * 32 * 48 + 2 * 16 * 48 * 8)) < 1
  assert s["by_kind"]["dot"]["ms"] > 0
  assert all(k in ("dot", "elementwise", "reduce", "copy / transpose", "scatter / gather",
                   "dynamic slice / update") for k, _ in kinds.values())
