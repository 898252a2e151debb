"""Resume or start: the checkpointed config is the run's identity, the newest good step is where it goes on.

`check_identity` compares the config of a restart with the one the checkpoint was written with (only
checkpoint.ALLOWED_CHANGES and the fields a user names may differ); `resume_or_init` restores the newest
step that restores and holds finite values (learner and optimizer state, the stale rollout snapshots and
the data iterators' positions), or starts fresh: initial (or `warmstart.init_from`) parameters, then the
supervised warm start. The one-line messages for "already complete" and "stopped by a signal" live here.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from trm_jax import checkpoint as ckpt_lib
from trm_jax import config as config_lib
from trm_jax import guard
from trm_jax import learner as learner_lib
from trm_jax import sharding as sharding_lib
from trm_jax import warmstart


@dataclasses.dataclass
class Start:
  """Where the RL loop starts: its state, the rollout snapshots (oldest first) and the first step."""

  state: Any
  history: list
  step: int
  resumed: bool


def check_identity(cfg, ckpt, workdir: str, allow: tuple) -> dict:
  """The checkpointed config is the run's identity: compare it with `cfg` before restoring anything.
  Returns the (allowed) changes; raises RunError naming each field that may not change."""
  if not cfg.checkpoint.resume:
    return {}
  for step in reversed(ckpt.all_steps()):
    try:
      old = ckpt.restore_meta(step).get("config")
    except Exception:  # noqa: BLE001 (a damaged step: restore_newest_good reports it)
      continue
    if old is not None:
      return ckpt_lib.check_resume_config(old, cfg.to_dict(), allow, config_lib.default_config().to_dict(),
                                          where=os.path.abspath(workdir))
  return {}


def zero_step(mesh):
  """The step counter placed as the jitted update returns it (replicated), so call 2 hits call 1's program."""
  return jax.device_put(jnp.zeros((), jnp.int32), sharding_lib.replicated(mesh))


def snapshots(params, k: int) -> list:
  """k rollout snapshots of `params`: ONE copy shared by all k (they are never donated), never the
  learner's own buffers, which the learner step donates."""
  if k == 0:
    return []
  copy = jax.tree.map(jnp.copy, params)
  return [copy] * k


def fresh_state(run, params):
  """(TrainState with a fresh RL optimizer at step 0, rollout snapshots) for `params`."""
  state = learner_lib.TrainState(params=params, opt_state=sharding_lib.init_sharded(run.tx.init, params, run.mesh),
                                 step=zero_step(run.mesh))
  return state, snapshots(params, run.backend.staleness_k)


def resume_or_init(run, ckpt, iters, workdir: str, preempt) -> Start | None:
  """The newest good checkpoint's state (and `iters` = (rl_iter, ws_iter) moved to its positions), else
  fresh parameters and the warm start. None: a stop signal arrived during the warm start."""
  cfg = run.config
  state, history = fresh_state(run, run.init_params())
  if cfg.checkpoint.resume:  # the newest step that restores and holds finite values (older ones as fallback)
    found = ckpt.restore_newest_good(ckpt_lib.abstract_like({"state": state, "history": tuple(history)}),
                                     check=guard.check_finite)
    if found is not None:
      step, restored, meta = found
      iters[0].set_state(meta["rl_iter"])
      iters[1].set_state(meta["ws_iter"])
      if jax.process_index() == 0:
        print(f"[trm_jax] resumed from {ckpt.directory} at step {step}", flush=True)
      return Start(restored["state"], list(restored["history"]), int(step), resumed=True)
  if cfg.warmstart.init_from:
    params = warmstart.params_from(run, cfg.warmstart.init_from)
    if jax.process_index() == 0:
      print(f"[trm_jax] warm-started parameters from {os.path.abspath(cfg.warmstart.init_from)}", flush=True)
  elif cfg.warmstart.steps:
    params = warmstart.supervised(run, state.params, iters[1], workdir, preempt)
    if params is None:
      return None
  else:
    return Start(state, history, 0, resumed=False)
  state, history = fresh_state(run, params)  # the RL optimizer starts fresh on the warm-started parameters
  return Start(state, history, 0, resumed=False)


def already_complete(cfg, workdir: str, ckpt_dir: str, step: int) -> dict:
  workdir = os.path.abspath(workdir)
  out = {"workdir": workdir, "metrics": os.path.join(workdir, "metrics.jsonl"), "checkpoints": ckpt_dir,
         "final": {}, "complete": step}
  if os.path.exists(os.path.join(workdir, "curves.png")):
    out["curves"] = os.path.join(workdir, "curves.png")
  if jax.process_index() == 0:
    print(f"[trm_jax] {workdir} is already complete: checkpoint at step {step} of rl.steps = {cfg.rl.steps}; "
          f"results: {out['metrics']}" + (f", {out['curves']}" if "curves" in out else "") +
          " (raise --config.rl.steps to continue it, or use a new --workdir)", flush=True)
  return out


def stopped(workdir: str, ckpt_dir: str, signal_name, step) -> dict:
  if jax.process_index() == 0:
    where = (f"after step {step}; checkpoint {step} saved in {ckpt_dir}" if step is not None
             else "during the warm start; nothing saved (a restart redoes the warm start)")
    print(f"[trm_jax] {signal_name} received: stopped {where}. Run the same command to resume.", flush=True)
  return {"workdir": os.path.abspath(workdir), "checkpoints": ckpt_dir, "preempted": signal_name,
          "stopped_at": step, "metrics": os.path.join(os.path.abspath(workdir), "metrics.jsonl"),
          "final": {}}
