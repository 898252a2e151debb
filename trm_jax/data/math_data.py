"""Real-data path: DAPO-Math-17k training prompts, AIME 2024 / 2025 evaluation, and a \\boxed{} reward.

Nothing downloads: the user places the files in a directory and passes it as the manual dir
(`data.math_manual_dir`). The builders read the `*.parquet` and `*.jsonl` files there whose lower-cased
name matches their pattern: `dapo_math` "dapo" (split `train`), `aime24` "aime24" / "aime_2024" /
"aime-2024", `aime25` the same with 25, `aime_eval` any "aime" (splits `test`). Layouts accepted:

  verl / DAPO parquet: `prompt` = chat messages [{"role", "content"}, ...], `reward_model.ground_truth`,
                       `data_source`, `extra_info` (ignored)
  plain rows:          `problem` (or `question`, or `prompt` as a string) and `answer` (or the last
                       \\boxed{} of `solution`)

Each example stores the bare `problem` (the deduplication key: the public DAPO parquet repeats every
problem ~100x), the chat `messages` (JSON) whose last user turn is the DAPO instruction wrapped around the
problem (kept as is when the file already has it, added to plain problems), `prompt` (that user text),
`answer` and `data_source`. The prompt text is data; the chat template belongs to the tokenizer and is
applied by the text tasks (`trm_jax.data.tasks.TextTask`).
"""
from __future__ import annotations

import fractions
import json
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from trm_jax.data.builders import QuietBuild

# The DAPO-Math-17k instruction around each problem (verbatim from the released parquet).
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of "
               "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = "\n\nRemember to put your answer on its own line after \"Answer:\"."

_INSTRUCTIONS = """Put the data files into the manual dir (data.math_manual_dir), for example:
  dapo-math-17k.parquet   (https://huggingface.co/datasets/BytedTsinghua-SIA/DAPO-Math-17k)
  aime-2024.parquet       (https://huggingface.co/datasets/BytedTsinghua-SIA/AIME-2024)
  aime-2025.jsonl         (AIME 2025 I + II as {"problem", "answer"} rows)
A *.parquet / *.jsonl file whose name contains "dapo" is training data; "aime24" / "aime-2024" /
"aime_2024" (and 25) name the evaluation sets."""

_FEATURES = {k: tfds.features.Text() for k in ("prompt", "answer", "problem", "messages", "data_source")}


def dapo_prompt(problem: str) -> str:
  """The DAPO instruction around a bare problem (the user turn of DAPO-Math-17k)."""
  return DAPO_PREFIX + problem + DAPO_SUFFIX


def strip_instruction(prompt: str) -> str:
  """The bare problem of a DAPO-format user turn (the text itself if it has no DAPO instruction)."""
  for suffix in (DAPO_SUFFIX, DAPO_SUFFIX[:-1]):  # copies of the data differ in the final period
    if prompt.startswith(DAPO_PREFIX) and prompt.endswith(suffix):
      return prompt[len(DAPO_PREFIX):len(prompt) - len(suffix)]
  return prompt


def iter_records(path):
  """Rows of a parquet or jsonl file as dicts, streamed (the DAPO parquet has ~1.8M rows)."""
  path = epath.Path(path)
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  # only this path needs it
    for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=8192):
      yield from batch.to_pylist()
    return
  for n, line in enumerate(path.read_text().splitlines()):
    if line.strip():
      try:
        yield json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n + 1}: not a JSON object ({e})") from e


def read_records(path) -> list[dict]:
  """Rows of a parquet or jsonl file as a list of dicts."""
  return list(iter_records(path))


def record_fields(row: dict) -> dict | None:
  """{problem, prompt, messages, answer, data_source} of a row in any accepted layout; None if incomplete."""
  raw = next((row[k] for k in ("prompt", "problem", "question") if _present(row.get(k))), None)
  messages = None
  if isinstance(raw, (list, tuple, np.ndarray)):  # chat format: keep the conversation, read the last user turn
    messages = [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in raw]
    users = [m["content"] for m in messages if m["role"] == "user"]
    raw = users[-1] if users else None
  answer = row.get("answer")
  if answer is None and isinstance(row.get("reward_model"), dict):
    answer = row["reward_model"].get("ground_truth")
  if answer is None and row.get("solution"):
    answer = last_boxed(row["solution"])
  if not raw or answer is None or not str(answer).strip():
    return None
  problem = strip_instruction(str(raw))
  if messages is None:
    prompt = dapo_prompt(problem) if problem == str(raw) else str(raw)
    messages = [{"role": "user", "content": prompt}]
  else:
    prompt = str(raw)
  return {"problem": problem, "prompt": prompt, "messages": json.dumps(messages, ensure_ascii=False),
          "answer": str(answer).strip(), "data_source": str(row.get("data_source") or "")}


