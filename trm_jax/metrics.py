"""Metric writers: JSONL (one object per step), TensorBoard events, a progress bar, a curve PNG.

Only process 0 writes; other processes get a writer that does nothing, so the trainer never
branches on the process index.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping

import jax
import numpy as np

# The panels of curves.png: (title, metric keys drawn on it).
CURVE_PANELS = (
    ("reward", ("reward/mean", "eval/reward_mean")),
    ("accept rate", ("trm/accept_rate",)),
    ("log-PPL gap", ("mismatch/ppl_gap",)),
    ("max per-token KL", ("mismatch/kl_max", "mismatch/k2_max")),
    ("bounds", ("bounds/unified", "bounds/mixed_kl", "bounds/pinsker_marginal_kl")),
    ("loss / grad norm", ("loss", "grad_norm")),
)


def _clean(v):
  v = float(np.asarray(v))
  return v if math.isfinite(v) else None  # JSON has no NaN/inf; null says "not finite"


class MetricWriter:
  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(self.path, "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items() if k != "step"}}
    self._file.write(json.dumps(row, sort_keys=True) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and v is not None:
          self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def dedupe_steps(rows: Iterable[dict]) -> list[dict]:
  """Keeps the last row written for each (step, kind): a resumed run rewrites steps it redoes."""
  last = {}
  for r in rows:
    last[(r["step"], "eval/reward_mean" in r and "loss" not in r)] = r
  return [last[k] for k in sorted(last)]


def plot_curves(rows: list[dict], path: str, title: str = "") -> str:
  """Draws CURVE_PANELS from metric rows into a PNG; returns the path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = dedupe_steps(rows)
  fig, axes = plt.subplots(2, 3, figsize=(13, 7))
  for ax, (name, keys) in zip(axes.ravel(), CURVE_PANELS):
    for key in keys:
      pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
      if pts:
        x, y = zip(*pts)
        ax.plot(x, y, marker="." if len(pts) < 40 else None, label=key)
    ax.set_title(name)
    ax.set_xlabel("step")
    if name in ("bounds", "max per-token KL") and any(r.get(k) for r in rows for k in keys):
      ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def progress(total: int, initial: int, enabled: bool, desc: str):
  """A tqdm bar with ETA on process 0 (a no-op object elsewhere or when disabled)."""
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and jax.process_index() == 0),
              dynamic_ncols=True, leave=True)
