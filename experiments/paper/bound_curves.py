"""Bound curves computed by trm_jax.bounds (paper Sec. 2), and acceptance vs length (paper Sec. 3).

  python -m experiments.paper.bound_curves                  # into a NEW directory experiments/runs/bound_curves_<time>
  python -m experiments.paper.bound_curves --runs_dir experiments/runs --out experiments/figures   # refresh the figures

Committed results are never replaced by less data: without --out the outputs go to a new directory; with
--out pointing at existing files, acceptance_vs_length.* is only rewritten when it has at least as many
measured rows as the file already there (--force overrides).

Writes (seconds on CPU):
  bounds_vs_T.png / .csv       every bound vs T = 64 .. 32768 (log-log) in the paper's two regimes:
                               KL-only: delta=1e-4, KL_seq=0.01, eps=sqrt(delta/2), TV_seq=sqrt(KL_seq/2);
                               KL+TV:   delta=1e-4, KL_seq=0.01, eps=5e-3,           TV_seq=0.05.
  bounds_vs_delta.png / .csv   every bound vs delta = 1e-6 .. 1 at T=4096 (KL_seq fixed at 0.01;
                               KL-only: eps=sqrt(delta/2); KL+TV: eps=min(5e-3, sqrt(delta/2)),
                               TV_seq=min(0.05, sqrt(KL_seq/2)) so the TV statistics never exceed Pinsker).
  acceptance_vs_length.png / .csv
                               (1-p)^T for p in {1e-4, 1e-3}, next to the TRM acceptance measured by
                               length bucket (trm/accept_rate/len_<lo>_<hi>) in the runs under --runs_dir
                               (runs whose trm.criterion is "none" are skipped; the panel says so when
                               there are none).

The Adaptive bounds use the worst case the token maxima allow, uniform Dbar_t = min(1, eps, sqrt(delta/2));
with it Adaptive-KL equals Pinsker-Marginal KL and Adaptive-TV equals Coupling (paper identities).
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import re

import jax
import numpy as np

from experiments import common
from experiments.paper import results
from trm_jax import bounds

T_GRID = tuple(2 ** k for k in range(6, 16))  # 64 .. 32768
DELTA_GRID = tuple(float(x) for x in np.logspace(-6, 0, 25))
T_FIXED = 4096
KL_SEQ = 0.01
P_GRID = (1e-4, 1e-3)

# (column name, label, line style); the order of the CSV columns.
BOUNDS = (
    ("classical_kl", "Classical KL  T(T-1)delta", "-"),
    ("classical_tv", "Classical TV  2T(T-1)eps^2", "--"),
    ("coupling", "Coupling", "-."),
    ("linear", "Linear 4T eps", ":"),
    ("pinsker_marginal_kl", "Pinsker-Marginal KL", "-"),
    ("pinsker_marginal_tv", "Pinsker-Marginal TV", "--"),
    ("adaptive_kl", "Adaptive KL (worst-case Dbar)", (0, (1, 1))),
    ("adaptive_tv", "Adaptive TV (worst-case Dbar)", (0, (3, 1, 1, 1))),
    ("adaptive", "Adaptive hybrid (worst-case Dbar)", (0, (5, 2))),
    ("mixed_kl", "Mixed KL", "-"),
    ("mixed_tv", "Mixed TV", "--"),
    ("unified", "Unified B*", "-"),
)
BOUND_KEYS = tuple(b[0] for b in BOUNDS)


def regime(name: str, delta: float, kl_seq: float = KL_SEQ) -> dict:
  """The statistics (delta, eps, kl_seq, tv_seq) of the paper's two regimes at a given delta."""
  if name == "kl_only":
    return dict(delta=delta, eps=math.sqrt(delta / 2), kl_seq=kl_seq, tv_seq=math.sqrt(kl_seq / 2))
  if name == "kl_tv":
    return dict(delta=delta, eps=min(5e-3, math.sqrt(delta / 2)), kl_seq=kl_seq,
                tv_seq=min(0.05, math.sqrt(kl_seq / 2)))
  raise ValueError(name)


REGIMES = {"kl_only": "KL-only (eps=sqrt(delta/2), TV_seq=sqrt(KL_seq/2))",
           "kl_tv": "KL+TV (eps=5e-3, TV_seq=0.05)"}


