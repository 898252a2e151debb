"""The offline auditor (trm_jax.audit) on a real engine mismatch and on vLLM / OpenAI dumps.

tests/fixtures/audit/hf_bf16.jsonl was sampled by HF transformers in bfloat16 (scripts/make_audit_dump.py; no torch
here); its `meta` holds transformers' float32 / float64 log-probs of the same tokens and the float64 exact KL / TV,
the independent references below. vllm.jsonl / openai.jsonl / bad_rows.jsonl are hand-written.
"""
import json
import os

import numpy as np
import pytest

from trm_jax.audit import __main__ as cli
from trm_jax.audit import adapters, auditor

HERE = os.path.dirname(__file__)
FIX = os.path.join(HERE, "fixtures", "audit")
HF = os.path.join(HERE, "fixtures", "hf", "qwen3")
VOCAB = 128


def run(dump, fmt="jsonl", **kw):
  return auditor.audit(auditor.Settings(dump=dump, hf_path=HF, format=fmt, progress=False, **kw))


@pytest.fixture(scope="module")
def meta():
  with open(os.path.join(FIX, "hf_bf16.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def bf16_cli(tmp_path_factory):
  """The CLI end to end on the transformers bf16 dump (exact KL from its .npy side file)."""
  out = str(tmp_path_factory.mktemp("audit"))
  cli.main([f"--dump={os.path.join(FIX, 'hf_bf16.jsonl')}", "--format=jsonl", f"--hf_path={HF}", f"--out={out}",
            "--deltas=0.05,0.1", "--no_progress"])
  return out


@pytest.fixture(scope="module")
def f32_dump(tmp_path_factory, meta):
  """The same tokens with transformers' float32 log-probs as the sampler's (an f32 engine), no side files."""
  path = str(tmp_path_factory.mktemp("f32") / "f32.jsonl")
  with open(path, "w") as f:
    for r in meta:
      keep = {k: r[k] for k in ("prompt_token_ids", "response_token_ids")}
      f.write(json.dumps(dict(keep, response_logprobs=r["meta"]["logprobs_f32"])) + "\n")
  return path


@pytest.fixture(scope="module")
def f32_results(f32_dump):
  return {d: run(f32_dump, learner_dtype=d) for d in ("float32", "bfloat16")}


def test_cli_outputs_contract(bf16_cli, meta):
  s = json.load(open(os.path.join(bf16_cli, "summary.json")))
  for k in ("sequences", "tokens", "bad_rows", "log_ratio_abs_mean", "k3_mean", "ppl_gap", "accept_rate"):
    assert k in s
  assert s["sequences"] == len(meta) and s["tokens"] == sum(len(r["response_token_ids"]) for r in meta)
  assert s["bad_rows"] == [] and s["divergence_source"] == "stored" and set(s["accept_rate"]) == {"0.05", "0.1"}
  seqs = [json.loads(x) for x in open(os.path.join(bf16_cli, "sequences.jsonl"))]
  assert [q["line"] for q in seqs] == list(range(1, len(meta) + 1))
  for k in ("length", "log_ratio_abs_max", "k2_max", "k3_mean", "accept_max_k2@0.05"):
    assert k in seqs[0]
  for p in ("acceptance_by_length.png", "max_kl_hist.png", "bound_vs_T.png"):
    assert os.path.getsize(os.path.join(bf16_cli, p)) > 1000


def test_summary_matches_float64_reference(bf16_cli, meta):
  # Catches a wrong sign / gather offset / mean of the headline numbers: float64 over transformers' f64 log-probs.
  s = json.load(open(os.path.join(bf16_cli, "summary.json")))
  lr = np.concatenate([np.subtract(r["meta"]["logprobs_f64"], r["response_logprobs"]) for r in meta])
  assert s["log_ratio_abs_mean"] == pytest.approx(np.abs(lr).mean(), rel=2e-3)
  assert s["k3_mean"] == pytest.approx((np.exp(lr) - 1 - lr).mean(), rel=2e-2)
  kl = np.concatenate([r["meta"]["kl_f64"] for r in meta])
  assert s["kl_mean"] == pytest.approx(kl.mean(), rel=2e-2) and s["kl_max"] == pytest.approx(kl.max(), rel=2e-2)


def test_per_token_log_ratio_float64(meta):
  # The reported per-token log ratio = log pi_theta - log pi_roll; a shifted position would miss by ~1.
  res = run(os.path.join(FIX, "hf_bf16.jsonl"))
  for tok, r in zip(res.tokens, meta):
    ref = np.subtract(r["meta"]["logprobs_f64"], r["response_logprobs"])
    np.testing.assert_allclose(tok["log_ratio"], ref, atol=2e-5)


def test_mismatch_nonzero_and_grows_with_bf16(bf16_cli, f32_results):
  s_bf16 = json.load(open(os.path.join(bf16_cli, "summary.json")))
  f32, learner_bf16 = f32_results["float32"].summary, f32_results["bfloat16"].summary
  assert f32["divergence_source"] == "sampled"
  # f32 sampler vs f32 learner: two float32 implementations, ~1e-6; a bf16 side makes it >= 100x larger.
  assert 0 < f32["log_ratio_abs_mean"] < 1e-4
  assert s_bf16["log_ratio_abs_mean"] > 100 * f32["log_ratio_abs_mean"]
  assert learner_bf16["log_ratio_abs_mean"] > 100 * f32["log_ratio_abs_mean"]


def test_vllm_adapter_and_end_to_end():
  rows, bad = adapters.read_dump(os.path.join(FIX, "vllm.jsonl"), "vllm", VOCAB)
  assert [r.line for r in rows] == [1, 1] and bad[0]["line"] == 2 and "outside the vocabulary" in bad[0]["reason"]
  np.testing.assert_array_equal(rows[0].response, [20, 21, 3])
  np.testing.assert_allclose(rows[0].logprobs, [-4.5, -4.25, -4.25])
  # top-K = ranks 1..K at every position: K = 1 (the last position has only ranks 1 and 2, sampled = 2).
  np.testing.assert_array_equal(rows[0].topk_ids[:, 0], [7, 9, 40])
  res = run(os.path.join(FIX, "vllm.jsonl"), fmt="vllm")
  assert res.summary["sequences"] == 2 and res.summary["tokens"] == 4 and res.summary["divergence_source"] == "topk"
  b = res.summary["bounds"]
  assert b["tv_only"] and b["unified"] <= min(b["coupling"], b["mixed_tv"], b["adaptive_tv"]) + 1e-6


def test_openai_adapter_and_bad_rows():
  res = run(os.path.join(FIX, "openai.jsonl"), fmt="openai")
  assert res.summary["sequences"] == 1 and res.summary["tokens"] == 2
  assert res.summary["bad_rows"][0]["line"] == 2 and "finite" in res.summary["bad_rows"][0]["reason"]
  np.testing.assert_array_equal(res.rows[0].topk_ids, [[7, 20], [9, 21]])


def test_bad_rows_reported_with_lines():
  _, bad = adapters.read_dump(os.path.join(FIX, "bad_rows.jsonl"), "jsonl", VOCAB)
  by_line = {b["line"]: b["reason"] for b in bad}
  assert sorted(by_line) == [2, 3, 4, 5, 7]  # line 6 is blank (skipped), line 1 is good
  assert "outside the vocabulary" in by_line[2] and "length mismatch" in by_line[3]
  assert "finite" in by_line[4] and "JSON" in by_line[5] and "unknown key" in by_line[7]
