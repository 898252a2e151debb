"""MoE dispatch benchmark: forward + backward of one MoE layer, sparse vs dense dispatch, same weights.

Run:
  python -m experiments.benchmarks.moe            # quick: ~1 min on 2 CPU cores
  python -m experiments.benchmarks.moe --full     # more tokens and rounds

The two dispatches (`model.moe_dispatch`, trm_jax/models/moe.py) compute the same function; A and B are
interleaved round by round and `moe_sparse_speedup` is the median of the per-round ratios dense / sparse
(timing.paired_ratio), so load from other processes cancels to first order. 32 experts, top-4: the
top-k-only FLOPs are k/E = 1/8 of the dense ones, so 8x is the ideal ratio.
JSON keys: moe_sparse_speedup, moe_sparse_s, moe_dense_s (medians, seconds per step), moe_flops_sparse,
moe_flops_dense (compiled cost analysis), shape.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.benchmarks import timing
from trm_jax.models.layers import Numerics
from trm_jax.models.moe import MoE
from trm_jax.models.presets import ModelConfig

SHAPES = {  # tokens = B * L; Qwen3-30B-A3B's expert ratio (D / moe_d_ff = 8/3) at toy width
    True: dict(B=8, L=512, d_model=128, moe_d_ff=192, n_experts=32, top_k=4, rounds=5),
    False: dict(B=8, L=512, d_model=256, moe_d_ff=384, n_experts=32, top_k=4, rounds=7),
}


def _step(shape: dict, dispatch: str):
  """(jitted fwd+bwd of one MoE layer: (params, x) -> (loss, grads), params, x) for one dispatch."""
  cfg = ModelConfig(vocab_size=8, d_model=shape["d_model"], n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2,
                    d_ff=shape["moe_d_ff"], kind="moe", n_experts=shape["n_experts"],
                    experts_top_k=shape["top_k"], moe_dispatch=dispatch)
  with nnx.use_eager_sharding(False):  # one device: no mesh to place the annotated parameters on
    graphdef, params = nnx.split(MoE(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  B, L = shape["B"], shape["L"]
  x = jax.random.normal(jax.random.key(1), (B, L, cfg.d_model), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))

  def loss(p, x):
    y, _ = nnx.merge(graphdef, p)(x, Numerics(), layer=0, positions=pos, tokens=pos)
    return jnp.mean(y * y)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params, x


def run(quick: bool = True) -> dict:
  """Times sparse vs dense forward + backward of one MoE layer; returns the JSON dict (module doc)."""
  shape = SHAPES[bool(quick)]
  fns, flops = {}, {}
  for name in ("sparse", "dense"):
    step, params, x = _step(shape, name)
    flops[name] = float(step.lower(params, x).compile().cost_analysis()["flops"])
    jax.block_until_ready(step(params, x))  # compile + warm up outside the timed rounds
    fns[name] = lambda step=step, params=params, x=x: jax.block_until_ready(step(params, x))
  times = timing.interleave(fns, shape["rounds"], desc="moe fwd+bwd")
  med = timing.medians(times)
  return {"moe_sparse_speedup": timing.paired_ratio(times, "dense", "sparse"),
          "moe_sparse_s": med["sparse"], "moe_dense_s": med["dense"],
          "moe_flops_sparse": flops["sparse"], "moe_flops_dense": flops["dense"],
          "shape": {k: v for k, v in shape.items() if k != "rounds"}, "rounds": shape["rounds"],
          "backend": jax.default_backend()}


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--full", action="store_true", help="more tokens and rounds than the quick default")
  print(json.dumps(run(quick=not ap.parse_args().full), indent=1))
