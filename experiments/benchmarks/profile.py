"""Where the time of a compiled step goes: per-HLO-op times from a profiler trace, dot FLOP/s per op.

    python -m experiments.benchmarks.profile                  # learner update at the throughput shape
    python -m experiments.benchmarks.profile --part sampler   # one sampler call at the peers' sampler shape
    python -m experiments.benchmarks.profile --shape peers --exact   # the peers' learner row, exact TRM
    python -m experiments.benchmarks.profile --ab [--shape peers --exact]   # layers.dense_last: both forms timed
    python -m experiments.benchmarks.profile --json prof.json

How: the step is compiled once and run under `jax.profiler.trace(..., create_perfetto_trace=True)`; every
trace event whose name is an instruction of the compiled (optimized) HLO module is one execution of that op
(XLA:CPU's thunk runtime emits one event per executed op, loop bodies once per iteration). Containers
(while, conditional, call) are left out, their bodies' ops counted instead. Durations are summed over
threads, so shares are of busy op time; "ms / call" is that sum over the number of calls.

FLOPs of a dot: 2 x (result elements) x (contracted elements), read from the HLO text; a fusion's FLOPs are
those of the dots inside it; executions per call from the loops' `known_trip_count`
(`trm_jax.hlo_stats.computation_runs`). GF/s of an op = its FLOPs per call / its time per call. The
classes: dot (any op with a dot inside), copy / transpose, reduce, scatter / gather, dynamic slice /
update, elementwise (the rest).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile

import jax

from trm_jax import hlo_stats

CONTAINERS = ("while", "conditional", "call")
_SHAPE = re.compile(r"^(?:\(|)([a-z0-9]+)\[([\d,]*)\]")
_OPERANDS = re.compile(r"%([\w.\-]+)")


def _dims(type_text: str) -> list[int]:
  m = _SHAPE.match(type_text.strip())
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def parse_module(hlo_text: str) -> dict:
  """name -> {op, type, computation, calls, flops (own dots), op_name} for every instruction."""
  insts, current = {}, None
  for line in hlo_text.splitlines():
    m = hlo_stats.COMPUTATION.match(line)
    if m:
      current = m.group(1)
      continue
    m = hlo_stats.INSTRUCTION.match(line)
    if not m or current is None:
      continue
    name, result, op, _ = m.groups()
    calls = [c for _, listed, single in hlo_stats.CALLEE.findall(line)
             for c in re.findall(r"%?([\w.\-]+)", listed or single)]
    meta = re.search(r'op_name="([^"]*)"', line)
    insts[name] = dict(op=op, type=result, computation=current, calls=calls, line=line,
                       op_name=meta.group(1) if meta else "")
  for name, d in insts.items():
    d["flops"] = 0.0
    if d["op"] == "dot":
      args = _OPERANDS.findall(d["line"].split(" dot(", 1)[1].split(")", 1)[0])
      lhs = insts.get(args[0]) if args else None
      cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", d["line"])
      if lhs and cd:
        ldims = _dims(lhs["type"])
        contracted = math.prod(ldims[int(i)] for i in cd.group(1).split(",") if i)
        d["flops"] = 2.0 * math.prod(_dims(d["type"])) * contracted
  return insts


def _inner(insts: dict, comps: dict, name: str, seen=None) -> list[dict]:
  """Instructions inside the computations an op calls (recursively), for fusions."""
  seen = set() if seen is None else seen
  out = []
  for c in insts[name]["calls"]:
    if c in seen:
      continue
    seen.add(c)
    for n in comps.get(c, ()):
      out.append(insts[n])
      out.extend(_inner(insts, comps, n, seen))
  return out


def classify(insts: dict) -> dict:
  """name -> (class, flops per execution) of every op that can appear in a trace."""
  comps = collections.defaultdict(list)
  for n, d in insts.items():
    comps[d["computation"]].append(n)
  out = {}
  for n, d in insts.items():
    inner = [d] + (_inner(insts, comps, n) if d["op"] == "fusion" else [])
    ops = {i["op"] for i in inner}
    flops = sum(i["flops"] for i in inner)
    if flops or "convolution" in ops:
      kind = "dot"
    elif ops & {"scatter", "gather"}:
      kind = "scatter / gather"
    elif ops & {"reduce", "reduce-window"}:
      kind = "reduce"
    elif d["op"] in ("copy", "transpose") or (d["op"] == "fusion" and ops & {"copy", "transpose"}
                                              and not ops & {"add", "multiply", "exponential", "divide"}):
      kind = "copy / transpose"
    elif ops & {"dynamic-slice", "dynamic-update-slice"}:
      kind = "dynamic slice / update"
    else:
      kind = "elementwise"
    out[n] = (kind, flops)
  return out


def trace_op_times(fn, calls: int, trace_dir: str | None = None) -> dict:
  """Summed trace duration (seconds, over threads) of every named event while fn() runs `calls` times."""
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="trm_profile_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
      fn()
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  times = collections.Counter()
  for e in events:
    if e.get("ph") == "X":
      times[e["name"]] += e.get("dur", 0.0) * 1e-6
  return dict(times)


def summarize(hlo_text: str, times: dict, calls: int, top: int = 12) -> dict:
  """Per-class and per-op time per call, shares of busy op time, dot FLOP/s (see the module docstring)."""
  insts = parse_module(hlo_text)
  kinds = classify(insts)
  runs = hlo_stats.computation_runs(hlo_text)
  rows = []
  for name, t in times.items():
    if name not in insts or insts[name]["op"] in CONTAINERS:
      continue
    kind, flops = kinds[name]
    flops *= runs.get(insts[name]["computation"], 1)
    rows.append(dict(op=name, kind=kind, ms=1e3 * t / calls, gflops=flops / 1e9, shape=insts[name]["type"][:60],
                     source=insts[name]["op_name"].split("/")[-3:]))
  busy = sum(r["ms"] for r in rows) or 1.0
  by_kind = collections.defaultdict(lambda: dict(ms=0.0, gflops=0.0))
  for r in rows:
    r["share"] = r["ms"] / busy
    r["gflop_per_s"] = r["gflops"] / (r["ms"] / 1e3) if r["gflops"] and r["ms"] else None
    by_kind[r["kind"]]["ms"] += r["ms"]
    by_kind[r["kind"]]["gflops"] += r["gflops"]
  for v in by_kind.values():
    v["share"] = v["ms"] / busy
  dot = by_kind.get("dot", {"ms": 0.0, "gflops": 0.0})
  rows.sort(key=lambda r: -r["ms"])
  return {"busy_ms_per_call": busy, "by_kind": dict(by_kind),
          "dot_gflop_per_s": dot["gflops"] / (dot["ms"] / 1e3) if dot["ms"] else None,
          "dot_gflops_per_call": dot["gflops"], "top_ops": rows[:top]}


def _dot_numbers(line: str) -> tuple:
  get = lambda k: tuple(int(i) for i in (re.search(k + r"=\{([\d,]*)\}", line) or [None, ""])[1].split(",") if i)
  return ((get("lhs_contracting_dims"), get("rhs_contracting_dims")), (get("lhs_batch_dims"), get("rhs_batch_dims")))


def dot_replay(hlo_text: str, repeats: int = 3) -> dict:
  """Every dot of the module re-run alone (same shapes and dimension numbers, row-major operands, one jit
  each): its best time, x its executions per call. The sum is what the step's dots would take if each ran
  alone at its standalone speed; against the step's wall time it splits the gap to the matmul peak into
  the dots' own shapes and everything else (other ops, ops sharing the cores)."""
  import time  # noqa: PLC0415

  import jax.numpy as jnp  # noqa: PLC0415
  insts, runs = parse_module(hlo_text), hlo_stats.computation_runs(hlo_text)
  seen, out = {}, []
  for d in insts.values():
    if d["op"] != "dot" or not d["flops"]:
      continue
    args = _OPERANDS.findall(d["line"].split(" dot(", 1)[1].split(")", 1)[0])
    shapes = tuple(tuple(_dims(insts[a]["type"])) for a in args[:2])
    key = (shapes, _dot_numbers(d["line"]))
    if key not in seen:
      lhs, rhs = (jnp.ones(s, jnp.float32) for s in shapes)
      f = jax.jit(lambda a, b, dn=key[1]: jax.lax.dot_general(a, b, dn))
      f(lhs, rhs).block_until_ready()
      best = math.inf
      for _ in range(repeats):
        t = time.perf_counter()
        f(lhs, rhs).block_until_ready()
        best = min(best, time.perf_counter() - t)
      seen[key] = best
    n = runs.get(d["computation"], 1)
    out.append(dict(shapes=shapes, numbers=key[1], runs=n, gflops=n * d["flops"] / 1e9, alone_s=n * seen[key]))
  return {"alone_s": sum(r["alone_s"] for r in out), "gflops": sum(r["gflops"] for r in out), "dots": out}


