"""Readers of rollout dumps: our JSONL schema, vLLM `RequestOutput` JSON, OpenAI-compatible completions.

Each adapter turns one line into rows of our schema (schema.SCHEMA), which `schema.validate` then checks;
a line that cannot be read becomes a bad row {line, reason}, never an exception.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterator

from trm_jax.audit.schema import BadRow, Row, validate

FORMATS_DOC = """\
--format=vllm: one vLLM offline `RequestOutput` per line as JSON (`prompt_token_ids`, `request_id`,
  `outputs: [{index, token_ids, logprobs: [{"<token_id>": {logprob, rank, decoded_token}, ...} per position]}]`,
  generated with SamplingParams(logprobs=K)). Each output is one row; the sampled token's entry gives its
  log-prob, the entries of rank 1..K the top-K. Optional extra keys per line: `sampling_params` {temperature,
  top_p, top_k} (what the log-probs are of: vLLM V1's default logprobs_mode=raw_logprobs reports the model's
  distribution BEFORE temperature / top-p, i.e. the defaults temperature=1, top_p=1, top_k=0 here), `reward`
  (a number, or a list with one per output).
--format=openai: one OpenAI-compatible completions response per line (`choices: [{logprobs: {tokens,
  token_logprobs, top_logprobs}}]`, or chat's `logprobs.content: [{token, logprob, top_logprobs}]`) with tokens as
  "token_id:N" strings (vLLM: --return-tokens-as-token-ids) or a choice's `token_ids`. The prompt ids come from
  the choice's or the line's `prompt_token_ids`, or the line's `prompt` when it is a list of ids (add the request's
  prompt ids to the line if the server does not return them). Optional `sampling_params` and `reward` as above.
"""

_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


def _sampling(obj: dict) -> dict:
  sp = obj.get("sampling_params") or {}
  if not isinstance(sp, dict):
    raise BadRow("sampling_params must be an object")
  return {k: sp[k] for k in ("temperature", "top_p", "top_k") if sp.get(k) is not None}


def _reward(obj: dict, i: int) -> dict:
  r = obj.get("reward")
  if isinstance(r, list):
    r = r[i] if i < len(r) else None
  return {} if r is None else {"reward": r}


def _vllm_topk(positions: list) -> dict:
  """The top-K by vLLM's rank (1..K at every position); {} when ranks are missing or K = 0."""
  ks, tops = [], []
  for d in positions:
    by_rank = sorted(((v.get("rank"), int(t), v.get("logprob")) for t, v in d.items()),
                     key=lambda x: (x[0] is None, x[0] or 0))
    k = 0
    while k < len(by_rank) and by_rank[k][0] == k + 1:
      k += 1
    ks.append(k)
    tops.append(by_rank)
  k = min(ks, default=0)
  if k == 0:
    return {}
  return {"topk_token_ids": [[t for _, t, _ in top[:k]] for top in tops],
          "topk_logprobs": [[lp for _, _, lp in top[:k]] for top in tops]}


def _vllm_output(obj: dict, out: dict, i: int) -> dict:
  ids, positions = out.get("token_ids"), out.get("logprobs")
  if not isinstance(ids, list) or not isinstance(positions, list):
    raise BadRow("needs token_ids and logprobs lists (SamplingParams(logprobs=K))")
  if len(ids) != len(positions):
    raise BadRow(f"length mismatch: {len(ids)} token_ids but {len(positions)} logprobs positions")
  lps = []
  for t, (tok, d) in enumerate(zip(ids, positions)):
    entry = d.get(str(tok)) if isinstance(d, dict) else None
    if not isinstance(entry, dict):
      raise BadRow(f"logprobs[{t}] has no entry for the sampled token {tok}")
    lps.append(entry.get("logprob"))
  raw = {"prompt_token_ids": obj.get("prompt_token_ids"), "response_token_ids": ids, "response_logprobs": lps,
         **_vllm_topk(positions), **_sampling(obj), **_reward(obj, i)}
  if obj.get("request_id") is not None:
    raw["group_id"] = obj["request_id"]
  return raw


def from_vllm(obj) -> Iterator[tuple[str, Callable[[], dict]]]:
  """(label, build) per output of one vLLM RequestOutput; build() raises BadRow for that output only."""
  if not isinstance(obj, dict) or not isinstance(obj.get("outputs"), list):
    raise BadRow("a vLLM RequestOutput needs an 'outputs' list")
  for i, out in enumerate(obj["outputs"]):
    yield f"outputs[{i}]", lambda out=out, i=i: _vllm_output(obj, out if isinstance(out, dict) else {}, i)


