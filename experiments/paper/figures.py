"""The paper's three training figures (Sec. 4) at CPU scale: log-PPL gap and score vs step, several seeds.

  python -m experiments.paper.figures --figure all --seeds 3 --steps 40 --runs_dir experiments/runs --out experiments/figures
  python -m experiments.paper.figures --figure b --print_commands      # the runs as trm_jax.main commands

Figures (each: mismatch/ppl_gap, reward/mean (rollout batches), eval/reward_mean (held-out, learner
policy) and trm/accept_rate against RL step; line = mean over seeds, band = min..max over seeds):
  a  token-level TIS (configs/baselines.py name=tis: decoupled PPO, weight min(pi_prox/pi_roll, 2) applied once)
     vs PPO clip (name=ppo_clip, ratio pi_theta/pi_roll)
  b  TRM-Max (delta) and TRM-Avg (delta_avg) vs PPO clip
  c  loose Max alone, loose Avg alone, and both combined (criterion=max_avg)
  s  (not in the paper) stress test: uncorrected plain-IS surrogate (name=none) vs PPO clip
  r  (not in the paper) TRM-Max and TRM-Avg beside their rivals PPO clip, token TIS, CPPO and DPPO
     (baseline.kind = cppo | dppo), same steps, batch and seeds

All runs share one rollout backend (--backend, --noise_scale; the default is the backend chosen by the
pilot documented in experiments/README.md) and the tiny model / running_sum task of configs/default.py.
Runs whose metrics.jsonl already reaches --steps are not re-run, so a second call only re-plots.
Runs are subprocesses of `python -m trm_jax.main` (--parallel at a time) and reuse one warm start per
seed (experiments/paper/launch.py).

Outputs in --out: figure_<x>.png, figure_<x>.csv (per method, metric and step: mean, std, min, max, n)
and figure_<x>_summary.csv / .md (per method: final eval score, final rollout reward, PPL gap, accept rate).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from experiments import common
from experiments.paper import launch, results
from experiments.paper.runspec import RunSpec, shell_command

# The CPU-scale backend chosen by the pilot (experiments/README.md, "Choosing the rollout backend").
DEFAULT_BACKEND = "noise"
DEFAULT_NOISE_SCALE = 0.1
# Thresholds: the paper's values by default; see --delta_* flags.
PAPER_DELTA_MAX, PAPER_DELTA_AVG = 0.05, 0.001
PAPER_LOOSE_MAX, PAPER_LOOSE_AVG = 0.1, 0.002

METRICS = (
    ("mismatch/ppl_gap", "log-PPL gap  |mean log pi_theta - mean log pi_roll|"),
    ("eval/reward_mean", "eval score (held-out, learner policy)"),
    ("reward/mean", "rollout reward (training batches)"),
    ("trm/accept_rate", "TRM accept rate"),
)
FIGURES = {
    "a": ("Token-level IS vs PPO clip", ("tis", "ppo_clip")),
    "b": ("TRM-Max and TRM-Avg vs PPO clip", ("trm_max", "trm_avg", "ppo_clip")),
    "c": ("Loose thresholds: Max alone, Avg alone, Max&Avg", ("loose_max", "loose_avg", "loose_max_avg")),
    # Not in the paper: a stress test of the uncorrected learner (plain IS surrogate, no clip, no mask).
    "s": ("Stress: uncorrected IS vs PPO clip", ("none", "ppo_clip")),
    # Not in the paper: TRM beside its rivals, every method at the same budget (steps, batch, seeds).
    "r": ("TRM vs rivals: TRM-Max, TRM-Avg, PPO clip, token TIS, CPPO, DPPO",
          ("trm_max", "trm_avg", "ppo_clip", "tis", "cppo", "dppo")),
}
COLORS = {"none": "tab:gray", "ppo_clip": "tab:red", "tis": "tab:blue", "trm_max": "tab:green", "trm_avg": "tab:purple",
          "loose_max": "tab:orange", "loose_avg": "tab:brown", "loose_max_avg": "tab:green", "cppo": "tab:olive",
          "dppo": "tab:cyan"}


def method_runs(args) -> dict[str, tuple[str, str, str, tuple]]:
  """method -> (config file, its argument, workdir label, extra dotted overrides) at the thresholds of `args`.

  CPPO and DPPO run alone (trm.criterion = none, as every configs/baselines.py run) with their published
  defaults (`baseline.*`) on the plain IS surrogate without a ratio clip (rl.loss = "is", ratio against
  pi_roll), as their sources define them: their token masks are the trust region.
  """
  dm, da, lm, la = args.delta_max, args.delta_avg, args.loose_max, args.loose_avg
  return {
      "none": ("baselines", "name=none", "none", ()),
      "tis": ("baselines", "name=tis", "tis", ()),
      "ppo_clip": ("baselines", "name=ppo_clip", "ppo_clip", ()),
      "trm_max": ("trm", f"criterion=max,delta={dm}", f"trm_max_d{dm:g}", ()),
      "trm_avg": ("trm", f"criterion=avg,delta_avg={da}", f"trm_avg_a{da:g}", ()),
      "loose_max": ("trm", f"criterion=max,delta={lm}", f"trm_max_d{lm:g}", ()),
      "loose_avg": ("trm", f"criterion=avg,delta_avg={la}", f"trm_avg_a{la:g}", ()),
      "loose_max_avg": ("trm", f"criterion=max_avg,delta={lm},delta_avg={la}", f"trm_maxavg_d{lm:g}_a{la:g}", ()),
      "cppo": ("baselines", "name=none", "cppo", (("baseline.kind", "cppo"),)),
      "dppo": ("baselines", "name=none", "dppo", (("baseline.kind", "dppo"),)),
  }


def method_spec(method: str, seed: int, args) -> RunSpec:
  """The run of `method` for `seed` under the backend and thresholds of `args`."""
  table = method_runs(args)
  if method not in table:
    raise ValueError(f"unknown method {method!r}; known: {sorted(table)}")
  config, arg, label, extra = table[method]
  overrides = [("eval.every", args.eval_every), ("eval.num_prompts", args.eval_prompts)]
  tag = args.backend
  if args.backend == "noise":
    overrides.append(("rollout.backend.logit_noise_scale", args.noise_scale))
    tag += f"{args.noise_scale:g}"
  arg += f",backend={args.backend},seed={seed},steps={args.steps}"
  return RunSpec(name=f"{tag}_n{args.steps}/{label}_s{seed}", config=config, arg=arg,
                 overrides=tuple(overrides) + tuple(extra))


def method_label(method: str, args) -> str:
  return {"none": "uncorrected (plain IS surrogate)", "tis": "token TIS (decoupled PPO)", "ppo_clip": "PPO clip [0.8, 1.28]",
          "trm_max": f"TRM-Max delta={args.delta_max:g}", "trm_avg": f"TRM-Avg delta_avg={args.delta_avg:g}",
          "loose_max": f"Max alone delta={args.loose_max:g}", "loose_avg": f"Avg alone delta_avg={args.loose_avg:g}",
          "loose_max_avg": f"Max&Avg {args.loose_max:g} & {args.loose_avg:g}",
          "cppo": "CPPO (Binary-TV budgets, UniRL defaults)", "dppo": "DPPO (Binary-TV mask 0.2)"}[method]


# ----------------------------------------------------------------------------- aggregation / plotting


def aggregate_methods(runs: dict[str, list[list[dict]]]) -> dict[str, dict[str, dict]]:
  """{method: {metric: aggregate(...)}} over the seeds' metric rows."""
  return {m: {key: results.aggregate(rows_list, key) for key, _ in METRICS} for m, rows_list in runs.items()}


