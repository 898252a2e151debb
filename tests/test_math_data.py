"""Real-data path: DAPO/AIME builders from local parquet + jsonl files, the text tasks, the \boxed{} reward."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trm_jax.data import math_data, pipeline, tasks
from trm_jax.data.tokenizer import load_tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer")
PRE, SUF = math_data.DAPO_PREFIX, math_data.DAPO_SUFFIX
LONG = "Consider the following very long statement. " * 40  # ~300 tokens with the tiny fixture BPE


def _write(manual):
  manual.mkdir()
  # DAPO's released layout: chat prompt with the instruction, reward_model.ground_truth, data_source,
  # extra_info, every problem repeated (once with different whitespace, once without the final period).
  dapo = [{"data_source": "math_dapo", "prompt": [{"role": "user", "content": PRE + f"What is {i}+{i}?" + SUF}],
           "ability": "MATH", "reward_model": {"ground_truth": str(2 * i), "style": "rule-lighteval/MATH_v2"},
           "extra_info": {"index": f"id-{i}"}} for i in range(5)]
  dapo += [{**r, "prompt": [{"role": "user", "content": PRE + f"What  is {i}+{i}?" + SUF[:-1]}]}
           for i, r in enumerate(dapo)]
  dapo += [{"prompt": [{"role": "user", "content": PRE + LONG + str(i) + SUF}],
            "reward_model": {"ground_truth": "1"}} for i in range(2)]  # too long for the prompt length
  pq.write_table(pa.Table.from_pylist(dapo + dapo), str(manual / "dapo-math-17k.parquet"))
  with open(manual / "dapo_extra.jsonl", "w") as f:  # plain layout: the DAPO instruction gets added
    f.write(json.dumps({"problem": "Compute 1/2+0.", "solution": "It is \\boxed{\\frac{1}{2}}."}))
    f.write("\n\n")
  aime24 = [{"problem": "AIME 1", "answer": "033"}, {"problem": "AIME 2", "answer": "204"}]
  pq.write_table(pa.Table.from_pylist(aime24), str(manual / "aime-2024.parquet"))
  with open(manual / "aime2025-I.jsonl", "w") as f:
    f.write(json.dumps({"question": "AIME 3", "answer": 7}) + "\n")
    f.write(json.dumps({"question": "AIME 4", "answer": 12}) + "\n")
  (manual / "notes.txt").write_text("ignored")
  return manual


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("math")
  return str(_write(root / "manual")), str(root / "tfds")


def _rows(src):
  return [{k: v.decode() for k, v in src[i].items()} for i in range(len(src))]


def test_builders_read_parquet_and_jsonl(dirs):
  manual, data_dir = dirs
  dapo = math_data.build("dapo_math", manual, data_dir)
  rows = _rows(dapo.as_data_source("train"))
  assert len(rows) == 8  # 5 problems (x4 copies: whitespace / final period) + 2 long + 1 jsonl
  by_problem = {r["problem"]: r for r in rows}
  assert by_problem["What is 3+3?"]["answer"] == "6"
  assert by_problem["What is 3+3?"]["data_source"] == "math_dapo"
  assert json.loads(by_problem["What is 3+3?"]["messages"]) == [
      {"role": "user", "content": PRE + "What is 3+3?" + SUF}]
  plain = by_problem["Compute 1/2+0."]
  assert plain["answer"] == "\\frac{1}{2}" and plain["prompt"] == PRE + "Compute 1/2+0." + SUF
  assert plain["data_source"] == "dapo_extra"
  aime24 = _rows(math_data.build("aime24", manual, data_dir).as_data_source("test"))
  assert sorted((r["problem"], r["answer"]) for r in aime24) == [("AIME 1", "033"), ("AIME 2", "204")]
  aime25 = _rows(math_data.build("aime25", manual, data_dir).as_data_source("test"))
  assert sorted((r["problem"], r["answer"]) for r in aime25) == [("AIME 3", "7"), ("AIME 4", "12")]
  assert len(math_data.build("aime_eval", manual, data_dir).as_data_source("test")) == 4
  assert str(dapo.version) == "1.1.0" and "manual dir" in dapo.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_builder_without_files_explains(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(Exception, match="dapo"):
    math_data.build("dapo_math", str(tmp_path / "empty"), str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="'gsm'"):
    math_data.build("gsm", str(tmp_path / "empty"), str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="math_manual_dir"):
    math_data.build("aime24", "", str(tmp_path / "tfds"))


def _cfg(dirs, task="dapo_math", **text):
  c = pipeline.default_data_config()
  c.task, c.horizon, c.math_manual_dir, c.data_dir = task, 32, dirs[0], dirs[1]
  c.text.update({"tokenizer_path": FIXTURE, "prompt_len": 200, **text})
  return c


def _chat(problem, think=""):
  """Qwen3's template for one user turn, written out by hand."""
  return f"<|im_start|>user\n{PRE}{problem}{SUF}<|im_end|>\n<|im_start|>assistant\n{think}"