def print_summary(s: dict, title: str, peak_gflops: float | None = None) -> None:
  print(f"{title}: busy op time {s['busy_ms_per_call']:.1f} ms per call (summed over threads)")
  for k, v in sorted(s["by_kind"].items(), key=lambda kv: -kv[1]["ms"]):
    rate = f", {v['gflops'] / (v['ms'] / 1e3):.0f} GF/s" if v["gflops"] and v["ms"] else ""
    print(f"  {k:24s} {v['ms']:8.1f} ms  {100 * v['share']:5.1f}%{rate}")
  if "wall_s_per_call" in s:
    wall, alone, gf = s["wall_s_per_call"], s["dots_alone_s"], s["dot_gflops_replayed"]
    print(f"  wall {1e3 * wall:.1f} ms per call; its dots: {gf:.1f} GFLOP, {1e3 * alone:.1f} ms when each runs alone"
          f" ({gf / alone:.0f} GF/s) = {alone / wall:.2f} of the wall time")
    if peak_gflops:
      print(f"  dot FLOP/s over the {peak_gflops:.0f} GF/s matmul peak: {gf / wall / peak_gflops:.3f} = "
            f"{gf / alone / peak_gflops:.3f} (the dots' shapes, alone) x {alone / wall:.3f} (their share of the wall)")
  for r in s["top_ops"]:
    rate = f"{r['gflop_per_s']:6.0f} GF/s" if r["gflop_per_s"] else " " * 11
    print(f"  {r['ms']:8.1f} ms {100 * r['share']:5.1f}% {rate}  {r['kind']:18s} {r['op']:28s} {r['shape']:40s} "
          f"{'/'.join(r['source'])}")


