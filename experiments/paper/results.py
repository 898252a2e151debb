"""Reading a run's metrics.jsonl and aggregating one metric over seeds."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from trm_jax import metrics as metrics_lib


def read_metrics(workdir_or_path: str) -> list[dict]:
  """Rows of metrics.jsonl, the last row per step kept (a resumed run may rewrite steps)."""
  path = workdir_or_path
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  last = {}
  for r in metrics_lib.read_jsonl(path):
    last[int(r["step"])] = {**last.get(int(r["step"]), {}), **r}
  return [last[s] for s in sorted(last)]


def is_complete(workdir: str, steps: int) -> bool:
  rows = read_metrics(workdir)
  return bool(rows) and max(r["step"] for r in rows) >= steps


def series(rows: Sequence[dict], key: str) -> dict[int, float]:
  """{step: value} for the rows that carry a finite `key`."""
  out = {}
  for r in rows:
    v = r.get(key)
    if v is not None and np.isfinite(v):
      out[int(r["step"])] = float(v)
  return out


def aggregate(runs: Sequence[Sequence[dict]], key: str) -> dict[str, np.ndarray]:
  """Per-step mean / std / min / max of `key` over runs (seeds), on the steps present in every run.

  Steps missing from some run (e.g. eval rows only every k steps, or a shorter run) are dropped so the
  mean is always over the same set of seeds. Returns arrays step, mean, std (population, ddof=0), min,
  max and n (number of runs).
  """
  per_run = [series(rows, key) for rows in runs]
  per_run = [s for s in per_run if s]
  if not per_run:
    return {k: np.zeros((0,)) for k in ("step", "mean", "std", "min", "max")} | {"n": 0}
  steps = sorted(set.intersection(*(set(s) for s in per_run)))
  vals = np.array([[s[t] for t in steps] for s in per_run], np.float64).reshape(len(per_run), len(steps))
  return {"step": np.asarray(steps, np.int64), "mean": vals.mean(0), "std": vals.std(0),
          "min": vals.min(0), "max": vals.max(0), "n": len(per_run)}


def final_value(rows: Sequence[dict], key: str, last_k: int = 1) -> float:
  """Mean of the last `last_k` finite values of `key` (nan when absent)."""
  s = series(rows, key)
  if not s:
    return float("nan")
  vals = [s[t] for t in sorted(s)][-last_k:]
  return float(np.mean(vals))


def seed_stats(values) -> list[float]:
  """[mean, population std, min, max] of the finite values (four nans when none)."""
  v = np.asarray(list(values), np.float64)
  v = v[np.isfinite(v)]
  if not len(v):
    return [float("nan")] * 4
  return [float(v.mean()), float(v.std()), float(v.min()), float(v.max())]
