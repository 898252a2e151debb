"""Real-data path: DAPO/AIME builders from local jsonl + parquet files, and the \\boxed{} reward."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trm_jax.data import math_data


def _write(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  # DAPO's released layout: chat-format prompt, answer in reward_model.ground_truth, duplicates.
  dapo = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
           "reward_model": {"ground_truth": str(2 * i), "style": "rule"}} for i in range(5)]
  pq.write_table(pa.Table.from_pylist(dapo + dapo), str(manual / "dapo-math-17k.parquet"))
  with open(manual / "dapo_extra.jsonl", "w") as f:
    f.write(json.dumps({"problem": "Compute 1/2+0.", "solution": "It is \\boxed{\\frac{1}{2}}."}))
    f.write("\n\n")
  aime = [{"problem": "AIME 1", "answer": "033"}, {"problem": "AIME 2", "answer": "204"}]
  pq.write_table(pa.Table.from_pylist(aime), str(manual / "aime-2024.parquet"))
  with open(manual / "aime25.jsonl", "w") as f:
    f.write(json.dumps({"question": "AIME 3", "answer": 7}) + "\n")
  (manual / "notes.txt").write_text("ignored")
  return manual


def test_builders_read_parquet_and_jsonl(tmp_path):
  manual = _write(tmp_path)
  dapo = math_data.build("dapo_math", str(manual), str(tmp_path / "tfds"))
  train = dapo.as_data_source("train")
  rows = sorted((r["prompt"].decode(), r["answer"].decode()) for r in (train[i] for i in range(len(train))))
  assert len(rows) == 6  # 5 unique parquet prompts (duplicates dropped) + 1 jsonl
  assert ("What is 3+3?", "6") in rows and ("Compute 1/2+0.", "\\frac{1}{2}") in rows
  aime = math_data.build("aime_eval", str(manual), str(tmp_path / "tfds")).as_data_source("test")
  got = sorted((aime[i]["prompt"].decode(), aime[i]["answer"].decode()) for i in range(len(aime)))
  assert got == [("AIME 1", "033"), ("AIME 2", "204"), ("AIME 3", "7")]
  assert str(dapo.version) == "1.0.0" and "manual dir" in dapo.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_builder_without_files_explains(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(Exception, match="dapo"):
    math_data.build("dapo_math", str(tmp_path / "empty"), str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="'gsm'"):
    math_data.build("gsm", str(tmp_path / "empty"), str(tmp_path / "tfds"))


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
