"""Sampler part of the bench: tokens/s of trm_jax's sampler (cached / full) and of HF `generate`.

All three generate exactly B * T new tokens: ours runs a fixed-length scan (eos_id = -1 never fires),
transformers gets min_new_tokens = max_new_tokens = T (EOS suppressed). Same dimensions, random weights,
plain sampling at temperature 1 (no top-k / top-p on either side). Compile / warm-up calls are excluded;
the rows are interleaved per round and the figures are medians.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks.timing import medians, timed
from trm_jax.models import ModelConfig, Transformer
from trm_jax.rollout import sampler

DIM_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")


def random_model(dims: dict, V: int, max_len: int):
  """(graphdef, params) of a Transformer with these dimensions and random weights (seed 0)."""
  mcfg = ModelConfig(vocab_size=V, max_len=max_len, **{k: int(dims[k]) for k in DIM_KEYS})
  with nnx.use_eager_sharding(False):
    return nnx.split(Transformer(mcfg, rngs=nnx.Rngs(0)))


def hf_generator(dims: dict, V: int, max_len: int):
  """A callable (prompt np[B,P], T) -> None running HF generate, or a string saying why not."""
  try:
    import torch
    import transformers
  except Exception as e:  # noqa: BLE001 - any import failure means "skip this row"
    return f"skipped: torch/transformers not importable ({type(e).__name__}: {e}); pip install -e .[bench]"
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=V, hidden_size=dims["d_model"], num_hidden_layers=dims["n_layers"],
      num_attention_heads=dims["n_heads"], num_key_value_heads=dims["n_kv_heads"], head_dim=dims["head_dim"],
      intermediate_size=dims["d_ff"], max_position_embeddings=max_len, rms_norm_eps=1e-6, rope_theta=10000.0,
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  model = transformers.LlamaForCausalLM(cfg).eval()

  def run(prompt: np.ndarray, T: int):
    torch.set_num_threads(run.threads)
    ids = torch.as_tensor(prompt, dtype=torch.long)
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, max_new_tokens=T, min_new_tokens=T, eos_token_id=2,
                           pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + T, out.shape

  run.threads = os.cpu_count() or 1
  run.info = {"torch": torch.__version__, "transformers": transformers.__version__}
  return run


def pick_hf_threads(hf, prompt_np, T_probe: int = 16, log=print) -> dict:
  """Times generate with torch threads = the core count and = 1 and keeps the faster (best case for HF).

  On a loaded machine (another process on the cores) torch's OpenMP workers spin-wait and 2 threads
  can be ~10x slower than 1; taking the faster setting keeps the comparison conservative.
  """
  probe = {}
  for th in sorted({os.cpu_count() or 1, 1}, reverse=True):
    hf.threads = th
    hf(prompt_np, 4)  # warm-up
    probe[th] = min(timed(lambda: hf(prompt_np, T_probe)) for _ in range(2))
  hf.threads = min(probe, key=probe.get)
  log(f"sampler: transformers probe (T={T_probe}) seconds by torch threads {probe}; using {hf.threads}")
  return {"probe_s_by_threads": probe, "threads": hf.threads}


def bench_sampler(dims: dict, V: int, B: int, P: int, Ts, repeats: int, full_repeats: int, log=print,
                  with_hf: bool = True) -> dict:
  max_len = P + max(Ts)
  graphdef, params = random_model(dims, V, max_len)
  r = np.random.default_rng(0)
  prompt_np = r.integers(3, V, size=(B, P)).astype(np.int32)
  prompt, pmask = jnp.asarray(prompt_np), jnp.ones((B, P), bool)
  hf = hf_generator(dims, V, max_len) if with_hf else "skipped: --no-hf"
  hf_note = hf if isinstance(hf, str) else None
  if hf_note:
    log(f"sampler: transformers row {hf_note}")
  else:
    hf.info.update(pick_hf_threads(hf, prompt_np, log=log))

  def ours(kernel, T):
    def go():
      out = sampler.sample(graphdef, params, prompt, pmask, jax.random.key(1), max_new_tokens=T, eos_id=-1,
                           kernel=kernel)
      jax.block_until_ready(out.tokens)
    return go

  rows = []
  for T in Ts:
    fns = {"cached": ours("cached", T), "full": ours("full", T)}
    if not hf_note:
      fns["transformers"] = lambda T=T: hf(prompt_np, T)
    warm = {k: timed(f) for k, f in fns.items() if k != "transformers"}  # compile (HF warmed by the probe)
    times = {k: [] for k in fns}
    for i in range(repeats):
      for k in fns:
        if k == "full" and i >= full_repeats:
          continue
        times[k].append(timed(fns[k]))
    med = medians(times)
    row = {"T": T, "tokens": B * T, "median_s": med, "times_s": times, "warmup_s": warm,
           "tokens_per_s": {k: B * T / v for k, v in med.items()},
           "speedup_vs_recompute": med["full"] / med["cached"]}
    if "transformers" in med:
      row["speedup_vs_transformers"] = med["transformers"] / med["cached"]
    rows.append(row)
    log(f"sampler T={T}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in row["tokens_per_s"].items()))
  out = {"rows": rows, "B": B, "P": P, "V": V, "dims": dims,
         "speedup_vs_recompute": min(r["speedup_vs_recompute"] for r in rows)}
  if hf_note:
    out["transformers"] = hf_note
    out["speedup_vs_transformers"] = None
  else:
    out["transformers"] = hf.info
    out["speedup_vs_transformers"] = min(r["speedup_vs_transformers"] for r in rows)
  return out


def bench_prefill_share(dims: dict, V: int, n_prompts: int = 2, G: int = 16, P: int = 256, T: int = 32,
                        repeats: int = 3, log=print) -> dict:
  """`sampler_prefill_share_speedup`: one prefill per prompt + KV cache broadcast G times vs G prefills.

  The same [n_prompts * G, P] batch (each prompt repeated G times) is sampled with `group_size=G` and with
  `group_size=1`; both sample the same responses (each keyed by its row), so the ratio of their median wall
  times is the saving. The prefill's batch shape differs (n_prompts vs n_prompts * G rows), and XLA:CPU may
  round its matmuls differently, so a row can flip a token where its uniform sits at a CDF step (reported as
  `rows_identical`; a real difference would change every row). Fixed length T (no stop id), temperature 1.
  """
  graphdef, params = random_model(dims, V, P + T)
  r = np.random.default_rng(1)
  prompt = jnp.repeat(jnp.asarray(r.integers(3, V, size=(n_prompts, P)).astype(np.int32)), G, axis=0)
  pmask = jnp.ones(prompt.shape, bool)

  def run(g):
    return sampler.sample(graphdef, params, prompt, pmask, jax.random.key(2), max_new_tokens=T, eos_id=-1,
                          group_size=g)

  shared, separate = run(G), run(1)  # compile
  rows_identical = float(jnp.mean(jnp.all(shared.tokens == separate.tokens, axis=1)))
  if rows_identical < 0.5:
    raise AssertionError(f"prefill sharing changed the sampled tokens of {1 - rows_identical:.0%} of the rows")
  times = {"shared": [], "separate": []}
  for _ in range(repeats):
    times["shared"].append(timed(lambda: jax.block_until_ready(run(G).tokens)))
    times["separate"].append(timed(lambda: jax.block_until_ready(run(1).tokens)))
  med = medians(times)
  out = {"n_prompts": n_prompts, "G": G, "P": P, "T": T, "V": V, "dims": dims, "median_s": med, "times_s": times,
         "rows_identical": rows_identical, "speedup": med["separate"] / med["shared"]}
  log(f"sampler prefill sharing (G={G}, P={P}, T={T}): {med['separate']:.3f}s -> {med['shared']:.3f}s "
      f"= {out['speedup']:.2f}x")
  return out
