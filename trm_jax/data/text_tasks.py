"""Text tasks (dapo_math, aime24, aime25): real math prompts for Hugging Face LLMs, scored on the host.

`text_task_from_config(data_cfg)` builds a `TextTask` whose prompts come from local files (math_data.py),
rendered with the checkpoint tokenizer's chat template (`prepare_prompts`: tokenized once, prompts longer
than `data.text.prompt_len` dropped and counted, never cut), and whose reward runs on the host on decoded
responses (rewards.py: DAPO's rule checker or math-verify). It answers the same questions as a synthetic
`Task` (synthetic.py): `score`, `reward_range`, `stats`, `tokenizer`, `has_warmstart_targets`,
`eval_split`, `device_reward`, `prompt_len` / `response_len` / `answer_len`, `encode_example`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, ClassVar

import ml_collections
import numpy as np

from trm_jax.data import math_data, rewards
from trm_jax.data.tokenizer import load_tokenizer, pad_batch

# data.task -> (math dataset of trm_jax.data.math_data, its split): DAPO-Math-17k trains, AIME evaluates.
TEXT_TASKS = {"dapo_math": ("dapo_math", "train"), "aime24": ("aime24", "test"), "aime25": ("aime25", "test")}


def is_text_task(name: str) -> bool:
  """Whether `data.task` = `name` is a text task (a key of TEXT_TASKS)."""
  return name in TEXT_TASKS


def default_text_config() -> ml_collections.ConfigDict:
  """Defaults of the `data.text` subtree (text tasks only; synthetic tasks ignore it)."""
  c = ml_collections.ConfigDict()
  c.tokenizer_path = ""        # checkpoint dir with tokenizer.json (+ tokenizer_config / generation_config)
  c.prompt_len = 2048          # P: static prompt length in tokens (DAPO: 2048); longer prompts dropped + counted
  c.answer_len = 64            # A: max UTF-8 bytes of a ground-truth answer carried in the batch
  c.chat_template = True       # render prompts with the tokenizer's chat template (False: the raw prompt text)
  c.chat_template_kwargs = ""  # JSON object for the template, e.g. '{"enable_thinking": false}'
  c.extra_stop_tokens = ""     # comma-separated tokens that also end a response (e.g. "<|im_end|>" for a
  #                              base model whose eos is <|endoftext|>); added to the tokenizer's stop ids
  c.reward = "dapo"            # dapo (DAPO rule checker, +1/-1) | math_verify (worker processes)
  c.reward_timeout = 10.0      # math_verify: wall seconds per answer; a timeout scores as wrong (-1), counted
  c.reward_workers = 4         # math_verify: checker processes
  c.overlong_buffer = 0        # DAPO soft overlong punishment buffer in tokens; 0 = off (DAPO: 4096)
  c.overlong_factor = 1.0      # its penalty factor (DAPO: 1.0)
  return c


@functools.lru_cache(maxsize=8)
def cached_tokenizer(path: str, extra_stop_tokens: str = ""):
  """`tokenizer.load_tokenizer(path)` (+ extra stop tokens), loaded once per process (pipeline and trainer)."""
  if not path:
    raise ValueError("text tasks need data.text.tokenizer_path (a Hugging Face checkpoint directory)")
  tok = load_tokenizer(path)
  extra = [t.strip() for t in extra_stop_tokens.split(",") if t.strip()]
  return tok.with_stop_tokens(extra) if extra else tok


@dataclasses.dataclass(frozen=True, eq=False)
class TextTask:
  """A math text task: chat-templated prompts from local files, host-side rewards on decoded responses.

  Batch layout (`encode_example`): prompt [P] left padded with the tokenizer's pad id, prompt_mask [P],
  answer [A] = the ground truth's UTF-8 bytes, right padded, answer_mask [A]. No warm-start target.
  """
  is_text: ClassVar[bool] = True  # the former fork; read the properties below instead
  has_warmstart_targets: ClassVar[bool] = False  # zero-RL: no supervised targets
  eval_split: ClassVar[str] = "test"  # the split evaluation reads (the only one an AIME set has)
  device_reward: ClassVar[None] = None  # scored on the host only (decode + checker)
  name: str
  horizon: int          # T: max response tokens
  prompt_len: int       # P
  answer_len: int       # A
  tokenizer: Any
  manual_dir: str
  data_dir: str
  chat_template: bool = True
  template_kwargs: str = ""  # JSON
  reward_kind: str = "dapo"
  reward_timeout: float = 10.0
  reward_workers: int = 4
  overlong_buffer: int = 0
  overlong_factor: float = 1.0

  @property
  def response_len(self) -> int:
    return self.horizon

  def source(self, split: str):
    """The tokenized prompts (`PromptSource`), built and tokenized once per process."""
    dataset, own = TEXT_TASKS[self.name]
    if split != own and not (own == "test" and split in ("validation", "train")):
      raise ValueError(f"text task {self.name!r} has only the {own!r} split (asked for {split!r}); evaluate on "
                       f"{sorted(k for k, v in TEXT_TASKS.items() if v[1] == 'test')}")
    return _prepared(dataset, own, self.manual_dir, self.data_dir, self.tokenizer, self.prompt_len,
                     self.answer_len, self.chat_template, self.template_kwargs)

  def stats(self, split: str) -> dict:
    """Counts of `split` to log once: prompts (kept), prompts_dropped_long, answers_dropped_long."""
    return self.source(split).stats()

  @property
  def reward_range(self) -> tuple[float, float]:
    """(min, max) reward as configured: -1 / +1, the overlong penalty extending the minimum."""
    return rewards.reward_range(self.overlong_buffer, self.overlong_factor)

  def encode_example(self, ex: dict) -> dict:
    """Pads one source element {"prompt": ids, "answer": bytes} into the batch layout (class docstring)."""
    prompt, prompt_mask = pad_batch([ex["prompt"]], self.prompt_len, pad_left=True, pad_id=self.tokenizer.pad_id)
    answer, answer_mask = pad_batch([np.frombuffer(ex["answer"], np.uint8).astype(np.int32)], self.answer_len,
                                    pad_left=False)
    return dict(prompt=prompt[0], prompt_mask=prompt_mask[0], answer=answer[0], answer_mask=answer_mask[0])

  @staticmethod
  def decode_answers(answer, answer_mask) -> list[str]:
    """Ground-truth strings of a batch's `answer` [N, A] / `answer_mask` [N, A]."""
    answer, mask = np.asarray(answer), np.asarray(answer_mask) > 0
    return [row[m].astype(np.uint8).tobytes().decode("utf-8") for row, m in zip(answer, mask)]

  def decode_responses(self, tokens, mask) -> list[str]:
    """Response texts (special tokens such as the stop token dropped) of `tokens` / `mask` [N, T]."""
    return self.tokenizer.decode_batch(tokens, mask, skip_special_tokens=True)

  def reward_text(self, responses: list[str], answers: list[str], lengths=None):
    """`rewards.RewardOutput` (reward [N] f32, correct [N] bool, metrics) of decoded responses."""
    reward = _math_reward(self.reward_kind, self.horizon, self.overlong_buffer, self.overlong_factor,
                          self.reward_timeout, self.reward_workers)
    return reward(responses, answers, lengths)

  def score(self, tokens, mask, answer, answer_mask) -> rewards.RewardOutput:
    """The same from host numpy arrays: response `tokens`/`mask` [N, T], `answer`/`answer_mask` [N, A]."""
    mask = np.asarray(mask)
    return self.reward_text(self.decode_responses(tokens, mask), self.decode_answers(answer, answer_mask),
                            (mask > 0).sum(-1))

  reward_host = score  # the former name


