"""Tokenizer and synthetic tasks: lengths vs horizon, generated solutions are correct, rewards."""
import jax
import numpy as np
import pytest

from trm_jax.data import tasks
from trm_jax.data.pipeline import encode_examples
from trm_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, MathTokenizer, Tokenizer

TOK = Tokenizer()
HORIZONS = (32, 64, 257, 1024)


# ------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_round_trip_and_vocab():
  text = "add:27+95\n750>12,291>12=122 sort;|<>()[]-*.#?xyz"
  ids = TOK.encode(text)
  assert TOK.decode(ids) == text
  assert min(ids) >= 3 and max(ids) < TOK.vocab_size <= 64
  assert (TOK.pad_id, TOK.bos_id, TOK.eos_id) == (0, 1, 2)
  # Decoding stops at EOS and drops specials.
  assert TOK.decode([BOS_ID] + ids[:3] + [EOS_ID] + ids[3:]) == text[:3]
  assert TOK.decode(ids[:3] + [EOS_ID] + ids[3:5], stop_at_eos=False) == text[:5]


def test_tokenizer_error_names_bad_char():
  with pytest.raises(ValueError, match="'A'"):
    TOK.encode("12A3")
  with pytest.raises(ValueError, match="'é'"):
    TOK.encode("1é")


def test_encode_batch_padding():
  ids, mask = TOK.encode_batch(["12", "3"], 4, pad_left=True, bos=True)
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 1, 1]])
  np.testing.assert_array_equal(ids[1], [PAD_ID, PAD_ID, BOS_ID, TOK.encode("3")[0]])
  ids, mask = TOK.encode_batch(["12"], 4, eos=True)
  np.testing.assert_array_equal(ids[0], TOK.encode("12") + [EOS_ID, PAD_ID])
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  with pytest.raises(ValueError, match="does not fit"):
    TOK.encode_batch(["12345"], 4)


def test_math_tokenizer_bytes_round_trip():
  tok = MathTokenizer()
  text = "Find $\\frac{1}{2}$ of x² — \\boxed{7}"
  ids = tok.encode(text)
  assert tok.vocab_size == 259 and min(ids) >= 3
  assert tok.decode(ids + [EOS_ID, 50]) == text


# -------------------------------------------------------------------------------------------- tasks

def _response(texts, task, eos=True):
  """[B, T] response ids + mask (mask covers up to and including EOS) from response texts."""
  return TOK.encode_batch(texts, task.response_len, eos=eos)


def _answers(answers, task):
  return TOK.encode_batch(answers, task.answer_len)


def _reward(task, responses, answers, eos=True):
  r, rm = _response(responses, task, eos)
  a, am = _answers(answers, task)
  return np.asarray(jax.jit(task.reward)(r, rm, a, am))


