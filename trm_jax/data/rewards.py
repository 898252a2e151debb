"""Math rewards on decoded responses (host-side Python, outside jit): DAPO's rule checker and math-verify.

`MathReward(kind="dapo")` (default) is the DAPO recipe's `math_dapo` checker: the last `Answer: ...` line
within the final 300 characters of the response, normalised (`normalize_final_answer`, minerva-style) and
compared as a string to the normalised ground truth; reward +1 if equal, -1 otherwise (DAPO, Yu et al.
2025, section 3; verl `utils/reward_score/math_dapo.py`). `kind="math_verify"` uses Hugging Face's
math-verify (symbolic equality: `\\frac{1}{2}` == `0.5`) in worker processes with a per-answer wall
timeout, because its own timeouts use `signal.alarm` (main thread only) and its parser can hang: a timeout
or a crash of the checker scores as a wrong answer (-1, verl's convention: a policy that makes the checker
hang earns nothing for it) and is counted (`reward/timeouts`, `reward/errors`), never fatal.

Optional overlong shaping (DAPO section 3.4, "soft overlong punishment"): with buffer B and maximum
response length L_max, a response of L tokens gets `min(-(L - (L_max - B)) / B * factor, 0)` added.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import re
import time
from typing import Callable, NamedTuple, Sequence

import numpy as np

TAIL_CHARS = 300  # DAPO scores only the response's last 300 characters
ANSWER_PATTERN = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
INVALID = "[INVALID]"
KINDS = ("dapo", "math_verify")

# DAPO / minerva normalisation tables (verl math_dapo.py), in its order: the order matters.
_SUBSTITUTIONS = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_REMOVED = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
            "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;",
            r",\!", "{,}", '"', "\\dots")


class RewardOutput(NamedTuple):
  reward: np.ndarray   # [N] float32: +1 / -1 (-1 on checker timeout or crash too) + overlong penalty
  correct: np.ndarray  # [N] bool: the answer is right (what avg@k / pass@k count)
  metrics: dict        # scalars: reward/timeouts, reward/errors, reward/answer_frac, reward/overlong_mean


def normalize_final_answer(answer: str) -> str:
  """DAPO's answer normalisation: text after the last `=`, units/LaTeX wrappers/spaces removed."""
  s = answer.split("=")[-1]
  for before, after in _SUBSTITUTIONS:
    s = s.replace(before, after)
  for expr in _REMOVED:
    s = s.replace(expr, "")
  s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", s)
  s = re.sub(r"(\\text\{)(.*?)(\})", "\\2", s)
  s = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", s)
  s = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", s)
  s = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", s)
  # Shorthand TeX: \fracab -> \frac{a}{b}, \sqrta -> \sqrt{a}.
  s = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", s)
  s = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", s)
  s = s.replace("$", "")
  if s.replace(",", "").isdigit():
    s = s.replace(",", "")
  return s.strip()


def extract_answer(response: str) -> str | None:
  """The last `Answer: ...` line's text within the response's final TAIL_CHARS characters, or None."""
  found = ANSWER_PATTERN.findall(response[-TAIL_CHARS:])
  return found[-1] if found else None


def dapo_is_correct(response: str, ground_truth: str) -> bool:
  """DAPO's rule: normalise(last `Answer:` in the tail) == normalise(ground truth), as strings."""
  got = extract_answer(response)
  return normalize_final_answer(INVALID if got is None else got) == normalize_final_answer(ground_truth)


def overlong_penalty(lengths, max_len: int, buffer_len: int, factor: float = 1.0) -> np.ndarray:
  """DAPO soft overlong punishment: min(-(L - (L_max - B)) / B * factor, 0) per response; [N] float32."""
  if buffer_len <= 0 or buffer_len > max_len:
    raise ValueError(f"overlong buffer_len={buffer_len} must be in [1, max_len={max_len}]")
  exceed = np.asarray(lengths, np.float64) - (max_len - buffer_len)
  return np.minimum(-exceed / buffer_len * factor, 0.0).astype(np.float32)


def reward_range(overlong_buffer: int = 0, overlong_factor: float = 1.0) -> tuple[float, float]:
  """(min, max) of `MathReward`: +1 / -1, minus at most `overlong_factor` of overlong penalty (L <= L_max)."""
  return (-1.0 - (max(overlong_factor, 0.0) if overlong_buffer else 0.0)), 1.0


