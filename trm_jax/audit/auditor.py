"""One audit, start to end: read the dump, run the learner side, analyse, and return everything report.py writes."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from trm_jax.audit import adapters, analysis, compute
from trm_jax.models import hf


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `python -m trm_jax.audit` was asked (its flags)."""
  dump: str
  hf_path: str
  format: str = "jsonl"
  learner_dtype: str = "float32"
  thresholds: analysis.Thresholds = analysis.Thresholds()
  recompute_rollout: Optional[str] = None  # "key=value,..." over rollout.backend's fields; None = use the dump
  batch_size: int = 32
  progress: bool = True


@dataclasses.dataclass
class Result:
  """summary (summary.json), sequences (one dict per audited row), tokens (per-row per-token arrays), curve."""
  summary: dict
  sequences: list
  tokens: list
  curve: dict
  by_length: dict
  rows: list


def _sequences(rows, seq: dict, flags: dict, seq_bounds: dict) -> list:
  out = []
  for i, r in enumerate(rows):
    d = {"line": r.line, "group_id": r.group_id, "reward": r.reward}
    d.update({k: (int(v[i]) if k == "length" else float(v[i])) for k, v in seq.items()})
    d.update(bound_unified=float(seq_bounds["bound_unified"][i]), bound_tightest=str(seq_bounds["bound_tightest"][i]))
    d.update({k: bool(v[i]) for k, v in flags.items()})
    out.append(d)
  return out


def _summary(s: Settings, source: str, rows, bad, numbers, rates, table) -> dict:
  return {
      "dump": s.dump, "format": s.format, "hf_path": s.hf_path, "learner_dtype": s.learner_dtype,
      "divergence_source": source, "recompute_rollout": s.recompute_rollout,
      "sequences": len(rows), "bad_rows": bad, "bad_row_count": len(bad), **numbers,
      "accept_rate": rates.get("max_k2", {}), "accept": rates, "bounds": table,
      "thresholds": {k: list(v) for k, v in dataclasses.asdict(s.thresholds).items()},
  }


def _empty(s: Settings, bad) -> Result:
  summary = _summary(s, "sampled", [], bad, {"tokens": 0, "log_ratio_abs_mean": None, "k3_mean": None,
                                             "ppl_gap": None}, {}, {})
  return Result(summary, [], [], {}, {}, [])


def audit(s: Settings) -> Result:
  """Runs the audit of `s.dump` against the checkpoint `s.hf_path`; bad rows are reported, never fatal."""
  vocab = hf.model_config_from_hf(s.hf_path).vocab_size
  rows, bad = adapters.read_dump(s.dump, s.format, vocab)
  if not rows:
    return _empty(s, bad)
  backend = compute.recompute_backend(s.recompute_rollout) if s.recompute_rollout is not None else None
  source = compute.source_of(rows, backend)
  learner = compute.load_learner(s.hf_path, s.learner_dtype)
  tokens = compute.per_token(learner, rows, source, batch_size=s.batch_size, backend=backend, vocab=vocab,
                             progress=s.progress)
  p = compute.padded(rows, tokens)
  est = analysis.estimators(p)
  for i, r in enumerate(rows):  # the reported per-token log ratio, beside what it was computed from
    tokens[i]["log_ratio"] = np.asarray(est["k1"][i, :len(r.response)]) * -1.0
  seq = analysis.sequence_stats(p, est, source)
  flags, rates, by_length = analysis.decisions(p, est, source, s.thresholds)
  table = analysis.bound_table(p, est, source)
  seq_bounds = analysis.per_sequence_bounds(p, est, source)
  summary = _summary(s, source, rows, bad, analysis.summary_numbers(p, est, source), rates, table)
  summary["accept_by_length"] = by_length
  curve = analysis.bound_curve(table, int(p["mask"].shape[1]))
  return Result(summary, _sequences(rows, seq, flags, seq_bounds), tokens, curve, by_length, rows)
