"""Orbax CheckpointManager wrapper: save everything a run needs, resume from the newest step.

A checkpoint holds two items: `state`, a pytree of arrays (learner params, optimizer state, step,
the rollout policy's stale parameter snapshots), saved sharded by orbax; and `meta`, JSON (the data
iterators' states, the phase of the run, the config that wrote it). Resuming restores sampler and
learner alike, so a resumed run continues exactly as an uninterrupted one (peers.md: mismatch
spikes after resume when only the learner is restored).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """`save(step, tree, meta)` / `restore(step, abstract_tree) -> (tree, meta)` / `latest_step()`."""

  def __init__(self, directory: str, *, keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree: Any, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_tree: Any) -> tuple[Any, dict]:
    """Restores into the structure, dtypes and shardings of `abstract_tree` (ShapeDtypeStructs)."""
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree),
                                                              meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings: the restore target for a tree shaped like `tree`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
