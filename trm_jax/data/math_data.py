"""Real-data path: DAPO-Math-17k-style training prompts, AIME-style eval, and a \\boxed{} answer reward.

Nothing downloads: the user places the files in a directory and passes it as the manual dir
(`data.math_manual_dir`). Both builders read `*.parquet` and `*.jsonl` files there:
`dapo_math` those whose name contains "dapo" (split `train`), `aime_eval` those containing "aime"
(split `test`). Field names accepted, first present wins:

  prompt: `prompt` (a string, or a chat list of {"role", "content"}: the last user message), `problem`,
          `question`
  answer: `answer`, `reward_model.ground_truth` (DAPO's layout), else the last \\boxed{} of `solution`

Duplicate prompts are dropped (the released DAPO-Math-17k parquet repeats each prompt many times).
"""
from __future__ import annotations

import fractions
import json
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

_INSTRUCTIONS = """Put the data files into the manual dir (data.math_manual_dir), for example:
  dapo-math-17k.parquet   (https://huggingface.co/datasets/BytedTsinghua-SIA/DAPO-Math-17k)
  aime-2024.parquet       (https://huggingface.co/datasets/BytedTsinghua-SIA/AIME-2024)
Any *.parquet / *.jsonl file whose name contains "dapo" (train) or "aime" (eval) is read."""

_FEATURES = {"prompt": tfds.features.Text(), "answer": tfds.features.Text()}


def read_records(path) -> list[dict]:
  """Rows of a parquet or jsonl file as dicts."""
  path = epath.Path(path)
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  # only this path needs it
    return pq.read_table(str(path)).to_pylist()
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_fields(row: dict) -> tuple[str, str] | None:
  """(prompt, answer) of a row in any accepted layout; None if either is missing."""
  prompt = next((row[k] for k in ("prompt", "problem", "question") if row.get(k)), None)
  if isinstance(prompt, (list, np.ndarray)):  # chat format: the last user message
    users = [m["content"] for m in prompt if m.get("role", "user") == "user"]
    prompt = users[-1] if users else None
  answer = row.get("answer")
  if answer is None and isinstance(row.get("reward_model"), dict):
    answer = row["reward_model"].get("ground_truth")
  if answer is None and row.get("solution"):
    answer = last_boxed(row["solution"])
  if not prompt or answer is None:
    return None
  return str(prompt), str(answer)


class _ManualMath(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic: read matching files from the manual dir into (prompt, answer) examples."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  FILE_KEY, SPLIT = "", ""

  def __init__(self, *, file_format="array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=tfds.features.FeaturesDict(_FEATURES))

  def _split_generators(self, dl_manager):
    files = sorted(p for p in epath.Path(dl_manager.manual_dir).iterdir()
                   if self.FILE_KEY in p.name.lower() and p.suffix in (".parquet", ".jsonl"))
    if not files:
      raise FileNotFoundError(f"no *{self.FILE_KEY}*.parquet/.jsonl in {dl_manager.manual_dir}. "
                              + _INSTRUCTIONS)
    return {self.SPLIT: self._generate_examples(files)}

  def _generate_examples(self, files):
    seen = set()
    for path in files:
      for i, row in enumerate(read_records(path)):
        fields = record_fields(row)
        if fields is None or fields[0] in seen:
          continue
        seen.add(fields[0])
        yield f"{path.name}:{i}", {"prompt": fields[0], "answer": fields[1]}


class DapoMath(_ManualMath):
  """DAPO-Math-17k-style math prompts with integer/expression answers (split `train`)."""
  FILE_KEY, SPLIT = "dapo", "train"


class AimeEval(_ManualMath):
  """AIME-style evaluation problems (split `test`)."""
  FILE_KEY, SPLIT = "aime", "test"


def build(name: str, manual_dir: str, data_dir: str):
  """Builds `dapo_math` or `aime_eval` from files in `manual_dir` into `data_dir`; returns the builder."""
  cls = {"dapo_math": DapoMath, "aime_eval": AimeEval}.get(name)
  if cls is None:
    raise ValueError(f"unknown math dataset {name!r}; known: ['aime_eval', 'dapo_math']")
  builder = cls(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  return builder


# ---------------------------------------------------------------- reward (host side, on decoded text)

def last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}), nested braces allowed; None if absent/unclosed."""
  start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  if start < 0:
    return None
  i = start + re.match(r"\\(?:boxed|fbox)\s*", text[start:]).end()
  if not text.startswith("{", i):  # `\boxed 5` form: the argument is the next token
    m = re.match(r"\\(?:boxed|fbox)\s+([^\s${}]+)", text[start:])
    return m.group(1) if m else None
  depth = 0
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i + 1:j]
  return None  # truncated before the closing brace


_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac(\d)(\d)")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def normalize_answer(s: str) -> str:
  """Canonical text of an answer: no spaces, $, \\text{}, \\left/\\right, trailing '.', fractions a/b."""
  s = s.strip()
  s = _TEXT_CMD.sub(r"\1", s)
  for tok in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "^\\circ", "^{\\circ}"):
    s = s.replace(tok, "")
  s = re.sub(r"\s+", "", s)
  s = _FRAC.sub(r"\1/\2", s)
  s = _FRAC_SHORT.sub(r"\1/\2", s)
  s = s.rstrip(".")
  if _THOUSANDS.match(s):
    s = s.replace(",", "")
  num = _as_number(s)
  return str(num) if num is not None else s


def _as_number(s: str) -> fractions.Fraction | None:
  """Exact rational value of an integer / decimal / a/b string (leading zeros allowed), else None."""
  if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)(/[-+]?\d+)?", s):
    return None
  try:
    return fractions.Fraction(s)
  except (ValueError, ZeroDivisionError):
    return None


def math_reward(response_texts: list[str], answers: list[str]) -> np.ndarray:
  """[N] float32: 1.0 where the response's last \\boxed{} equals the answer after normalisation, else 0.

  No \\boxed{} (malformed) or an unclosed one (truncated) scores 0. Numbers compare by exact value
  (`007 == 7`, `1/2 == 0.5 == \\frac{1}{2}`); everything else by normalised text.
  """
  if len(response_texts) != len(answers):
    raise ValueError(f"{len(response_texts)} responses but {len(answers)} answers")
  out = np.zeros(len(answers), np.float32)
  for i, (text, ref) in enumerate(zip(response_texts, answers)):
    got = last_boxed(text)
    ref = last_boxed(ref) if "\\boxed" in ref else ref
    out[i] = float(got is not None and ref is not None
                   and normalize_answer(got) == normalize_answer(ref))
  return out