def _token_id(token) -> int:
  m = _TOKEN_ID.match(token) if isinstance(token, str) else None
  if m is None:
    raise BadRow(f"token {token!r} is not a 'token_id:N' string (serve with --return-tokens-as-token-ids)")
  return int(m.group(1))


def _openai_topk(tops: list) -> dict:
  """Top-K from per-position {token: logprob} maps: the K = min size largest at each position."""
  if not tops or any(not t for t in tops):
    return {}
  k = min(len(t) for t in tops)
  best = [sorted(((lp, _token_id(tok)) for tok, lp in t.items()), key=lambda x: -x[0])[:k] for t in tops]
  return {"topk_token_ids": [[i for _, i in b] for b in best], "topk_logprobs": [[lp for lp, _ in b] for b in best]}


def _openai_choice(obj: dict, ch: dict, i: int) -> dict:
  lp = ch.get("logprobs")
  if not isinstance(lp, dict):
    raise BadRow("choice has no logprobs (request logprobs=K)")
  if isinstance(lp.get("content"), list):  # chat completions
    tokens = [c.get("token") for c in lp["content"]]
    values = [c.get("logprob") for c in lp["content"]]
    tops = [{t.get("token"): t.get("logprob") for t in c.get("top_logprobs") or []} for c in lp["content"]]
  else:
    tokens, values, tops = lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs") or []
  if not isinstance(tokens, list) or not isinstance(values, list):
    raise BadRow("logprobs needs tokens and token_logprobs lists")
  ids = ch.get("token_ids") or [_token_id(t) for t in tokens]
  prompt = ch.get("prompt_token_ids") or obj.get("prompt_token_ids") or obj.get("prompt")
  if not isinstance(prompt, list):
    raise BadRow("no prompt token ids: add prompt_token_ids (or the request's prompt as ids) to the line")
  raw = {"prompt_token_ids": prompt, "response_token_ids": ids, "response_logprobs": values,
         **(_openai_topk(tops) if len(tops) == len(values) else {}), **_sampling(obj), **_reward(obj, i)}
  if obj.get("id") is not None:
    raw["group_id"] = obj["id"]
  return raw


def from_openai(obj) -> Iterator[tuple[str, Callable[[], dict]]]:
  """(label, build) per choice of one OpenAI-compatible completions (or chat completions) response."""
  if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
    raise BadRow("an OpenAI completions response needs a 'choices' list")
  for i, ch in enumerate(obj["choices"]):
    yield f"choices[{i}]", lambda ch=ch, i=i: _openai_choice(obj, ch if isinstance(ch, dict) else {}, i)


def from_jsonl(obj) -> Iterator[tuple[str, Callable[[], dict]]]:
  yield "", lambda: obj


ADAPTERS = {"jsonl": from_jsonl, "vllm": from_vllm, "openai": from_openai}


def _rows_of_line(text: str, line: int, fmt: str, vocab_size: int, base_dir: str, cache: dict):
  """(rows, bad) of one line of the dump."""
  rows, bad = [], []
  try:
    obj = json.loads(text)
    parts = list(ADAPTERS[fmt](obj))
  except (json.JSONDecodeError, BadRow) as e:
    msg = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
    return rows, [{"line": line, "reason": msg}]
  for label, build in parts:
    try:
      rows.append(validate(build(), line, vocab_size, base_dir=base_dir, npy_cache=cache))
    except (BadRow, TypeError, ValueError, AttributeError) as e:
      reason = str(e) if isinstance(e, BadRow) else f"malformed entry ({e.__class__.__name__}: {e})"
      bad.append({"line": line, "reason": f"{label}: {reason}" if label else reason})
  return rows, bad


def read_dump(path: str, fmt: str, vocab_size: int) -> tuple[list[Row], list[dict]]:
  """All good rows of a dump and every bad one as {line, reason} (1-based lines; blank lines are skipped)."""
  if fmt not in ADAPTERS:
    raise ValueError(f"--format must be one of {sorted(ADAPTERS)}, got {fmt!r}")
  rows, bad, cache = [], [], {}
  base_dir = os.path.dirname(os.path.abspath(path))
  with open(path) as f:
    for line, text in enumerate(f, start=1):
      if text.strip():
        r, b = _rows_of_line(text, line, fmt, vocab_size, base_dir, cache)
        rows += r
        bad += b
  return rows, bad