@functools.lru_cache(maxsize=8)
def _math_reward(kind, max_len, overlong_buffer, overlong_factor, timeout, num_workers):
  """One `rewards.MathReward` per setting, so tasks built from the same config share its worker pool."""
  return rewards.MathReward(kind, max_len=max_len, overlong_buffer=overlong_buffer, overlong_factor=overlong_factor,
                            timeout=timeout, num_workers=num_workers)


@functools.lru_cache(maxsize=16)
def _prepared(dataset, split, manual_dir, data_dir, tokenizer, prompt_len, answer_len, chat_template, kwargs):
  return prepare_prompts(dataset, split, manual_dir, data_dir, tokenizer, prompt_len=prompt_len,
                                   answer_len=answer_len, chat_template=chat_template,
                                   template_kwargs=json.loads(kwargs) if kwargs else None)


def check_text_config(data_cfg) -> None:
  """Raises ValueError naming the field if a text task's `data` config is inconsistent (no file access)."""
  t = data_cfg.text
  if data_cfg.task not in TEXT_TASKS:
    raise ValueError(f"data.task={data_cfg.task!r} is not a text task; known: {sorted(TEXT_TASKS)}")
  if t.prompt_len < 1 or t.answer_len < 1 or data_cfg.horizon < 1:
    raise ValueError(f"data.text.prompt_len ({t.prompt_len}), data.text.answer_len ({t.answer_len}) and "
                     f"data.horizon ({data_cfg.horizon}) must be positive")
  if t.reward not in rewards.KINDS:
    raise ValueError(f"data.text.reward={t.reward!r}; known: {list(rewards.KINDS)}")
  if t.reward_timeout <= 0 or t.reward_workers < 1:
    raise ValueError(f"data.text.reward_timeout ({t.reward_timeout}) must be > 0 and data.text.reward_workers "
                     f"({t.reward_workers}) >= 1")
  if t.chat_template_kwargs:
    try:
      kwargs = json.loads(t.chat_template_kwargs)
    except ValueError:
      kwargs = None
    if not isinstance(kwargs, dict):
      raise ValueError(f"data.text.chat_template_kwargs={t.chat_template_kwargs!r} is not a JSON object")
  if t.overlong_factor < 0:
    raise ValueError(f"data.text.overlong_factor={t.overlong_factor} must be >= 0 (a penalty, never a bonus)")
  if t.overlong_buffer and not 0 < t.overlong_buffer <= data_cfg.horizon:
    raise ValueError(f"data.text.overlong_buffer={t.overlong_buffer} must be in [0, data.horizon={data_cfg.horizon}]")