def _present(v) -> bool:
  return v is not None and (len(v) > 0 if hasattr(v, "__len__") else True)


def dedup_key(problem: str) -> str:
  """Problems equal up to whitespace are the same problem."""
  return " ".join(problem.split())


class _ManualMath(QuietBuild, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic: read matching files from the manual dir into deduplicated examples."""
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "problem / messages / data_source features, DAPO instruction, aime24 / aime25."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  FILE_PATTERN, SPLIT = "", ""

  def __init__(self, *, file_format="array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=tfds.features.FeaturesDict(_FEATURES))

  def _split_generators(self, dl_manager):
    files = sorted(p for p in epath.Path(dl_manager.manual_dir).iterdir()
                   if re.search(self.FILE_PATTERN, p.name.lower()) and p.suffix in (".parquet", ".jsonl"))
    if not files:
      raise FileNotFoundError(f"no *.parquet/*.jsonl file matching {self.FILE_PATTERN!r} in "
                              f"{dl_manager.manual_dir}. " + _INSTRUCTIONS)
    return {self.SPLIT: self._generate_examples(files)}

  def _generate_examples(self, files):
    seen = set()
    for path in files:
      for i, row in enumerate(iter_records(path)):
        ex = record_fields(row)
        if ex is None or dedup_key(ex["problem"]) in seen:
          continue
        seen.add(dedup_key(ex["problem"]))
        ex["data_source"] = ex["data_source"] or path.stem
        yield f"{path.name}:{i}", ex


class DapoMath(_ManualMath):
  """DAPO-Math-17k-style math prompts with integer/expression answers (split `train`)."""
  FILE_PATTERN, SPLIT = "dapo", "train"


class AimeEval(_ManualMath):
  """Every AIME-style evaluation file (split `test`)."""
  FILE_PATTERN, SPLIT = "aime", "test"


class Aime24(_ManualMath):
  """AIME 2024 (split `test`)."""
  FILE_PATTERN, SPLIT = r"aime[-_ ]?(20)?24", "test"


class Aime25(_ManualMath):
  """AIME 2025 (split `test`)."""
  FILE_PATTERN, SPLIT = r"aime[-_ ]?(20)?25", "test"


BUILDERS = {"dapo_math": DapoMath, "aime_eval": AimeEval, "aime24": Aime24, "aime25": Aime25}


def build(name: str, manual_dir: str, data_dir: str | None):
  """Builds a math dataset (a key of BUILDERS) from files in `manual_dir` into `data_dir`; returns the builder."""
  cls = BUILDERS.get(name)
  if cls is None:
    raise ValueError(f"unknown math dataset {name!r}; known: {sorted(BUILDERS)}")
  if not manual_dir:
    raise ValueError(f"math dataset {name!r} needs data.math_manual_dir (the directory with its files). "
                     + _INSTRUCTIONS)
  builder = cls(data_dir=data_dir or None)
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


# ---------------------------------------------------------------- tokenized prompts for the text tasks


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
  and counted (and logged), never truncated.
  """
  import logging  # pylint: disable=g-import-not-at-top

  source = build(name, manual_dir, data_dir).as_data_source(split)
  examples = [source[i] for i in range(len(source))]
  texts = [ex["prompt"].decode("utf-8") for ex in examples]
  if chat_template:
    texts = [tokenizer.apply_chat_template(json.loads(ex["messages"].decode("utf-8")), add_generation_prompt=True,
                                           **(template_kwargs or {})) for ex in examples]
  encode_many = getattr(tokenizer, "encode_many", None)  # HFTokenizer: batched, in parallel in Rust
  all_ids = encode_many(texts) if encode_many else [tokenizer.encode(t) for t in texts]
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
  log = logging.getLogger(__name__)
  log.info("%s/%s: %d prompts kept, %d dropped (longer than prompt_len=%d tokens; longest %d), %d dropped "
           "(answer longer than answer_len=%d bytes)", name, split, len(prompts), dropped, prompt_len, longest,
           long_answers, answer_len)
  if dropped or long_answers:
    log.warning("%s/%s: dropped %d prompts > prompt_len=%d tokens and %d answers > answer_len=%d bytes",
                name, split, dropped, prompt_len, long_answers, answer_len)
  if not prompts:
    raise ValueError(f"{name}/{split}: all {len(source)} prompts dropped: {dropped} exceed data.text.prompt_len="
                     f"{prompt_len} tokens (longest {longest}), {long_answers} answers exceed "
                     f"data.text.answer_len={answer_len} bytes")
  return PromptSource(prompts, answers, dropped, long_answers, longest)
