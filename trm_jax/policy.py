"""What a run trains on: the tokenizer, the task and the policy network, synthetic or a Hugging Face checkpoint.

- Synthetic tasks (`data.task` in tasks.TASKS): the character tokenizer, a model from the `model` presets,
  random init (then the supervised warm start).
- Text tasks (`data.task` in tasks.TEXT_TASKS, e.g. DAPO-Math): the checkpoint's tokenizer
  (`data.text.tokenizer_path`), prompts from local files, rewards on the decoded responses (host side).
- `model.hf_path`: the network's shapes come from the checkpoint's config.json and its weights replace the
  random init, read directly into the run's shardings (each process reads only its slices): zero-RL from a
  base model, as the paper does with Qwen3-8B-Base.

The trainer calls `build` once and `reward_fn` for every rollout batch; nothing else here is stateful.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from trm_jax import sharding as sharding_lib
from trm_jax.data import tasks
from trm_jax.data.tokenizer import Tokenizer
from trm_jax.models import ModelConfig, model_config_from


@dataclasses.dataclass
class Policy:
  """The run's task, tokenizer and network shape; `hf_path` ("" = random init) holds the weights."""

  task: Any
  tokenizer: Any
  model_cfg: ModelConfig
  hf_path: str = ""

  @property
  def is_text(self) -> bool:
    return bool(getattr(self.task, "is_text", False))

  @property
  def stop_ids(self) -> tuple:
    """Token ids that end a response (a chat model's EOS and end-of-turn; the synthetic EOS)."""
    return tuple(getattr(self.tokenizer, "stop_ids", None) or (self.tokenizer.eos_id,))


def build(config) -> Policy:
  """The `Policy` the config describes (validates that tokenizer, task and checkpoint fit together)."""
  hf_path = config.model.hf_path
  if tasks.is_text_task(config.data.task):
    if not config.data.text.tokenizer_path:
      raise ValueError(f"data.task={config.data.task!r} is a text task: set data.text.tokenizer_path (usually "
                       f"the checkpoint directory, model.hf_path={hf_path!r})")
    task = tasks.text_task_from_config(config.data)  # the tokenizer the data pipeline uses too (cached)
    tokenizer = task.tokenizer
  else:
    tokenizer = Tokenizer()
    task = tasks.get_task(config.data.task, config.data.horizon)
  if hf_path:
    from trm_jax.models import hf  # pylint: disable=g-import-not-at-top  # safetensors only for this path
    model_cfg = hf.model_config_from_hf(hf_path, dtype=config.model.param_dtype,
                                        max_len=config.model.max_len or None, scan_layers=config.model.scan_layers)
    if tokenizer.vocab_size > model_cfg.vocab_size:
      raise ValueError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) exceeds the vocab_size "
                       f"({model_cfg.vocab_size}) of model.hf_path={hf_path!r}")
  else:
    model_cfg = model_config_from(config.model, tokenizer.vocab_size)
  return Policy(task=task, tokenizer=tokenizer, model_cfg=model_cfg, hf_path=hf_path)


def pretrained_params(policy: Policy, abstract_params, shardings):
  """The checkpoint's parameters in the run's `shardings` (the tree of `abstract_params`)."""
  from trm_jax.models import hf  # pylint: disable=g-import-not-at-top
  return hf.load_params(policy.hf_path, policy.model_cfg, abstract_params, shardings)


def host_all(x) -> np.ndarray:
  """Every row of a (possibly multi-process sharded) array, on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def reward_fn(policy: Policy, mesh) -> Callable:
  """score(out: SampleOutput, batch: dict) -> (rewards [B] global array, metrics dict).

  Synthetic tasks: the task's jitted reward on device. Text tasks: this process decodes and scores its
  rows (`sharding.host_rows`) on the host and the rewards are assembled into one global array;
  metrics: the checker's counts (reward/timeouts, reward/errors, ...) and `reward/correct_frac`
  (this process's rows).
  """
  task = policy.task
  if not policy.is_text:
    f = jax.jit(task.reward)
    return lambda out, batch: (f(out.tokens, out.mask, batch["answer"], batch["answer_mask"]), {})

  def score(out, batch):
    rows = sharding_lib.host_rows(mesh, out.tokens.shape[0])
    get = lambda x: host_all(x)[rows]
    r = task.reward_host(get(out.tokens), get(out.mask), get(batch["answer"]), get(batch["answer_mask"]))
    metrics = dict(r.metrics)
    metrics["reward/correct_frac"] = float(np.mean(r.correct))
    return sharding_lib.shard_batch(np.asarray(r.reward, np.float32), mesh), metrics

  return score
