"""Launching the runs of a figure: one warm start per key, a shared compile cache, two runs at a time.

Warm-start reuse. `trm_jax.trainer.train` warm-starts every run itself (300 supervised steps, ~50-100 s on
2 CPU cores, about as long as 40 RL steps). Runs that share (seed, model, data, warmstart, optim,
learner, mesh, staleness) start from bit-identical warm-started parameters, so we warm-start once per such
key (a run with `rl.steps=0`, which saves checkpoint 0 right after the warm start) and start each run from
it with `--config.warmstart.init_from=<that workdir>`: the trainer takes the learner parameters of its newest
checkpoint and skips its own warm start (a fresh optimizer and data iterators, as after a warm start).
"""
from __future__ import annotations

import concurrent.futures as futures
import os
import shutil
import subprocess
import time
from typing import Iterable

from experiments import common
from experiments.paper import results
from experiments.paper.runspec import RunSpec, warm_key


def run_env() -> dict:
  """The subprocesses' environment: a shared persistent XLA compilation cache (experiments/runs/_jax_cache).

  Runs that differ only in seed (or in the TRM criterion, for the sampler and eval programs) compile the
  same programs; the cache turns their ~20-30 s of compilation on 2 CPU cores into a lookup.
  """
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(common.DEFAULT_RUNS, "_jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return env


def _run_logged(cmd: list[str], log_path: str) -> int:
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, "a") as log:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, cwd=common.REPO, stdout=log, stderr=subprocess.STDOUT, env=run_env()).returncode


def ensure_warm(spec: RunSpec, runs_dir: str) -> str:
  """The workdir of the warm-start run for `spec` (made if missing): its checkpoint 0 holds the parameters."""
  warm_dir = os.path.join(runs_dir, "_warm", warm_key(spec))
  if os.path.isdir(os.path.join(warm_dir, "checkpoints", "0")):
    return warm_dir
  if os.path.isdir(warm_dir):
    shutil.rmtree(warm_dir)  # an interrupted warm start
  cmd = spec.command(runs_dir, extra={"rl.steps": 0})
  cmd[-1] = f"--workdir={warm_dir}"
  rc = _run_logged(cmd, warm_dir + ".log")
  if rc != 0 or not os.path.isdir(os.path.join(warm_dir, "checkpoints", "0")):
    raise RuntimeError(f"warm start for {spec.name} failed (rc={rc}); see {warm_dir}.log")
  return warm_dir


def run_one(spec: RunSpec, runs_dir: str, *, reuse_warm: bool = True) -> tuple[str, float, int]:
  """Runs `spec` unless its metrics.jsonl is complete. Returns (name, seconds, return code)."""
  wd = spec.workdir(runs_dir)
  if results.is_complete(wd, spec.steps):
    return spec.name, 0.0, 0
  if not _claim(wd):
    return spec.name, 0.0, -1  # another orchestrator is running it
  try:
    return _run_claimed(spec, runs_dir, reuse_warm)
  finally:
    os.remove(os.path.join(wd, ".claim"))


def _claim(wd: str) -> bool:
  """Marks `wd` as being run by this process (so two orchestrators never run the same spec at once)."""
  os.makedirs(wd, exist_ok=True)
  path = os.path.join(wd, ".claim")
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        with open(path) as f:
          os.kill(int(f.read().strip() or 0), 0)  # raises if that process is gone
        return False
      except (ProcessLookupError, ValueError, FileNotFoundError):
        if os.path.exists(path):
          os.remove(path)  # stale claim of a dead orchestrator
        continue
    with os.fdopen(fd, "w") as f:
      f.write(str(os.getpid()))
    return True
  return False


def _run_claimed(spec: RunSpec, runs_dir: str, reuse_warm: bool) -> tuple[str, float, int]:
  t0 = time.time()
  # A run that has checkpoints of its own resumes from them (the trainer ignores init_from then).
  extra = {"warmstart.init_from": ensure_warm(spec, runs_dir)} if reuse_warm else None
  rc = _run_logged(spec.command(runs_dir, extra=extra), os.path.join(spec.workdir(runs_dir), "run.log"))
  return spec.name, time.time() - t0, rc


def run_all(specs: Iterable[RunSpec], runs_dir: str, *, parallel: int = 2, reuse_warm: bool = True,
            verbose: bool = True) -> dict[str, tuple[float, int]]:
  """Runs the incomplete specs, `parallel` at a time; warm starts are made first (also in parallel)."""
  specs = list(dict.fromkeys(specs))
  runs_dir = os.path.abspath(runs_dir)  # subprocesses run in REPO
  todo = [s for s in specs if not results.is_complete(s.workdir(runs_dir), s.steps)]
  say = print if verbose else (lambda *a, **k: None)
  say(f"[experiments] {len(specs) - len(todo)} of {len(specs)} runs complete; running {len(todo)}", flush=True)
  out = {}
  if not todo:
    return out
  with futures.ThreadPoolExecutor(max(parallel, 1)) as pool:
    if reuse_warm:
      first = {}
      for s in todo:
        first.setdefault(warm_key(s), s)
      t0 = time.time()
      list(pool.map(lambda s: ensure_warm(s, runs_dir), first.values()))
      say(f"[experiments] {len(first)} warm start(s) ready ({time.time() - t0:.0f} s)", flush=True)
    for name, secs, rc in pool.map(lambda s: run_one(s, runs_dir, reuse_warm=reuse_warm), todo):
      out[name] = (secs, rc)
      say(f"[experiments] {name}: rc={rc} {secs:.0f} s", flush=True)
  return out