def all_bounds(T, delta, eps, kl_seq, tv_seq) -> dict:
  """Every bound of trm_jax.bounds; T or the statistics may be 1-D arrays (broadcast), returns numpy.

  The Adaptive bounds get the worst-case uniform Dbar_t = min(1, eps, sqrt(delta/2)) over t = 1..max(T).
  Vectorised over the grid so each bound is one call (a few jnp shapes, seconds in total).
  """
  T = np.asarray(T, np.int64)
  delta, eps = np.asarray(delta, np.float32), np.asarray(eps, np.float32)
  kl_seq, tv_seq = np.asarray(kl_seq, np.float32), np.asarray(tv_seq, np.float32)
  t_max = int(T.max())
  c = np.minimum(np.minimum(1.0, eps), np.sqrt(delta / 2))
  dbar = (np.asarray(c, np.float32)[..., None] * np.ones((t_max,), np.float32))
  out = _bounds_jit(T.astype(np.float32), delta, eps, kl_seq, tv_seq, dbar, t_max=t_max)
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("t_max",))
def _bounds_jit(T, delta, eps, kl_seq, tv_seq, dbar, *, t_max):
  """All of trm_jax.bounds in one compiled program (one compile instead of hundreds of eager ops)."""
  return {
      "classical_kl": bounds.classical_kl(T, delta),
      "classical_tv": bounds.classical_tv(T, eps),
      "coupling": bounds.coupling(T, eps, t_max=t_max),
      "linear": bounds.linear(T, eps),
      "pinsker_marginal_kl": bounds.pinsker_marginal_kl(T, delta, t_max=t_max),
      "pinsker_marginal_tv": bounds.pinsker_marginal_tv(T, delta, eps, t_max=t_max),
      "adaptive_kl": bounds.adaptive_kl(delta, dbar, T=T),
      "adaptive_tv": bounds.adaptive_tv(eps, dbar, T=T),
      "adaptive": bounds.adaptive(delta, eps, dbar, T=T),
      "mixed_kl": bounds.mixed_kl(T, delta, kl_seq),
      "mixed_tv": bounds.mixed_tv(T, eps, tv_seq),
      "unified": bounds.unified(T, delta, eps, kl_seq, tv_seq, t_max=t_max),
  }


def _rows(reg: str, T, stats: dict, n: int) -> list[dict]:
  b = all_bounds(T, **stats)
  full = {k: np.broadcast_to(np.asarray(v), (n,)) for k, v in {"T": T, **stats, **b}.items()}
  return [{"regime": reg, **{k: (int(v[i]) if k == "T" else float(v[i])) for k, v in full.items()}}
          for i in range(n)]


def bounds_vs_T(T_grid=T_GRID, delta=1e-4) -> list[dict]:
  rows = []
  for reg in REGIMES:
    rows += _rows(reg, np.asarray(T_grid), regime(reg, delta), len(T_grid))
  return rows


def bounds_vs_delta(delta_grid=DELTA_GRID, T=T_FIXED) -> list[dict]:
  rows = []
  for reg in REGIMES:
    st = [regime(reg, float(d)) for d in delta_grid]
    stats = {k: np.array([s[k] for s in st]) for k in st[0]}
    rows += _rows(reg, int(T), stats, len(delta_grid))
  return rows


def _write_rows(path: str, rows: list[dict]) -> str:
  header = ["regime", "T", "delta", "eps", "kl_seq", "tv_seq", *BOUND_KEYS]
  return common.write_csv(path, header, ([r[h] for h in header] for r in rows))


def _plot_bounds(rows: list[dict], x: str, path: str, title: str) -> str:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
  for ax, reg in zip(axes, REGIMES):
    sub = [r for r in rows if r["regime"] == reg]
    xs = [r[x] for r in sub]
    for key, label, ls in BOUNDS:
      lw = 2.6 if key == "unified" else 1.4
      color = "k" if key == "unified" else None
      ax.plot(xs, [r[key] for r in sub], linestyle=ls, lw=lw, label=label, color=color)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.text(xs[0], 1.15, "1 = the range of J (R in [0,1]); a certificate needs L' > B*", fontsize=7, color="gray")
    ax.set_xscale("log", base=2 if x == "T" else 10)
    ax.set_yscale("log")
    ax.set_xlabel("horizon T (tokens)" if x == "T" else "delta = max_t KL(roll || theta)")
    ax.set_title(REGIMES[reg], fontsize=10)
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel("bound on |Error|")
  axes[1].legend(fontsize=7, loc="lower right" if x == "T" else "upper left")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- acceptance vs length

_BUCKET = re.compile(r"^trm/accept_rate/len_(\d+)_(\d+)$")


def run_label(run_dir: str, runs_dir: str) -> str:
  """Group label: the run's path under runs_dir without its seed suffix (`_s<k>`)."""
  rel = os.path.relpath(run_dir, runs_dir)
  return re.sub(r"_s\d+$", "", rel)


