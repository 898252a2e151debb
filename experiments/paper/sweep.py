"""T x delta sweep of TRM-Max, driven by configs/trm.py's `sweep()` grid (ml_collections configs).

  python -m experiments.paper.sweep --print_commands                 # one trm_jax.main command per grid point (a pod)
  python -m experiments.paper.sweep --steps 30 --runs_dir experiments/runs --out experiments/figures
  python -m experiments.paper.sweep --plot_only                      # table + plots from the runs that exist

Each grid point {"T": t, "delta": d} becomes load_config("trm", f"T={t},delta={d},backend=...,seed=...,steps=...")
(criterion=max, exact KL over the recomputed rollout distribution) plus the dotted overrides below; points
are run 2 at a time locally (subprocesses, one warm start per (T, seed) reused) or printed for a pod.
Runs whose metrics.jsonl is complete are not re-run.

Outputs in --out: sweep_summary.csv / sweep_summary.md (per point: final eval score, final rollout
reward, mean accept rate, fraction of steps with bounds/certified_improvement > 0, mean max-KL, mean
pre-update B*, mean certified improvement; then the post-update surrogate L'(theta') and B*, and the
selection-biased margin on the accepted rows, bounds/accepted/selected_margin) and sweep.png (the first
three against delta per T and against T per delta).
Every run has bounds.certify_update on (experiments/paper/runspec.py RUN_DEFAULTS).
"""
from __future__ import annotations

import argparse
import importlib.util
import os

import numpy as np

from experiments import common
from experiments.paper import launch, results
from experiments.paper.runspec import RunSpec, shell_command
from trm_jax import config as config_lib

DEFAULT_BACKEND = "noise"  # the backend of experiments/paper/figures.py, so the deltas bite
DEFAULT_NOISE_SCALE = 0.1


