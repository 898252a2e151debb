"""Metric writers: JSONL (one object per step), TensorBoard events, a progress bar, a curve PNG.

Only process 0 writes; other processes get a writer that does nothing, so the trainer never
branches on the process index.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Iterable, Mapping

import jax
import numpy as np

# The panels of curves.png: (title, y label, metric keys drawn on it, config threshold drawn as a line).
CURVE_PANELS = (
    ("reward", "mean reward per response", ("reward/mean", "eval/reward_mean"), None),
    ("accept rate", "fraction of sequences kept", ("trm/accept_rate",), None),
    ("log-PPL gap", "log PPL(learner) - log PPL(rollout)", ("mismatch/ppl_gap",), None),
    ("max per-token KL", "max_t KL(roll || learner)", ("mismatch/kl_max", "mismatch/k2_max"), "delta"),
    ("mean per-token KL", "mean_t KL(roll || learner)", ("mismatch/kl_mean", "mismatch/k3_mean"), "delta_avg"),
    ("bounds", "bound on |Error|", ("bounds/unified", "bounds/mixed_kl", "bounds/pinsker_marginal_kl"), None),
    ("loss", "surrogate loss", ("loss",), None),
    ("grad norm", "global grad norm (pre-clip)", ("grad_norm",), None),
    ("entropy", "nats per token", ("entropy",), None),
)
LOG_PANELS = ("bounds", "max per-token KL", "mean per-token KL")


def _clean(v):
  v = float(np.asarray(v))
  return v if math.isfinite(v) else None  # JSON has no NaN/inf; null says "not finite"


class MetricWriter:
  """Appends rows to `<workdir>/metrics.jsonl` (and TensorBoard under `<workdir>/tb`).

  `keep_through`: a resumed run passes the restored step: rows with a larger step (written after that
  checkpoint, and about to be redone) are dropped first, atomically (a new file renamed over the old),
  and TensorBoard is told to purge its events from step keep_through + 1 on (tensorboardX purge_step,
  honoured by TensorBoard), so neither holds a step twice. -1 drops every row (a fresh start).
  None (default) appends as is.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None,
               keep_through: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if keep_through is not None and os.path.exists(self.path):
      truncate_rows(self.path, keep_through)
    self._file = open(self.path, "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter
      purge = keep_through + 1 if keep_through is not None and os.path.isdir(os.path.join(workdir, "tb")) else None
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge)

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      os.fsync(self._file.fileno())
      if self._tb is not None:
        self._tb.flush()

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


def truncate_rows(path: str, keep_through: int) -> int:
  """Drops the rows of a JSONL metrics file whose step > keep_through (write-then-rename: a crash
  leaves the old file or the new one, never half of one); a torn last line is dropped too. Returns
  the number of rows dropped."""
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        dropped += 1
        continue
      if row.get("step", 0) <= keep_through:
        keep.append(json.dumps(row, sort_keys=True) + "\n")
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return dropped


def dedupe_steps(rows: Iterable[dict]) -> list[dict]:
  """Keeps the last row written for each (step, kind): a resumed run rewrites steps it redoes."""
  last = {}
  for r in rows:
    last[(r["step"], "eval/reward_mean" in r and "loss" not in r)] = r
  return [last[k] for k in sorted(last)]


def smooth(y, window: int) -> np.ndarray:
  """Trailing moving average over `window` points (shorter at the start), for noisy reward curves."""
  y = np.asarray(y, np.float64)
  c = np.cumsum(np.insert(y, 0, 0.0))
  idx = np.arange(1, len(y) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def plot_curves(rows: list[dict], path: str, title: str = "", thresholds: Mapping[str, float] | None = None) -> str:
  """Draws CURVE_PANELS from metric rows into a PNG; returns the path.

  thresholds: {"delta": .., "delta_avg": ..} drawn as horizontal lines on the divergence panels.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = dedupe_steps(rows)
  thresholds = thresholds or {}
  fig, axes = plt.subplots(3, 3, figsize=(15, 10.5))
  for ax, (name, ylabel, keys, line) in zip(axes.ravel(), CURVE_PANELS):
    for key in keys:
      pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
      if not pts:
        continue
      x, y = zip(*pts)
      if key == "reward/mean" and len(pts) >= 5:
        w = max(3, len(pts) // 10)
        ax.plot(x, y, lw=0.8, alpha=0.35, label=f"{key} (raw)")
        ax.plot(x, smooth(y, w), lw=2.0, color=ax.lines[-1].get_color(), label=f"{key} (mean of {w})")
      else:
        ax.plot(x, y, marker="." if len(pts) < 40 else None, label=key)
    if line and line in thresholds:
      ax.axhline(thresholds[line], color="red", ls="--", lw=1.2, label=f"{line} = {thresholds[line]:g}")
    if name == "accept rate":
      ax.set_ylim(-0.02, 1.02)
    ax.set_title(name)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    positive = [r.get(k) for r in rows for k in keys if r.get(k) is not None]
    if name in LOG_PANELS and any(v > 0 for v in positive):
      ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


_DATASET_NOISE = ("Using custom data configuration", "has no dataset_info.json")


class _DropDatasetNoise(logging.Filter):
  def filter(self, record):
    return not any(s in record.getMessage() for s in _DATASET_NOISE)


def quiet_dataset_logs() -> None:
  """Drops TFDS's per-load warnings about our generated configs and its build progress bars: the
  datasets are generated locally in seconds (trm_jax.data.builders), nothing is downloaded."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropDatasetNoise) for f in logger.filters):
    logger.addFilter(_DropDatasetNoise())
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()


def progress(total: int, initial: int, enabled: bool, desc: str):
  """A tqdm bar with ETA on process 0 (a no-op object elsewhere or when disabled)."""
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and jax.process_index() == 0),
              dynamic_ncols=True, leave=True)