def test_text_task_batches(dirs):
  c = _cfg(dirs)
  task = pipeline.task_from_config(c)
  tok = task.tokenizer
  assert task.is_text and (task.prompt_len, task.response_len, task.answer_len) == (200, 32, 64)
  assert task.stats("train") == {"prompts": 6.0, "prompts_dropped_long": 2.0, "answers_dropped_long": 0.0}
  assert not task.has_warmstart_targets and task.device_reward is None and task.eval_split == "test"
  batches = list(pipeline.make_iterator(c, "train", batch_size=3, seed=0, num_epochs=1, process_index=0,
                                        process_count=1))
  assert len(batches) == 2
  want = {"prompt": (3, 200), "prompt_mask": (3, 200), "answer": (3, 64), "answer_mask": (3, 64)}
  assert {k: v.shape for k, v in batches[0].items()} == want
  seen = {}
  for b in batches:
    for ids, mask, ans in zip(b["prompt"], b["prompt_mask"], task.decode_answers(b["answer"], b["answer_mask"])):
      n = int(mask.sum())
      assert mask[-n:].all() and not mask[:-n].any() and (ids[:-n] == tok.pad_id).all()  # left padded
      seen[tok.decode(ids[-n:], skip_special_tokens=False)] = ans
  want = {_chat(f"What is {i}+{i}?"): str(2 * i) for i in range(5)}
  want[_chat("Compute 1/2+0.")] = "\\frac{1}{2}"
  assert seen == want


def test_text_task_template_kwargs_and_eval_splits(dirs):
  c = _cfg(dirs, task="aime25", chat_template_kwargs='{"enable_thinking": false}')
  task = pipeline.task_from_config(c)
  b = next(pipeline.make_iterator(c, "validation", batch_size=2, seed=0, shuffle=False, process_index=0,
                                  process_count=1))
  texts = sorted(task.tokenizer.decode(p[m > 0], skip_special_tokens=False)
                 for p, m in zip(b["prompt"], b["prompt_mask"]))
  assert texts == [_chat("AIME 3", "<think>\n\n</think>\n\n"), _chat("AIME 4", "<think>\n\n</think>\n\n")]
  c.text.chat_template = False
  raw = pipeline.task_from_config(c).source("test")
  assert load_tokenizer(FIXTURE).decode(raw[0]["prompt"]) in (PRE + "AIME 3" + SUF, PRE + "AIME 4" + SUF)


def test_text_task_reward_from_token_arrays(dirs):
  c = _cfg(dirs, overlong_buffer=20)
  task = pipeline.task_from_config(c)
  tok = task.tokenizer
  im_end = tok.encode("<|im_end|>")
  texts = ["So 3+3 is six.\nAnswer: 6", "Answer: 7", "I give up"]
  tokens = np.full((3, 32), tok.pad_id, np.int32)
  mask = np.zeros((3, 32), np.int32)
  for i, t in enumerate(texts):
    ids = tok.encode(t) + im_end
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, 1
  ex = task.encode_example({"prompt": np.zeros(1, np.int32), "answer": b"6"})
  answer, answer_mask = np.stack([ex["answer"]] * 3), np.stack([ex["answer_mask"]] * 3)
  assert task.decode_responses(tokens, mask) == texts  # the stop token is dropped
  out = task.score(tokens, mask, answer, answer_mask)
  lengths = mask.sum(-1)
  penalty = np.minimum(-(lengths - (32 - 20)) / 20, 0)  # DAPO's soft overlong punishment, by hand
  np.testing.assert_allclose(out.reward, np.array([1, -1, -1]) + penalty, rtol=1e-6)
  np.testing.assert_array_equal(out.correct, [True, False, False])
  assert lengths[0] > 12 > lengths[1]  # (so the penalty is exercised on one row)
  # reward_range: -1 - factor (wrong at L = L_max, the full penalty) to +1; a full-length wrong row attains it.
  assert task.reward_range == (-2.0, 1.0)
  full = np.concatenate([tokens[2:, :3], np.full((1, 29), tok.encode("x")[0], np.int32)], -1)
  np.testing.assert_allclose(task.score(full, np.ones_like(full), answer[:1], answer_mask[:1]).reward, [-2.0])
  assert pipeline.task_from_config(_cfg(dirs, overlong_buffer=20, overlong_factor=0.5)).reward_range == (-1.5, 1)
  assert pipeline.task_from_config(_cfg(dirs)).reward_range == (-1.0, 1.0)
  with pytest.raises(ValueError, match="overlong_factor=-1"):
    pipeline.task_from_config(_cfg(dirs, overlong_buffer=20, overlong_factor=-1.0))