def measured_acceptance(runs_dir: str | None, exclude: tuple = ("_warm", "pilot")) -> list[dict]:
  """Mean TRM acceptance per length bucket, per run group (runs with trm.criterion != none).

  Returns rows {group, criterion, bucket_lo, bucket_hi, accept_mean, n_steps, n_runs}; empty buckets are
  logged by the trainer as -1 (or null) and ignored.
  """
  if not runs_dir or not os.path.isdir(runs_dir):
    return []
  groups: dict[str, dict] = {}
  for path in sorted(glob.glob(os.path.join(runs_dir, "**", "metrics.jsonl"), recursive=True)):
    run_dir = os.path.dirname(path)
    parts = os.path.relpath(run_dir, runs_dir).split(os.sep)
    if any(p in exclude for p in parts) or parts[-1] == "warmstart":
      continue
    criterion = "?"
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        criterion = json.load(f).get("trm", {}).get("criterion", "?")
    if criterion == "none":
      continue
    rows = results.read_metrics(run_dir)
    if not rows:
      continue
    g = groups.setdefault(run_label(run_dir, runs_dir), {"criterion": criterion, "runs": 0, "b": {}})
    g["runs"] += 1
    for r in rows:
      for k, v in r.items():
        m = _BUCKET.match(k)
        if m and v is not None and v >= 0:
          g["b"].setdefault((int(m.group(1)), int(m.group(2))), []).append(float(v))
  out = []
  for name, g in sorted(groups.items()):
    for (lo, hi), vals in sorted(g["b"].items()):
      out.append({"group": name, "criterion": g["criterion"], "bucket_lo": lo, "bucket_hi": hi,
                  "accept_mean": float(np.mean(vals)), "n_steps": len(vals), "n_runs": g["runs"]})
  return out


def acceptance_curves(T_grid=None) -> list[dict]:
  T_grid = T_grid if T_grid is not None else [2 ** k for k in range(4, 16)]
  return [{"p": p, "T": int(T), "accept": (1.0 - p) ** T} for p in P_GRID for T in T_grid]


MIN_STEPS = 5  # buckets observed on fewer steps are kept in the CSV but not drawn (too few sequences)


