"""Writes a rollout dump sampled by HF transformers in bfloat16 (a real engine mismatch) under tests/fixtures/audit/.

    python scripts/make_audit_dump.py        # needs torch + transformers; the test suite never imports them

The sampler is the tiny random Qwen3 checkpoint tests/fixtures/hf/qwen3 run by transformers (PyTorch) with
bfloat16 weights and activations; each step's log-probs are log_softmax of its bf16 logits taken in float32 (as
vLLM / SGLang report them). Files (the JSONL schema of `python -m trm_jax.audit --help`):

  hf_bf16.jsonl       one row per response: prompt / response ids, the sampler's log-probs, its top-4, a reward,
                      a group id, `logits_npy` (row i of the side file) and, under `meta` (ignored by the audit),
                      the independent references the tests compare with: `logprobs_f32` / `logprobs_f64` =
                      transformers float32 / float64 log-probs of the same tokens (teacher forced), and `kl_f64` /
                      `tv_f64` = exact KL(sampler || float64 model) and TV per position, in numpy float64.
  hf_bf16_logits.npy  [N, T_max, V] float16: the sampler's bf16 logits (exact in float16 at these magnitudes).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen3")
OUT = os.path.join(ROOT, "tests", "fixtures", "audit")
PROMPTS, GROUP, TOPK, SEED = 8, 2, 4, 0
MAX_NEW = (8, 16, 24, 32)  # per prompt, so the dump spans several length buckets
EOS = (3, 5)  # the checkpoint's generation_config stop ids


def load(dtype):
  return transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype, attn_implementation="eager").eval()


def log_softmax64(logits: np.ndarray) -> np.ndarray:
  x = logits.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def sample(model, prompt: list[int], max_new: int, gen: torch.Generator):
  """Ancestral sampling at temperature 1, one full forward per step; returns (ids, bf16 logits [T, V] as f32)."""
  ids, logits = list(prompt), []
  for _ in range(max_new):
    with torch.no_grad():
      step = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    logits.append(step.numpy())
    tok = int(torch.multinomial(torch.softmax(step, -1), 1, generator=gen))
    ids.append(tok)
    if tok in EOS:
      break
  return ids[len(prompt):], np.stack(logits)


def teacher_forced(model, prompt, response) -> np.ndarray:
  """Log-probs [T, V] float64 of the model at each response position, one forward over prompt + response."""
  with torch.no_grad():
    out = model(input_ids=torch.tensor([prompt + response])).logits[0].double().numpy()
  return log_softmax64(out[len(prompt) - 1:len(prompt) - 1 + len(response)])


def row(i, prompt, response, logits, ref32, ref64):
  lp = log_softmax64(logits).astype(np.float32)  # what the engine reports: float32 log-probs of its logits
  t = np.arange(len(response))
  top = np.argsort(-lp, axis=-1, kind="stable")[:, :TOPK]
  p_roll = np.exp(log_softmax64(logits))
  kl = (p_roll * (log_softmax64(logits) - ref64)).sum(-1)
  tv = 0.5 * np.abs(p_roll - np.exp(ref64)).sum(-1)
  return {"prompt_token_ids": prompt, "response_token_ids": response,
          "response_logprobs": lp[t, response].tolist(),
          "topk_token_ids": top.tolist(), "topk_logprobs": np.take_along_axis(lp, top, -1).tolist(),
          "reward": float(7 in response), "group_id": i // GROUP, "temperature": 1.0,
          "logits_npy": f"hf_bf16_logits.npy#{i}",
          "meta": {"logprobs_f32": ref32[t, response].tolist(), "logprobs_f64": ref64[t, response].tolist(),
                   "kl_f64": kl.tolist(), "tv_f64": tv.tolist()}}


def main() -> None:
  torch.manual_seed(SEED)
  gen = torch.Generator().manual_seed(SEED)
  rng = np.random.default_rng(SEED)
  bf16, f32, f64 = load(torch.bfloat16), load(torch.float32), load(torch.float64)
  rows, all_logits = [], []
  for p in range(PROMPTS):
    prompt = rng.integers(6, bf16.config.vocab_size, size=int(rng.integers(3, 11))).tolist()
    for g in range(GROUP):
      i = p * GROUP + g
      response, logits = sample(bf16, prompt, MAX_NEW[p % len(MAX_NEW)], gen)
      ref32 = teacher_forced(f32, prompt, response)
      ref64 = teacher_forced(f64, prompt, response)
      rows.append(row(i, prompt, response, logits, ref32, ref64))
      all_logits.append(logits)
  side = np.zeros((len(rows), max(MAX_NEW), bf16.config.vocab_size), np.float16)
  for i, lg in enumerate(all_logits):
    side[i, :len(lg)] = lg
  assert np.array_equal(side[0, :len(all_logits[0])].astype(np.float32), all_logits[0]), "float16 lost bits"
  os.makedirs(OUT, exist_ok=True)
  np.save(os.path.join(OUT, "hf_bf16_logits.npy"), side)
  with open(os.path.join(OUT, "hf_bf16.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  lens = [len(r["response_token_ids"]) for r in rows]
  gap = np.mean([np.abs(np.subtract(r["response_logprobs"], r["meta"]["logprobs_f64"])).mean() for r in rows])
  print(f"{len(rows)} rows, lengths {lens}, mean |logp_bf16 - logp_f64| = {gap:.3e}")


if __name__ == "__main__":
  main()
