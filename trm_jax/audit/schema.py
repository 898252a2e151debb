"""The audit's rollout-dump schema (one JSON object per line) and its validation.

A row that breaks the schema raises `BadRow(reason)`; the reader records {line, reason} and goes on, so a
dump with bad rows is audited on its good rows and the summary lists every rejected line.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import numpy as np

SCHEMA = """\
Rollout dump schema (--format=jsonl): one JSON object per line, one line per response.
  prompt_token_ids     list[int], >= 1 id        the prompt as the sampler saw it (chat template applied)
  response_token_ids   list[int], >= 1 id        the sampled response, stop token included if sampled
  response_logprobs    list[float], same length  the sampler's log pi_roll(y_t | c_t) of each sampled token
                                                 (finite, <= 0), of the distribution sampled from (after
                                                 temperature / top_p / top_k as given below)
  topk_token_ids       list[list[int]] [T][K]    optional: the sampler's top-K ids at each position (distinct)
  topk_logprobs        list[list[float]] [T][K]  optional, with topk_token_ids: their log-probs
  logits_npy           str                       optional: "FILE.npy" ([T', V] array) or "FILE.npy#i" (row i of an
                                                 [N, T', V] array), T' >= T, the sampler's raw logits at each
                                                 response position (before temperature); relative to the dump's
                                                 directory. Gives the exact full-vocabulary KL / TV.
  reward               float                     optional
  group_id             str | int                 optional: responses to one prompt share it
  temperature          float > 0 (default 1)     optional sampler settings the log-probs are taken under
  top_p                float in (0, 1] (1)
  top_k                int >= 0 (0 = off)
  meta                 object                    optional, ignored: put any other field here
Any other key, a missing required key, an id outside [0, vocab_size), a length mismatch between ids and
log-probs, or a NaN / inf / positive log-prob makes the row bad: it is reported with its line number in
summary.json's bad_rows and skipped; the run goes on.
"""

REQUIRED = ("prompt_token_ids", "response_token_ids", "response_logprobs")
OPTIONAL = ("topk_token_ids", "topk_logprobs", "logits_npy", "reward", "group_id", "temperature", "top_p",
            "top_k", "meta")
LOGPROB_TOL = 1e-4  # engines round log-probs of near-certain tokens to small positive values


class BadRow(ValueError):
  """A dump row that breaks the schema; the message is the reason reported in bad_rows."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One validated response. Arrays are numpy; `line` is the 1-based line of the dump it came from."""
  line: int
  prompt: np.ndarray  # [P] int32
  response: np.ndarray  # [T] int32
  logprobs: np.ndarray  # [T] float32, log pi_roll of the sampled tokens
  topk_ids: Optional[np.ndarray] = None  # [T, K] int32
  topk_logprobs: Optional[np.ndarray] = None  # [T, K] float32
  logits: Optional[tuple] = None  # (absolute .npy path, row index or None)
  reward: Optional[float] = None
  group_id: Optional[str] = None
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def sampling(self) -> tuple:
    return (self.temperature, self.top_p, self.top_k)


def _ids(value, name: str, vocab_size: int) -> np.ndarray:
  if not isinstance(value, list) or not value:
    raise BadRow(f"{name} must be a non-empty list of token ids")
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise BadRow(f"{name} must hold integers only")
  ids = np.asarray(value, np.int64)
  bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
  if bad.size:
    raise BadRow(f"{name}[{bad[0]}] = {ids[bad[0]]} is outside the vocabulary [0, {vocab_size})")
  return ids.astype(np.int32)


def _logprobs(value, name: str, n: int) -> np.ndarray:
  if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in value):
    raise BadRow(f"{name} must be a list of numbers")
  if len(value) != n:
    raise BadRow(f"length mismatch: {name} has {len(value)} entries for {n} response tokens")
  lp = np.asarray(value, np.float64)
  bad = np.flatnonzero(~np.isfinite(lp) | (lp > LOGPROB_TOL))
  if bad.size:
    raise BadRow(f"{name}[{bad[0]}] = {lp[bad[0]]} is not a finite log-probability <= 0")
  return lp.astype(np.float32)


def _topk(raw: dict, n: int, vocab_size: int):
  ids, lps = raw.get("topk_token_ids"), raw.get("topk_logprobs")
  if ids is None and lps is None:
    return None, None
  if ids is None or lps is None:
    raise BadRow("topk_token_ids and topk_logprobs must be given together")
  if not isinstance(ids, list) or not isinstance(lps, list) or len(ids) != n or len(lps) != n:
    raise BadRow(f"length mismatch: top-k lists must have one entry per response token ({n})")
  k = len(ids[0]) if isinstance(ids[0], list) else 0
  if k == 0 or any(not isinstance(x, list) or len(x) != k for x in ids + lps):
    raise BadRow("top-k entries must be lists of one length K >= 1 at every position")
  tid = _ids([v for x in ids for v in x], "topk_token_ids", vocab_size).reshape(n, k)
  tlp = _logprobs([v for x in lps for v in x], "topk_logprobs", n * k).reshape(n, k)
  if any(len(set(x.tolist())) != k for x in tid):
    raise BadRow("topk_token_ids must be distinct at each position")
  return tid, tlp


def _sampling(raw: dict) -> tuple:
  t, p, k = raw.get("temperature", 1.0), raw.get("top_p", 1.0), raw.get("top_k", 0)
  if not isinstance(t, (int, float)) or not t > 0 or not math.isfinite(t):
    raise BadRow(f"temperature must be > 0, got {t!r}")
  if not isinstance(p, (int, float)) or not 0 < p <= 1:
    raise BadRow(f"top_p must be in (0, 1], got {p!r}")
  if not isinstance(k, int) or isinstance(k, bool) or k < 0:
    raise BadRow(f"top_k must be an integer >= 0, got {k!r}")
  return float(t), float(p), int(k)


def _logits_ref(spec, base_dir: str, n: int, vocab_size: int, cache: dict):
  if spec is None:
    return None
  if not isinstance(spec, str):
    raise BadRow("logits_npy must be a string FILE.npy or FILE.npy#ROW")
  file, _, index = spec.partition("#")
  path = os.path.normpath(os.path.join(base_dir, file))
  if path not in cache:
    try:
      cache[path] = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
      raise BadRow(f"logits_npy {file!r} cannot be read ({e.__class__.__name__})") from None
  arr = cache[path]
  try:
    i = int(index) if index else None
  except ValueError:
    raise BadRow(f"logits_npy row {index!r} is not an integer") from None
  shape = arr.shape[1:] if i is not None else arr.shape
  if arr.ndim != (3 if i is not None else 2) or (i is not None and not 0 <= i < arr.shape[0]):
    raise BadRow(f"logits_npy {spec!r} does not name a [T, V] array (file shape {arr.shape})")
  if shape[0] < n or shape[1] != vocab_size:
    raise BadRow(f"logits_npy {spec!r} has shape {shape}, needs [>= {n}, {vocab_size}]")
  return path, i


def validate(raw, line: int, vocab_size: int, *, base_dir: str = ".", npy_cache: Optional[dict] = None) -> Row:
  """Checks one parsed dump row against SCHEMA and returns it as a `Row`; raises BadRow naming the problem."""
  if not isinstance(raw, dict):
    raise BadRow("a row must be a JSON object")
  unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
  if unknown:
    raise BadRow(f"unknown key(s) {unknown}; put extra fields under 'meta'")
  missing = [k for k in REQUIRED if k not in raw]
  if missing:
    raise BadRow(f"missing key(s) {missing}")
  prompt = _ids(raw["prompt_token_ids"], "prompt_token_ids", vocab_size)
  response = _ids(raw["response_token_ids"], "response_token_ids", vocab_size)
  n = len(response)
  logprobs = _logprobs(raw["response_logprobs"], "response_logprobs", n)
  topk_ids, topk_logprobs = _topk(raw, n, vocab_size)
  temperature, top_p, top_k = _sampling(raw)
  reward = raw.get("reward")
  if reward is not None and (not isinstance(reward, (int, float)) or not math.isfinite(reward)):
    raise BadRow(f"reward must be a finite number, got {reward!r}")
  meta = raw.get("meta", {})
  if not isinstance(meta, dict):
    raise BadRow("meta must be an object")
  logits = _logits_ref(raw.get("logits_npy"), base_dir, n, vocab_size, {} if npy_cache is None else npy_cache)
  group = raw.get("group_id")
  return Row(line=line, prompt=prompt, response=response, logprobs=logprobs, topk_ids=topk_ids,
             topk_logprobs=topk_logprobs, logits=logits, reward=None if reward is None else float(reward),
             group_id=None if group is None else str(group), temperature=temperature, top_p=top_p, top_k=top_k,
             meta=meta)