def math_verify_check(response: str, ground_truth: str) -> bool:
  """math-verify's verdict (as verl's `math_verify` reward: the gold is wrapped in \\boxed{})."""
  # Imported in the worker only: sympy is slow to import and the parent never needs it.
  from math_verify import ExprExtractionConfig, LatexExtractionConfig, math_metric  # pylint: disable=g-import-not-at-top,line-too-long
  check = math_metric(gold_extraction_target=(LatexExtractionConfig(),),
                      pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()))
  score, _ = check(["\\boxed{" + ground_truth + "}"], [response])
  return score > 0


# ------------------------------------------------------------------ checker worker processes


def _worker(check: Callable[[str, str], bool], conn, warmup: tuple[str, str] | None) -> None:
  """Worker loop: (i, response, truth) -> (i, "ok", bool) | (i, "error", message).

  `warmup` is checked once before reporting ready, so imports (sympy) never count against a timeout.
  """
  if warmup is not None:
    try:
      check(*warmup)
    except Exception:  # pylint: disable=broad-except  # a failing warm-up shows up on real answers
      pass
  conn.send(("ready", None, None))
  while True:
    try:
      item = conn.recv()
    except EOFError:
      return
    if item is None:
      return
    i, response, truth = item
    try:
      conn.send((i, "ok", bool(check(response, truth))))
    except (KeyboardInterrupt, SystemExit):
      raise
    except BaseException as e:  # pylint: disable=broad-except  # math-verify's TimeoutException is one
      status = "timeout" if type(e).__name__ == "TimeoutException" else "error"  # its own signal timeout
      conn.send((i, status, f"{type(e).__name__}: {e}"))


class CheckerPool:
  """`check(response, truth)` in `num_workers` spawned processes, each answer under a wall `timeout`.

  A worker that exceeds the timeout is killed and replaced (the answer counts as a timeout); one that
  dies (segfault, os._exit) is replaced (an error); an exception in `check` is an error. `check` must be
  picklable (a module-level function). Workers start on first use and are reused across calls.
  """

  def __init__(self, check: Callable[[str, str], bool], num_workers: int = 4, timeout: float = 10.0,
               start_timeout: float = 120.0, warmup: tuple[str, str] | None = None):
    if num_workers < 1 or timeout <= 0:
      raise ValueError(f"CheckerPool needs num_workers >= 1 and timeout > 0, got {num_workers}, {timeout}")
    self.check, self.num_workers, self.timeout, self.start_timeout = check, num_workers, timeout, start_timeout
    self.warmup = warmup
    self._ctx = multiprocessing.get_context("spawn")  # never fork a process that runs JAX threads
    self._workers: list = []  # (process, connection)

  def _spawn(self):
    parent, child = self._ctx.Pipe()
    proc = self._ctx.Process(target=_worker, args=(self.check, child, self.warmup),
                              daemon=True)
    proc.start()
    child.close()
    if not parent.poll(self.start_timeout) or parent.recv()[0] != "ready":
      proc.kill()
      raise RuntimeError(f"reward checker worker did not start within {self.start_timeout} s")
    return proc, parent

  def _replace(self, k: int) -> None:
    proc, conn = self._workers[k]
    proc.kill()
    proc.join(5)
    conn.close()
    self._workers[k] = self._spawn()

  def map(self, responses: Sequence[str], truths: Sequence[str]) -> tuple[list, int, int]:
    """(verdicts: bool or None per pair, #timeouts, #errors); None = timed out or crashed."""
    while len(self._workers) < self.num_workers:
      self._workers.append(self._spawn())
    todo = list(range(len(responses)))[::-1]
    out: list = [None] * len(responses)
    busy: dict[int, tuple[int, float]] = {}  # worker -> (item, deadline)
    timeouts = errors = 0
    while todo or busy:
      for k in range(self.num_workers):
        if k not in busy and todo:
          i = todo.pop()
          try:
            self._workers[k][1].send((i, responses[i], truths[i]))
          except OSError:  # the worker died while idle: replace it and resend
            self._replace(k)
            self._workers[k][1].send((i, responses[i], truths[i]))
          busy[k] = (i, time.monotonic() + self.timeout)
      wait = max(min(d for _, d in busy.values()) - time.monotonic(), 0.0)
      ready = multiprocessing.connection.wait([self._workers[k][1] for k in busy], timeout=wait)
      for k in list(busy):
        conn = self._workers[k][1]
        if conn in ready:
          try:
            _, status, value = conn.recv()
          except (EOFError, OSError):  # the worker died mid-answer
            errors += 1
            del busy[k]
            self._replace(k)
            continue
          out[busy.pop(k)[0]] = value if status == "ok" else None
          errors += status == "error"
          timeouts += status == "timeout"
        elif time.monotonic() >= busy[k][1]:
          timeouts += 1
          del busy[k]
          self._replace(k)
    return out, timeouts, errors

  def close(self) -> None:
    for proc, conn in self._workers:
      try:
        conn.send(None)
      except OSError:
        pass
      proc.join(1)
      if proc.is_alive():
        proc.kill()
      conn.close()
    self._workers = []

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # interpreter shutdown: modules may be gone
      pass


