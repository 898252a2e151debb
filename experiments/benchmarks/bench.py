"""Performance benchmark of trm_jax: TRM overhead, memory, sampler, learner FLOP/s, scaling.

Run (from the repository root, or anywhere after `pip install -e .`):
  python -m experiments.benchmarks.bench --quick --json bench_quick.json   # < ~5 min on 2 CPU cores
  python -m experiments.benchmarks.bench --json bench_full.json            # the full grid (tens of minutes on CPU)
  python -m experiments.benchmarks.bench --tiny                            # seconds; what tests/test_bench.py runs

Every speed figure is a RATIO measured inside one run with its A and B interleaved round by round
(medians over rounds), so load from other processes on the machine cancels to first order. Absolute
times are printed and written to the JSON for reference only.

  1. TRM overhead     the compiled learner update with TRM vs the same update with trm.criterion = none
                      (PPO clip, same model / batch / shapes): sampled-token estimators (max_avg, k2/k3),
                      exact KL from stored rollout logits (V = 32k), exact KL recomputed under the backend.
  2. Memory           XLA compiled temp bytes (compile only) of learner log-probs + exact divergences,
                      chunked (trm_jax.logprobs) vs naive [B,T,V] logits, B = 1..8, T to 32k, V 32k..152k.
  3. Sampler          tokens/s of sample(kernel="cached") vs kernel="full" vs HF transformers generate.
  4. Learner          tokens/s and FLOP/s of the update as a fraction of the measured f32 jnp.dot peak.
  5. Scaling          same global batch on 1/2/4/8 fake CPU devices (subprocess): losses and step times.
  6. GPU              on a GPU backend the peak is also measured in bf16 and the learner row is labelled.
  7. Peers            one random Qwen3 checkpoint loaded by trm_jax and transformers (benchmarks/peers.py):
                      sampler vs transformers generate, the learner update vs an eager PyTorch TRM update;
                      needs `pip install -e .[bench]` (else "skipped: pip install -e .[bench]").

JSON keys (public contract): trm_overhead_estimator, trm_overhead_exact, trm_overhead_exact_qwen_shape,
memory_naive_over_ours, sampler_speedup_vs_recompute, sampler_speedup_vs_transformers (same weights, part 7, when it runs),
learner_peak_fraction, learner_speedup_vs_torch (+ details); part "compile" (benchmarks/compile_time.py):
compile_s/<learner|sampler>/<scan|unrolled>/L<n> and compile_ratio/<learner|sampler>/<scan|unrolled>;
part "moe" (benchmarks/moe.py, when present): moe_sparse_speedup.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import time

# peers first: before anything imports torch it sets OMP_WAIT_POLICY (see benchmarks/peers.py)
from experiments.benchmarks import peers as bp  # isort: skip
from experiments import common
from experiments.benchmarks import compile_time as bc
from experiments.benchmarks import continuous as bcb
from experiments.benchmarks import hf_load as bhl
from experiments.benchmarks import learner as bl
from experiments.benchmarks import memory as bm
from experiments.benchmarks import sampler as bs
from experiments.benchmarks import skewed as bsk
from experiments.benchmarks.timing import log
import jax
import jax.numpy as jnp
from trm_jax import config as config_lib

# Parts in their own modules, run when the module exists: part -> (module, its headline JSON key). Each module
# has `run(quick: bool) -> dict` holding that key; the whole dict goes to res[part].
OPTIONAL_PARTS = {"moe": ("experiments.benchmarks.moe", "moe_sparse_speedup")}
PRESENT = tuple(k for k, (mod, _) in OPTIONAL_PARTS.items() if importlib.util.find_spec(mod) is not None)

PUBLIC_KEYS = ("trm_overhead_estimator", "trm_overhead_exact", "trm_overhead_exact_qwen_shape",
               "memory_naive_over_ours", "sampler_speedup_vs_recompute", "sampler_speedup_vs_transformers",
               "sampler_prefill_share_speedup", "learner_peak_fraction", "learner_speedup_vs_torch",
               "moe_sparse_speedup", "learner_skewed_speedup", "sampler_continuous_speedup")
PARTS = ("overhead", "memory", "sampler", "throughput", "skewed", "scaling", "peers", "compile",
         "hf_load") + PRESENT

TINY_DIMS = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
# overhead model: the 32k vocabulary the exact-KL target is stated for, small blocks so CPU time is sane
OVERHEAD_DIMS = dict(d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=1024)
SAMPLER_DIMS = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=512)
THROUGHPUT_DIMS = dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=64, d_ff=1536)
SCALING_DIMS = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
# Qwen3-0.6B's width, heads and vocabulary with 2 layers (CPU time): the exact criterion at V = 151936
QWEN_DIMS = dict(d_model=1024, n_layers=2, n_heads=16, n_kv_heads=8, head_dim=128, d_ff=3072)
QWEN_V = 151936

MODES = {
    "tiny": dict(
        overhead=dict(dims=TINY_DIMS, B=4, G=2, P=4, T=16, V=512), overhead_repeats=2,
        overhead_qwen=dict(dims=TINY_DIMS, B=2, G=2, P=4, T=16, V=1024), overhead_qwen_repeats=2,
        memory_grid=[(1, t, v) for t in (256, 512) for v in (1024, 2048)], memory_D=64, memory_ref=(512, 1024),
        sampler=dict(dims=TINY_DIMS, V=512, B=2, P=4, Ts=(8,)), sampler_repeats=1, sampler_full_repeats=1,
        continuous=dict(dims=TINY_DIMS, V=512, N=20, P=4, T=16, slots=4, repeats=1),
        throughput=dict(dims=TINY_DIMS, B=2, G=2, P=4, T=16, V=512), throughput_repeats=1,
        skewed=dict(dims=TINY_DIMS, B=16, G=2, P=4, T=32, V=512), skewed_repeats=1,
        scaling=dict(dims=TINY_DIMS, B=8, G=2, P=4, T=8, V=64), scaling_counts=(1, 2), scaling_repeats=1),
    "quick": dict(
        overhead=dict(dims=OVERHEAD_DIMS, B=2, G=2, P=16, T=256, V=32768), overhead_repeats=7,
        overhead_qwen=dict(dims=QWEN_DIMS, B=2, G=2, P=16, T=512, V=QWEN_V), overhead_qwen_repeats=3,
        memory_grid=[(b, t, v) for b in (1, 8) for t in (1024, 8192, 32768) for v in (32768, 151936)],
        memory_D=2048, memory_ref=(8192, 32768),
        sampler=dict(dims=SAMPLER_DIMS, V=32000, B=4, P=16, Ts=(128, 256)), sampler_repeats=2,
        sampler_full_repeats=1, continuous=dict(dims=SAMPLER_DIMS, V=32000, N=80, P=16, T=256, slots=8, repeats=3),
        throughput=dict(dims=THROUGHPUT_DIMS, B=2, G=2, P=16, T=512, V=32000), throughput_repeats=3,
        skewed=dict(dims=OVERHEAD_DIMS, B=20, G=2, P=16, T=512, V=32000), skewed_repeats=3,
        scaling=dict(dims=SCALING_DIMS, B=8, G=2, P=8, T=64, V=256), scaling_counts=(1, 2, 4, 8),
        scaling_repeats=2),
    "full": dict(
        overhead=dict(dims=OVERHEAD_DIMS, B=8, G=2, P=16, T=512, V=32768), overhead_repeats=7,
        overhead_qwen=dict(dims=QWEN_DIMS, B=4, G=2, P=16, T=512, V=QWEN_V), overhead_qwen_repeats=5,
        memory_grid=[(b, t, v) for b in (1, 2, 4, 8) for t in (1024, 8192, 32768) for v in (32768, 65536, 151936)],
        memory_D=2048, memory_ref=(8192, 32768),
        sampler=dict(dims=SAMPLER_DIMS, V=32000, B=4, P=16, Ts=(128, 256, 512, 1024)), sampler_repeats=3,
        sampler_full_repeats=1, continuous=dict(dims=SAMPLER_DIMS, V=32000, N=160, P=16, T=512, slots=16, repeats=5),
        throughput=dict(dims=THROUGHPUT_DIMS, B=4, G=2, P=16, T=1024, V=32000), throughput_repeats=5,
        skewed=dict(dims=THROUGHPUT_DIMS, B=40, G=2, P=16, T=1024, V=32000), skewed_repeats=5,
        scaling=dict(dims=SCALING_DIMS, B=16, G=2, P=8, T=128, V=256), scaling_counts=(1, 2, 4, 8),
        scaling_repeats=5),
}

TARGETS = {"trm_overhead_estimator": 1.03, "trm_overhead_exact": 1.10, "trm_overhead_exact_qwen_shape": 1.05,
           "memory_naive_over_ours": 10.0,
           "learner_peak_fraction": 0.40, "learner_skewed_speedup": 1.6, "sampler_continuous_speedup": 2.0}


def _git() -> dict:
  root = common.REPO
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=False).stdout
    dirty = subprocess.run(["git", "status", "--short", "trm_jax"], cwd=root, capture_output=True, text=True, check=False).stdout
    return {"commit": head.strip(), "trm_jax_modified": [l[3:] for l in dirty.splitlines()]}
  except OSError:
    return {}


def _cpu_model() -> str:
  """The host CPU's model name and vector extensions: the peer ratios depend on them (XLA:CPU vs oneDNN)."""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return platform.processor() or "unknown"
  name = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "unknown")
  flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
  vec = sorted(f for f in flags if f.startswith(("avx512f", "avx2", "amx")))
  return f"{name} ({' '.join(vec)})" if vec else name


