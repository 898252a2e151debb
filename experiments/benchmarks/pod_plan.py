"""The T sweep of the pod plan: per TPU topology and response length T, does the paper's 8B step fit, how fast.

  pip install -e ".[tpu]"
  python -m experiments.benchmarks.pod_plan --hf_path=/ckpt/Qwen3-8B-Base --T=4096,20480 --json=pod_plan.json

Each (topology, T) point is one `trm_jax.plan.plan` of `configs/pod_qwen3_8b.py` (B = 512, P = 2048, its
microbatch settings) with `T=<T>`: ahead-of-time compiled for the topology on this CPU, ~10-15 min per point on
2 cores. `hf_path` needs only config.json and the tokenizer files. The largest T that fits is extrapolated
linearly in T from the two points of a topology (every T-dependent buffer -- KV cache, residuals, attention
blocks, batch -- is linear in T at fixed block sizes) and printed as such: an estimate, not a compiled plan.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402

from trm_jax import config as config_lib  # noqa: E402
from trm_jax import plan as plan_lib  # noqa: E402

GiB = 1024**3


def point(hf_path: str, topology: str, T: int, config: str = "pod_qwen3_8b") -> dict:
  """One plan; the fields of the README table."""
  r = plan_lib.plan(config_lib.load_config(config, f"hf_path={hf_path},T={T}"), topology)
  usable = r["hbm_per_chip"] * plan_lib.USABLE_HBM
  return {"topology": topology, "T": T, "fits": r["peak_per_chip"] <= usable and "fits" in r["verdict"],
          "peak_gib": r["peak_per_chip"] / GiB, "hbm_gib": r["hbm_per_chip"] / GiB,
          "headroom": 1 - r["peak_per_chip"] / r["hbm_per_chip"], "step_s": r["step_s"],
          "step_serial_s": r["step_serial_s"], "learner_bound": r["learner"]["bound"],
          "sampler_bound": r["sampler"]["bound"], "verdict": r["verdict"]}


def largest_fitting_T(points: list[dict], headroom: float = 0.10) -> float | None:
  """Linear extrapolation of the peak over T from the first and last point: the T whose peak leaves
  `headroom` of HBM free."""
  if len(points) < 2 or points[-1]["T"] == points[0]["T"]:
    return None
  a, b = points[0], points[-1]
  slope = (b["peak_gib"] - a["peak_gib"]) / (b["T"] - a["T"])
  if slope <= 0:
    return None
  return a["T"] + ((1 - headroom) * a["hbm_gib"] - a["peak_gib"]) / slope


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--hf_path", required=True, help="directory with the checkpoint's config.json and tokenizer")
  ap.add_argument("--topologies", default="v5p:4x4x4,v5e:16x16")
  ap.add_argument("--T", default="4096,20480", help="response lengths, comma-separated (first and last fit the line)")
  ap.add_argument("--config", default="pod_qwen3_8b")
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  rows = []
  for topology in args.topologies.split(","):
    pts = [point(args.hf_path, topology, int(t), args.config) for t in args.T.split(",")]
    for p in pts:
      print(f"{topology:10s} T={p['T']:6d} peak {p['peak_gib']:6.2f} / {p['hbm_gib']:.0f} GiB "
            f"(headroom {100 * p['headroom']:.0f}%) step {p['step_s']:.1f} s ({p['step_serial_s']:.1f} s no overlap; "
            f"learner {p['learner_bound']}-bound, sampler {p['sampler_bound']}-bound) {p['verdict'][:60]}", flush=True)
    t_max = largest_fitting_T(pts)
    print(f"{topology:10s} largest T with >= 10% headroom (linear in T): "
          f"{'n/a' if t_max is None else f'{t_max:.0f}'}", flush=True)
    rows.append({"topology": topology, "points": pts, "largest_T_linear": t_max})
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