# ------------------------------------------------------------------ the reward the text tasks use


class MathReward:
  """Reward of decoded responses against ground-truth strings: `kind` dapo (in process) or math_verify.

  Args:
    kind: "dapo" (rule checker, default) or "math_verify" (worker processes).
    max_len: L_max, the maximum response length in tokens (for the overlong penalty).
    overlong_buffer: B; 0 = no overlong penalty.
    overlong_factor: the penalty's factor (DAPO: 1.0).
    timeout, num_workers: math_verify's per-answer wall timeout (s) and worker processes.
    check: replaces math_verify's checker (tests inject hanging / crashing ones).
  """

  def __init__(self, kind: str = "dapo", *, max_len: int = 0, overlong_buffer: int = 0,
               overlong_factor: float = 1.0, timeout: float = 10.0, num_workers: int = 4,
               check: Callable[[str, str], bool] | None = None):
    if kind not in KINDS:
      raise ValueError(f"unknown reward kind {kind!r}; known: {list(KINDS)}")
    if overlong_buffer:
      overlong_penalty([0], max_len, overlong_buffer)  # validates
    self.kind, self.max_len = kind, max_len
    self.overlong_buffer, self.overlong_factor = overlong_buffer, overlong_factor
    self.pool = None
    if kind == "math_verify":
      self.pool = CheckerPool(check or math_verify_check, num_workers, timeout,
                              warmup=None if check else ("Answer: \\frac{1}{2}", "0.5"))

  def __call__(self, responses: Sequence[str], answers: Sequence[str], lengths=None) -> RewardOutput:
    """Scores N responses; `lengths` [N] response tokens (needed only with the overlong penalty)."""
    if len(responses) != len(answers):
      raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    n = len(responses)
    timeouts = errors = 0
    if self.pool is None:
      correct = np.array([dapo_is_correct(r, a) for r, a in zip(responses, answers)], bool).reshape(n)
      reward = np.where(correct, 1.0, -1.0).astype(np.float32)
    else:
      verdicts, timeouts, errors = self.pool.map(list(responses), list(answers))
      correct = np.array([v is True for v in verdicts], bool).reshape(n)  # None (timeout / crash) is wrong
      reward = np.where(correct, 1.0, -1.0).astype(np.float32)
    penalty = np.zeros(n, np.float32)
    if self.overlong_buffer:
      if lengths is None:
        raise ValueError("the overlong penalty needs the responses' token lengths")
      penalty = overlong_penalty(lengths, self.max_len, self.overlong_buffer, self.overlong_factor)
    metrics = {"reward/timeouts": float(timeouts), "reward/errors": float(errors),
               "reward/answer_frac": float(np.mean([extract_answer(r) is not None for r in responses]))
               if n else 0.0,
               "reward/overlong_mean": float(penalty.mean()) if n else 0.0}
    return RewardOutput(reward + penalty, correct, metrics)

  @property
  def reward_range(self) -> tuple[float, float]:
    """(min, max) reward as configured (`reward_range`)."""
    return reward_range(self.overlong_buffer, self.overlong_factor)

  def close(self) -> None:
    if self.pool is not None:
      self.pool.close()
