"""Evaluation: avg@k / pass@k on hand-computed cases, and the evaluator's aggregation over sampler calls."""
import math

import jax
import numpy as np
import pytest

import tiny_models
from trm_jax import config as config_lib
from trm_jax import eval as eval_lib
from trm_jax import sharding as sharding_lib
from trm_jax.data.rewards import RewardOutput
from trm_jax.models import LEARNER


def test_avg_and_pass_at_k_hand_computed():
  correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  assert eval_lib.avg_at_k(correct) == pytest.approx(5 / 12)
  assert eval_lib.pass_at_k(correct, 4) == pytest.approx(2 / 3)  # n = k: any sample correct
  assert eval_lib.pass_at_k(correct, 1) == pytest.approx(5 / 12)  # pass@1 = avg@n
  # pass@2, problem 0: 1 - C(3,2)/C(4,2) = 1 - 3/6; problem 1: 0; problem 2: 1.
  assert eval_lib.pass_at_k(correct, 2) == pytest.approx((0.5 + 0 + 1) / 3)
  # n = 5, c = 2, k = 3: 1 - C(3,3)/C(5,3) = 1 - 1/10.
  assert eval_lib.pass_at_k(np.array([[1, 1, 0, 0, 0]]), 3) == pytest.approx(0.9)


def test_pass_at_k_matches_binomials():
  """The product form equals 1 - C(n-c,k)/C(n,k) with exact integer binomials (n = 32, as AIME avg@32)."""
  rng = np.random.default_rng(0)
  n = 32
  for c in (0, 1, 5, 16, 31, 32):
    row = np.zeros((1, n), bool)
    row[0, rng.choice(n, c, replace=False)] = True
    for k in (1, 2, 8, 16, 32):
      want = 1 - math.comb(n - c, k) / math.comb(n, k)
      assert eval_lib.pass_at_k(row, k) == pytest.approx(want, abs=1e-12), (c, k)


def test_bad_shapes_and_k():
  with pytest.raises(ValueError, match="k <= n"):
    eval_lib.pass_at_k(np.ones((2, 3), bool), 4)
  with pytest.raises(ValueError, match="N problems"):
    eval_lib.avg_at_k(np.ones(3))


@pytest.mark.parametrize("n,k,batch,div,want", [(30, 1, 0, 8, 32), (30, 32, 0, 8, 30), (30, 4, 5, 8, 6),
                                                (3, 4, 2, 8, 2), (7, 3, 0, 1, 7)])
def test_prompts_per_call(n, k, batch, div, want):
  c = config_lib.with_overrides(config_lib.default_config(), {"eval.k": k, "eval.batch_prompts": batch})
  m = eval_lib.prompts_per_call(c, n, div)
  assert m == want and (m * k) % div == 0


class _StubText:
  """A text-style task whose verdict is known: problem i's first answer byte a_i makes exactly min(a_i, k)
  of its k samples correct (samples arrive problem-major, k consecutive rows per problem)."""
  response_len = 6

  def __init__(self, k):
    self.k, self.calls = k, []

  def score(self, tokens, mask, answer, answer_mask):
    self.calls.append(np.asarray(answer[:, 0]).copy())
    j = np.arange(len(tokens)) % self.k
    correct = j < np.asarray(answer[:, 0])
    return RewardOutput(np.where(correct, 1.0, -1.0), correct, {"reward/timeouts": 1.0})


def test_evaluator_aggregates_over_calls_and_drops_padding():
  """3 problems, k = 4, 2 problems per call on 8 devices: calls [0, 1], [2, 2(pad)]; the pad is dropped."""
  V, P, k = 16, 3, 4
  graphdef, params = tiny_models.build("dense", vocab=V, max_len=16)
  cfg = config_lib.with_overrides(config_lib.default_config(), {
      "eval.k": k, "eval.batch_prompts": 2, "eval.pass_k": (2,), "eval.temperature": 1.0})
  mesh = sharding_lib.make_mesh(cfg.mesh)
  answers = np.array([1, 0, 4])
  data = {"prompt": np.full((3, P), 5, np.int32), "prompt_mask": np.ones((3, P), np.int32),
          "answer": np.stack([answers, answers * 0], 1).astype(np.int32), "answer_mask": np.ones((3, 2), np.int32)}
  task = _StubText(k)

  class Tok:
    pad_id, stop_ids = 0, (1,)

  evaluate = eval_lib.make_evaluator(cfg, mesh=mesh, graphdef=graphdef, tokenizer=Tok(), numerics=LEARNER,
                                     sets=[eval_lib.EvalSet("stub", task, data)])
  m = evaluate(params, jax.random.key(0))
  np.testing.assert_array_equal(np.concatenate(task.calls), np.repeat([1, 0, 4, 4], k))
  assert m["eval/stub/avg@4"] == pytest.approx((1 + 0 + 4) / 12)
  assert m["eval/stub/pass@4"] == pytest.approx(2 / 3)
  assert m["eval/stub/pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)
  assert m["eval/stub/reward_mean"] == pytest.approx((5 - 7) / 12)
  assert m["eval/stub/reward_timeouts"] == 2.0  # counts add up over the two calls
  assert 1 <= m["eval/stub/response_length_mean"] <= task.response_len
  assert 0 <= m["eval/stub/clip_frac"] <= 1
  assert m["eval/solved_frac"] == m["eval/stub/avg@4"]
