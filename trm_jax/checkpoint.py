"""Orbax CheckpointManager wrapper: save everything a run needs, resume from the newest GOOD step.

A checkpoint holds two items: `state`, a pytree of arrays (learner params, optimizer state, step,
the rollout policy's stale parameter snapshots), saved sharded by orbax; and `meta`, JSON (the data
iterators' states, the config that wrote it). Resuming restores sampler and learner alike, so a resumed
run continues exactly as an uninterrupted one (peers.md: mismatch spikes after resume when only the
learner is restored).

Reliability:
  * the checkpointed config is the run's identity: `config_changes` compares it field by field with
    the config of a restart; only `ALLOWED_CHANGES` (or fields the user names) may differ;
  * `restore_newest_good` tries the newest step, says in one line why it cannot be restored and falls
    back to older steps; damaged steps are moved aside (`<workdir>/checkpoints_damaged/`), never deleted;
  * `Preemption` turns SIGTERM / SIGINT into "finish this step, save, exit 0", with every host
    agreeing on the step.
"""
from __future__ import annotations

import datetime
import fnmatch
import json
import logging
import os
import shutil
import signal
import threading
import warnings
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

# Config fields that may differ between a run and its resume: they change when or how often
# things happen, or where inputs are read from, never what is computed. Patterns (fnmatch) on dotted
# keys. rl.steps extends or shortens the run (with optim.schedule=cosine it also stretches the schedule).
ALLOWED_CHANGES = (
    "rl.steps",
    "log.*",
    "eval.every",
    "checkpoint.every", "checkpoint.keep", "checkpoint.resume", "checkpoint.max_consecutive_skips",
    "data.data_dir", "data.math_manual_dir", "data.num_threads", "data.prefetch",
    "mesh.*", "distributed.*",  # orbax reshards on restore: the global shapes do not depend on the mesh
    # memory layout of the same computation:
    "learner.chunk_size", "learner.remat", "learner.logits_remat", "learner.microbatches",
    "rollout.microbatches", "rollout.slots",  # the same samples (each response keyed by its row), other batching
    "bounds.certify_update",  # extra logged metrics only
)


class RunError(RuntimeError):
  """A run cannot start or continue for a reason the user must act on; the CLI prints it as one line."""


