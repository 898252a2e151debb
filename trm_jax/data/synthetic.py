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

A `Task` answers what a text task (text_tasks.py) answers: `score` (the jnp reward run on the host's
CPU: numpy in, `RewardOutput` out), `reward_range` = (0, 1), `stats(split)`, `tokenizer`, `eval_split`,
`has_warmstart_targets`, and `device_reward` (the same reward, to jit on the accelerator).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax.data.rewards import RewardOutput
from trm_jax.data.tokenizer import BOS_ID, EOS_ID, Tokenizer, pad_batch

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

  def encode_examples(self, examples) -> dict:
    """Tokenizes examples (dicts or `Example`s, str or bytes fields) into the batch dict of [N, .] arrays:
    prompt / prompt_mask [N, P] (BOS + prompt, left padded), answer / answer_mask [N, A], target /
    target_mask [N, T] (solution + EOS, right padded: the warm-start target)."""
    get = lambda ex, k: ex[k] if isinstance(ex, dict) else getattr(ex, k)
    bos, eos = np.array([BOS_ID], np.int32), np.array([EOS_ID], np.int32)
    prompt, prompt_mask = pad_batch([np.concatenate([bos, _TOK.encode_np(get(e, "prompt"))]) for e in examples],
                                    self.prompt_len, pad_left=True)
    answer, answer_mask = pad_batch([_TOK.encode_np(get(e, "answer")) for e in examples], self.answer_len,
                                    pad_left=False)
    target, target_mask = pad_batch([np.concatenate([_TOK.encode_np(get(e, "solution")), eos]) for e in examples],
                                    self.response_len, pad_left=False)
    return dict(prompt=prompt, prompt_mask=prompt_mask, answer=answer, answer_mask=answer_mask,
                target=target, target_mask=target_mask)

  def encode_example(self, ex) -> dict:
    """`encode_examples` of one example (one dataset element: the pipeline maps it)."""
    return {k: v[0] for k, v in self.encode_examples([ex]).items()}

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

  def score(self, tokens, mask, answer, answer_mask) -> RewardOutput:
    """Host-side scoring of numpy arrays: the jnp reward run on the CPU; correct = reward 1."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      reward = np.asarray(_host_reward(np.asarray(tokens), np.asarray(mask), np.asarray(answer),
                                       np.asarray(answer_mask)), np.float32)
    return RewardOutput(reward, reward >= 1.0, {})

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
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
  return TASKS[name]