def environment() -> dict:
  dev = jax.devices()[0]
  learner_defaults = config_lib.default_config().learner.to_dict()
  return {"git": _git(), "learner_defaults": learner_defaults, "jax": jax.__version__,
          "backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
          "n_devices": len(jax.devices()), "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "machine": platform.machine(), "cpu_model": _cpu_model(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def run(mode: str = "quick", parts=PARTS, with_hf: bool = True) -> dict:
  """Runs the selected parts in `mode`; returns the result dict (public keys always present)."""
  m = MODES[mode]
  env = environment()
  gpu = env["backend"] == "gpu"
  res = {"mode": mode, "env": env, **{k: None for k in PUBLIC_KEYS}}
  log(f"mode={mode} backend={env['backend']} device={env['device']} jax={env['jax']} cpus={env['cpu_count']} "
      f"cpu={env['cpu_model']}")
  if gpu:
    log("GPU backend: the peak is measured in float32 and bfloat16; the learner row reports both fractions")
  else:
    log("no GPU backend: the bf16-MFU row (part 6) is not measured on this machine")
  t_start = time.perf_counter()

  if "overhead" in parts:
    log("1/5 TRM overhead (compiles 5 learner programs)")
    o = bl.bench_overhead(m["overhead"], m["overhead_repeats"])
    res["overhead"] = o
    res["trm_overhead_estimator"] = o["estimator"]
    res["trm_overhead_exact"] = o["exact_stored"]
    res["trm_overhead_recompute"] = o["exact_recompute"]
    q = m["overhead_qwen"]
    log(f"1/5 TRM overhead at the Qwen3-0.6B-like shape (d={q['dims']['d_model']}, V={q['V']}, T={q['T']})")
    oq = bl.bench_overhead(q, m["overhead_qwen_repeats"], names=("ppo_none", "trm_exact_stored"), no_preupdate=False,
                           share_state=True)
    res["overhead_qwen_shape"] = oq
    res["trm_overhead_exact_qwen_shape"] = oq["exact_stored"]
    log("1/5 profile: one chunk's pieces at both shapes (where the exact criterion's time goes)")
    res["overhead_profile"] = {"overhead": bl.profile_chunk(m["overhead"], m["overhead_repeats"]),
                               "qwen_shape": bl.profile_chunk(q, m["overhead_qwen_repeats"])}

  if "memory" in parts:
    log(f"2/5 memory ({len(m['memory_grid'])} shapes x 4 programs, compile only)")
    mem = bm.bench_memory(m["memory_grid"], m["memory_D"], log=log)
    mem["summary"] = bm.summarise(mem, *m["memory_ref"])
    res["memory"] = mem
    res["memory_naive_over_ours"] = mem["summary"]["naive_over_ours_ref"]

  if "sampler" in parts:
    s = m["sampler"]
    log(f"3/5 sampler (T = {s['Ts']})")
    smp = bs.bench_sampler(s["dims"], s["V"], s["B"], s["P"], s["Ts"], m["sampler_repeats"],
                           m["sampler_full_repeats"], log=log, with_hf=with_hf)
    res["sampler"] = smp
    res["sampler_speedup_vs_recompute"] = smp["speedup_vs_recompute"]
    res["sampler_speedup_vs_transformers"] = smp["speedup_vs_transformers"]
    # One prefill per prompt + KV cache broadcast G = 16 times vs 16 prefills (256-token prompts).
    small = mode == "tiny"
    sp = bs.bench_prefill_share(s["dims"], s["V"], P=16 if small else 256, T=4 if small else 32,
                                repeats=1 if small else 3, log=log)
    res["sampler_prefill_share"] = sp
    res["sampler_prefill_share_speedup"] = sp["speedup"]
    c = m["continuous"]
    log(f"3/5 continuous batching: {c['N']} responses, {c['slots']} slots, T {c['T']}, long-tailed lengths")
    res["sampler_continuous"] = bcb.bench_continuous(log=log, **c)
    res["sampler_continuous_speedup"] = res["sampler_continuous"]["speedup"]

  if "throughput" in parts:
    log("4/5 learner throughput (peak matmul first)")
    peak = bl.matmul_peak(n_list=(256, 512) if mode == "tiny" else (1024, 2048, 4096))
    res["peak_f32"] = peak
    thr = bl.bench_throughput(m["throughput"], m["throughput_repeats"], peak)
    res["throughput"] = thr
    res["learner_peak_fraction"] = thr["peak_fraction"]
    if gpu:  # part 6: the same update against the bf16 matmul peak (the learner computes in f32 today)
      peak16 = bl.matmul_peak(n_list=(2048, 4096, 8192), dtype=jnp.bfloat16)
      res["peak_bf16"] = peak16
      res["learner_mfu_bf16_peak"] = thr["achieved_flops_per_s"] / peak16["flops_per_s"]

  if "skewed" in parts:
    sk = m["skewed"]
    log(f"skewed: packed / padded learner update [B={sk['B']} P={sk['P']} T={sk['T']} V={sk['V']} "
        f"d={sk['dims']['d_model']} L={sk['dims']['n_layers']}]; lengths: {bsk.LENGTHS_DOC}")
    res["skewed"] = bsk.bench_skewed(sk, m["skewed_repeats"])
    res["learner_skewed_speedup"] = res["skewed"]["speedup"]
    log(f"skewed: median length {res['skewed']['median_length']:.0f}, real tokens "
        f"{res['skewed']['real_fraction']:.0%} of B x T, packed rows {res['skewed']['packed_rows']}")

  if "scaling" in parts:
    log(f"5/5 scaling over {m['scaling_counts']} fake CPU devices (subprocess)")
    res["scaling"] = bl.bench_scaling(m["scaling"], m["scaling_counts"], m["scaling_repeats"])

  if "peers" in parts:  # one Qwen3 checkpoint loaded by trm_jax and transformers
    log("peers: trm_jax vs transformers generate / an eager PyTorch update, same weights (benchmarks/peers.py)")
    pr = bp.run(mode, log=log) if with_hf else {k: None for k in bp.PUBLIC}
    res["peers"] = pr if with_hf else {"peers": "skipped: --no-hf"}
    # the same-weights figure replaces part 3's (different random weights); part 3's stays in res["sampler"]
    res["sampler_speedup_vs_transformers"] = pr["sampler_speedup_vs_transformers"]
    res["learner_speedup_vs_torch"] = pr["learner_speedup_vs_torch"]
    res["learner_speedup_vs_torch_estimators"] = pr.get("learner_speedup_vs_torch_estimators")

  if "compile" in parts:  # compile time vs depth, layers scanned vs unrolled
    log(f"compile: learner step and sampler at L = {bc.LAYERS[mode]}, scanned vs unrolled (compile_time.py)")
    comp = bc.run(bc.LAYERS[mode], log=log)
    res["compile"] = comp
    res.update(comp)

  if "hf_load" in parts:  # sharded HF loading, bytes read / memory per process (benchmarks/hf_load.py)
    log("hf_load: one random Qwen3 checkpoint loaded by 4 jax processes (fsdp over processes)")
    hl = bhl.bench_hf_load(dims=bhl.LOAD_DIMS_FULL if mode == "full" else None)
    res["hf_load"] = hl
    res.update({k: v for k, v in hl.items() if k != "hf_load_per_process"})

  for part in PRESENT:  # e.g. moe: sparse vs dense MoE dispatch, same model (benchmarks/moe.py)
    if part in parts:
      module, key = OPTIONAL_PARTS[part]
      log(f"{part}: {module}.run(quick={mode != 'full'})")
      res[part] = importlib.import_module(module).run(quick=mode != "full")
      res[key] = res[part].get(key)

  res["wall_s"] = time.perf_counter() - t_start
  res["table"] = table_rows(res)
  return res


def _fmt(x, spec="{:.3f}"):
  return "n/a" if x is None else spec.format(x)


def table_rows(res: dict) -> list:
  """(figure, value, target, met) rows; met is "yes" / "NO" / "-" (no target) / "n/a" (not measured)."""
  rows = []

  def add(fig, val, target, ok, spec="{:.3f}"):
    met = "n/a" if val is None else ("-" if ok is None else ("yes" if ok else "NO"))
    rows.append((fig, _fmt(val, spec) if not isinstance(val, str) else val, target, met))

  o = res.get("overhead")
  if o:
    sh = o["shape"]
    tag = f"B={sh['B']} T={sh['T']} V={sh['V']} d={sh['dims']['d_model']} L={sh['dims']['n_layers']}"
    add(f"TRM overhead, estimators max_avg k2/k3 (x criterion=none) [{tag}]", o["estimator"], "<= 1.03",
        o["estimator"] <= 1.03)
    add("TRM overhead, exact KL from stored logits (x criterion=none)", o["exact_stored"], "<= 1.10",
        o["exact_stored"] <= 1.10)
    add("TRM overhead, exact KL recompute, bf16 engine (x criterion=none)", o["exact_recompute"], "-", None)
    if "estimator_vs_ppo_no_preupdate" in o:
      add("  TRM estimators x PPO without the pre-update forward", o["estimator_vs_ppo_no_preupdate"], "-", None)
  oq = res.get("overhead_qwen_shape")
  if oq:
    sh = oq["shape"]
    add(f"TRM overhead, exact KL stored, Qwen3-0.6B-like [B={sh['B']} T={sh['T']} V={sh['V']} "
        f"d={sh['dims']['d_model']} L={sh['dims']['n_layers']}]", oq["exact_stored"], "<= 1.05",
        oq["exact_stored"] <= 1.05)
  for name, pr in (res.get("overhead_profile") or {}).items():
    add(f"  chunk fwd profile ({name}): (exact - learner-only) / learner-only; exact new / old",
        f"{pr['exact_extra_over_learner'] / pr['median_s']['learner']:.2f}; {pr['exact_vs_exact_old']:.2f}", "-", None)
  mem = res.get("memory")
  if mem:
    s = mem["summary"]
    add(f"Memory naive/ours temp bytes at T={s['ref']['T']} V={s['ref']['V']} (min over B, fwd & grad)",
        s["naive_over_ours_ref"], ">= 10", s["naive_over_ours_ref"] >= 10, "{:.1f}")
    big = max(mem["rows"], key=lambda r: r["B"] * r["T"] * r["V"])
    add(f"Memory naive/ours at the largest shape B={big['B']} T={big['T']} V={big['V']}",
        big["naive_over_ours"], "-", None, "{:.1f}")
    w = s["worst_vt_growth_in_chunks"]
    add("Memory: growth of ours' V-dependent temp bytes with T, in chunks of logits", w, "<= 1",
        None if w is None else w <= 1.0, "{:.2f}")
  smp = res.get("sampler")
  if smp:
    ts = ",".join(str(r["T"]) for r in smp["rows"])
    add(f"Sampler cached / full-recompute speed (min over T={ts})", smp["speedup_vs_recompute"], "> 1",
        smp["speedup_vs_recompute"] > 1, "{:.2f}")
    hf = smp["speedup_vs_transformers"]
    add("Sampler cached / HF transformers generate (min over T)",
        hf if hf is not None else smp["transformers"][:60], "> 1", None if hf is None else hf > 1, "{:.2f}")
    last = smp["rows"][-1]
    add(f"  sampler tokens/s at T={last['T']} (cached)", last["tokens_per_s"]["cached"], "-", None, "{:,.0f}")
  cb = res.get("sampler_continuous")
  if cb:
    add(f"Sampler continuous / static tokens/s [{cb['N']} responses, {cb['slots']} slots, T={cb['T']}, median "
        f"{cb['median_len']:.0f}, {cb['frac_at_T']:.0%} at T]", cb["speedup"], ">= 2.0", cb["speedup"] >= 2.0, "{:.2f}")
  thr = res.get("throughput")
  if thr:
    sh = thr["shape"]
    add(f"Learner tokens/s [d={sh['dims']['d_model']} L={sh['dims']['n_layers']} B={sh['B']} T={sh['T']} "
        f"V={sh['V']}]", thr["tokens_per_s"], "-", None, "{:,.0f}")
    add(f"Learner FLOP/s / f32 matmul peak ({thr['peak_flops_per_s'] / 1e9:.0f} GFLOP/s), executed FLOPs",
        thr["peak_fraction"], ">= 0.40", thr["peak_fraction"] >= 0.40)
    add("  same, model FLOPs only (6N + attention; MFU convention)", thr["mfu_model_flops"], "-", None)
    if thr.get("peak_fraction_cost_analysis") is not None:
      add("  same, FLOPs from compiled.cost_analysis()", thr["peak_fraction_cost_analysis"], "-", None)
  if "learner_mfu_bf16_peak" in res:
    add("GPU: learner FLOP/s / bf16 matmul peak", res["learner_mfu_bf16_peak"], "-", None)
  elif thr:
    add("GPU: learner FLOP/s / bf16 matmul peak", "not measured (no GPU backend)", "-", None)
  if res.get("hf_load"):
    hl = res["hf_load"]
    add(f"HF load, max bytes read per process / checkpoint ({hl['hf_load_processes']} processes, "
        f"{hl['hf_load_checkpoint_mb']:.0f} MB)", hl["hf_load_bytes_read_frac"], "-", None)
    add("  peak anonymous memory growth per process / checkpoint", hl["hf_load_anon_growth_frac"], "-", None)
  sk = res.get("skewed")
  if sk:
    sh = sk["shape"]
    add(f"Learner skewed lengths: padded / packed update [B={sh['B']} T={sh['T']} V={sh['V']} "
        f"d={sh['dims']['d_model']}; 10% at T, median {sk['median_length']:.0f}]", sk["speedup"], ">= 1.6",
        sk["speedup"] >= 1.6, "{:.2f}")
  sc = res.get("scaling")
  if sc:
    loss = abs(next(iter(sc["loss"].values())))
    add(f"Scaling max |loss_n - loss_1| over n={sc['device_counts']} fake devices", sc["max_abs_loss_diff"],
        "<= 1e-5*|loss|", sc["max_abs_loss_diff"] <= 1e-5 * max(loss, 1.0), "{:.2e}")
    add("  step time n=max / n=1 (fake devices share the same cores)",
        sc["median_step_s"][str(sc["device_counts"][-1])] / sc["median_step_s"][str(sc["device_counts"][0])],
        "-", None, "{:.2f}")
  pr = res.get("peers")
  if pr:
    note = pr.get("peers") if isinstance(pr.get("peers"), str) else None
    tag = lambda sh: f" [B={sh['B']} P={sh['P']} T={sh['T']}]" if sh else ""
    v = pr.get("sampler_speedup_vs_transformers")
    add(f"Peers, same Qwen3 weights: sampler / transformers generate{tag(pr.get('sampler_peer_shape'))}",
        v if v is not None else (note or "greedy check failed")[:60], ">= 3 (moonshot)",
        None if v is None else v >= 3, "{:.2f}")
    v = pr.get("learner_speedup_vs_torch")
    add(f"Peers: learner exact TRM / eager PyTorch TRM update{tag(pr.get('learner_peer_shape'))}",
        v if v is not None else (note or "first-step losses differ")[:60], ">= 1.5",
        None if v is None else v >= 1.5, "{:.2f}")
    if pr.get("learner_speedup_vs_torch_estimators") is not None:
      add("  same, trm_jax with the k2/k3 estimators (like for like)", pr["learner_speedup_vs_torch_estimators"],
          "-", None, "{:.2f}")
  v = res.get("moe_sparse_speedup")
  if v is not None:
    add("MoE dispatch: sparse (top-k experts only) / dense, same model (`moe_sparse_speedup`)", v, ">= 4",
        v >= 4, "{:.2f}")
  return rows


def print_table(res: dict) -> None:
  env = res["env"]
  print()
  print(f"trm_jax bench ({res['mode']})  device: {env['device']} x{env['n_devices']} ({env['backend']}, "
        f"{env['cpu_count']} CPU cores)  jax {env['jax']}  python {env['python']}  wall {res['wall_s']:.0f}s")
  rows = [("figure", "value", "target", "met?")] + list(res["table"])
  w = [max(len(str(r[i])) for r in rows) for i in range(4)]
  line = "+".join("-" * (x + 2) for x in w)
  print(line)
  for i, r in enumerate(rows):
    print(" | ".join(str(c).ljust(w[j]) for j, c in enumerate(r)))
    if i == 0:
      print(line)
  print(line, flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--quick", action="store_true", help="a subset that runs in ~5 minutes on 2 CPU cores")
  g.add_argument("--tiny", action="store_true", help="tiny shapes (seconds); for tests, numbers meaningless")
  p.add_argument("--json", default="", help="write every figure to this path")
  p.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts among {PARTS}")
  p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
  p.add_argument("--_scaling_worker", default="", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a._scaling_worker:
    w = json.loads(a._scaling_worker)
    out = bl.scaling_worker(w["shape"], w["device_counts"], w["repeats"])
    print("SCALING_JSON " + json.dumps(out), flush=True)
    return out
  parts = tuple(x for x in a.only.split(",") if x)
  unknown = set(parts) - set(PARTS)
  if unknown:
    p.error(f"unknown parts {sorted(unknown)}; choose among {PARTS}")
  mode = "tiny" if a.tiny else "quick" if a.quick else "full"
  res = run(mode, parts, with_hf=not a.no_hf)
  print_table(res)
  if a.json:
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1, default=float)
    log(f"wrote {a.json}")
  return res


if __name__ == "__main__":
  main()