class Checkpointer:
  """`save(step, tree, meta)` / `restore(step, abstract_tree) -> (tree, meta)` / `latest_step()`."""

  def __init__(self, directory: str, *, keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, tree: Any, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_tree: Any) -> tuple[Any, dict]:
    """Restores into the structure, dtypes and shardings of `abstract_tree` (ShapeDtypeStructs)."""
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree),
                                                              meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_meta(self, step: int) -> dict:
    """The JSON item alone (config, iterator states): cheap, and readable whatever the model's shapes."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_newest_good(self, abstract_tree: Any, check: Callable[[Any], None] | None = None):
    """(step, tree, meta) of the newest step that restores (and passes `check`), or None if there is none.

    A step that fails is reported in one line (step, path, cause) and moved to
    `<workdir>/checkpoints_damaged/<step>` (kept for inspection, and out of the way so a later save of
    the same step number cannot overwrite it); raises RunError when steps exist but none restores.
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        with _quiet_orbax():
          tree, meta = self.restore(step, abstract_tree)
          if check is not None:
            check(tree)
      except Exception as e:  # noqa: BLE001 (any failure to restore means: try the next older step)
        cause = one_line_cause(e)
        failures.append(f"step {step} ({cause})")
        older = [s for s in self.all_steps() if s < step]
        warnings.warn(f"checkpoint step {step} at {os.path.join(self.directory, str(step))} cannot be restored: "
                      f"{cause}; " + (f"falling back to step {older[-1]}" if older else "no older step"))
        continue
      if failures:
        self._move_aside([s for s in self.all_steps() if s > step])
      return step, tree, meta
    if failures:
      raise RunError(f"no checkpoint under {self.directory} can be restored: {'; '.join(failures)}. They are "
                     "left in place; move them away (or use a new --workdir) to start over")
    return None

  def _move_aside(self, steps: list[int]) -> None:
    if not steps:
      return
    if jax.process_index() == 0:
      dest_root = os.path.join(os.path.dirname(self.directory), "checkpoints_damaged")
      os.makedirs(dest_root, exist_ok=True)
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
      for step in steps:
        dest = os.path.join(dest_root, f"{step}_{stamp}")
        shutil.move(os.path.join(self.directory, str(step)), dest)
        warnings.warn(f"damaged checkpoint step {step} moved to {dest} (not deleted)")
    if jax.process_count() > 1:  # every host sees the move before its manager re-lists the steps
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("trm_jax_checkpoints_moved_aside")
    self._manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """JAX's multi-host preemption sync point (orbax), False on a single host."""
    if jax.process_count() == 1:
      return False
    try:
      return bool(self._manager.reached_preemption(step))
    except RuntimeError:  # jax.distributed started without the preemption service: the allgather decides
      return False

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings: the restore target for a tree shaped like `tree`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def one_line_cause(e: BaseException) -> str:
  """The innermost cause of an exception chain as `Type: first line` (at most 200 characters)."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
  return f"{type(e).__name__}: {text}"[:200] if text else type(e).__name__


class _quiet_orbax:
  """Silences orbax's and asyncio's error logging while a restore is attempted: the failure is
  reported once, in one line, by the caller."""

  _NAMES = ("absl", "orbax", "asyncio", "jax._src.distributed")

  def __enter__(self):
    self._levels = [(lg, lg.level) for lg in map(logging.getLogger, self._NAMES)]
    for lg, _ in self._levels:
      lg.setLevel(logging.CRITICAL)

  def __exit__(self, *exc):
    for lg, level in self._levels:
      lg.setLevel(level)


# ----------------------------------------------------------------------------- the run's identity


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _normalise(d: dict) -> dict:
  return json.loads(json.dumps(d, default=str))  # tuples -> lists, as the checkpoint's JSON holds them


def config_changes(old: dict, new: dict, defaults: dict | None = None) -> dict:
  """{dotted field: (old, new)} for every field whose value differs. A field absent from `old` (added
  to the code since) counts as unchanged when `new` holds its default."""
  old_f, new_f = _flatten(_normalise(old)), _flatten(_normalise(new))
  defaults_f = _flatten(_normalise(defaults)) if defaults else {}
  missing = object()
  out = {}
  for key in sorted(set(old_f) | set(new_f)):
    a, b = old_f.get(key, missing), new_f.get(key, missing)
    if a is missing and key in defaults_f and b == defaults_f[key]:
      continue
    if a != b:
      out[key] = ("<absent>" if a is missing else a, "<absent>" if b is missing else b)
  return out


def is_allowed(field: str, extra: tuple = ()) -> bool:
  return any(fnmatch.fnmatchcase(field, pat) for pat in (*ALLOWED_CHANGES, *extra))


def check_resume_config(old: dict, new: dict, allow: tuple = (), defaults: dict | None = None,
                        where: str = "") -> dict:
  """Raises RunError naming every changed field not allowed (ALLOWED_CHANGES or `allow`); returns
  all changes {field: (old, new)} for the history."""
  changes = config_changes(old, new, defaults)
  bad = {k: v for k, v in changes.items() if not is_allowed(k, tuple(allow))}
  if bad:
    diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in bad.items())
    raise RunError(f"cannot resume {where or 'the run'}: the config differs from the checkpointed run in fields "
                   f"that define it: {diff}. Use a new --workdir, or pass --allow_config_change="
                   f"{','.join(bad)} to change them on purpose")
  return changes


def record_config(workdir: str, config_json: str, *, event: str, step: int, changes: dict | None = None) -> None:
  """config.json = the config the run STARTED with (written at a fresh start, never by a resume);
  config_history.jsonl gets one line per start / resume with the changed fields."""
  first = os.path.join(workdir, "config.json")
  if event == "start" or not os.path.exists(first):  # a fresh start (no checkpoint) is a new run
    with open(first + ".tmp", "w") as f:
      f.write(config_json)
    os.replace(first + ".tmp", first)
  row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "event": event,
         "step": int(step), "changes": {k: list(v) for k, v in (changes or {}).items()}}
  with open(os.path.join(workdir, "config_history.jsonl"), "a") as f:
    f.write(json.dumps(row, default=str) + "\n")


# ----------------------------------------------------------------------------- preemption


class Preemption:
  """SIGTERM (what TPU / cloud preemption sends) and SIGINT -> stop after the current step and save.

  `should_stop(step)` is called by every host after each step; it is True on ALL hosts or on none:
  each host's local flag (its own signal handler) is all-gathered, and JAX's coordination-service
  preemption notice (orbax `reached_preemption`, the sync point of jax.experimental.multihost_utils)
  is honoured too. A second SIGINT interrupts at once (KeyboardInterrupt).
  """

  def __init__(self, checkpointer: Checkpointer | None = None, signals=(signal.SIGTERM, signal.SIGINT)):
    self.received: str | None = None
    self._ckpt = checkpointer
    self._old = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
      for s in signals:
        self._old[s] = signal.signal(s, self._handler)

  def _handler(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name

  def should_stop(self, step: int) -> bool:
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    anyone = bool(np.any(multihost_utils.process_allgather(np.array([local]))))
    synced = self._ckpt is not None and self._ckpt.reached_preemption(step)
    if (anyone or synced) and self.received is None:
      self.received = "SIGTERM (another host)" if anyone else "preemption notice"
    return anyone or synced

  def close(self) -> None:
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old = {}
