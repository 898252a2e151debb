"""Shared helpers of experiments/*.py: run specs, launching runs, warm-start reuse, reading and aggregating metrics.

A run is `python -m trm_jax.main --config=configs/<file>.py:<arg> [--config.<key>=<value> ...] --workdir=<dir>`,
i.e. exactly the documented CLI, so every figure's runs can be re-made by hand from the printed commands.

Warm-start reuse. `trm_jax.trainer.train` warm-starts every run itself (300 supervised steps, ~50 s on
2 CPU cores, about as long as 40 RL steps). Runs that share (seed, model, data, warmstart, optim,
learner, mesh, staleness) start from bit-identical warm-started parameters, so we warm-start once per such
key (a run with `rl.steps=0`, which saves checkpoint 0 right after the warm start) and copy that
checkpoint 0 into each run's workdir before launching it. The trainer's resume path then restores
learner state, optimizer state, stale rollout snapshots and the data iterators' positions from it;
the trainer documents that a resumed run continues exactly as an uninterrupted one, so the result is
the same run, minus the repeated warm start. (A `warmstart.init_from` hook in the trainer would make
this unnecessary; see experiments/README.md.)
"""
from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Iterable, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RUNS = os.path.join(REPO, "experiments", "runs")
DEFAULT_FIGURES = os.path.join(REPO, "experiments", "figures")

# Overrides every experiment run gets: no TensorBoard events, checkpoints only at 0 and at the end,
# no per-run curve PNG (the experiment scripts draw their own), and the post-update certificate
# (bounds/certified_improvement = L'(theta') - B*; one extra no-grad forward per step).
RUN_DEFAULTS = {"log.tensorboard": False, "checkpoint.every": 0, "log.plot": False, "log.progress": False,
                "bounds.certify_update": True}