def curves_csv(path: str, agg: dict[str, dict[str, dict]]) -> str:
  rows = []
  for m, per_metric in agg.items():
    for key, a in per_metric.items():
      for i, s in enumerate(a["step"]):
        rows.append([m, key, int(s), a["mean"][i], a["std"][i], a["min"][i], a["max"][i], a["n"]])
  return common.write_csv(path, ["method", "metric", "step", "mean", "std", "min", "max", "n_seeds"], rows)


def summarize(runs: dict[str, list[list[dict]]], last_k: int = 5, reference: str = "ppo_clip") -> list[list]:
  """Per method: final eval score, final rollout reward (mean of the last k steps), PPL gap, accept rate,
  and the final eval minus the reference method's on the same seed (paired; nan without a reference).

  Each is the mean over seeds with the population std and the min..max over seeds.
  """
  out = []
  for m, rows_list in runs.items():
    stat = lambda fn: results.seed_stats(fn(rows) for rows in rows_list)
    first_eval = stat(lambda r: results.series(r, "eval/reward_mean")[min(results.series(r, "eval/reward_mean"))]
                      if results.series(r, "eval/reward_mean") else float("nan"))
    final_eval = stat(lambda r: results.final_value(r, "eval/reward_mean", 1))
    final_reward = stat(lambda r: results.final_value(r, "reward/mean", last_k))
    gap_mean = stat(lambda r: np.mean(list(results.series(r, "mismatch/ppl_gap").values())))
    gap_final = stat(lambda r: results.final_value(r, "mismatch/ppl_gap", last_k))
    accept = stat(lambda r: np.mean(list(results.series(r, "trm/accept_rate").values())))
    # Paired by seed (each seed's runs share one warm start): final eval minus the reference's.
    ref = runs.get(reference)
    if ref is not None and len(ref) == len(rows_list):
      d = [results.final_value(a, "eval/reward_mean", 1) - results.final_value(b, "eval/reward_mean", 1)
           for a, b in zip(rows_list, ref)]
      diff = results.seed_stats(d)
    else:
      diff = [float("nan")] * 4
    out.append([m, len(rows_list), *first_eval, *final_eval, *final_reward, *gap_mean, *gap_final, *accept, *diff])
  return out