def grid(config_name: str = "trm") -> list[dict]:
  """The `sweep()` list of configs/<config_name>.py."""
  path = os.path.join(config_lib.CONFIG_DIR, f"{config_name}.py")
  spec = importlib.util.spec_from_file_location(f"sweep_{config_name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return list(module.sweep())


def point_spec(point: dict, seed: int, args) -> RunSpec:
  arg = ",".join(f"{k}={v}" for k, v in point.items())
  arg += f",backend={args.backend},seed={seed},steps={args.steps}"
  overrides = [("eval.every", args.eval_every), ("eval.num_prompts", args.eval_prompts)]
  tag = args.backend
  if args.backend == "noise":
    overrides.append(("rollout.backend.logit_noise_scale", args.noise_scale))
    tag += f"{args.noise_scale:g}"
  name = "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in point.items())
  return RunSpec(name=f"sweep_{tag}_n{args.steps}/{name}_s{seed}", config=args.config, arg=arg,
                 overrides=tuple(overrides))


def point_summary(rows: list[dict], last_k: int = 5) -> dict:
  """Scalars of one run: final scores, mean accept rate, certified fraction, mismatch and bound means.

  The certificate columns are the POST-update ones (bounds.certify_update): L'(theta') - B*(theta' vs
  pi_roll) over the whole batch (certified_*), and the same margin on the rows the mask selected
  (accepted_selected_margin_*: selection-biased, no guarantee; logged as bounds/accepted/selected_margin).
  """
  ci = list(results.series(rows, "bounds/certified_improvement").values())
  aci = list(results.series(rows, "bounds/accepted/selected_margin").values())
  mean = lambda key: float(np.mean(list(results.series(rows, key).values()) or [np.nan]))
  return {
      "accepted_selected_margin_frac": float(np.mean(np.asarray(aci) > 0)) if aci else float("nan"),
      "accepted_selected_margin_mean": float(np.mean(aci)) if aci else float("nan"),
      "surrogate_post_mean": mean("bounds/post/surrogate"),
      "unified_post_mean": mean("bounds/post/unified"),
      "unified_accepted_mean": mean("bounds/accepted/unified"),
      "final_eval": results.final_value(rows, "eval/reward_mean", 1),
      "final_reward_last5": results.final_value(rows, "reward/mean", last_k),
      "accept_mean": mean("trm/accept_rate"),
      "certified_frac": float(np.mean(np.asarray(ci) > 0)) if ci else float("nan"),
      "certified_mean": float(np.mean(ci)) if ci else float("nan"),
      "kl_max_mean": mean("mismatch/kl_max"),
      "unified_mean": mean("bounds/unified"),
      "ppl_gap_mean": mean("mismatch/ppl_gap"),
      "steps": len(rows),
  }


COLUMNS = ("final_eval", "final_reward_last5", "accept_mean", "certified_frac", "certified_mean", "kl_max_mean",
           "unified_mean", "ppl_gap_mean", "steps", "surrogate_post_mean", "unified_post_mean",
           "accepted_selected_margin_frac", "accepted_selected_margin_mean", "unified_accepted_mean")


def summarize(points: list[dict], seeds: int, args) -> list[dict]:
  out = []
  for p in points:
    per_seed = [point_summary(results.read_metrics(point_spec(p, s, args).workdir(args.runs_dir)))
                for s in range(seeds)]
    per_seed = [r for r in per_seed if r["steps"]]
    if not per_seed:
      continue
    row = dict(p, seeds=len(per_seed))
    for c in COLUMNS:
      v = np.asarray([r[c] for r in per_seed], np.float64)
      row[c] = float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")
    out.append(row)
  return out


def plot(summary: list[dict], path: str, title: str) -> str:
  plt = common.pyplot()
  panels = (("final_eval", "final eval score"), ("accept_mean", "mean TRM accept rate"),
            ("certified_frac", "fraction of steps with certified improvement > 0"))
  Ts = sorted({r["T"] for r in summary})
  ds = sorted({r["delta"] for r in summary})
  fig, axes = plt.subplots(2, 3, figsize=(14, 8))
  for j, (key, name) in enumerate(panels):
    ax = axes[0, j]
    for T in Ts:
      pts = sorted((r["delta"], r[key]) for r in summary if r["T"] == T)
      ax.plot(*zip(*pts), marker="o", label=f"T={T}")
    ax.set_xscale("log")
    ax.set_xlabel("delta (TRM-Max threshold)")
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1, j]
    for d in ds:
      pts = sorted((r["T"], r[key]) for r in summary if r["delta"] == d)
      ax.plot(*zip(*pts), marker="s", label=f"delta={d:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("horizon T")
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if key != "final_eval":
      axes[0, j].set_ylim(-0.03, 1.03)
      axes[1, j].set_ylim(-0.03, 1.03)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="trm", help="configs/<name>.py providing get_config and sweep()")
  ap.add_argument("--seeds", type=int, default=1)
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--backend", default=DEFAULT_BACKEND)
  ap.add_argument("--noise_scale", type=float, default=DEFAULT_NOISE_SCALE)
  ap.add_argument("--eval_every", type=int, default=10)
  ap.add_argument("--eval_prompts", type=int, default=64)
  ap.add_argument("--runs_dir", default=common.DEFAULT_RUNS)
  ap.add_argument("--out", default=common.DEFAULT_FIGURES)
  ap.add_argument("--parallel", type=int, default=2)
  ap.add_argument("--print_commands", action="store_true", help="print one command per point and exit")
  ap.add_argument("--plot_only", action="store_true")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  points = grid(args.config)
  specs = [point_spec(p, s, args) for p in points for s in range(args.seeds)]
  if args.print_commands:
    for s in specs:
      print(shell_command(s, args.runs_dir))
    return []
  if not args.plot_only:
    launch.run_all(specs, args.runs_dir, parallel=args.parallel)
  summary = summarize(points, args.seeds, args)
  header = [*points[0].keys(), "seeds", *COLUMNS]
  os.makedirs(args.out, exist_ok=True)
  common.write_csv(os.path.join(args.out, "sweep_summary.csv"), header, ([r[h] for h in header] for r in summary))
  md = common.markdown_table(header, ([r[h] for h in header] for r in summary))
  with open(os.path.join(args.out, "sweep_summary.md"), "w") as f:
    f.write(md + "\n")
  backend = args.backend + (f" logit_noise_scale={args.noise_scale:g}" if args.backend == "noise" else "")
  if summary:
    plot(summary, os.path.join(args.out, "sweep.png"),
         f"TRM-Max T x delta sweep ({args.config}.py sweep()), backend {backend}, {args.steps} RL steps, "
         f"{args.seeds} seed(s)")
  print(md)
  return summary


if __name__ == "__main__":
  main()
