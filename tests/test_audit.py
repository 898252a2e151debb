"""`python -m trm_jax.audit` end to end: a dump sampled by HF transformers in bf16 (scripts/make_audit_dump.py,
committed under tests/fixtures/audit/) against the float32 JAX learner, and a hand-written vLLM-format file."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUMP = os.path.join(ROOT, "tests", "fixtures", "audit", "hf_bf16.jsonl")
CKPT = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen3")


def _audit(out, dump, fmt="jsonl", *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device is enough for 16 rows
  subprocess.run([sys.executable, "-m", "trm_jax.audit", f"--dump={dump}", f"--format={fmt}", f"--hf_path={CKPT}",
                  f"--out={out}", "--no_progress", *extra], check=True, cwd=ROOT, env=env, capture_output=True)
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(out, "sequences.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return summary, rows, out


@pytest.fixture(scope="module")
def fixture_rows():
  with open(DUMP) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def jsonl_audit(tmp_path_factory):
  return _audit(str(tmp_path_factory.mktemp("audit_jsonl")), DUMP)


def test_transformers_bf16_dump_audits_end_to_end(jsonl_audit, fixture_rows):
  summary, rows, out = jsonl_audit
  assert summary["sequences"] == len(fixture_rows) == len(rows) and summary["bad_rows"] == []
  assert summary["tokens"] == sum(len(r["response_token_ids"]) for r in fixture_rows)
  # A real engine mismatch (bf16 PyTorch sampler vs float32 JAX learner): non-zero, and far below the
  # log-probs' own size (same weights); catches a learner scored on the wrong positions (|log ratio| ~ 1).
  assert 1e-4 < summary["log_ratio_abs_mean"] < 0.1
  assert summary["k3_mean"] > 0 and set(summary["accept_rate"]) == {"0.05", "0.1"}
  for r in rows:
    assert {"line", "length", "log_ratio_abs_max", "k2_max", "k3_mean"} <= set(r)
    # k2 = 1/2 (log rho)^2 at the token with the largest |log rho|
    assert r["k2_max"] == pytest.approx(0.5 * r["log_ratio_abs_max"] ** 2, rel=1e-4)
  for name in ("acceptance_by_length.png", "max_kl_hist.png", "bound_vs_T.png"):
    assert os.path.getsize(os.path.join(out, name)) > 1000


def _vllm_line(row):
  """One vLLM RequestOutput as JSON (vLLM's documented structure) carrying a fixture row."""
  lps = [{str(tok): {"logprob": lp, "rank": 1, "decoded_token": "?"}}
         for tok, lp in zip(row["response_token_ids"], row["response_logprobs"])]
  return {"request_id": "0", "prompt_token_ids": row["prompt_token_ids"],
          "outputs": [{"index": 0, "token_ids": row["response_token_ids"], "logprobs": lps}]}


def test_vllm_format_and_bad_rows(tmp_path, jsonl_audit, fixture_rows):
  good = _vllm_line(fixture_rows[0])
  oov = _vllm_line(fixture_rows[1])
  oov["outputs"][0]["token_ids"] = [10 ** 7] + oov["outputs"][0]["token_ids"][1:]
  oov["outputs"][0]["logprobs"][0] = {str(10 ** 7): {"logprob": -1.0, "rank": 1, "decoded_token": "?"}}
  short = _vllm_line(fixture_rows[2])
  short["outputs"][0]["logprobs"] = short["outputs"][0]["logprobs"][:-1]
  nan = _vllm_line(fixture_rows[3])
  first = nan["outputs"][0]["token_ids"][0]
  nan["outputs"][0]["logprobs"][0] = {str(first): {"logprob": math.nan, "rank": 1, "decoded_token": "?"}}
  path = tmp_path / "vllm.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in (good, oov, short, nan, good)) + "\n")
  summary, rows, _ = _audit(str(tmp_path / "out"), str(path), "vllm")
  assert summary["sequences"] == 2 and [r["line"] for r in rows] == [1, 5]
  assert sorted(b["line"] for b in summary["bad_rows"]) == [2, 3, 4]  # counted with line numbers, never dropped
  # The same response read through the vLLM adapter audits to the same numbers as through our schema.
  ref = jsonl_audit[1][0]
  assert rows[0]["log_ratio_abs_max"] == pytest.approx(ref["log_ratio_abs_max"], rel=1e-5)
  assert rows[0]["k3_mean"] == pytest.approx(ref["k3_mean"], rel=1e-4, abs=1e-9)