SUMMARY_HEADER = ["method", "seeds"] + [f"{q}_{s}" for q in ("first_eval", "final_eval", "final_reward_last5",
                                                             "ppl_gap_mean", "ppl_gap_last5", "accept_mean",
                                                             "final_eval_minus_ref")
                                        for s in ("mean", "std", "min", "max")]


def summary_markdown(summary: list[list]) -> str:
  cols = ["method", "seeds", "first eval", "final eval", "rollout reward (last 5)", "PPL gap (all steps)",
          "PPL gap (last 5)", "accept rate", "final eval - ref (paired)"]
  rows = []
  for r in summary:
    cells = [r[0], r[1]]
    for i in range(7):
      mean, std, lo, hi = r[2 + 4 * i: 6 + 4 * i]
      if not np.isfinite(mean):
        cells.append("-")
        continue
      prec = ".4f" if i in (3, 4) else ".3f"
      cells.append(f"{mean:{prec}} ± {std:{prec}} [{lo:{prec}}, {hi:{prec}}]")
    rows.append(cells)
  return common.markdown_table(cols, rows)


def plot_figure(path: str, title: str, agg: dict[str, dict[str, dict]], labels: dict[str, str]) -> str:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(METRICS), figsize=(4.6 * len(METRICS), 4.2))
  for ax, (key, name) in zip(axes, METRICS):
    for m, per_metric in agg.items():
      a = per_metric[key]
      if not len(a["step"]):
        continue
      color = COLORS.get(m)
      ax.plot(a["step"], a["mean"], label=f"{labels.get(m, m)} (n={a['n']})", color=color,
              marker="o" if len(a["step"]) <= 12 else None, ms=3)
      ax.fill_between(a["step"], a["min"], a["max"], color=color, alpha=0.18, lw=0)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("RL step")
    ax.set_ylabel(key, fontsize=8)
    ax.grid(alpha=0.3)
    if key == "mismatch/ppl_gap":
      ax.set_yscale("log")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{title}   (line: mean over seeds, band: min..max)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def make_figure(fig: str, args, *, run: bool = True) -> dict:
  title, methods = FIGURES[fig]
  specs = {m: [method_spec(m, s, args) for s in range(args.seeds)] for m in methods}
  if run:
    launch.run_all([s for ss in specs.values() for s in ss], args.runs_dir, parallel=args.parallel)
  runs = {}
  for m, ss in specs.items():
    rows = [results.read_metrics(s.workdir(args.runs_dir)) for s in ss]
    rows = [r for r in rows if r]
    if rows:
      runs[m] = rows
  agg = aggregate_methods(runs)
  labels = {m: method_label(m, args) for m in methods}
  backend = f"{args.backend}" + (f" (logit_noise_scale={args.noise_scale:g}, df=2)" if args.backend == "noise" else "")
  os.makedirs(args.out, exist_ok=True)
  fig_name = fig + args.suffix
  out = {
      "png": plot_figure(os.path.join(args.out, f"figure_{fig_name}.png"), f"({fig}) {title} -- backend {backend}",
                         agg, labels),
      "csv": curves_csv(os.path.join(args.out, f"figure_{fig_name}.csv"), agg),
  }
  summary = summarize(runs, reference="ppo_clip" if "ppo_clip" in runs else methods[-1])
  out["summary_csv"] = common.write_csv(os.path.join(args.out, f"figure_{fig_name}_summary.csv"), SUMMARY_HEADER, summary)
  md = summary_markdown(summary)
  with open(os.path.join(args.out, f"figure_{fig_name}_summary.md"), "w") as f:
    f.write(md + "\n")
  out["summary_md"] = md
  print(f"\n## figure {fig_name}: {title}\n{md}\n", flush=True)
  return out


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--figure", default="all", choices=("a", "b", "c", "s", "r", "all"),
                  help="a|b|c: the paper's figures (all = a, b, c); s: stress test, uncorrected IS vs PPO clip; "
                       "r: TRM vs rivals (PPO clip, token TIS, CPPO, DPPO)")
  ap.add_argument("--suffix", default="", help="appended to the output file names (figure_<x><suffix>.png)")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--runs_dir", default=common.DEFAULT_RUNS)
  ap.add_argument("--out", default=common.DEFAULT_FIGURES)
  ap.add_argument("--parallel", type=int, default=2, help="runs at once (subprocesses)")
  ap.add_argument("--backend", default=DEFAULT_BACKEND, help="bf16 | moe | stale | noise (config BACKEND_PRESETS)")
  ap.add_argument("--noise_scale", type=float, default=DEFAULT_NOISE_SCALE,
                  help="rollout.backend.logit_noise_scale when --backend=noise (df=2 from the preset)")
  ap.add_argument("--delta_max", type=float, default=PAPER_DELTA_MAX)
  ap.add_argument("--delta_avg", type=float, default=PAPER_DELTA_AVG)
  ap.add_argument("--loose_max", type=float, default=PAPER_LOOSE_MAX)
  ap.add_argument("--loose_avg", type=float, default=PAPER_LOOSE_AVG)
  ap.add_argument("--eval_every", type=int, default=5)
  ap.add_argument("--eval_prompts", type=int, default=64)
  ap.add_argument("--print_commands", action="store_true", help="print the runs' commands and exit")
  ap.add_argument("--plot_only", action="store_true", help="never train; plot what exists")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  figs = ("a", "b", "c") if args.figure == "all" else (args.figure,)
  if args.print_commands:
    seen = set()
    for f in figs:
      for m in FIGURES[f][1]:
        for s in range(args.seeds):
          cmd = shell_command(method_spec(m, s, args), args.runs_dir)
          if cmd not in seen:
            seen.add(cmd)
            print(cmd)
    return {}
  return {f: make_figure(f, args, run=not args.plot_only) for f in figs}


if __name__ == "__main__":
  main()