def text_task_from_config(data_cfg, tokenizer=None) -> TextTask:
  """The text task `data_cfg.task` (a key of TEXT_TASKS); `tokenizer` defaults to data.text.tokenizer_path's."""
  check_text_config(data_cfg)
  t = data_cfg.text
  return TextTask(name=data_cfg.task, horizon=data_cfg.horizon, prompt_len=t.prompt_len, answer_len=t.answer_len,
                  tokenizer=tokenizer or cached_tokenizer(t.tokenizer_path, t.extra_stop_tokens),
                  manual_dir=data_cfg.math_manual_dir, data_dir=data_cfg.data_dir, chat_template=t.chat_template,
                  template_kwargs=t.chat_template_kwargs, reward_kind=t.reward, reward_timeout=t.reward_timeout,
                  reward_workers=t.reward_workers, overlong_buffer=t.overlong_buffer,
                  overlong_factor=t.overlong_factor)


# ------------------------------------------------------------------ tokenized prompts


class PromptSource:
  """Random access to tokenized, length-filtered prompts: {"prompt": int32 ids, "answer": UTF-8 bytes}.

  `num_dropped` prompts were longer than `prompt_len` tokens after the chat template (dropped, never
  cut); `num_long_answers` had a ground truth longer than `answer_len` bytes (dropped too).
  """

  def __init__(self, prompts: list[np.ndarray], answers: list[bytes], num_dropped: int, num_long_answers: int,
               max_prompt_tokens: int):
    self.prompts, self.answers = prompts, answers
    self.num_dropped, self.num_long_answers, self.max_prompt_tokens = num_dropped, num_long_answers, max_prompt_tokens

  def __len__(self) -> int:
    return len(self.prompts)

  def __getitem__(self, i):
    return {"prompt": self.prompts[i], "answer": self.answers[i]}

  def stats(self) -> dict:
    """{"prompts": kept, "prompts_dropped_long": over prompt_len, "answers_dropped_long": over answer_len}."""
    return {"prompts": float(len(self)), "prompts_dropped_long": float(self.num_dropped),
            "answers_dropped_long": float(self.num_long_answers)}


def prepare_prompts(name: str, split: str, manual_dir: str, data_dir: str | None, tokenizer, *, prompt_len: int,
                    answer_len: int, chat_template: bool = True, template_kwargs: dict | None = None) -> PromptSource:
  """Builds dataset `name` and tokenizes its `split`: chat template (or the raw prompt text), encode, drop.

  Prompts longer than `prompt_len` tokens and answers longer than `answer_len` UTF-8 bytes are dropped
  and counted, never truncated; one console line says so when any is dropped.
  """
  source = math_data.build(name, manual_dir, data_dir).as_data_source(split)
  examples = [source[i] for i in range(len(source))]
  all_ids = _encode_prompts(examples, tokenizer, chat_template, template_kwargs)
  prompts, answers, dropped, long_answers, longest = [], [], 0, 0, 0
  for ex, ids in zip(examples, all_ids):
    longest = max(longest, len(ids))
    if len(ids) > prompt_len:
      dropped += 1
    elif len(ex["answer"]) > answer_len:
      long_answers += 1
    else:
      prompts.append(np.asarray(ids, np.int32))
      answers.append(bytes(ex["answer"]))
  if dropped or long_answers:  # printed, not logged: absl's default level would hide it, and it changes the run
    print(f"[trm_jax] {name}/{split}: {len(prompts)} of {len(examples)} prompts kept; dropped {dropped} longer "
          f"than data.text.prompt_len={prompt_len} tokens (longest {longest}) and {long_answers} whose answer "
          f"is longer than data.text.answer_len={answer_len} bytes", flush=True)
  if not prompts:
    raise ValueError(f"{name}/{split}: all {len(source)} prompts dropped: {dropped} exceed data.text.prompt_len="
                     f"{prompt_len} tokens (longest {longest}), {long_answers} answers exceed "
                     f"data.text.answer_len={answer_len} bytes")
  return PromptSource(prompts, answers, dropped, long_answers, longest)


def _encode_prompts(examples, tokenizer, chat_template: bool, template_kwargs: dict | None) -> list:
  """Token ids of each example's prompt: its chat `messages` through the template, or the raw prompt text."""
  if chat_template:
    texts = [tokenizer.apply_chat_template(json.loads(ex["messages"].decode("utf-8")), add_generation_prompt=True,
                                           **(template_kwargs or {})) for ex in examples]
  else:
    texts = [ex["prompt"].decode("utf-8") for ex in examples]
  encode_many = getattr(tokenizer, "encode_many", None)  # HFTokenizer: batched, in parallel in Rust
  return encode_many(texts) if encode_many else [tokenizer.encode(t) for t in texts]
