"""Compile time vs depth: the learner step and the sampler, layers scanned vs unrolled.

The transformer stacks its layers' parameters and runs them with one `lax.scan` (model.scan_layers=True,
the default), so the compiled program, and its compile time, should not grow with depth; the unrolled
loop over the same parameters (model.scan_layers=False, the pre-scan behaviour) compiles one copy of
the block per layer. Small width (d_model 64) so the grid runs on CPU; compile time depends on the
program, not on the width.

  compile_s/learner/<scan|unrolled>/L<n>  seconds to the first learner update (trace + compile + one step)
                                          minus one steady-state step: trm_jax.learner.make_learner_step
                                          with the default config (fused update, remat "full").
  compile_s/sampler/<scan|unrolled>/L<n>  the same for trm_jax.rollout.sample (cached kernel, prefill +
                                          decode loop).
  compile_ratio/<learner|sampler>/<scan|unrolled>  compile_s at the deepest / at the shallowest depth.

Run:
  python -m experiments.benchmarks.compile_time                      # L = 4, 16, 36 (minutes on 2 CPU cores)
  python -m experiments.benchmarks.compile_time --layers 2,4 --json out.json
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.benchmarks import learner as bl
from experiments.benchmarks.timing import first_minus_steady
from trm_jax import sharding as sharding_lib
from trm_jax.models import Transformer, model_config_from
from trm_jax.rollout import sample

DIMS = dict(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
SHAPE = dict(B=4, G=2, P=8, T=16, V=64)
LAYERS = {"tiny": (1, 2), "quick": (4, 16), "full": (4, 16, 36)}


def learner_compile_s(n_layers: int, scan: bool) -> float:
  s = SHAPE
  cfg = bl.learner_config(dict(DIMS, n_layers=n_layers), B=s["B"], G=s["G"], P=s["P"], T=s["T"],
                          overrides={"model.scan_layers": scan})
  mesh = sharding_lib.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  state, step, _, _ = bl.build_step(cfg, s["V"], mesh)
  batch = bl.make_batch(s["B"], s["G"], s["P"], s["T"], s["V"])
  box = [state]

  def one():
    box[0], metrics = step(box[0], batch)
    return metrics

  return first_minus_steady(one)


def sampler_compile_s(n_layers: int, scan: bool) -> float:
  s = SHAPE
  c = bl.learner_config(dict(DIMS, n_layers=n_layers), B=s["B"], G=s["G"], P=s["P"], T=s["T"],
                        overrides={"model.scan_layers": scan})
  with nnx.use_eager_sharding(False):
    g, params = nnx.split(Transformer(model_config_from(c.model, s["V"]), rngs=nnx.Rngs(0)))
  prompt = jax.random.randint(jax.random.key(0), (s["B"], s["P"]), 3, s["V"])
  mask = jnp.ones((s["B"], s["P"]), bool)
  return first_minus_steady(lambda: sample(g, params, prompt, mask, jax.random.key(1), max_new_tokens=s["T"],
                                            eos_id=-1).tokens)


def run(layers=LAYERS["full"], log=print) -> dict:
  """{key: seconds} for every (part, scan|unrolled, depth), plus the deepest/shallowest ratios."""
  res = {}
  for part, fn in (("learner", learner_compile_s), ("sampler", sampler_compile_s)):
    for mode, scan in (("scan", True), ("unrolled", False)):
      for n in layers:
        res[f"compile_s/{part}/{mode}/L{n}"] = t = fn(n, scan)
        log(f"compile_s/{part}/{mode}/L{n} = {t:.2f}")
      lo, hi = res[f"compile_s/{part}/{mode}/L{layers[0]}"], res[f"compile_s/{part}/{mode}/L{layers[-1]}"]
      res[f"compile_ratio/{part}/{mode}"] = hi / max(lo, 1e-9)
  return res


def table(res: dict, layers) -> str:
  rows = [f"{'compile seconds':22s}" + "".join(f"{'L' + str(n):>9s}" for n in layers) + f"{'L' + str(layers[-1]) + '/L' + str(layers[0]):>10s}"]
  for part in ("learner", "sampler"):
    for mode in ("scan", "unrolled"):
      rows.append(f"{part + ' ' + mode:22s}" + "".join(f"{res[f'compile_s/{part}/{mode}/L{n}']:9.2f}" for n in layers)
                  + f"{res[f'compile_ratio/{part}/{mode}']:10.2f}")
  return "\n".join(rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", default=",".join(map(str, LAYERS["full"])), help="comma list of depths")
  p.add_argument("--json", default="", help="write the figures to this path")
  a = p.parse_args(argv)
  layers = tuple(int(x) for x in a.layers.split(","))
  res = run(layers)
  print(table(res, layers))
  print(json.dumps(res, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
