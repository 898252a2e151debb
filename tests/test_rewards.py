"""Math rewards: DAPO's rule checker, the overlong penalty, math-verify in killable worker processes."""
import os
import time

import numpy as np
import pytest

from trm_jax.data import rewards

TAIL = "Let me think about this problem carefully.\n"


@pytest.mark.parametrize("response, truth, want", [
    (TAIL + "Answer: 42", "42", True),                                # right
    (TAIL + "Answer: 41", "42", False),                               # wrong
    (TAIL + "The answer is 42.", "42", False),                        # malformed: no Answer: line
    (TAIL + "So the answer is", "42", False),                         # truncated before the answer
    ("Answer: 1\nwait, no.\nAnswer: 42", "42", True),                 # the last Answer: counts
    ("answer :  42\nDone.", "42", True),                              # case, spaces, text after the line
    ("Answer: 42\n" + "x" * 300, "42", False),                        # outside the final 300 characters
    ("Answer: 42\n" + "x" * 285, "42", True),                         # inside them
    (TAIL + "Answer: \\frac{1}{2}", "0.5", False),                    # DAPO compares strings
    (TAIL + "Answer: \\frac12", "\\frac{1}{2}", True),                # shorthand \fracab normalised
    (TAIL + "Answer: $\\boxed{42}$", "42", True),                     # boxed inside Answer:
    (TAIL + "\\boxed{42}", "42", False),                              # boxed without Answer: is no answer
    (TAIL + "Answer: x = 5", "5", True),                              # text after the last '='
    (TAIL + "Answer: 30 degrees", "30", True),                        # units removed
    (TAIL + "Answer: 1,000", "1000", True),                           # thousands separator
    (TAIL + "Answer: \\text{(B)}", "(B)", True),
])
def test_dapo_rule(response, truth, want):
  assert rewards.dapo_is_correct(response, truth) is want


def test_dapo_normalisation_by_hand():
  assert rewards.normalize_final_answer("$\\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"
  assert rewards.normalize_final_answer("7 integers") == "7"
  assert rewards.normalize_final_answer("\\sqrt2") == "\\sqrt{2}"
  assert rewards.normalize_final_answer("12 \\text{ cm}^2") == "12"  # spaces, cm, then \text{}^2 go
  assert rewards.extract_answer("no answer") is None


def test_dapo_reward_plus_minus_one_and_metrics():
  r = rewards.MathReward("dapo")
  out = r(["Answer: 3", "Answer: 4", "nothing"], ["3", "3", "3"])
  np.testing.assert_array_equal(out.reward, [1.0, -1.0, -1.0])
  np.testing.assert_array_equal(out.correct, [True, False, False])
  assert out.reward.dtype == np.float32
  assert out.metrics["reward/answer_frac"] == pytest.approx(2 / 3)
  assert out.metrics["reward/timeouts"] == out.metrics["reward/errors"] == 0
  with pytest.raises(ValueError, match="2 responses but 1 answers"):
    r(["a", "b"], ["1"])
  with pytest.raises(ValueError, match="unknown reward kind 'exact'"):
    rewards.MathReward("exact")


def test_overlong_penalty():
  # L_max = 100, B = 20: no penalty up to 80 tokens, then linear down to -factor at 100.
  got = rewards.overlong_penalty([50, 80, 85, 90, 100], 100, 20, factor=1.0)
  np.testing.assert_allclose(got, [0.0, 0.0, -0.25, -0.5, -1.0])
  np.testing.assert_allclose(rewards.overlong_penalty([90], 100, 20, factor=0.5), [-0.25])
  r = rewards.MathReward("dapo", max_len=100, overlong_buffer=20)
  out = r(["Answer: 3", "Answer: 3"], ["3", "3"], lengths=[10, 95])
  np.testing.assert_allclose(out.reward, [1.0, 0.25])
  assert out.correct.all() and out.metrics["reward/overlong_mean"] == pytest.approx(-0.375)
  with pytest.raises(ValueError, match="token lengths"):
    r(["Answer: 3"], ["3"])
  # The range the certificate scales by: -1 - factor (wrong, L = L_max) to +1; attained at both ends.
  assert r.reward_range == (-2.0, 1.0) and rewards.MathReward("dapo").reward_range == (-1.0, 1.0)
  assert rewards.reward_range(20, 0.5) == (-1.5, 1.0)
  np.testing.assert_allclose(r(["Answer: 4"], ["3"], lengths=[100]).reward, [-2.0])
  with pytest.raises(ValueError, match="buffer_len=200"):
    rewards.MathReward("dapo", max_len=100, overlong_buffer=200)


class TimeoutException(BaseException):  # named like math-verify's own (signal) timeout
  pass


# Injected checkers (module level so the spawned workers can import them).
def _flaky_check(response, truth):
  if response == "slow":
    raise TimeoutException("math-verify gave up")
  if response == "hang":
    time.sleep(60)
  if response == "raise":
    raise RuntimeError("parser exploded")
  if response == "crash":
    os._exit(3)
  return response == truth


def test_worker_pool_survives_hang_crash_and_error():
  r = rewards.MathReward("math_verify", timeout=1.0, num_workers=2, check=_flaky_check)
  try:
    t0 = time.monotonic()
    out = r(["a", "hang", "raise", "crash", "b", "slow"], ["a", "x", "x", "x", "c", "x"])
    # A timeout or crash scores as wrong (-1), not 0 (0 would pay a policy for hanging the checker).
    np.testing.assert_array_equal(out.reward, [1.0, -1.0, -1.0, -1.0, -1.0, -1.0])
    np.testing.assert_array_equal(out.correct, [True, False, False, False, False, False])
    assert out.metrics["reward/timeouts"] == 2 and out.metrics["reward/errors"] == 2
    assert time.monotonic() - t0 < 30  # the hanging answer cost ~1 s, not 60
    r.pool._workers[0][0].kill()  # a worker that dies while idle is replaced on the next call
    r.pool._workers[0][0].join()
    again = r(["q", "hang", "w"], ["q", "q", "w"])  # the pool keeps working after replacing workers
    np.testing.assert_array_equal(again.reward, [1.0, -1.0, 1.0])
    assert again.metrics["reward/timeouts"] == 1 and again.metrics["reward/errors"] == 0
  finally:
    r.close()


@pytest.mark.parametrize("response, truth, want", [
    ("Answer: 0.5", "\\frac{1}{2}", True),                # LaTeX vs decimal: symbolic equality
    ("so \\boxed{\\frac{1}{2}}", "0.5", True),            # boxed works for math-verify
    ("Answer: 1/3", "\\frac{1}{3}", True),
    ("Answer: 0.33", "\\frac{1}{3}", False),
    ("Answer: 7", "8", False),
    ("I have no idea", "8", False),                        # malformed
])
def test_math_verify_check(response, truth, want):
  assert rewards.math_verify_check(response, truth) is want


def test_math_verify_reward_in_workers():
  r = rewards.MathReward("math_verify", timeout=20.0, num_workers=1)  # the real checker, warmed up first
  try:
    out = r(["Answer: 0.5", "\\boxed{\\frac{1}{3}}", "Answer: 2"], ["\\frac{1}{2}", "0.33", "2"])
    np.testing.assert_array_equal(out.reward, [1.0, -1.0, 1.0])
    assert out.metrics["reward/timeouts"] == out.metrics["reward/errors"] == 0
  finally:
    r.close()