def _check_semantics(name, ex):
  """The answer is right, computed independently of the task's own code."""
  body = ex.prompt.split(":", 1)[1]
  if name == "running_sum":
    assert int(ex.answer) == sum(map(int, body)) % 10
  elif name == "copy_reverse":
    assert ex.answer == body[::-1] + ":" + str(sum(map(int, body)) % 10)
  elif name == "addition":
    a, b = body.split("+")
    assert int(ex.answer) == int(a) + int(b) and len(a) == len(b)
  elif name == "sort":
    assert ex.answer == "".join(sorted(body))


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
@pytest.mark.parametrize("horizon", HORIZONS)
def test_generated_solutions_fit_are_correct_and_score_one(name, horizon):
  task = tasks.get_task(name, horizon)
  assert task.response_len == horizon
  rng = np.random.default_rng(horizon)
  exs = [task.generate(rng) for _ in range(40)]
  for ex in exs:
    assert len(ex.prompt) + 1 <= task.prompt_len          # + BOS
    assert len(ex.solution) + 1 <= task.response_len      # + EOS
    assert len(ex.answer) <= task.answer_len
    assert ex.solution.endswith("=" + ex.answer) and ex.answer == ex.solution.rsplit("=", 1)[1]
    _check_semantics(name, ex)
  batch = encode_examples(exs, task)
  r = np.asarray(jax.jit(task.reward)(batch["target"], batch["target_mask"], batch["answer"],
                                      batch["answer_mask"]))
  np.testing.assert_array_equal(r, 1.0)
  assert r.dtype == np.float32


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_long_horizon_uses_the_horizon(name):
  """The correct response length grows with T: at T=4096 it fills most of the horizon."""
  task = tasks.get_task(name, 4096)
  ex = task.generate(np.random.default_rng(0))
  assert len(ex.solution) > 0.9 * 4096 and len(ex.solution) < 4096


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_random_responses_score_low(name):
  task = tasks.get_task(name, 64)
  rng = np.random.default_rng(0)
  exs = [task.generate(rng) for _ in range(256)]
  a, am = _answers([e.answer for e in exs], task)
  resp = rng.integers(3, TOK.vocab_size, size=(256, 64)).astype(np.int32)
  resp[rng.random(resp.shape) < 0.05] = EOS_ID
  r = np.asarray(jax.jit(task.reward)(resp, np.ones_like(resp), a, am))
  assert r.mean() < 0.05
  # Random *well-formed* answers of the right length: chance level, far below 1.
  guesses = ["".join(rng.choice(list("0123456789"), len(e.answer))) for e in exs]
  if name == "copy_reverse":
    guesses = [g[:-2] + ":" + g[-1] for g in guesses]
  r = _reward(task, ["=" + g for g in guesses], [e.answer for e in exs])
  assert r.mean() < 0.35 and (r >= 0).all() and (r <= 1).all()


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_hand_made_rewards(name):
  # Room for responses longer than the solution (T=256) at the problem size of T=64.
  task = tasks.get_task(name, 256, size=tasks.max_size(name, 64))
  ex = task.generate(np.random.default_rng(1))
  sol, ans = ex.solution, ex.answer
  flip = lambda c: str((int(c) + 1) % 10)
  wrong_all = "".join(flip(c) if c.isdigit() else c for c in ans)
  digit_pos = [i for i, c in enumerate(ans) if c.isdigit()]
  one_wrong = ans[:digit_pos[-1]] + flip(ans[digit_pos[-1]]) + ans[digit_pos[-1] + 1:]
  head = sol[: sol.rindex("=")]
  cases = {
      "correct": (sol, True, 1.0),
      "correct_no_scratchpad": ("=" + ans, True, 1.0),  # the reward checks the answer only
      # Every digit wrong: only copy_reverse's ':' separator still matches (partial credit for it).
      "wrong": (head + "=" + wrong_all, True, 0.5 * ans.count(":") / len(ans)),
      "partial": (head + "=" + one_wrong, True, 0.5 * (len(ans) - 1) / len(ans)),
      "too_long": (sol + "1", True, 0.0),
      "malformed": (sol.replace("=", ";"), True, 0.0),
      "truncated": (sol, False, 0.0),                     # no EOS inside the mask
      "empty": ("", True, 0.0),
      "later_delimiter_wins": (sol + "=" + wrong_all, True, 0.5 * ans.count(":") / len(ans)),
      "earlier_delimiter_ignored": ("=" + wrong_all + ";" + sol, True, 1.0),
  }
  # One batched call (one compile) for all cases.
  rows = [_response([text], task, eos) for text, eos, _ in cases.values()]
  r, rm = np.concatenate([x[0] for x in rows]), np.concatenate([x[1] for x in rows])
  a, am = _answers([ans] * len(cases), task)
  got = np.asarray(jax.jit(task.reward)(r, rm, a, am))
  for i, (case, (text, _, want)) in enumerate(cases.items()):
    np.testing.assert_allclose(got[i], want, rtol=1e-6, err_msg=f"{name}/{case}: {text!r}")


def test_reward_ignores_tokens_after_eos_and_outside_mask():
  task = tasks.get_task("addition", 32)
  ex = task.generate(np.random.default_rng(0))
  r, rm = _response([ex.solution], task)
  a, am = _answers([ex.answer], task)
  n = int(rm.sum())
  r2 = r.copy()
  r2[0, n:] = TOK.encode("=9")[0]  # junk after EOS (mask 0) must not count as a later delimiter
  assert float(task.reward(r2, rm, a, am)[0]) == 1.0
  rm_cut = rm.copy()
  rm_cut[0, n - 1] = 0  # EOS outside the mask: truncated
  assert float(task.reward(r, rm_cut, a, am)[0]) == 0.0


