"""Peers on the same weights: trm_jax vs transformers / PyTorch on one random Qwen3 checkpoint.

    python -m experiments.benchmarks.peers [--tiny] [--json F]      # both rows; needs `pip install -e .[bench]`

One random-weight Qwen3-shaped checkpoint is WRITTEN BY transformers (Qwen3ForCausalLM(config).save_pretrained,
float32 safetensors, seed 0, transformers' own init) into a temp dir and loaded by trm_jax
(`trm_jax.models.hf.load_pretrained`) and by transformers (`AutoModelForCausalLM.from_pretrained`, float32,
default sdpa attention). A forward on the same tokens checks the logits agree first.

  sampler  trm_jax `rollout.sampler.sample` (KV cache, while loop, the trainer's sampler) vs transformers
           `generate`: same batch, prompt and response lengths (exactly T new tokens on both sides: eos never
           fires), float32. First greedy (trm_jax top_k=1, which is argmax: `sampling.processed_logprobs` keeps
           the single largest logit; transformers do_sample=False) must give the same tokens (a divergence
           counts as a float32 near-tie only if, teacher-forcing transformers' tokens, trm_jax's logit of
           transformers' token is within 1e-4 * max|logit| of its maximum); then tokens/s sampling at
           temperature 1 (no top-k / top-p) -> `sampler_speedup_vs_transformers` = t_transformers / t_trm_jax.
  learner  one trm_jax update built exactly as the trainer builds it (learner.make_learner_step from a config:
           exact TRM-Max&Avg from stored rollout logits + PPO clip + AdamW, fused single forward, remat "full")
           vs `peers_torch.TorchTRMUpdate` (eager PyTorch written as TRL / verl do: see that module) on the
           same batch, weights and advantages. Their first-step losses, grad norms and sequence masks are
           checked equal, then tokens/s -> `learner_speedup_vs_torch` = t_torch / t_trm_jax. Like-for-like
           variant: trm_jax with the sampled k2-max / k3-mean estimators (what the torch side computes)
           -> `learner_speedup_vs_torch_estimators`.

Threads: XLA's CPU client runs one intra-op pool of len(os.sched_getaffinity(0)) threads; torch gets the same
count (torch.set_num_threads). OMP_WAIT_POLICY defaults to PASSIVE here (set before torch is imported) so
torch's OpenMP workers sleep instead of spinning when the shared cores are busy (otherwise 2 threads can be
>10x slower than 1 on a loaded machine); the JSON also has torch at 1 thread (`*_torch_1thread`).
Every timing: A and B interleaved round by round (order rotated); a speedup is the median over rounds of the
per-round ratio t_peer / t_trm_jax (load drift cancels); tokens/s are from the median times (reference only).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see the docstring

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.benchmarks import learner as bl  # noqa: E402
from experiments.benchmarks.timing import interleave, medians, paired_ratio, timed  # noqa: E402
from trm_jax import learner as learner_lib  # noqa: E402
from trm_jax import sharding as sharding_lib  # noqa: E402
from trm_jax.models import hf  # noqa: E402
from trm_jax.rollout import sampler  # noqa: E402
from trm_jax.rollout.backends import backend_from_config  # noqa: E402
from trm_jax.rollout.batch import RolloutBatch  # noqa: E402

SKIP = "skipped: pip install -e .[bench]"
PUBLIC = ("sampler_speedup_vs_transformers", "learner_speedup_vs_torch")
# A Qwen3-shaped model small enough for 2 CPU cores; Qwen3's vocabulary would be 151936 (5x the unembedding).
PEER_DIMS = dict(vocab_size=32768, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=768)
TINY_DIMS = dict(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
MODES = {
    "tiny": dict(dims=TINY_DIMS, sampler=dict(B=2, P=4, T=8), learner=dict(B=4, G=4, P=4, T=64), repeats=1),
    "quick": dict(dims=PEER_DIMS, sampler=dict(B=8, P=64, T=64), learner=dict(B=8, G=4, P=32, T=128), repeats=7),  # 7 rounds: torch's eager step varies ~20% round to round
    "full": dict(dims=PEER_DIMS, sampler=dict(B=8, P=128, T=256), learner=dict(B=8, G=4, P=64, T=512), repeats=5),
}
# TRM thresholds (trm_jax defaults for delta_avg; delta as the co-released k2 recipe) and the batch's mismatch.
DELTA, DELTA_AVG = 0.05, 0.001
NOISE_KEEP, NOISE_REJECT, SPIKE = 0.01, 1.0, 0.23


def torch_missing() -> str | None:
  """None if torch and transformers import, else the SKIP line with the reason."""
  try:
    import torch  # noqa: F401, PLC0415
    import transformers  # noqa: F401, PLC0415
  except Exception as e:  # noqa: BLE001 - any import failure means "skip these rows"
    return f"{SKIP} ({type(e).__name__}: {e})"
  return None


def xla_threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_checkpoint(out_dir: str, dims: dict, max_len: int, seed: int = 0) -> str:
  """A random Qwen3ForCausalLM written by transformers (float32 safetensors + config.json)."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  torch.manual_seed(seed)
  cfg = transformers.Qwen3Config(
      vocab_size=dims["vocab_size"], hidden_size=dims["d_model"], intermediate_size=dims["d_ff"],
      num_hidden_layers=dims["n_layers"], num_attention_heads=dims["n_heads"], num_key_value_heads=dims["n_kv_heads"],
      head_dim=dims["head_dim"], max_position_embeddings=max_len, rope_theta=1e6, rms_norm_eps=1e-6,
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  transformers.Qwen3ForCausalLM(cfg).save_pretrained(out_dir)
  return out_dir


def load_both(path: str, max_len: int):
  """(trm_jax Transformer, transformers model) from the same directory, both float32."""
  from experiments.benchmarks import peers_torch  # noqa: PLC0415 - imports torch
  return hf.load_pretrained(path, dtype="float32", max_len=max_len), peers_torch.load_model(path)


def logits_parity(jmodel, tmodel, tokens) -> float:
  """max |logit_trm_jax - logit_transformers| / max |logit| on one full forward of `tokens` [B,S]."""
  import torch  # noqa: PLC0415
  valid = jnp.ones(tokens.shape, bool)
  ours = np.asarray(jmodel(jnp.asarray(tokens), jnp.cumsum(valid, axis=1) - 1, valid))
  with torch.inference_mode():
    theirs = tmodel(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


# ----------------------------------------------------------------------------- sampler vs generate


def bench_sampler(jmodel, tmodel, V: int, B: int, P: int, T: int, repeats: int, threads: int, log) -> dict:
  from experiments.benchmarks import peers_torch as pt  # noqa: PLC0415 - imports torch
  graphdef, params = nnx.split(jmodel)
  prompt_np = np.random.default_rng(0).integers(3, V, size=(B, P)).astype(np.int32)
  prompt, pmask = jnp.asarray(prompt_np), jnp.ones((B, P), bool)
  pt.set_threads(threads)
  ours_g = np.asarray(sampler.sample(graphdef, params, prompt, pmask, jax.random.key(0), max_new_tokens=T,
                                     eos_id=-1, top_k=1).tokens)
  theirs_g = pt.generate(tmodel, prompt_np, T, greedy=True)
  same = ours_g == theirs_g
  first = [int(np.argmin(r)) if not r.all() else T for r in same]
  gaps = []
  if not same.all():  # teacher-force transformers' tokens through trm_jax: a near-tie, or a real mismatch?
    full = jnp.asarray(np.concatenate([prompt_np, theirs_g], axis=1))
    valid = jnp.ones(full.shape, bool)
    logits = np.asarray(jmodel(full, jnp.cumsum(valid, axis=1) - 1, valid))
    tol = 1e-4 * float(np.abs(logits).max())
    gaps = [float(logits[b, P - 1 + t].max() - logits[b, P - 1 + t, theirs_g[b, t]])
            for b, t in enumerate(first) if t < T]
  greedy_ok = all(g <= tol for g in gaps) if gaps else True
  log(f"peers sampler: greedy tokens equal {same.mean():.4f} (first divergence per row {first}"
      f"{'; logit gaps ' + str(gaps) if gaps else ''}) -> {'OK' if greedy_ok else 'MISMATCH'}")

  def ours():
    out = sampler.sample(graphdef, params, prompt, pmask, jax.random.key(1), max_new_tokens=T, eos_id=-1)
    jax.block_until_ready(out.tokens)

  def theirs(n):
    def go():
      pt.set_threads(n)
      pt.generate(tmodel, prompt_np, T, greedy=False)
    return go

  fns = {"trm_jax": ours, "transformers": theirs(threads)}
  if threads != 1:
    fns["transformers_1thread"] = theirs(1)
  compile_s = timed(ours)  # compile + one run; transformers is warm from the greedy call
  times = interleave(fns, repeats, "peers sampler", log)
  med = medians(times)
  pt.set_threads(threads)
  tps = {k: B * T / v for k, v in med.items()}
  res = {"sampler_speedup_vs_transformers": paired_ratio(times, "transformers", "trm_jax") if greedy_ok else None,
         "sampler_greedy_equal_frac": float(same.mean()), "sampler_greedy_ok": greedy_ok,
         "sampler_greedy_first_divergence": first, "sampler_greedy_divergence_logit_gaps": gaps,
         "sampler_peer_tokens_per_s": tps, "sampler_peer_times_s": times,
         "sampler_peer_shape": dict(B=B, P=P, T=T), "sampler_peer_trm_jax_compile_s": compile_s}
  if "transformers_1thread" in med:
    res["sampler_speedup_vs_transformers_torch_1thread"] = paired_ratio(times, "transformers_1thread", "trm_jax")
  log("peers sampler: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in tps.items())
      + f" -> speedup {res['sampler_speedup_vs_transformers']}")
  return res


# ----------------------------------------------------------------------------- learner vs eager PyTorch


def make_peer_batch(tmodel, V: int, B: int, G: int, P: int, T: int, seed: int = 0) -> dict:
  """A rollout batch on the checkpoint's own distribution (numpy).

  rollout logits = the model's response logits (transformers forward) + Gaussian noise per row: NOISE_KEEP
  on most rows (exact KL and k3 ~ 1e-4: accepted by both criteria) plus a +SPIKE logit on the sampled token
  at T/64 positions per row (ratio ~0.79: PPO clips there for negative advantages; k2 0.026 < delta, k3 0.025
  adds ~4e-4 to the row's mean, < delta_avg), NOISE_REJECT on one row per
  group (KL ~ 0.5: rejected by both). So exact TRM and the k2/k3 estimators keep the same rows and the losses
  are comparable. rollout_logp = log_softmax(rollout logits)[token] (float64, then float32).
  """
  import torch  # noqa: PLC0415
  r = np.random.default_rng(seed)
  prompt = r.integers(3, V, size=(B, P)).astype(np.int32)
  lengths = np.maximum(T - r.integers(0, max(T // 8, 1), size=B), 2)
  lengths[0] = T
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  response = (r.integers(3, V, size=(B, T)) * mask).astype(np.int32)
  ids = torch.as_tensor(np.concatenate([prompt, response], 1), dtype=torch.long)
  attn = torch.as_tensor(np.concatenate([np.ones((B, P)), mask], 1), dtype=torch.long)
  with torch.inference_mode():
    logits = tmodel(input_ids=ids, attention_mask=attn, logits_to_keep=T + 1).logits[:, :-1].double().numpy()
  scale = np.full((B,), NOISE_KEEP)
  scale[1::G] = NOISE_REJECT
  roll = logits + scale[:, None, None] * r.standard_normal(logits.shape)
  for b in range(B):
    for t in r.choice(int(lengths[b]), size=max(1, T // 64), replace=False):
      roll[b, t, response[b, t]] += SPIKE
  lse = np.log(np.exp(roll - roll.max(-1, keepdims=True)).sum(-1)) + roll.max(-1)
  rollout_logp = (np.take_along_axis(roll, response[..., None], -1)[..., 0] - lse) * mask
  return dict(prompt=prompt, prompt_mask=np.ones((B, P), np.float32), response=response, response_mask=mask,
              rollout_logp=rollout_logp.astype(np.float32), rollout_logits=roll.astype(np.float32),
              rewards=r.uniform(size=B).astype(np.float32), group_size=G)


TRM_VARIANTS = {  # name -> config overrides (plus the learner config of learner.learner_config)
    "exact": {"trm.criterion": "max_avg", "trm.source": "stored", "trm.divergence": "exact",
              "trm.divergence_avg": "exact", "trm.delta": DELTA, "trm.delta_avg": DELTA_AVG},
    "estimators": {"trm.criterion": "max_avg", "trm.source": "sampled", "trm.divergence": "k2",
                   "trm.divergence_avg": "k3", "trm.delta": DELTA, "trm.delta_avg": DELTA_AVG},
}


def trm_jax_step(jmodel, dims: dict, batch: dict, variant: str, B: int, G: int, P: int, T: int,
                 overrides: dict | None = None):
  """A learner.Stepper running the trainer's jitted learner step on the loaded weights."""
  cfg = bl.learner_config(dims, B=B, G=G, P=P, T=T, overrides={**TRM_VARIANTS[variant], **(overrides or {})})
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  model_def, params = learner_lib.split_model(jmodel)
  psh = sharding_lib.state_shardings(params, mesh)
  params = jax.device_put(jax.tree.map(jnp.array, params), psh)  # a copy: the step donates its state
  tx = learner_lib.make_optimizer(cfg.optim, 10)
  opt_state = sharding_lib.init_sharded(tx.init, params, mesh)
  state = learner_lib.TrainState(params=params, opt_state=opt_state,
                                 step=jax.device_put(jnp.zeros((), jnp.int32), sharding_lib.replicated(mesh)))
  step = learner_lib.make_learner_step(cfg, model_def, tx, backend_from_config(cfg.rollout.backend), mesh, psh,
                                       jax.tree.map(lambda x: x.sharding, opt_state), stale=False)
  rb = RolloutBatch(**{k: jnp.asarray(v) for k, v in batch.items() if k != "group_size"
                       and (k != "rollout_logits" or variant == "exact")}, group_size=G)
  return bl.Stepper(step, state, sharding_lib.shard_batch(rb, mesh))


def bench_learner(jmodel, tmodel, dims: dict, B: int, G: int, P: int, T: int, repeats: int, threads: int,
                  log) -> dict:
  from experiments.benchmarks import peers_torch as pt  # noqa: PLC0415 - imports torch
  pt.set_threads(threads)
  batch = make_peer_batch(tmodel, dims["vocab_size"], B, G, P, T)
  torch_step = pt.TorchTRMUpdate(tmodel, batch, G=G, delta=DELTA, delta_avg=DELTA_AVG)
  first = {"torch": torch_step()}  # the first step: the losses compared (same initial weights)
  steppers, compile_s = {}, {}
  for v in TRM_VARIANTS:
    st = trm_jax_step(jmodel, dims, batch, v, B, G, P, T)
    compile_s[v] = timed(st)  # compile + the first step
    first[v] = {k: float(x) for k, x in jax.device_get(st.metrics).items()}
    st()  # a retrace on the donated state's sharding would happen here, not in the timed rounds
    steppers[v] = st
  ref = first["torch"]
  log(f"peers learner first step: torch loss {ref['loss']:.8f} grad_norm {ref['grad_norm']:.6f} accept "
      f"{ref['accept_rate']:.3f} clip_frac {ref['clip_frac']:.4f}; " + "; ".join(
          f"trm_jax {v} loss {first[v]['loss']:.8f} grad_norm {first[v]['grad_norm']:.6f} accept "
          f"{first[v]['trm/accept_rate']:.3f} clip_frac {first[v]['clip_frac']:.4f}" for v in TRM_VARIANTS))
  # float32 on both sides, different reduction orders: agree to 1e-5 relative (observed ~1e-7).
  # relative to the scale of the summed terms (sum |pg_t w_t| / B): GRPO advantages cancel within a group.
  rel = {v: abs(first[v]["loss"] - ref["loss"]) / ref["loss_scale"] for v in TRM_VARIANTS}
  grad_rel = {v: abs(first[v]["grad_norm"] - ref["grad_norm"]) / max(ref["grad_norm"], 1e-12)
              for v in TRM_VARIANTS}
  same_mask = {v: abs(first[v]["trm/accept_rate"] - ref["accept_rate"]) < 1e-6 for v in TRM_VARIANTS}
  loss_ok = {v: rel[v] <= 1e-5 and grad_rel[v] <= 1e-4 and same_mask[v] and 0 < ref["accept_rate"] < 1
             for v in TRM_VARIANTS}
  fns = {"trm_jax_exact": steppers["exact"], "trm_jax_estimators": steppers["estimators"], "torch": torch_step}
  if threads != 1:
    def torch_1thread():
      pt.set_threads(1)
      torch_step()
      pt.set_threads(threads)
    fns["torch_1thread"] = torch_1thread
  times = interleave(fns, repeats, "peers learner", log)
  med = medians(times)
  tokens = B * (P + T)
  res = {"learner_speedup_vs_torch": paired_ratio(times, "torch", "trm_jax_exact") if loss_ok["exact"] else None,
         "learner_speedup_vs_torch_estimators": (paired_ratio(times, "torch", "trm_jax_estimators")
                                                 if loss_ok["estimators"] else None),
         "learner_peer_first_step": {k: {m: x for m, x in d.items() if m in ("loss", "grad_norm", "accept_rate",
                                                                            "trm/accept_rate", "entropy", "clip_frac")}
                                     for k, d in first.items()},
         "learner_peer_loss_rel_diff": rel, "learner_peer_grad_norm_rel_diff": grad_rel,
         "learner_peer_losses_equal": loss_ok, "learner_peer_torch_seq_mask": np.asarray(ref["seq_mask"]).tolist(),
         "learner_peer_tokens_per_s": {k: tokens / v for k, v in med.items()}, "learner_peer_times_s": times,
         "learner_peer_shape": dict(B=B, G=G, P=P, T=T), "learner_peer_trm_jax_compile_s": compile_s}
  if "torch_1thread" in med:
    res["learner_speedup_vs_torch_1thread"] = paired_ratio(times, "torch_1thread", "trm_jax_exact")
  log("peers learner: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in res["learner_peer_tokens_per_s"].items())
      + f" -> speedup exact {res['learner_speedup_vs_torch']}, estimators "
      f"{res['learner_speedup_vs_torch_estimators']}")
  return res


def run(mode: str = "quick", log=print) -> dict:
  """Both peer rows in `mode` (tiny | quick | full); the PUBLIC keys are None with a note if torch is absent."""
  missing = torch_missing()
  if missing:
    log(f"peers: {missing}")
    return {**{k: None for k in PUBLIC}, "peers": missing}
  m = MODES[mode]
  dims, s, lr = m["dims"], m["sampler"], m["learner"]
  max_len = max(s["P"] + s["T"], lr["P"] + lr["T"])
  threads = xla_threads()
  with tempfile.TemporaryDirectory() as d:
    write_checkpoint(d, dims, max_len)
    jmodel, tmodel = load_both(d, max_len)
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  parity = logits_parity(jmodel, tmodel, np.random.default_rng(3).integers(3, dims["vocab_size"], size=(2, 32)))
  log(f"peers: checkpoint {dims}; logits max rel diff trm_jax vs transformers {parity:.2e}; threads {threads} "
      f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})")
  info = {"dims": dims, "logits_rel_diff": parity, "threads": threads, "torch": torch.__version__,
          "transformers": transformers.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
          "loadavg_start": os.getloadavg()}
  res = bench_sampler(jmodel, tmodel, dims["vocab_size"], s["B"], s["P"], s["T"], m["repeats"], threads, log)
  res.update(bench_learner(jmodel, tmodel, dims, lr["B"], lr["G"], lr["P"], lr["T"], m["repeats"], threads, log))
  info["loadavg_end"] = os.getloadavg()
  res["peers"] = info
  return res


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--tiny", action="store_true")
  g.add_argument("--full", action="store_true")
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  res = run("tiny" if a.tiny else "full" if a.full else "quick")
  print(json.dumps({k: res.get(k) for k in PUBLIC + ("learner_speedup_vs_torch_estimators",)}, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1, default=float)
  return res


if __name__ == "__main__":
  main()
