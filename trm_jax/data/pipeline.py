"""Input pipeline: tfds.data_source -> grain -> fixed-shape numpy batches for rollout and warm start.

`make_iterator(data_cfg, "train", batch_size=64, seed=0)` yields this process's rows of each GLOBAL
batch of 64, as dicts of numpy arrays:

  prompt [b, P] int32   BOS + prompt text, LEFT padded (every response then starts at position P)
  prompt_mask [b, P]    1 on real tokens
  answer [b, A] int32   reference final answer, right padded (the reward compares against it)
  answer_mask [b, A]
  target [b, T] int32   correct response + EOS, right padded (supervised warm start)
  target_mask [b, T]

P, A, T come from `tasks.get_task(data_cfg.task, data_cfg.horizon, ...)`. Order: source -> shuffle(seed)
-> repeat (reshuffled per epoch) -> [warm-start noise] -> tokenize/pad: ONE global stream, the same on
any number of processes; global batch i is its elements [i*B, (i+1)*B). Each process then reads only
its rows of each global batch (b = len(rows); default: block `process_index` of `process_count` equal
blocks; a mesh's own rows come from `trm_jax.sharding.host_rows`), so a run is a function of
(config, seed) whatever the topology. The iterator is a grain `DatasetIterator`: `get_state()` /
`set_state()` restore the exact next batches, and the state (batches consumed) is the same on every
process and every process count, so a checkpoint written on N processes resumes on M.
"""
from __future__ import annotations

import functools

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from trm_jax.data import builders, synthetic, tasks, text_tasks


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults of the `data` config subtree; every field commented here, once."""
  c = ml_collections.ConfigDict()
  c.task = "running_sum"       # a key of tasks.TASKS (synthetic) or tasks.TEXT_TASKS (text)
  c.horizon = 64               # T: max response tokens incl. EOS; the primary difficulty knob
  c.size = 0                   # max problem size n (digits); 0 = the largest whose solution fits T
  c.min_size = 0               # n is drawn uniformly in [min_size, size]; 0 = size (fixed length)
  c.data_dir = ""              # where TFDS datasets live; "" = TFDS default (~/tensorflow_datasets
  #                              or $TFDS_DATA_DIR); built there on first use, in seconds
  c.num_train = builders.DEFAULT_NUM_TRAIN  # examples in the train split
  c.num_eval = builders.DEFAULT_NUM_EVAL    # examples in each of the validation and test splits
  c.warmstart_noise = 0.0      # fraction of warm-start targets whose answer digits are corrupted, so a
  #                              warm-started model's reward starts below 1 and RL has room to improve
  c.num_threads = 4            # grain reader threads (the per-element work is a numpy lookup)
  c.prefetch = 8               # grain prefetch buffer (batches' worth of elements is plenty)
  c.math_manual_dir = ""       # directory holding DAPO-Math / AIME files (see math_data.py)
  c.text = text_tasks.default_text_config()  # text tasks (dapo_math, aime24, aime25): tokenizer, prompt_len, reward
  return c


def task_from_config(data_cfg) -> tasks.Task | tasks.TextTask:
  """The `Task` (or `TextTask`) the config names (validates task, horizon, size, min_size)."""
  return tasks.task_from_config(data_cfg)


def corrupt_answer(ex: dict, rng: np.random.Generator, noise: float) -> dict:
  """With probability `noise`, replaces every answer digit in the solution by a different random digit.

  Only `solution` (the warm-start target) changes; `answer` stays the reference, so a model that learns
  the noisy targets earns reward < 1 on those examples.
  """
  if rng.random() >= noise:
    return ex
  sol = ex["solution"].decode() if isinstance(ex["solution"], bytes) else ex["solution"]
  cut = sol.rindex(synthetic.DELIMITER) + 1
  tail = [str((int(c) + int(rng.integers(1, 10))) % 10) if c.isdigit() else c for c in sol[cut:]]
  return {**ex, "solution": sol[:cut] + "".join(tail)}


def data_source(data_cfg, split: str):
  """The random-access TFDS source for `split`, building the dataset first if it is missing."""
  c = data_cfg
  config = builders.config_arg(c.task, c.horizon, size=c.size, min_size=c.min_size,
                               num_train=c.num_train, num_eval=c.num_eval)
  with builders.build_lock(c.data_dir or None):  # processes started together build it once
    return tfds.data_source(
        "trm_tasks", split=split, data_dir=c.data_dir or None, download=True,
        builder_kwargs={"config": config},
        download_and_prepare_kwargs={
            "download_config": tfds.download.DownloadConfig(try_download_gcs=False)})


class _Rows:
  """Random access to `rows` of each global batch of `global_batch` consecutive elements of `parent`."""

  def __init__(self, parent, rows, global_batch: int):
    self.parent, self.rows, self.global_batch = parent, np.asarray(rows, np.int64), global_batch

  def __len__(self):
    n = len(self.parent)
    return n if n >= 2**62 else n // self.global_batch * len(self.rows)  # repeat(None) is "infinite"

  def __getitem__(self, j):
    i, r = divmod(int(j), len(self.rows))
    return self.parent[i * self.global_batch + int(self.rows[r])]


def local_rows(batch_size: int, process_index: int, process_count: int) -> np.ndarray:
  """Block `process_index` of `process_count` equal contiguous blocks of a global batch."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if batch_size % process_count:
    raise ValueError(f"global batch_size={batch_size} must be a multiple of process_count={process_count}")
  b = batch_size // process_count
  return np.arange(process_index * b, (process_index + 1) * b)


