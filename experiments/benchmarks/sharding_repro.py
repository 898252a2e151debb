"""Minimal reproduction of the XLA SPMD miscompile that `models.transformer.gather_fsdp` works around.

  python -m experiments.benchmarks.sharding_repro      # prints the per-row error, then the collective-permute

On 8 fake CPU devices, mesh data=2 x fsdp=2 x tensor=2, `einsum("blh,hd->bld", v, w)` with v batch-sharded over
(data, fsdp) and h over tensor, w = P("tensor", "fsdp"), and the output constrained to batch over (data, fsdp)
and d over tensor: the partitioner collective-permutes v's batch shards between devices 2 <-> 4 and 3 <-> 5
(mesh coordinates (data 0, fsdp 1) and (data 1, fsdp 0)) and labels the result with the original layout, so
rows 2-3 and 4-5 get each other's outputs. Measured on jax 0.10.2 (Shardy and GSPMD alike): wrong at d = 64
and 128, right at d = 32 (a different strategy); right with w first constrained to P("tensor", None).
"""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def run(d: int = 64, gather_weight: bool = False) -> np.ndarray:
  """Per-row max |sharded - numpy| of the einsum above; all ~0 when XLA is right."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  batch = ("data", "fsdp")
  r = np.random.default_rng(0)
  v, w = r.normal(size=(8, 12, 4)).astype(np.float32), r.normal(size=(4, d)).astype(np.float32)

  def f(v, w):
    if gather_weight:
      w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P("tensor", None)))
    out = jnp.einsum("blh,hd->bld", v, w)
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P(batch, None, "tensor")))

  out = jax.jit(f)(jax.device_put(v, NamedSharding(mesh, P(batch, None, "tensor"))),
                   jax.device_put(w, NamedSharding(mesh, P("tensor", "fsdp"))))
  return np.abs(np.asarray(out) - np.einsum("blh,hd->bld", v, w)).max(axis=(1, 2))


def main():
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
  for d, gather in ((32, False), (64, False), (64, True)):
    print(f"d={d:3d} weight gathered over fsdp first={gather!s:5}: per-row max error {np.round(run(d, gather), 4)}")


if __name__ == "__main__":
  main()
