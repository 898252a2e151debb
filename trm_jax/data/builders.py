"""TFDS builder for the synthetic tasks: one config per (task, horizon), generated locally, array_record.

`build("addition", 256, data_dir)` writes `data_dir/trm_tasks/addition_h256/1.0.0/` (seconds, no network)
and returns the builder; `tfds.data_source("trm_tasks", builder_kwargs={"config": ...})` then serves it
without TensorFlow. Features are text (`prompt`, `solution`, `answer`): the stored data stays readable and
independent of the tokenizer; the pipeline tokenizes (a numpy lookup, cheap next to the model).

Each split draws from its own seed, a function of (task, horizon, size, min_size, split) only, so growing
`num_train` extends the train split rather than reshuffling it. Splits are not deduplicated against each
other: for the default sizes a collision is astronomically unlikely except at the smallest horizons.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds

from trm_jax.data import synthetic
from trm_jax.data.quiet_build import QuietBuild

SPLITS = ("train", "validation", "test")
DEFAULT_NUM_TRAIN, DEFAULT_NUM_EVAL = synthetic.DEFAULT_NUM_TRAIN, synthetic.DEFAULT_NUM_EVAL
HORIZONS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # predefined configs; any other horizon works too


@dataclasses.dataclass(eq=False)
class TaskConfig(tfds.core.BuilderConfig):
  """A (task, horizon) config; `size`/`min_size` 0 = the task's defaults at that horizon."""
  task: str = "running_sum"
  horizon: int = 64
  size: int = 0
  min_size: int = 0
  num_train: int = DEFAULT_NUM_TRAIN
  num_eval: int = DEFAULT_NUM_EVAL  # size of validation and of test


def task_config(task: str, horizon: int, *, size: int = 0, min_size: int = 0,
                num_train: int = DEFAULT_NUM_TRAIN, num_eval: int = DEFAULT_NUM_EVAL) -> TaskConfig:
  """The config for these settings, named `<task>_h<T>` plus a suffix for any non-default value.

  The name is the cache key on disk, so every setting that changes the data must appear in it.
  """
  t = synthetic.get_task(task, horizon, size or None, min_size or None)  # validates, names the bad value
  name = f"{task}_h{horizon}"
  if size or min_size:
    name += f"_n{t.min_size}-{t.size}"
  if (num_train, num_eval) != (DEFAULT_NUM_TRAIN, DEFAULT_NUM_EVAL):
    name += f"_tr{num_train}_ev{num_eval}"
  return TaskConfig(name=name, task=task, horizon=horizon, size=size, min_size=min_size,
                    num_train=num_train, num_eval=num_eval,
                    description=f"{task} at horizon {horizon} (problem size {t.min_size}..{t.size})")


def _predefined() -> list[TaskConfig]:
  out = []
  for name in synthetic.TASKS:
    for horizon in HORIZONS:
      try:
        out.append(task_config(name, horizon))
      except ValueError:  # horizon too small for this task
        pass
  return out


class TrmTasks(QuietBuild, tfds.core.GeneratorBasedBuilder):
  """Synthetic verifiable tasks (see `trm_jax.data.synthetic`), generated without any download."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: running_sum, copy_reverse, addition, sort."}
  BUILDER_CONFIGS = _predefined()

  def __init__(self, *, file_format="array_record", **kwargs):
    # array_record is what gives random access (tfds.data_source / grain) without TensorFlow.
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Text(),
            "solution": tfds.features.Text(),
            "answer": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated locally
    c = self.builder_config
    sizes = {"train": c.num_train, "validation": c.num_eval, "test": c.num_eval}
    return {s: self._generate_examples(s, sizes[s]) for s in SPLITS}

  def _generate_examples(self, split: str, num: int):
    c = self.builder_config
    task = synthetic.get_task(c.task, c.horizon, c.size or None, c.min_size or None)
    key = f"{c.task}_h{c.horizon}_n{task.min_size}-{task.size}"
    rng = np.random.default_rng([zlib.crc32(key.encode()), SPLITS.index(split)])
    for i in range(num):
      yield i, task.generate(rng)._asdict()


def config_arg(task: str, horizon: int, **kwargs) -> str | TaskConfig:
  """The `config=` argument for `TrmTasks` / `tfds.data_source(builder_kwargs=...)`.

  TFDS refuses a config object named like a predefined one, so predefined configs go by name.
  """
  cfg = task_config(task, horizon, **kwargs)
  return cfg.name if cfg.name in TrmTasks.builder_configs else cfg


def build(task: str, horizon: int, data_dir: str, *, num_train: int = DEFAULT_NUM_TRAIN,
          num_eval: int = DEFAULT_NUM_EVAL, size: int = 0, min_size: int = 0) -> TrmTasks:
  """Builds the (task, horizon) dataset into `data_dir` if it is not there yet; returns the builder."""
  config = config_arg(task, horizon, size=size, min_size=min_size, num_train=num_train,
                      num_eval=num_eval)
  with build_lock(data_dir):
    builder = TrmTasks(config=config, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


@contextlib.contextmanager
def build_lock(data_dir: str | None):
  """An exclusive lock on `data_dir` (a file lock, across processes) while a dataset is looked up or built.

  Why: several processes started at once on an empty cache (the paper's launcher runs seeds in parallel,
  every host of a pod builds its own copy) would each build the same dataset into its own temporary
  directory, and all but the first fail when TFDS renames theirs into place. Under the lock the first
  builds, the others find the finished dataset and only read it.
  """
  root = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, ".trm_tasks.lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
