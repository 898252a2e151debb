"""Timing helpers every benchmark shares: A and B interleaved round by round, medians, paired ratios.

Every speed figure of the benchmarks is a ratio measured in one process with its A and B runs interleaved
(order rotated each round): another process may share the cores, so absolute times drift; the per-round
ratios of interleaved runs do not, to first order.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def log(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn: Callable[[], object]) -> float:
  """Wall seconds of one call of `fn` (which must block until its result is ready)."""
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def first_minus_steady(fn: Callable[[], object]) -> float:
  """Seconds of the first call (trace + compile + run) minus a steady-state call: the compile time."""
  import jax  # noqa: PLC0415 - the only helper that needs jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return max(first - (time.perf_counter() - t0), 0.0)


def interleave(fns: dict, repeats: int, desc: str = "", log: Callable[[str], None] = log) -> dict:
  """Round-robin timing: each round runs every fn once (order rotated); returns name -> [seconds]."""
  names, out = list(fns), {k: [] for k in fns}
  for r in range(repeats):
    for k in names[r % len(names):] + names[:r % len(names)]:
      out[k].append(timed(fns[k]))
    log(f"{desc} round {r + 1}/{repeats}: " + ", ".join(f"{k}={out[k][-1]:.3f}s" for k in names))
  return out


def medians(times: dict) -> dict:
  return {k: float(statistics.median(v)) for k, v in times.items()}


def paired_ratio(times: dict, a: str, b: str) -> float:
  """Median over rounds of t_a / t_b (each round ran both back to back, so load drift cancels)."""
  return float(statistics.median(x / y for x, y in zip(times[a], times[b])))
