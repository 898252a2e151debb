"""Writes the tiny Hugging Face checkpoints + golden logits under tests/fixtures/hf/ (needs torch + transformers).

    python scripts/make_hf_fixtures.py                 # (re)write the fixtures
    python scripts/make_hf_fixtures.py --check-export  # also: trm_jax load -> save_pretrained -> transformers
                                                       # load gives the same logits (the export contract)

Each fixture directory holds what `transformers.save_pretrained` writes (config.json, safetensors, maybe an
index) plus golden.npz: a left-padded batch (tokens, valid, positions) and the float64 transformers logits at a
subset of positions (`pos_idx`), stored as float32. The test suite (tests/test_hf.py) never imports torch: it
compares trm_jax's logits for the same batch against these files.

Weights are redrawn larger than HF's init (std 0.02 would leave the logits almost constant): linear layers
~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm scales ~ 1 + 0.3 N(0, 1), biases ~ 0.5 N(0, 1); the script then
checks that zeroing any single tensor moves the logits, so a loader that drops or misplaces one cannot pass.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import numpy as np
import torch
import transformers

EAGER = dict(attn_implementation="eager", experts_implementation="eager")  # float64-capable kernels
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")
VOCAB = 128
BATCH, LENGTH = 3, 256
PADS = (0, 41, 150)  # left padding per row
EOS = [3, 5]  # generation_config eos may be a list (Qwen3 instruct)

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=512, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=2)

FIXTURES = {
    # Qwen3 dense, separate lm_head, non-default rope_theta.
    "qwen3": ("Qwen3Config", dict(COMMON, intermediate_size=64, num_hidden_layers=2, tie_word_embeddings=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 50000.0}), {}),
    # Qwen3 dense, tied embeddings, eps 1e-6, attention_bias (q/k/v and o biases).
    "qwen3_tied": ("Qwen3Config", dict(COMMON, intermediate_size=64, num_hidden_layers=2, rms_norm_eps=1e-6,
                                       tie_word_embeddings=True, attention_bias=True,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}), {}),
    # Qwen3 dense in bfloat16 on disk (as released checkpoints are), sharded into several files + index.
    "qwen3_sharded": ("Qwen3Config", dict(COMMON, intermediate_size=64, num_hidden_layers=3,
                                          tie_word_embeddings=False,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                      dict(dtype=torch.bfloat16, shards=True)),
    # Qwen3-MoE: MoE on layers (i+1) % 2 == 0 except mlp_only_layers=[5] -> MoE {1, 3}, dense {0, 2, 4, 5}.
    "qwen3_moe": ("Qwen3MoeConfig", dict(COMMON, intermediate_size=48, moe_intermediate_size=16,
                                         num_hidden_layers=6, num_experts=8, num_experts_per_tok=2,
                                         decoder_sparse_step=2, mlp_only_layers=[5], norm_topk_prob=True,
                                         tie_word_embeddings=False,
                                         rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
                  dict(legacy_config=True)),
    # Qwen3-MoE without top-k renormalisation, every layer MoE but layer 0.
    "qwen3_moe_nonorm": ("Qwen3MoeConfig", dict(COMMON, intermediate_size=48, moe_intermediate_size=16,
                                                num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                                decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=False,
                                                tie_word_embeddings=True), {}),
    # Qwen2: q/k/v biases, no q/k norm, tied, sliding window configured but off (as Qwen2.5 ships).
    "qwen2": ("Qwen2Config", dict(COMMON, intermediate_size=64, num_hidden_layers=2, tie_word_embeddings=True,
                                  use_sliding_window=False, sliding_window=4096, max_window_layers=2,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
              dict(legacy_config=True)),
}


def to_legacy_config(path: str) -> None:
  """Rewrites config.json the way transformers 4.x wrote it (and the released Qwen checkpoints ship it):
  `rope_theta` + `rope_scaling: null`, `num_experts`, `torch_dtype`; the loader must read both spellings."""
  with open(path) as f:
    c = json.load(f)
  rope = c.pop("rope_parameters")
  c["rope_theta"], c["rope_scaling"] = rope["rope_theta"], None
  if "num_local_experts" in c:
    c["num_experts"] = c.pop("num_local_experts")
  c["torch_dtype"] = c.pop("dtype")
  with open(path, "w") as f:
    json.dump(c, f, indent=2, sort_keys=True)


def redraw(model: torch.nn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
      elif name.endswith(".bias"):
        p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
      else:  # [out, in] linear weights, fused experts [E, out, in], routers [E, D]
        fan_in = p.shape[-1]
        scale = 3.0 if name.endswith("mlp.gate.weight") or name.endswith("router.weight") else 1.0
        p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64) / fan_in ** 0.5)


def batch(seed: int):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(6, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
  valid = np.ones((BATCH, LENGTH), bool)
  for b, pad in enumerate(PADS):
    valid[b, :pad] = False
    tokens[b, :pad] = 0
  positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
  # Every 4th position plus the last 16 (where long-range attention and RoPE matter most).
  pos_idx = np.unique(np.concatenate([np.arange(0, LENGTH, 4), np.arange(LENGTH - 16, LENGTH)])).astype(np.int32)
  return tokens, valid, positions, pos_idx


def hf_logits(model, tokens, valid, positions) -> np.ndarray:
  """Logits [B, L, V] (0 on padding), one unpadded row at a time.

  The left-padded batch's logits at valid positions must equal each row run alone at positions 0..n-1; running
  rows alone keeps transformers' fully masked padding rows (NaN in float64 eager attention) out of the reference.
  """
  out = np.zeros(tokens.shape + (model.config.vocab_size,))
  for b in range(tokens.shape[0]):
    ids = torch.tensor(tokens[b][valid[b]], dtype=torch.long)[None]
    assert (positions[b][valid[b]] == np.arange(ids.shape[1])).all()
    with torch.no_grad():
      out[b, valid[b]] = model(input_ids=ids).logits[0].double().numpy()
  return out


def check_every_tensor_matters(model, tokens, valid, positions, ref) -> None:
  """Zeroing any one tensor must move the logits (else a loader could silently drop it)."""
  sel = valid[..., None]
  for name, p in model.named_parameters():
    saved = p.detach().clone()
    with torch.no_grad():
      p.zero_()
    moved = np.abs(np.where(sel, hf_logits(model, tokens, valid, positions) - ref, 0)).max()
    with torch.no_grad():
      p.copy_(saved)
    if moved < 1e-2:
      raise SystemExit(f"tensor {name} barely moves the logits ({moved:.2e}); redraw larger")


def make(name: str, seed: int) -> None:
  cls_name, kwargs, opts = FIXTURES[name]
  cfg = getattr(transformers, cls_name)(**kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, **EAGER).double().eval()
  redraw(model, seed)
  tokens, valid, positions, pos_idx = batch(seed)
  # Round the weights to the dtype they are stored in, then take the reference in float64.
  # (Parameters only: casting the module would also round buffers such as RoPE's inv_freq.)
  with torch.no_grad():
    for prm in model.parameters():
      prm.copy_(prm.to(opts.get("dtype", torch.float32)).double())
  ref = hf_logits(model, tokens, valid, positions)
  check_every_tensor_matters(model, tokens, valid, positions, ref)
  out = os.path.join(OUT, name)
  shutil.rmtree(out, ignore_errors=True)
  save_model = model.to(opts.get("dtype", torch.float32))
  if opts.get("shards"):
    total = sum(p.numel() * p.element_size() for p in save_model.parameters())
    save_model.save_pretrained(out, max_shard_size=int(total * 0.6))
  else:
    save_model.save_pretrained(out)
  if opts.get("legacy_config"):
    to_legacy_config(os.path.join(out, "config.json"))
  gen = transformers.GenerationConfig(bos_token_id=1, eos_token_id=EOS, do_sample=True, temperature=0.7, top_p=0.8)
  gen.save_pretrained(out)
  np.savez(os.path.join(out, "golden.npz"), tokens=tokens, valid=valid, positions=positions, pos_idx=pos_idx,
           logits=ref[:, pos_idx].astype(np.float32))
  files = sorted(os.listdir(out))
  if opts.get("shards") and sum(f.endswith(".safetensors") for f in files) < 2:
    raise SystemExit(f"{name}: expected >= 2 safetensors shards, got {files}")
  # The saved files must reload in transformers to the same logits (checks the fixture itself).
  again = transformers.AutoModelForCausalLM.from_pretrained(out, **EAGER, dtype=torch.float64)
  err = np.abs(np.where(valid[..., None], hf_logits(again, tokens, valid, positions) - ref, 0)).max()
  assert err < 1e-9, (name, err)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
  print(f"{name}: {files} {size / 1024:.0f} KiB, logit scale {np.abs(ref).max():.2f}")


def check_export(name: str) -> None:
  """trm_jax load -> save_pretrained -> transformers loads it to the same logits as the fixture's golden."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from trm_jax.models import hf  # noqa: PLC0415 (jax only when asked)
  src = os.path.join(OUT, name)
  g = np.load(os.path.join(src, "golden.npz"))
  model = hf.load_pretrained(src)
  with tempfile.TemporaryDirectory() as out:
    # A small shard threshold exercises the sharded export; the bf16-on-disk fixture is re-exported in bf16
    # (lossless there, so the golden logits still hold).
    dtype = "bfloat16" if FIXTURES[name][2].get("dtype") == torch.bfloat16 else None
    hf.save_pretrained(model, out, max_shard_bytes=40_000, dtype=dtype, copy_from=src)
    again = transformers.AutoModelForCausalLM.from_pretrained(out, **EAGER, dtype=torch.float64)
    logits = hf_logits(again, g["tokens"], g["valid"], g["positions"])[:, g["pos_idx"]]
    files = sorted(os.listdir(out))
    assert again.generation_config.eos_token_id == EOS, again.generation_config
  sel = g["valid"][:, g["pos_idx"]][..., None]
  err = np.abs(np.where(sel, logits - g["logits"], 0)).max() / np.abs(g["logits"]).max()
  print(f"export {name}: {files} max rel err vs golden {err:.2e}")
  if err > 1e-5:
    raise SystemExit(f"export of {name} does not reproduce the logits in transformers ({err:.2e})")


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--check-export", action="store_true")
  p.add_argument("--only", default="", help="comma-separated fixture names")
  p.add_argument("--skip-make", action="store_true")
  args = p.parse_args(argv)
  torch.set_num_threads(1)
  names = [n for n in FIXTURES if not args.only or n in args.only.split(",")]
  if not args.skip_make:
    os.makedirs(OUT, exist_ok=True)
    for i, name in enumerate(names):
      make(name, seed=100 + i)
  if args.check_export:
    for name in names:
      check_export(name)


if __name__ == "__main__":
  main()