def test_text_task_errors(dirs):
  with pytest.raises(ValueError, match="only the 'train' split"):
    pipeline.task_from_config(_cfg(dirs)).source("validation")
  with pytest.raises(ValueError, match="data.text.tokenizer_path"):
    pipeline.task_from_config(_cfg(dirs, tokenizer_path=""))
  with pytest.raises(ValueError, match="data.text.reward='exact'"):
    pipeline.task_from_config(_cfg(dirs, reward="exact"))
  with pytest.raises(ValueError, match="not a JSON object"):
    pipeline.task_from_config(_cfg(dirs, chat_template_kwargs="enable_thinking=false"))
  with pytest.raises(ValueError, match="data.text.prompt_len=10 tokens"):
    pipeline.task_from_config(_cfg(dirs, prompt_len=10)).source("train")
  assert pipeline.task_from_config(_cfg(dirs, extra_stop_tokens="<|im_start|>")).tokenizer.stop_ids == (2, 0, 1)
  with pytest.raises(ValueError, match="stop token 'nope' is not a single token"):
    pipeline.task_from_config(_cfg(dirs, extra_stop_tokens="nope"))
  with pytest.raises(ValueError, match="is a text task"):
    tasks.get_task("aime24", 64)


def test_last_boxed():
  assert math_data.last_boxed(r"a \boxed{1} then \boxed{\frac{3}{4}}") == r"\frac{3}{4}"
  assert math_data.last_boxed(r"\boxed{\{1, \{2\}\}} x") is not None
  assert math_data.last_boxed(r"\boxed{a{b{c}}d}") == "a{b{c}}d"
  assert math_data.last_boxed(r"\boxed 42.") == "42."
  assert math_data.last_boxed(r"\fbox{5}") == "5"
  assert math_data.last_boxed(r"so \boxed{12") is None  # truncated
  assert math_data.last_boxed("no box here") is None


@pytest.mark.parametrize("response, answer, want", [
    (r"The answer is \boxed{42}.", "42", 1.0),                       # correct
    (r"The answer is \boxed{41}.", "42", 0.0),                       # wrong
    ("The answer is 42.", "42", 0.0),                                # malformed: no \boxed
    (r"The answer is \boxed{4", "42", 0.0),                          # truncated
    (r"\boxed{1} wait, \boxed{ 042 }", "42", 1.0),                   # last box, spaces, zeros
    (r"\boxed{\frac{1}{2}}", "1/2", 1.0),                            # fractions
    (r"\boxed{\dfrac{2}{4}}", "0.5", 1.0),                           # numeric equality
    (r"\boxed{\frac{1}{3}}", "0.33", 0.0),
    (r"\boxed{$1{,}000$}", "1000", 0.0),                             # {,} is not a plain comma
    (r"\boxed{1,000}", "1000", 1.0),                                 # thousands separator
    (r"\boxed{\text{(B)}}", "(B)", 1.0),                             # \text{}
    (r"\boxed{\left(1, 2\right)}", "(1,2)", 1.0),                    # \left \right, spaces
    (r"\boxed{x^{2}+1}", "x^{2}+1", 1.0),                            # nested braces
    (r"\boxed{x^{2}+1}", "x^{3}+1", 0.0),
    (r"\boxed{30^\circ}", "30", 1.0),
    (r"\boxed{7}", r"\boxed{7}", 1.0),                               # boxed reference
])
def test_math_reward_cases(response, answer, want):
  r = math_data.math_reward([response], [answer])
  assert r.dtype == np.float32 and r.shape == (1,)
  assert r[0] == want, (response, answer, math_data.last_boxed(response))


def test_math_reward_batch_and_length_check():
  r = math_data.math_reward([r"\boxed{1}", r"\boxed{2}", ""], ["1", "1", "1"])
  np.testing.assert_array_equal(r, [1.0, 0.0, 0.0])
  with pytest.raises(ValueError, match="2 responses but 1 answers"):
    math_data.math_reward(["a", "b"], ["1"])


def test_config_validate_checks_text_fields():
  from trm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.default_config()
  c.data.task, c.warmstart.steps = "aime25", 0
  config_lib.validate(c)  # nothing is read: no files, no tokenizer
  c.warmstart.steps = 5
  with pytest.raises(config_lib.ConfigError, match="warmstart.steps must be 0 for the text task 'aime25'"):
    config_lib.validate(c)
  c.warmstart.steps, c.data.text.reward = 0, "llm_judge"
  with pytest.raises(config_lib.ConfigError, match="config.data.text.reward='llm_judge'"):
    config_lib.validate(c)