def _fmt(v) -> str:
  if isinstance(v, bool):
    return "True" if v else "False"
  return repr(v) if isinstance(v, str) and not v else str(v)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run: a config file + its argument string + dotted overrides, in a workdir."""

  name: str  # workdir basename under the runs dir
  config: str  # configs/<config>.py
  arg: str  # get_config argument, e.g. "name=ppo_clip,backend=noise,seed=1,steps=40"
  overrides: tuple = ()  # ((dotted key, value), ...) applied with --config.<key>=<value>

  def workdir(self, runs_dir: str) -> str:
    return os.path.join(runs_dir, self.name)

  def all_overrides(self) -> dict:
    return {**RUN_DEFAULTS, **dict(self.overrides)}

  def command(self, runs_dir: str, *, extra: dict | None = None, python: str = "python") -> list[str]:
    cmd = [python, "-m", "trm_jax.main", f"--config=configs/{self.config}.py:{self.arg}"]
    for k, v in {**self.all_overrides(), **(extra or {})}.items():
      cmd.append(f"--config.{k}={_fmt(v)}")
    cmd.append(f"--workdir={self.workdir(runs_dir)}")
    return cmd

  def load(self):
    """The ml_collections config this run trains with (validated)."""
    from trm_jax import config as config_lib
    c = config_lib.load_config(self.config, self.arg)
    c = config_lib.with_overrides(c, self.all_overrides())
    return config_lib.validate(c)

  @property
  def steps(self) -> int:
    return int(self.load().rl.steps)


def shell_command(spec: RunSpec, runs_dir: str) -> str:
  return " ".join(spec.command(runs_dir))


# ----------------------------------------------------------------------------- metrics


def read_metrics(workdir_or_path: str) -> list[dict]:
  """Rows of metrics.jsonl, the last row per step kept (a resumed run may rewrite steps)."""
  from trm_jax import metrics as metrics_lib
  path = workdir_or_path
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = metrics_lib.read_jsonl(path)
  last = {}
  for r in rows:
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


# ----------------------------------------------------------------------------- running


def warm_key(spec: RunSpec) -> str:
  """Hash of everything the warm-started checkpoint 0 depends on (values and array structure)."""
  c = spec.load()
  parts = {k: c[k].to_dict() for k in ("model", "data", "warmstart", "optim", "learner", "mesh")}
  parts["seed"] = c.seed
  parts["staleness_k"] = c.rollout.backend.staleness_k
  parts["data"].pop("num_threads", None)
  parts["data"].pop("prefetch", None)
  blob = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:12]


def run_env() -> dict:
  """The subprocesses' environment: a shared persistent XLA compilation cache (experiments/runs/_jax_cache).

  Runs that differ only in seed (or in the TRM criterion, for the sampler and eval programs) compile the
  same programs; the cache turns their ~20-30 s of compilation on 2 CPU cores into a lookup.
  """
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(DEFAULT_RUNS, "_jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return env


def _run_logged(cmd: list[str], log_path: str, env=None) -> int:
  env = run_env() if env is None else env
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, "a") as log:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def ensure_warm(spec: RunSpec, runs_dir: str) -> str:
  """Path of a checkpoint-0 directory holding the warm-started state for `spec` (made if missing)."""
  warm_dir = os.path.join(runs_dir, "_warm", warm_key(spec))
  ck = os.path.join(warm_dir, "checkpoints", "0")
  if os.path.isdir(ck):
    return ck
  if os.path.isdir(warm_dir):
    shutil.rmtree(warm_dir)  # an interrupted warm start
  cmd = spec.command(runs_dir, extra={"rl.steps": 0})
  cmd[-1] = f"--workdir={warm_dir}"
  rc = _run_logged(cmd, os.path.join(runs_dir, "_warm", warm_key(spec) + ".log"))
  if rc != 0 or not os.path.isdir(ck):
    raise RuntimeError(f"warm start for {spec.name} failed (rc={rc}); see {warm_dir}.log")
  return ck


def run_one(spec: RunSpec, runs_dir: str, *, reuse_warm: bool = True) -> tuple[str, float, int]:
  """Runs `spec` unless its metrics.jsonl is complete. Returns (name, seconds, return code)."""
  wd = spec.workdir(runs_dir)
  steps = spec.steps
  if is_complete(wd, steps):
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
  wd = spec.workdir(runs_dir)
  t0 = time.time()
  has_ckpt = os.path.isdir(os.path.join(wd, "checkpoints")) and any(
      d.isdigit() for d in os.listdir(os.path.join(wd, "checkpoints")))
  if reuse_warm and not has_ckpt:
    ck = ensure_warm(spec, runs_dir)
    os.makedirs(os.path.join(wd, "checkpoints"), exist_ok=True)
    shutil.copytree(ck, os.path.join(wd, "checkpoints", "0"))
    with open(os.path.join(wd, "warm_start_from.txt"), "w") as f:
      f.write(os.path.relpath(ck, wd) + "\n")
  cmd = spec.command(runs_dir)
  if os.path.exists(os.path.join(wd, "warm_start_from.txt")):
    # Checkpoint 0 came from the warm-start run of the same warm_key: the trainer's resume identity check
    # (checkpoint.ALLOWED_CHANGES) must let every field outside that key differ.
    cmd.insert(-1, "--allow_config_change=" + ",".join(_outside_warm_key(spec)))
  rc = _run_logged(cmd, os.path.join(wd, "run.log"))
  return spec.name, time.time() - t0, rc


def _outside_warm_key(spec: RunSpec) -> list[str]:
  """Config field patterns warm_key does not hash: they may differ from the warm-start run's config."""
  c = spec.load()
  keyed = ("model", "data", "warmstart", "optim", "learner", "mesh", "seed")
  return [f"{k}.*" if hasattr(c[k], "keys") else k for k in c.keys() if k not in keyed] + [
      "data.num_threads", "data.prefetch"]


def run_all(specs: Iterable[RunSpec], runs_dir: str, *, parallel: int = 2, reuse_warm: bool = True,
            verbose: bool = True) -> dict[str, tuple[float, int]]:
  """Runs the incomplete specs, `parallel` at a time; warm starts are made first (also in parallel)."""
  specs = list(dict.fromkeys(specs))
  runs_dir = os.path.abspath(runs_dir)  # subprocesses run in REPO
  todo = [s for s in specs if not is_complete(s.workdir(runs_dir), s.steps)]
  if verbose:
    print(f"[experiments] {len(specs) - len(todo)} of {len(specs)} runs complete; running {len(todo)}",
          flush=True)
  results = {}
  if not todo:
    return results
  with futures.ThreadPoolExecutor(max(parallel, 1)) as pool:
    if reuse_warm:
      first = {}
      for s in todo:
        first.setdefault(warm_key(s), s)
      t0 = time.time()
      list(pool.map(lambda s: ensure_warm(s, runs_dir), first.values()))
      if verbose:
        print(f"[experiments] {len(first)} warm start(s) ready ({time.time() - t0:.0f} s)", flush=True)
    for name, secs, rc in pool.map(lambda s: run_one(s, runs_dir, reuse_warm=reuse_warm), todo):
      results[name] = (secs, rc)
      if verbose:
        print(f"[experiments] {name}: rc={rc} {secs:.0f} s", flush=True)
  return results


# ----------------------------------------------------------------------------- output


def write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence]) -> str:
  import csv
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    for r in rows:
      w.writerow([f"{v:.6g}" if isinstance(v, (float, np.floating)) else v for v in r])
  return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
  fmt = lambda v: f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def ensure_repo_on_path():
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
