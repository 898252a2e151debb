"""The tasks a run trains and evaluates on: synthetic (synthetic.py) or text (text_tasks.py), one interface.

`task_from_config(data_cfg)` returns a synthetic `Task` or a `TextTask`; both answer, without the caller
asking which kind it holds:

  score(tokens, mask, answer, answer_mask) -> rewards.RewardOutput   host numpy in and out
  reward_range -> (min, max)      the reward as configured (the certificate scales its bounds by it)
  stats(split) -> {"prompts", "prompts_dropped_long", ...}   counts to log once
  tokenizer, eval_split, has_warmstart_targets, device_reward (a jittable reward, or None),
  prompt_len (P), response_len (T), answer_len (A), encode_example(element) -> one batch row

This module also re-exports the names callers import from `trm_jax.data.tasks`.
"""
from __future__ import annotations

import dataclasses

from trm_jax.data import synthetic
# Re-exported: the public names of both kinds, at the path callers import them from.
from trm_jax.data.synthetic import (DEFAULT_NUM_EVAL, DEFAULT_NUM_TRAIN, DELIMITER, DELIMITER_ID, MIN_SIZE,  # noqa: F401
                                    PARTIAL_SCALE, TASKS, Addition, CopyReverse, Example, RunningSum, Sort, Task,
                                    answer_reward, max_size)
from trm_jax.data.text_tasks import (TEXT_TASKS, TextTask, cached_tokenizer, check_text_config,  # noqa: F401
                                     default_text_config, is_text_task, text_task_from_config)


def get_task(name: str, horizon: int, size: int | None = None, min_size: int | None = None) -> Task:
  """The synthetic task `name` at horizon T (`synthetic.get_task`); a text task's name says how to build it."""
  if is_text_task(name):
    raise ValueError(f"{name!r} is a text task: build it with tasks.task_from_config(data_cfg)")
  return synthetic.get_task(name, horizon, size, min_size)


def task_from_config(data_cfg, tokenizer=None) -> Task | TextTask:
  """The synthetic `Task` or the `TextTask` that `data_cfg` names (validates task, horizon, size, min_size)."""
  if is_text_task(data_cfg.task):
    return text_task_from_config(data_cfg, tokenizer)
  task = get_task(data_cfg.task, data_cfg.horizon, data_cfg.size or None, data_cfg.min_size or None)
  return dataclasses.replace(task, num_train=data_cfg.get("num_train", DEFAULT_NUM_TRAIN),
                             num_eval=data_cfg.get("num_eval", DEFAULT_NUM_EVAL))