def test_reward_batched_and_broadcast_shapes():
  task = tasks.get_task("sort", 64)
  rng = np.random.default_rng(3)
  exs = [task.generate(rng) for _ in range(6)]
  b = encode_examples(exs, task)
  r = task.reward(b["target"].reshape(2, 3, -1), b["target_mask"].reshape(2, 3, -1),
                  b["answer"].reshape(2, 3, -1), b["answer_mask"].reshape(2, 3, -1))
  assert r.shape == (2, 3)
  np.testing.assert_array_equal(r, 1.0)


def test_size_knob_and_variable_length():
  task = tasks.get_task("addition", 256, size=10, min_size=3)
  rng = np.random.default_rng(0)
  sizes = {len(task.generate(rng).answer) - 1 for _ in range(200)}  # answer has n or n+1 digits
  assert min(sizes) <= 3 and max(sizes) >= 9
  assert task.prompt_len == 1 + 4 + 21 and task.answer_len == 11


def test_get_task_errors_name_the_bad_value():
  with pytest.raises(ValueError, match="'nope'"):
    tasks.get_task("nope", 64)
  with pytest.raises(ValueError, match="horizon=10.*addition"):
    tasks.get_task("addition", 10)
  with pytest.raises(ValueError, match="size=100"):
    tasks.get_task("addition", 64, size=100)
  with pytest.raises(ValueError, match="min_size=9"):
    tasks.get_task("addition", 64, size=5, min_size=9)
  assert set(tasks.TASKS) == {"running_sum", "copy_reverse", "addition", "sort"}


def test_task_from_config_dispatches_synthetic_and_text():
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(task="sort", horizon=64, size=5, min_size=2))
  t = tasks.task_from_config(cfg)
  assert not t.is_text and t == tasks.get_task("sort", 64, 5, 2)
  assert TOK.stop_ids == (EOS_ID,) and tasks.TEXT_TASKS.keys() == {"dapo_math", "aime24", "aime25"}
  assert tasks.is_text_task("aime25") and not tasks.is_text_task("sort")
  assert not set(tasks.TEXT_TASKS) & set(tasks.TASKS)


def test_score_is_the_reward_on_host_arrays_with_range_and_stats():
  """`Task.score`: numpy in, RewardOutput out; catches a score that drifts from the jnp reward, a `correct`
  that counts partial credit, or a reward_range / stats that disagree with the task's definition."""
  task = tasks.get_task("addition", 64, size=3)
  ex = task.generate(np.random.default_rng(0))
  head, ans = ex.solution[: ex.solution.rindex("=")], ex.answer
  one_wrong = ans[:-1] + str((int(ans[-1]) + 1) % 10)
  texts, eos = [ex.solution, head + "=" + one_wrong, ex.solution], [True, True, False]
  rows = [_response([t], task, e) for t, e in zip(texts, eos)]
  r, rm = np.concatenate([x[0] for x in rows]), np.concatenate([x[1] for x in rows])
  a, am = _answers([ans] * 3, task)
  out = task.score(r, rm, a, am)
  want = [1.0, 0.5 * (len(ans) - 1) / len(ans), 0.0]  # exact, partial credit, truncated (by hand)
  assert isinstance(out.reward, np.ndarray) and out.reward.dtype == np.float32
  np.testing.assert_allclose(out.reward, want, rtol=1e-6)
  np.testing.assert_array_equal(out.correct, [True, False, False])
  assert out.metrics == {}
  lo, hi = task.reward_range
  assert (lo, hi) == (0.0, 1.0) and min(want) == lo and max(want) == hi  # both ends are attained
  assert task.device_reward is not None and task.has_warmstart_targets and task.eval_split == "validation"
  assert task.tokenizer.decode(r[0]) == ex.solution
  sized = tasks.dataclasses.replace(task, num_train=10, num_eval=3)
  assert sized.stats("train") == {"prompts": 10.0, "prompts_dropped_long": 0.0}
  assert sized.stats("test") == sized.stats("validation") == {"prompts": 3.0, "prompts_dropped_long": 0.0}
  with pytest.raises(ValueError, match="'dev'"):
    task.stats("dev")