def _plot_acceptance(theory: list[dict], measured: list[dict], path: str, runs_dir: str | None) -> str:
  plt = common.pyplot()
  families = sorted({m["group"].split(os.sep)[0] for m in measured})
  fig, axes = plt.subplots(1, 1 + max(len(families), 1), figsize=(6 * (1 + max(len(families), 1)), 5),
                           squeeze=False)
  axes = axes[0]
  ax = axes[0]
  for p in P_GRID:
    pts = [(r["T"], r["accept"]) for r in theory if r["p"] == p]
    ax.plot(*zip(*pts), marker="o", label=f"(1 - p)^T, p = {p:g}")
  ax.set_xscale("log", base=2)
  ax.set_ylim(-0.02, 1.02)
  ax.axhline(0.7, color="gray", ls=":", lw=1)
  ax.text(16, 0.72, "keep acceptance above ~70% (paper)", fontsize=7, color="gray")
  ax.set_xlabel("sequence length T")
  ax.set_ylabel("P(sequence accepted)")
  ax.set_title("i.i.d. per-token violation probability p (paper Sec. 3)", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  if not measured:
    ax = axes[1]
    ax.text(0.5, 0.5, f"no TRM runs with trm/accept_rate/len_* metrics under\n{runs_dir!r}:\n"
            "run experiments.paper.figures or experiments.paper.sweep first", ha="center", va="center",
            fontsize=9, transform=ax.transAxes)
    ax.set_title("measured acceptance (skipped)")
  styles = ["-", "--", "-.", ":"]
  for ax, fam in zip(axes[1:], families):
    groups = sorted({m["group"] for m in measured if m["group"].split(os.sep)[0] == fam})
    for i, name in enumerate(groups):
      pts = sorted((m["bucket_lo"], m["bucket_hi"], m["accept_mean"]) for m in measured
                   if m["group"] == name and m["n_steps"] >= MIN_STEPS)
      if not pts:
        continue
      lo, hi, acc = (np.array(v, np.float64) for v in zip(*pts))
      x = np.sqrt(np.maximum(lo, 1.0) * hi)
      ax.errorbar(x, acc, xerr=[x - np.maximum(lo, 1.0), hi - x], marker="o", ms=4, capsize=2,
                  ls=styles[(i // 10) % len(styles)], label=name.split(os.sep, 1)[-1])
    for p in P_GRID + (1e-2,):
      T = np.array([2 ** k for k in range(3, 11)])
      ax.plot(T, (1 - p) ** T, color="gray", ls="--", lw=0.8)
      ax.text(T[-1], (1 - p) ** T[-1], f" p={p:g}", fontsize=6, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6)
    ax.set_title(f"measured TRM accept rate by length bucket: {fam}", fontsize=9)
    ax.set_xlabel(f"response length bucket [lo, hi) (buckets seen on >= {MIN_STEPS} steps)")
    ax.set_ylabel("accept rate, mean over steps and seeds")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _rows_in(path: str, kind: str | None = None) -> int:
  """Data rows of an existing CSV (only those whose `kind` column equals `kind`, if given); 0 if absent."""
  if not os.path.exists(path):
    return 0
  import csv
  with open(path) as f:
    return sum(1 for r in csv.DictReader(f) if kind is None or r.get("kind") == kind)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=None, help="output directory (default: a new experiments/runs/bound_curves_<time>)")
  ap.add_argument("--force", action="store_true", help="replace existing outputs even when they hold more rows")
  ap.add_argument("--runs_dir", default=common.DEFAULT_RUNS, help="where to look for measured acceptance")
  ap.add_argument("--T", default=",".join(map(str, T_GRID)), help="comma-separated horizons for bounds_vs_T")
  ap.add_argument("--exclude", default="_warm,pilot", help="comma-separated run sub-directories to skip")
  ap.add_argument("--T_fixed", type=int, default=T_FIXED, help="horizon of bounds_vs_delta")
  args = ap.parse_args(argv)
  if args.out is None:
    import datetime
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = os.path.join(common.DEFAULT_RUNS, f"bound_curves_{stamp}")
  print(f"[bound_curves] writing to {args.out}")
  os.makedirs(args.out, exist_ok=True)
  out = {}

  def keep_existing(name: str, n_new: int, kind: str | None = None) -> bool:
    """True (and says so) when <name>.csv already holds more rows than we would write: never less data."""
    have = _rows_in(os.path.join(args.out, f"{name}.csv"), kind)
    if have > n_new and not args.force:
      print(f"[bound_curves] kept {os.path.join(args.out, name)}.csv/.png: it has {have} "
            f"{kind or ''}{' ' if kind else ''}rows, this run has {n_new} (--force to replace)")
      return True
    return False

  T_grid = [int(t) for t in args.T.split(",") if t]
  rows_T = bounds_vs_T(T_grid)
  if not keep_existing("bounds_vs_T", len(rows_T)):
    out["bounds_vs_T.csv"] = _write_rows(os.path.join(args.out, "bounds_vs_T.csv"), rows_T)
    out["bounds_vs_T.png"] = _plot_bounds(rows_T, "T", os.path.join(args.out, "bounds_vs_T.png"),
                                          "Bounds on |Error| vs horizon T (delta=1e-4, KL_seq=0.01), trm_jax.bounds")
  rows_d = bounds_vs_delta(T=args.T_fixed)
  if not keep_existing("bounds_vs_delta", len(rows_d)):
    out["bounds_vs_delta.csv"] = _write_rows(os.path.join(args.out, "bounds_vs_delta.csv"), rows_d)
    out["bounds_vs_delta.png"] = _plot_bounds(rows_d, "delta", os.path.join(args.out, "bounds_vs_delta.png"),
                                              f"Bounds on |Error| vs delta at T={args.T_fixed} (KL_seq=0.01)")
  theory = acceptance_curves()
  measured = measured_acceptance(args.runs_dir, tuple(x for x in args.exclude.split(",") if x))
  header = ["kind", "group", "criterion", "p", "bucket_lo", "bucket_hi", "T", "accept", "n_steps", "n_runs"]
  csv_rows = [["theory", "", "", r["p"], "", "", r["T"], r["accept"], "", ""] for r in theory]
  csv_rows += [["measured", m["group"], m["criterion"], "", m["bucket_lo"], m["bucket_hi"], "", m["accept_mean"],
                m["n_steps"], m["n_runs"]] for m in measured]
  if not keep_existing("acceptance_vs_length", len(measured), "measured"):
    out["acceptance_vs_length.csv"] = common.write_csv(os.path.join(args.out, "acceptance_vs_length.csv"),
                                                       header, csv_rows)
    out["acceptance_vs_length.png"] = _plot_acceptance(theory, measured,
                                                       os.path.join(args.out, "acceptance_vs_length.png"),
                                                       args.runs_dir)
    if not measured:
      print(f"[bound_curves] no measured acceptance under {args.runs_dir!r}; that panel is skipped")
  for k, v in out.items():
    print(f"[bound_curves] wrote {v}")
  return out


if __name__ == "__main__":
  main()
