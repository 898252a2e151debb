"""Writes an audit's outputs: OUT/summary.json, OUT/sequences.jsonl and three PNG plots with labelled axes."""
from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

PLOTS = ("acceptance_by_length.png", "max_kl_hist.png", "bound_vs_T.png")


def _clean(x):
  """JSON without NaN / inf (strict readers refuse them): non-finite floats become null."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  return x


def _bucket_mid(name: str) -> float:
  lo, hi = (int(v) for v in name.split("_")[1:])
  return math.sqrt(max(lo, 1) * hi)


def plot_acceptance(by_length: dict, path: str, source: str) -> None:
  """Acceptance rate per response-length bucket, one line per TRM-Max threshold (k2, and KL when known)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for crit, style in (("max_k2", "-o"), ("max_kl", "--s")):
    for thr, buckets in by_length.get(crit, {}).items():
      names = sorted(buckets, key=_bucket_mid)
      ax.plot([_bucket_mid(n) for n in names], [buckets[n] for n in names], style,
              label=f"TRM-Max on {'k2' if crit == 'max_k2' else 'KL'}, delta={thr}")
  ax.set_xscale("log")
  ax.set_xlabel("response length (tokens, bucket geometric centre)")
  ax.set_ylabel("fraction of sequences accepted")
  ax.set_ylim(-0.03, 1.03)
  ax.set_title(f"TRM acceptance vs length (divergence source: {source})")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_max_kl(sequences: list, path: str, source: str) -> None:
  """Histogram of the per-sequence max_t KL (exact / top-k lower bound) or, sampled-only, max_t k2."""
  field = "k2_max" if source == "sampled" else "kl_max"
  values = [max(s[field], 1e-12) for s in sequences]
  fig, ax = plt.subplots(figsize=(6, 4))
  lo, hi = math.log10(min(values)), math.log10(max(values)) + 1e-9
  ax.hist(values, bins=[10 ** (lo + (hi - lo) * i / 30) for i in range(31)])
  ax.set_xscale("log")
  what = {"sampled": "max_t k2 = max_t (log rho_t)^2 / 2", "topk": "max_t KL lower bound (top-k)"}
  ax.set_xlabel(f"per-sequence {what.get(source, 'max_t KL(pi_roll || pi_theta) (exact)')}")
  ax.set_ylabel("number of sequences")
  ax.set_title("per-sequence maximum divergence")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_bounds(curve: dict, table: dict, path: str) -> None:
  """Each bound vs the horizon T at the dump's delta and eps, log-log."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, values in curve.items():
    if name != "T":
      ax.plot(curve["T"], [max(v, 1e-12) for v in values], "k-" if name == "unified" else "-",
              lw=2.5 if name == "unified" else 1.2, label=name)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("horizon T (tokens)")
  ax.set_ylabel("bound on |J(theta) - J(roll) - L'(theta)|")
  ax.set_title(f"bounds at the dump's delta={table.get('delta', float('nan')):.2e}, eps={table['eps']:.2e}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(result, out_dir: str, *, per_token: bool = False) -> list:
  """Writes summary.json, sequences.jsonl (+ per-token log ratios with per_token) and the plots; returns paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "summary.json"), os.path.join(out_dir, "sequences.jsonl")]
  if result.sequences:
    source = result.summary["divergence_source"]
    plot_acceptance(result.by_length, os.path.join(out_dir, PLOTS[0]), source)
    plot_max_kl(result.sequences, os.path.join(out_dir, PLOTS[1]), source)
    plot_bounds(result.curve, result.summary["bounds"], os.path.join(out_dir, PLOTS[2]))
    paths += [os.path.join(out_dir, p) for p in PLOTS]
  result.summary["plots"] = [os.path.basename(p) for p in paths[2:]]
  with open(paths[0], "w") as f:
    json.dump(_clean(result.summary), f, indent=2)
  with open(paths[1], "w") as f:
    for i, s in enumerate(result.sequences):
      row = dict(s, log_ratio=result.tokens[i]["log_ratio"].tolist()) if per_token else s
      f.write(json.dumps(_clean(row)) + "\n")
  return paths