def make_iterator(data_cfg, split: str, *, batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, noise: float = 0.0, process_index: int | None = None,
                  process_count: int | None = None, rows=None) -> grain.DatasetIterator:
  """Iterator of this process's rows of each global batch (module docstring); deterministic given `seed`.

  Args:
    data_cfg: the `data` ConfigDict (`default_data_config()`).
    split: "train", "validation" or "test".
    batch_size: GLOBAL batch size B (the last partial batch of a finite pass is dropped).
    seed: shuffle / noise seed.
    shuffle: shuffle each epoch (eval passes use False).
    num_epochs: None = repeat forever.
    noise: warm-start target corruption probability (see `corrupt_answer`).
    process_index, process_count: this process's block of B / process_count rows; default
      jax.process_index() / jax.process_count().
    rows: explicit row indices in [0, B) this process reads (overrides the block), e.g.
      `sharding.host_rows(mesh, B)` when a mesh gives a process non-contiguous rows.
  """
  task = task_from_config(data_cfg)
  if rows is None:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    rows = local_rows(batch_size, index, count)
  rows = np.asarray(rows, np.int64)
  if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= batch_size:
    raise ValueError(f"rows must be a non-empty list of indices in [0, batch_size={batch_size}), got {rows}")
  if not 0 <= noise <= 1:
    raise ValueError(f"warm-start noise (data.warmstart_noise) = {noise} must be a probability in [0, 1]")
  if noise > 0 and not task.has_warmstart_targets:
    raise ValueError(f"warm-start noise {noise} needs warm-start targets, which task {data_cfg.task!r} has not")
  text = isinstance(task, text_tasks.TextTask)  # tokenized prompts in memory | the synthetic TFDS dataset
  ds = grain.MapDataset.source(task.source(split) if text else data_source(data_cfg, split))
  if len(ds) < batch_size:
    raise ValueError(f"batch_size={batch_size} exceeds the {len(ds)} {split!r} examples")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if noise > 0:
    ds = ds.random_map(functools.partial(corrupt_answer, noise=noise), seed=seed)
  # Only this process's rows are read, tokenized and padded: the global stream above is lazy.
  ds = grain.MapDataset.source(_Rows(ds, rows, batch_size))
  ds = ds.map(task.encode_example)
  ds = ds.batch(len(rows), drop_remainder=True)
  read = grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch)
  return iter(ds.to_iter_dataset(read))


def warmstart_iterator(data_cfg, split: str = "train", *, batch_size: int, seed: int,
                       **kwargs) -> grain.DatasetIterator:
  """Supervised warm-start batches: `make_iterator` with `data_cfg.warmstart_noise` target noise.

  The trainer's warm-start stream; `data.warmstart_noise` is read here and nowhere else.
  """
  return make_iterator(data_cfg, split, batch_size=batch_size, seed=seed,
                       noise=data_cfg.warmstart_noise, **kwargs)