def _profiled(hlo_text: str, fn, calls: int) -> dict:
  """summarize() of a traced run, plus the untraced wall time per call and the dots replayed alone."""
  import time  # noqa: PLC0415
  walls = []
  for _ in range(3):
    t = time.perf_counter()
    fn()
    walls.append(time.perf_counter() - t)
  s = summarize(hlo_text, trace_op_times(fn, calls), calls)
  s["wall_s_per_call"] = sorted(walls)[1]
  rep = dot_replay(hlo_text)
  s["dots_alone_s"], s["dot_gflops_replayed"] = rep["alone_s"], rep["gflops"]
  return s


EXACT = {"trm.criterion": "max_avg", "trm.source": "stored", "trm.divergence": "exact", "trm.divergence_avg": "exact"}
ESTIMATORS = {"trm.criterion": "max_avg", "trm.source": "sampled", "trm.divergence": "k2", "trm.divergence_avg": "k3"}


def profile_learner(shape: dict, exact: bool = False, calls: int = 2) -> dict:
  """One learner update (k2 / k3 estimators, or exact TRM-Max&Avg from stored logits) at `shape`, profiled."""
  from experiments.benchmarks import learner as bl  # noqa: PLC0415
  from trm_jax import sharding as sharding_lib  # noqa: PLC0415
  dims, B, G, P, T, V = (shape[k] for k in ("dims", "B", "G", "P", "T", "V"))
  cfg = bl.learner_config(dims, B=B, G=G, P=P, T=T, overrides={**(EXACT if exact else ESTIMATORS),
                                                               **shape.get("overrides", {})})
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  state, step, *_ = bl.build_step(cfg, V, mesh)
  batch = sharding_lib.shard_batch(bl.make_batch(B, G, P, T, V, logits=exact), mesh)
  compiled = step.lower(state, batch).compile()
  st = bl.Stepper(compiled, state, batch)
  st()
  st()
  return _profiled(compiled.as_text(), st, calls)


