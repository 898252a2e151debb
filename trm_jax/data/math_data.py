"""Real-data path: DAPO-Math-17k training prompts and AIME 2024 / 2025 evaluation, from local files.

Nothing downloads: the user places the files in a directory and passes it as the manual dir
(`data.math_manual_dir`). The builders read the `*.parquet` and `*.jsonl` files there whose lower-cased
name matches their pattern: `dapo_math` "dapo" (split `train`), `aime24` "aime24" / "aime_2024" /
"aime-2024", `aime25` the same with 25 (splits `test`). Layouts accepted:

  verl / DAPO parquet: `prompt` = chat messages [{"role", "content"}, ...], `reward_model.ground_truth`,
                       `data_source`, `extra_info` (ignored)
  plain rows:          `problem` (or `question`, or `prompt` as a string) and `answer` (or the last
                       \\boxed{} of `solution`)

Each example stores the bare `problem` (the deduplication key: the public DAPO parquet repeats every
problem ~100x), the chat `messages` (JSON) whose last user turn is the DAPO instruction wrapped around the
problem (kept as is when the file already has it, added to plain problems), `prompt` (that user text),
`answer` and `data_source`. The prompt text is data; the chat template belongs to the tokenizer and is
applied by the text tasks (`trm_jax.data.text_tasks.TextTask`).
"""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from etils import epath

from trm_jax.data.quiet_build import QuietBuild

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
    for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=8192):
      yield from batch.to_pylist()
    return
  for n, line in enumerate(path.read_text().splitlines()):
    if line.strip():
      try:
        yield json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n + 1}: not a JSON object ({e})") from e


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

  @classmethod
  def source_files(cls, manual_dir) -> list[epath.Path]:
    """The `*.parquet` / `*.jsonl` files of `manual_dir` whose lower-cased name matches FILE_PATTERN, sorted."""
    files = sorted(p for p in epath.Path(manual_dir).iterdir()
                   if re.search(cls.FILE_PATTERN, p.name.lower()) and p.suffix in (".parquet", ".jsonl"))
    if not files:
      raise FileNotFoundError(f"no *.parquet/*.jsonl file matching {cls.FILE_PATTERN!r} in {manual_dir}. "
                              + _INSTRUCTIONS)
    return files

  def _split_generators(self, dl_manager):
    return {self.SPLIT: self._generate_examples(self.source_files(dl_manager.manual_dir))}

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


class Aime24(_ManualMath):
  """AIME 2024 (split `test`)."""
  FILE_PATTERN, SPLIT = r"aime[-_ ]?(20)?24", "test"


class Aime25(_ManualMath):
  """AIME 2025 (split `test`)."""
  FILE_PATTERN, SPLIT = r"aime[-_ ]?(20)?25", "test"


BUILDERS = {"dapo_math": DapoMath, "aime24": Aime24, "aime25": Aime25}


def build(name: str, manual_dir: str, data_dir: str | None):
  """Builds a math dataset (a key of BUILDERS) from files in `manual_dir` into `data_dir`; returns the builder."""
  cls = BUILDERS.get(name)
  if cls is None:
    raise ValueError(f"unknown math dataset {name!r}; known: {sorted(BUILDERS)}")
  if not manual_dir:
    raise ValueError(f"math dataset {name!r} needs data.math_manual_dir (the directory with its files). "
                     + _INSTRUCTIONS)
  files = cls.source_files(manual_dir)
  key = source_key(files)
  config = tfds.core.BuilderConfig(name=f"files_{key}", description=f"built from {len(files)} file(s) of "
                                   f"{manual_dir} whose content hashes to {key}")
  builder = cls(config=config, data_dir=data_dir or None)
  if builder.is_prepared():
    print(f"[trm_jax] reusing dataset {name}/{config.name} in {builder.data_dir} (the same content of "
          f"{', '.join(f.name for f in files)})", flush=True)
  else:  # QuietBuild's line says where it was written
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False))
  return builder


def source_key(files) -> str:
  """16 hex digits of SHA-256 over each file's name, size and content: the cache key of a math dataset.

  Content rather than mtime, so a copy of the same files reuses the build and any edit rebuilds it.
  """
  h = hashlib.sha256()
  for path in files:
    path = epath.Path(path)
    h.update(f"{path.name}\0{path.stat().length}\0".encode())
    with path.open("rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()[:16]
