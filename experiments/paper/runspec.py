"""A training run as data: a config file, its argument string and dotted overrides, in a workdir.

A run is `python -m trm_jax.main --config=configs/<file>.py:<arg> [--config.<key>=<value> ...] --workdir=<dir>`,
i.e. exactly the documented CLI, so every figure's runs can be re-made by hand from the printed commands.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from trm_jax import config as config_lib

# Overrides every experiment run gets: no TensorBoard events, checkpoints only at 0 and at the end,
# no per-run curve PNG (the experiment scripts draw their own), and the post-update certificate
# (one extra no-grad forward per step).
RUN_DEFAULTS = {"log.tensorboard": False, "checkpoint.every": 0, "log.plot": False, "log.progress": False,
                "bounds.certify_update": True}
# The config sections whose values fix the warm-started parameters (with the seed and the staleness).
WARM_SECTIONS = ("model", "data", "warmstart", "optim", "learner", "mesh")


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
    c = config_lib.load_config(self.config, self.arg)
    return config_lib.validate(config_lib.with_overrides(c, self.all_overrides()))

  @property
  def steps(self) -> int:
    return int(self.load().rl.steps)


def shell_command(spec: RunSpec, runs_dir: str) -> str:
  return " ".join(spec.command(runs_dir))


def warm_key(spec: RunSpec) -> str:
  """Hash of everything the warm-started parameters depend on (values and array structure)."""
  c = spec.load()
  parts = {k: c[k].to_dict() for k in WARM_SECTIONS}
  parts["seed"] = c.seed
  parts["staleness_k"] = c.rollout.backend.staleness_k
  parts["data"].pop("num_threads", None)
  parts["data"].pop("prefetch", None)
  parts["warmstart"].pop("init_from", None)  # where the parameters come from, not what they are
  blob = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:12]