def profile_sampler(B: int = 8, P: int = 64, T: int = 64, calls: int = 2, dims: dict | None = None) -> dict:
  """One static-batch sampler call at the peers' sampler shape (random weights), profiled."""
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from experiments.benchmarks import peers  # noqa: PLC0415
  from trm_jax.models import ModelConfig, Transformer  # noqa: PLC0415
  from trm_jax.rollout import sampler  # noqa: PLC0415
  dims = dims or peers.PEER_DIMS
  model = Transformer(ModelConfig(max_len=P + T, **dims), rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.key(1), (B, P), 3, dims["vocab_size"])
  mask = jnp.ones((B, P), jnp.float32)
  fn = jax.jit(lambda m, p, pm, k: sampler.sample(m, p, pm, k, max_new_tokens=T, temperature=1.0, eos_id=-1))
  args = (model, prompt, mask, jax.random.key(2))
  compiled = fn.lower(*args).compile()
  run = lambda: jax.block_until_ready(compiled(*args))  # noqa: E731
  run()
  return _profiled(compiled.as_text(), run, calls)


def ab_weight_grad(shape: dict, exact: bool = False, rounds: int = 7) -> dict:
  """One learner update with `layers.dense_last`'s weight gradient in both forms (autodiff einsum vs
  transposed input), same batch, interleaved rounds: {median_s, speedup (autodiff / transposed), loss_equal}."""
  from experiments.benchmarks import learner as bl  # noqa: PLC0415
  from experiments.benchmarks.timing import interleave, medians, paired_ratio  # noqa: PLC0415
  from trm_jax import sharding as sharding_lib  # noqa: PLC0415
  from trm_jax.models import layers  # noqa: PLC0415
  dims, B, G, P, T, V = (shape[k] for k in ("dims", "B", "G", "P", "T", "V"))
  cfg = bl.learner_config(dims, B=B, G=G, P=P, T=T, overrides={**(EXACT if exact else ESTIMATORS),
                                                               **shape.get("overrides", {})})
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  fns, losses, saved = {}, {}, layers.WEIGHT_GRAD
  try:
    for form in ("autodiff", "transposed"):
      layers.WEIGHT_GRAD = form  # read when tracing: each form is its own compiled step
      state, step, *_ = bl.build_step(cfg, V, mesh)
      batch = sharding_lib.shard_batch(bl.make_batch(B, G, P, T, V, logits=exact), mesh)
      st = bl.Stepper(step.lower(state, batch).compile(), state, batch)
      st()
      losses[form] = float(st.metrics["loss"])
      st()
      fns[form] = st
  finally:
    layers.WEIGHT_GRAD = saved
  times = interleave(fns, rounds, "weight-gradient A/B")
  return {"median_s": medians(times), "speedup": paired_ratio(times, "autodiff", "transposed"),
          "losses": losses}


def shapes() -> dict:
  """The profiled shapes: bench part `throughput` (--quick) and the peers' learner / sampler rows (quick)."""
  from experiments.benchmarks import bench, peers  # noqa: PLC0415
  pd = peers.PEER_DIMS
  pl, ps = peers.MODES["quick"]["learner"], peers.MODES["quick"]["sampler"]
  return {"throughput": bench.MODES["quick"]["throughput"],
          "peers": dict(dims={k: pd[k] for k in pd if k != "vocab_size"}, V=pd["vocab_size"], **pl),
          "sampler": ps}


def main(argv=None) -> dict:
  from experiments.benchmarks import learner as bl  # noqa: PLC0415
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--part", choices=("learner", "sampler"), default="learner")
  p.add_argument("--shape", choices=("throughput", "peers"), default="throughput", help="learner shape")
  p.add_argument("--exact", action="store_true", help="learner: exact TRM from stored logits (else k2 / k3)")
  p.add_argument("--ab", action="store_true", help="learner: time dense_last's two weight-gradient forms instead")
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  if a.ab:
    res = ab_weight_grad(shapes()[a.shape], exact=a.exact)
    print(json.dumps(res, indent=1))
    return res
  peak = bl.matmul_peak()["flops_per_s"] / 1e9
  sh = shapes()
  if a.part == "learner":
    s = profile_learner(sh[a.shape], exact=a.exact)
    title = f"learner ({a.shape} shape, {'exact' if a.exact else 'k2 / k3 estimators'})"
  else:
    s = profile_sampler(**sh["sampler"])
    title = "sampler (peers' shape)"
  s["peak_gflop_per_s"] = peak
  print_summary(s, title, peak)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(s, f, indent=1, default=str)
  return s


if __name__ == "__main__":
  main()
