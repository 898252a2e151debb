"""Synthetic verifiable tasks whose correct response length scales with the horizon T.

Every task writes a response of the form `<scratchpad>=<answer>` followed by EOS, where the scratchpad
makes the answer computable one local step at a time, so the response length (not the reasoning depth)
is what grows with T. The problem size n is the largest that fits T (or a smaller `size`).

| task         | prompt             | solution (response without EOS)          | answer       | length     |
|--------------|--------------------|------------------------------------------|--------------|------------|
| running_sum  | `sum:31415`        | `34894=4` prefix sums mod 10             | last digit   | n + 2      |
| copy_reverse | `rev:31415`        | `=51413:4` reverse, `:`, digit sum mod 10 | all after =  | n + 3      |
| addition     | `add:27+95`        | `750>12,291>12=122` per column LSB first: | a + b        | <= 8n + 1  |
|              |                    | a_i b_i carry_in > two-digit column sum   |              |            |
| sort         | `sort:3141`        | `0,2,0,1,1,0,0,0,0,0=1134` digit counts  | sorted digits| <= n+10k+10|

(k = number of decimal digits of n.) `copy_reverse` is the genuinely long one (its whole response is the
answer, length ~ T); `addition` with partial credit is the one where RL improves a warm-started model.

Reward (`answer_reward`): the answer is the text between the LAST `=` and the first EOS. 1.0 if it equals
the reference answer exactly; if the response is well formed (EOS inside the mask, a `=` before it) and the
extracted answer has the reference's length, partial credit `0.5 * (fraction of answer characters
correct)` (so a wrong single-digit answer gets 0); otherwise 0 (truncated: no EOS; malformed: no `=`).

Text tasks (`TEXT_TASKS`: dapo_math, aime24, aime25) are real math prompts for Hugging Face LLMs:
`task_from_config(data_cfg)` builds a `TextTask` whose prompts come from local files (math_data.py),
rendered with the checkpoint tokenizer's chat template, and whose reward runs on the host on decoded
responses (rewards.py: DAPO's rule checker or math-verify). Both kinds expose `is_text`, `prompt_len`,
`response_len` and `answer_len`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax.data import rewards
from trm_jax.data.tokenizer import EOS_ID, Tokenizer, _pad_batch

_TOK = Tokenizer()
DELIMITER = "="
DELIMITER_ID = _TOK.encode(DELIMITER)[0]
PARTIAL_SCALE = 0.5  # partial credit never reaches a correct answer's reward
MIN_SIZE = 2  # smaller problems are trivial; a horizon that cannot fit them is rejected
DEFAULT_NUM_TRAIN, DEFAULT_NUM_EVAL = 2048, 256  # split sizes of the synthetic datasets


class Example(NamedTuple):
  prompt: str    # task text without BOS
  solution: str  # the full correct response without EOS
  answer: str    # the final answer (what follows the last `=` in `solution`)


def answer_reward(response, response_mask, answer, answer_mask, *, delimiter_id: int = DELIMITER_ID,
                  eos_id: int = EOS_ID, partial_scale: float = PARTIAL_SCALE):
  """Reward of delimited final answers: 1 exact, `partial_scale * frac correct` if same length, else 0.

  Args:
    response: [B, T] int token ids of the sampled responses.
    response_mask: [B, T] 1 on response tokens (up to and including EOS).
    answer: [B, A] int reference answer ids, right padded.
    answer_mask: [B, A] 1 on answer tokens.
  Returns:
    [B] float32 in [0, 1].
  """
  t, a = response.shape[-1], answer.shape[-1]
  pos = jnp.arange(t)
  valid = response_mask > 0
  is_eos = (response == eos_id) & valid
  has_eos = is_eos.any(-1)
  eos_pos = jnp.where(has_eos, jnp.argmax(is_eos, -1), t)
  is_delim = (response == delimiter_id) & valid & (pos < eos_pos[..., None])
  has_delim = is_delim.any(-1)
  last_delim = t - 1 - jnp.argmax(is_delim[..., ::-1], -1)
  start = last_delim + 1
  got_len = eos_pos - start
  idx = start[..., None] + jnp.arange(a)
  got = jnp.take_along_axis(response, jnp.clip(idx, 0, t - 1), axis=-1)
  in_answer = answer_mask > 0
  ans_len = in_answer.sum(-1)
  n_match = ((got == answer) & in_answer & (idx < eos_pos[..., None])).sum(-1)
  same_len = has_eos & has_delim & (got_len == ans_len)
  exact = same_len & (n_match == ans_len)
  partial = partial_scale * n_match / jnp.maximum(ans_len, 1)
  return jnp.where(exact, 1.0, jnp.where(same_len, partial, 0.0)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Task:
  """A synthetic task at horizon T: sizes, a generator of examples and the batched jnp reward.

  `size` is the largest problem size n (digits); examples draw n uniformly from [min_size, size].
  """
  name: ClassVar[str]
  keyword: ClassVar[str]
  is_text: ClassVar[bool] = False  # synthetic: character tokenizer, jnp reward on ids
  has_warmstart_targets: ClassVar[bool] = True  # batches carry `target`: the correct response + EOS
  eval_split: ClassVar[str] = "validation"  # the split evaluation reads
  horizon: int
  size: int
  min_size: int
  num_train: int = DEFAULT_NUM_TRAIN  # examples in the train split (stats only: the builder holds them)
  num_eval: int = DEFAULT_NUM_EVAL    # examples in each of the validation and test splits

  @property
  def response_len(self) -> int:
    """T: max response tokens including EOS."""
    return self.horizon

  @property
  def prompt_len(self) -> int:
    """P: max prompt tokens including BOS."""
    return 1 + len(self.keyword) + self.prompt_chars(self.size)

  @property
  def answer_len(self) -> int:
    """A: max answer tokens."""
    return self.answer_chars(self.size)

  def generate(self, rng: np.random.Generator) -> Example:
    n = int(rng.integers(self.min_size, self.size + 1))
    digits = rng.integers(0, 10, size=n)
    ex = self._example(digits, rng)
    return Example(self.keyword + ex.prompt, ex.solution, ex.answer)

  def reward(self, response, response_mask, answer, answer_mask):
    """[B] float32 reward in [0, 1]; see `answer_reward` and the module docstring."""
    return answer_reward(response, response_mask, answer, answer_mask)

  @property
  def tokenizer(self) -> Tokenizer:
    """The character tokenizer every synthetic task uses."""
    return _TOK

  @property
  def device_reward(self):
    """The jittable jnp reward(tokens, mask, answer, answer_mask) -> [B] f32 (None on text tasks)."""
    return self.reward

  @property
  def reward_range(self) -> tuple[float, float]:
    """(min, max) of `answer_reward`: 0 (wrong / malformed / truncated) to 1 (exact)."""
    return 0.0, 1.0

  def stats(self, split: str) -> dict:
    """Counts of `split`: {"prompts": its size, "prompts_dropped_long": 0} (every prompt fits P)."""
    sizes = {"train": self.num_train, "validation": self.num_eval, "test": self.num_eval}
    if split not in sizes:
      raise ValueError(f"unknown split {split!r}; known: {list(sizes)}")
    return {"prompts": float(sizes[split]), "prompts_dropped_long": 0.0}

  def score(self, tokens, mask, answer, answer_mask) -> rewards.RewardOutput:
    """Host-side scoring of numpy arrays: the jnp reward run on the CPU; correct = reward 1."""
    with jax.default_device(jax.devices("cpu")[0]):
      reward = np.asarray(_host_reward(np.asarray(tokens), np.asarray(mask), np.asarray(answer),
                                       np.asarray(answer_mask)), np.float32)
    return rewards.RewardOutput(reward, reward >= 1.0, {})

  # Per-task formulas: worst case over problems of size n.
  @staticmethod
  def prompt_chars(n: int) -> int:
    raise NotImplementedError

  @staticmethod
  def solution_chars(n: int) -> int:
    raise NotImplementedError

  @staticmethod
  def answer_chars(n: int) -> int:
    raise NotImplementedError

  def _example(self, digits: np.ndarray, rng: np.random.Generator) -> Example:
    raise NotImplementedError


_host_reward = jax.jit(answer_reward)  # compiled once per shape; `Task.score` runs it on the CPU


def _s(digits) -> str:
  """Digits 0-9 as a string (via bytes: thousands of digits per example at long horizons)."""
  return (np.asarray(digits, np.uint8) + ord("0")).tobytes().decode()


class RunningSum(Task):
  """Prefix sums mod 10, one digit per step; answer = the last one (no partial credit: one digit)."""
  name, keyword = "running_sum", "sum:"
  prompt_chars = staticmethod(lambda n: n)
  solution_chars = staticmethod(lambda n: n + 2)
  answer_chars = staticmethod(lambda n: 1)

  def _example(self, digits, rng):
    prefix = _s(np.cumsum(digits) % 10)
    return Example(_s(digits), f"{prefix}={prefix[-1]}", prefix[-1])


class CopyReverse(Task):
  """Reverse a digit string then its digit sum mod 10; the whole response (~T tokens) is the answer."""
  name, keyword = "copy_reverse", "rev:"
  prompt_chars = staticmethod(lambda n: n)
  solution_chars = staticmethod(lambda n: n + 3)
  answer_chars = staticmethod(lambda n: n + 2)

  def _example(self, digits, rng):
    answer = f"{_s(digits[::-1])}:{int(digits.sum()) % 10}"
    return Example(_s(digits), DELIMITER + answer, answer)


class Addition(Task):
  """n-digit a + b with a per-column scratchpad (LSB first): `a_i b_i carry_in > column sum (2 digits)`."""
  name, keyword = "addition", "add:"
  prompt_chars = staticmethod(lambda n: 2 * n + 1)
  solution_chars = staticmethod(lambda n: 7 * n - 1 + 1 + n + 1)  # steps, `=`, answer
  answer_chars = staticmethod(lambda n: n + 1)

  def _example(self, digits, rng):
    n = len(digits)
    a, b = digits.copy(), rng.integers(0, 10, size=n)
    a[0], b[0] = rng.integers(1, 10), rng.integers(1, 10)  # true n-digit numbers: no leading zeros
    steps, carry = [], 0
    for ai, bi in zip(a[::-1], b[::-1]):
      s = int(ai) + int(bi) + carry
      steps.append(f"{ai}{bi}{carry}>{s:02d}")
      carry = s // 10
    answer = str(int(_s(a)) + int(_s(b)))
    return Example(f"{_s(a)}+{_s(b)}", ",".join(steps) + DELIMITER + answer, answer)


class Sort(Task):
  """Sort digits via a count scratchpad: counts of 0..9 separated by `,`, then `=` sorted digits."""
  name, keyword = "sort", "sort:"
  prompt_chars = staticmethod(lambda n: n)
  solution_chars = staticmethod(lambda n: 10 * len(str(n)) + 9 + 1 + n)
  answer_chars = staticmethod(lambda n: n)

  def _example(self, digits, rng):
    counts = np.bincount(digits, minlength=10)
    answer = _s(np.sort(digits))
    return Example(_s(digits), ",".join(str(int(c)) for c in counts) + DELIMITER + answer, answer)


TASKS: dict[str, type[Task]] = {c.name: c for c in (RunningSum, CopyReverse, Addition, Sort)}


def max_size(name: str, horizon: int) -> int:
  """Largest problem size whose worst-case solution plus EOS fits `horizon` tokens (0 if none)."""
  cls = _task_cls(name)
  n = 0
  while cls.solution_chars(n + 1) <= horizon - 1:
    n += 1
  return n


def get_task(name: str, horizon: int, size: int | None = None, min_size: int | None = None) -> Task:
  """The task `name` at horizon T=`horizon`.

  Args:
    name: a key of `TASKS`.
    horizon: T, max response tokens including EOS.
    size: max problem size n (difficulty); None/0 = the largest that fits T.
    min_size: smallest problem size (n drawn uniformly in [min_size, size]); None/0 = `size`.
  """
  cls = _task_cls(name)
  fit = max_size(name, horizon)
  if fit < MIN_SIZE:
    need = next(t for t in range(2, 1 << 20) if max_size(name, t) >= MIN_SIZE)
    raise ValueError(f"horizon={horizon} is too small for task {name!r}: needs horizon >= {need}")
  size = size or fit
  if not MIN_SIZE <= size <= fit:
    raise ValueError(f"size={size} for task {name!r} at horizon={horizon} must be in [{MIN_SIZE}, {fit}]")
  min_size = min_size or size
  if not 1 <= min_size <= size:
    raise ValueError(f"min_size={min_size} for task {name!r} must be in [1, size={size}]")
  return cls(horizon=horizon, size=size, min_size=min_size)


def _task_cls(name: str) -> type[Task]:
  if name in TEXT_TASKS:
    raise ValueError(f"{name!r} is a text task: build it with tasks.task_from_config(data_cfg)")
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
  return TASKS[name]


# ------------------------------------------------------------------ text tasks (real LLMs, math)

# data.task -> (math dataset of trm_jax.data.math_data, its split): DAPO-Math-17k trains, AIME evaluates.
TEXT_TASKS = {"dapo_math": ("dapo_math", "train"), "aime24": ("aime24", "test"), "aime25": ("aime25", "test")}


def is_text_task(name: str) -> bool:
  return name in TEXT_TASKS


def default_text_config():
  """Defaults of the `data.text` subtree (text tasks only; synthetic tasks ignore it)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

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
  from trm_jax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
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
  is_text: ClassVar[bool] = True
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
    """The tokenized prompts (`math_data.PromptSource`), built and tokenized once per process."""
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
    prompt, prompt_mask = _pad_batch([ex["prompt"]], self.prompt_len, pad_left=True, pad_id=self.tokenizer.pad_id)
    answer, answer_mask = _pad_batch([np.frombuffer(ex["answer"], np.uint8).astype(np.int32)], self.answer_len,
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
  from trm_jax.data import math_data  # pylint: disable=g-import-not-at-top  # TFDS only for text tasks
  return math_data.prepare_prompts(dataset, split, manual_dir, data_dir, tokenizer, prompt_len=prompt_len,
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


def task_from_config(data_cfg, tokenizer=None):
  """The synthetic `Task` or the `TextTask` that `data_cfg` names."""
  if is_text_task(data_cfg.task):
    return text_task_from_config(data_cfg, tokenizer)
  task = get_task(data_cfg.task, data_cfg.horizon, data_cfg.size or None, data_cfg.min_size or None)
  return dataclasses.replace(task, num_train=data_cfg.get("num_train", DEFAULT_NUM_TRAIN),
                             num_eval=data_cfg.get("num_eval", DEFAULT_NUM_EVAL))
