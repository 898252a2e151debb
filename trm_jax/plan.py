"""A TPU plan without a TPU: compile the rollout sampler and the learner update for a TPU topology, ahead of time.

  python -m trm_jax.plan --config=configs/pod_qwen3_8b.py --topology=v5e:16x16
  python -m trm_jax.plan --config=configs/pod_qwen3_8b.py --topology=v5p:4x4x4 --config.mesh.tensor=4

libtpu (`pip install "jax[tpu]"`) compiles for real TPU chips on a CPU-only machine
(`jax.experimental.topologies`). With abstract parameters (nnx.eval_shape: nothing allocated) this
compiles exactly the trainer's programs (the rollout engine's sampler program, `learner.make_learner_step`,
the optimizer's init, all from `build.Run`) on the config's mesh over the topology's chips, and prints per chip: parameter,
optimizer, batch, activation / temp and KV-cache bytes against the chip's HBM, the FLOPs of
one step, the bytes each collective moves per chip (summed from the compiled HLO, loop bodies times their
trip count: trm_jax.hlo_stats), a roofline step time (per program the largest of FLOPs / peak bf16
FLOP/s, decode bytes / HBM bandwidth and collective bytes / ICI bandwidth), any large array left replicated, and a
verdict ("fits" or "does not fit: reduce X"). XLA's cost analysis counts a while loop's body once, and
the layer scan, the chunked log-prob pass and the decode loop are while loops, so the FLOPs used are an
analytic dense-transformer count (XLA's figure is printed next to it).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the TPU topology; never touch local devices

import jax  # noqa: E402
import jax.numpy as jnp
from flax import nnx

from trm_jax import build, hlo_stats
from trm_jax import config as config_lib
from trm_jax import learner as learner_lib
from trm_jax import sharding as sharding_lib
from trm_jax.rollout.batch import RolloutBatch

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int  # per chip
  peak_flops: float  # bf16 dense matmul FLOP/s per chip
  hbm_bw: float  # bytes/s per chip
  chip_config: str  # libtpu's chip_config_name: one JAX device per chip
  ici_bw: float = 0.0  # inter-chip interconnect bytes/s per chip (all links together)


# Public per-chip figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm and the v5e/v5p/v6e pages).
CHIPS = {
    # ICI: 2400 / 1600 / 4800 / 3584 Gbit/s per chip.
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12, "megacore", 300e9),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 0.819e12, "default", 200e9),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.765e12, "default", 600e9),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12, "default", 448e9),
}
USABLE_HBM = 0.95  # XLA and the runtime keep some HBM for themselves
# Compile a program that does not fit anyway, so its memory analysis says by how much.
NO_OOM = {"xla_tpu_no_crash_on_oom": True}


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """"v5e:16x16" -> ("v5e", (16, 16)); v4 / v5p are 3-D tori (AxBxC), v5e / v6e 2-D (AxB)."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", topology.strip())
  if not m:
    raise ValueError(f"--topology must look like v5e:4x4 or v5p:4x4x4 (one of {sorted(CHIPS)}), got {topology!r}")
  gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  want = 3 if gen in ("v4", "v5p") else 2
  if len(dims) != want:
    raise ValueError(f"--topology {topology!r}: {gen} slices are {want}-D ({'AxBxC' if want == 3 else 'AxB'})")
  return gen, dims


def topology_devices(topology: str) -> list:
  """The JAX devices (one per chip) of a TPU slice, for ahead-of-time compilation on any machine."""
  gen, dims = parse_topology(topology)
  # Another process may hold libtpu (e.g. a CPU run without JAX_PLATFORMS=cpu); we only compile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server here: skip its ~10 s of retries
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{gen}:{'x'.join(map(str, dims))}",
        chip_config_name=CHIPS[gen].chip_config,
        chips_per_host_bounds=tuple(min(2, d) for d in dims[:2]) + (1,), num_slices=1)
  except Exception as e:  # no libtpu, or one that does not know this topology
    raise RuntimeError(f"cannot build TPU topology {topology!r} ({type(e).__name__}: {e}); trm_jax.plan needs "
                       f"libtpu: pip install \"jax[tpu]=={jax.__version__}\"") from e
  return list(desc.devices)


# ----------------------------------------------------------------------------- bytes per chip


def chip_bytes(x) -> int:
  """Bytes of one device's shard of an array (ShapeDtypeStruct with a sharding)."""
  shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
  return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def full_bytes(x) -> int:
  return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _tree_chip_bytes(tree) -> int:
  return sum(chip_bytes(x) for x in jax.tree.leaves(tree))


def replicated_arrays(named: dict, n_devices: int, threshold: int) -> list[tuple[str, tuple, str, int, int]]:
  """Arrays whose per-chip shard is >= threshold bytes and not fully divided over the mesh.

  Returns (name, shape, spec, chip bytes, replication factor = devices holding each element).
  """
  out = []
  for name, tree in named.items():
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      per_chip = chip_bytes(x)
      factor = round(n_devices * per_chip / max(full_bytes(x), 1))
      if per_chip >= threshold and factor > 1:
        out.append((f"{name}{jax.tree_util.keystr(path)}", tuple(x.shape), str(x.sharding.spec), per_chip, factor))
  return sorted(out, key=lambda r: -r[3])


# ----------------------------------------------------------------------------- the plan


def _sds(x, sharding):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _compile(lowered):
  """(compiled, None), or (None, the compiler's message) when even one buffer exceeds the chip's HBM."""
  try:
    return lowered.compile(NO_OOM), None
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None, str(e).split("::")[0].strip() + " :: " + "".join(str(e).split("::")[1:2]).strip()


def _memory(compiled) -> dict:
  if compiled is None:
    return {"argument": 0, "output": 0, "alias": 0, "temp": 0, "peak": 0}
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def _cost(compiled) -> dict:
  if compiled is None:
    return {"flops": 0.0, "bytes": 0.0}
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else (c or {})
  return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0))}


def plan(config, topology: str, *, replicated_threshold: int = 64 * 2**20) -> dict:
  """Compiles the trainer's sampler and learner update for `topology`; returns the per-chip report dict."""
  config_lib.validate(config)
  gen, _ = parse_topology(topology)
  chip = CHIPS[gen]
  devices = topology_devices(topology)
  setup = build.Run(config, devices=devices)
  mesh, n = setup.mesh, len(devices)
  B, P, T = setup.batch_size, setup.task.prompt_len, setup.task.response_len
  params, opt_state, opt_shardings, state = _abstract_state(setup)
  sampler, sampler_error, batch = _compile_sampler(setup, params)
  stale = setup.backend.staleness_k > 0
  step = learner_lib.make_learner_step(config, setup.model_def, setup.tx, setup.backend, mesh, setup.param_shardings,
                                       opt_shardings, stale=stale, reward_range=setup.task.reward_range)
  learner, learner_error = _compile(step.lower(state, batch, *((params,) if stale else ())))
  kv_chip, sampler_cost, learner_flops = _analytic_costs(setup, params)
  report = {
      "topology": topology, "chip": chip.name, "chips": n, "mesh": dict(mesh.shape), "batch": [B, P, T],
      "params": sum(math.prod(x.shape) for x in jax.tree.leaves(params)), "hbm_per_chip": chip.hbm_bytes,
      "bytes_per_chip": {"params": _tree_chip_bytes(params), "optimizer": _tree_chip_bytes(opt_state),
                         "batch": _tree_chip_bytes(batch), "kv_cache": int(kv_chip),
                         "stale_snapshots": _tree_chip_bytes(params) * (1 if stale else 0)},
      "learner": {"memory": _memory(learner), "cost": _cost(learner), "error": learner_error,
                  "largest": hlo_stats.largest_buffers(learner.as_text()) if learner is not None else []},
      "sampler": {"memory": _memory(sampler), "cost_xla_loop_body_once": _cost(sampler), "cost": sampler_cost,
                  "error": sampler_error,
                  "largest": hlo_stats.largest_buffers(sampler.as_text()) if sampler is not None else []},
  }
  b = report["bytes_per_chip"]
  # The run holds the optimizer state (and stale snapshots) while it samples.
  report["sampler"]["memory"]["resident"] = b["optimizer"] + b["stale_snapshots"] + (b["params"] if stale else 0)
  report["peak_per_chip"] = max(report["learner"]["memory"]["peak"],
                                report["sampler"]["memory"]["peak"] + report["sampler"]["memory"]["resident"])
  report["learner"]["flops_analytic"] = learner_flops
  for name, compiled, terms in (("learner", learner, {"compute": learner_flops / chip.peak_flops}),
                                ("sampler", sampler, {"compute": sampler_cost["flops"] / chip.peak_flops,
                                                      "hbm": sampler_cost["bytes"] / chip.hbm_bw})):
    coll = hlo_stats.collective_bytes(compiled.as_text()) if compiled is not None else {}
    terms["ici"] = sum(coll.values()) / chip.ici_bw if chip.ici_bw else 0.0
    report[name]["collective_bytes"] = coll
    report[name]["roofline_terms_s"] = terms
    report[name]["roofline_s"] = max(terms.values())  # the terms overlap at best: the largest bounds the step
    report[name]["bound"] = max(terms, key=terms.get)
    report[name]["serial_s"] = sum(terms.values())  # no overlap at all: the worst case
  report["step_s"] = report["learner"]["roofline_s"] + report["sampler"]["roofline_s"]
  report["step_serial_s"] = report["learner"]["serial_s"] + report["sampler"]["serial_s"]
  report["replicated"] = replicated_arrays({"params": params, "opt_state": opt_state, "batch": batch}, n,
                                           replicated_threshold)
  report["verdict"] = verdict(report, config)
  return report


def _abstract_state(setup):
  """Abstract (ShapeDtypeStruct) params, optimizer state and TrainState, laid out as the trainer's init."""
  mesh = setup.mesh
  params = jax.tree.map(lambda v, s: v.replace(value=_sds(v.get_value(), s)), setup.abstract_params,
                        setup.param_shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  opt_shardings = sharding_lib.opt_shardings(setup.tx.init, params, mesh)  # as the trainer's init_sharded
  opt_state = jax.tree.map(_sds, jax.eval_shape(setup.tx.init, params), opt_shardings)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding_lib.replicated(mesh))
  return params, opt_state, opt_shardings, learner_lib.TrainState(params=params, opt_state=opt_state, step=step)


def _compile_sampler(setup, params):
  """Compiles one rollout.microbatches slice of the sampler; returns it, its error and the learner's batch.

  The batch is what the learner receives: the sampler's output layout (batch-sharded where it cannot be read).
  """
  mesh, engine = setup.mesh, build.rollout_engine(setup)
  B, P = setup.batch_size, setup.task.prompt_len
  rep = sharding_lib.replicated(mesh)
  prompt = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=sharding_lib.batch_sharding(mesh, 2))
  rows = jax.ShapeDtypeStruct((engine.slice_rows, P), jnp.int32, sharding=sharding_lib.batch_sharding(mesh, 2))
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
  sampler, sampler_error = _compile(engine.program.lower(params, rows, rows, rng))
  out = jax.eval_shape(engine.generate, params, prompt, prompt, rng)
  out = jax.tree.map(_sds, out, sampler.output_shardings if sampler is not None else
                     jax.tree.map(lambda x: sharding_lib.batch_sharding(mesh, x.ndim) if x.ndim else rep, out))
  rewards = jax.ShapeDtypeStruct((B,), jnp.float32, sharding=sharding_lib.batch_sharding(mesh, 1))
  batch = RolloutBatch(prompt=prompt, prompt_mask=prompt, response=out.tokens, response_mask=out.mask,
                       rollout_logp=out.logp, rewards=rewards, rollout_logits=out.logits,
                       rollout_topk_logp=out.topk_logp, rollout_topk_ids=out.topk_ids,
                       group_size=setup.config.rl.group_size)
  return sampler, sampler_error, batch


def _analytic_costs(setup, params):
  """(KV-cache bytes per chip, sampler {flops, bytes}, learner FLOPs) per chip, dense analytic counts.

  XLA's cost analysis counts a while loop's body once, and both the layer scan and the decode loop are
  while loops, so FLOPs are counted by hand. Matmul params exclude the embedding gather (unless tied).
  """
  mesh, mc, cfg = setup.mesh, setup.model_cfg, setup.config
  B, P, T = setup.batch_size, setup.task.prompt_len, setup.task.response_len
  act = jnp.dtype(setup.backend.numerics.act)
  kv_full = 2 * mc.n_layers * B * (P + T) * mc.n_kv_heads * mc.head_dim * act.itemsize
  kv_div = sharding_lib.batch_divisor(mesh) * (mesh.shape["tensor"] if mc.n_kv_heads % mesh.shape["tensor"] == 0
                                               else 1)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  matmul = n_params - (0 if mc.tie_embeddings else mc.vocab_size * mc.d_model)
  attn = lambda ctx: 4 * mc.n_layers * mc.n_heads * mc.head_dim * ctx  # QK^T and PV per token
  tp, rows = mesh.shape["tensor"], B / sharding_lib.batch_divisor(mesh)
  kv_chip = kv_full / kv_div
  # Sampler: prefill P tokens per row, then T decode steps; each decode step reads the (gathered) weights
  # of this chip's tensor shard and on average a (P + T/2)-filled KV cache.
  sampler_cost = {"flops": rows * (P * (2 * matmul + attn(P / 2)) + T * (2 * matmul + attn(P + T / 2))) / tp,
                  "bytes": T * (matmul * act.itemsize / tp + kv_chip * (P + T / 2) / (P + T))}
  # Learner: forward + backward (3 forwards) over B x (P + T) tokens, +1 forward recomputed under remat,
  # +1 forward of the rollout numerics when trm.source = recompute.
  passes = 3 + (cfg.learner.remat != "none") + (cfg.trm.source == "recompute")
  learner_flops = passes * rows * (P + T) * (2 * matmul + attn((P + T) / 2)) / tp
  return kv_chip, sampler_cost, learner_flops


def verdict(report: dict, cfg) -> str:
  """'fits (x% of HBM)' or 'does not fit: reduce ...' naming the largest consumers and the knobs."""
  hbm = report["hbm_per_chip"] * USABLE_HBM
  peak = report["peak_per_chip"]
  errors = [f"{k}: {report[k]['error']}" for k in ("sampler", "learner") if report.get(k, {}).get("error")]
  if errors:
    return ("does not fit: a single buffer exceeds the chip's HBM, so XLA cannot even place it; reduce it "
            "(the shape names it) -- " + "; ".join(errors))
  if peak <= hbm:
    return f"fits: peak {peak / GiB:.2f} GiB per chip = {100 * peak / report['hbm_per_chip']:.0f}% of HBM"
  b, lm = report["bytes_per_chip"], report["learner"]["memory"]
  parts = {
      "parameters + optimizer state (more chips in mesh.fsdp, or mesh.tensor for heads / mlp / vocab)":
          b["params"] + b["optimizer"] + b["stale_snapshots"],
      "learner activations / temp (learner.microbatches > 1: the same step in slices; learner.chunk_size, "
      "learner.remat, a shorter data.horizon)": lm["temp"],
      "KV cache (fewer rl.prompts_per_step * rl.group_size per chip, a shorter data.horizon, or "
      "rollout.backend.precision=bfloat16)": b["kv_cache"],
  }
  top = sorted(parts.items(), key=lambda kv: -kv[1])
  need = ", ".join(f"{k}: {v / GiB:.1f} GiB" for k, v in top)
  return (f"does not fit: peak {peak / GiB:.1f} GiB per chip > {hbm / GiB:.1f} GiB usable; reduce {top[0][0]} "
          f"[{need}]")


def format_report(r: dict) -> str:
  g = lambda x: f"{x / GiB:8.2f} GiB" if x >= GiB / 10 else f"{x / 2**20:8.2f} MiB"
  b, lm, sm = r["bytes_per_chip"], r["learner"]["memory"], r["sampler"]["memory"]
  lines = [
      f"trm_jax.plan: {r['topology']} = {r['chips']} x {r['chip']} ({r['hbm_per_chip'] / GiB:.0f} GiB HBM each), "
      f"mesh {r['mesh']}, model {r['params'] / 1e9:.2f}B params, batch B={r['batch'][0]} P={r['batch'][1]} "
      f"T={r['batch'][2]}",
      "per chip                         bytes",
      f"  parameters                 {g(b['params'])}",
      f"  optimizer state            {g(b['optimizer'])}",
      f"  rollout batch (learner in) {g(b['batch'])}",
      f"  stale rollout snapshots    {g(b['stale_snapshots'])}",
      f"  learner temp (activations) {g(lm['temp'])}",
      f"  learner peak               {g(lm['peak'])}   (args {lm['argument'] / GiB:.2f} + out {lm['output'] / GiB:.2f}"
      f" - donated {lm['alias'] / GiB:.2f} + temp {lm['temp'] / GiB:.2f})",
      f"  KV cache (in sampler temp) {g(b['kv_cache'])}",
      f"  sampler temp               {g(sm['temp'])}",
      f"  sampler peak + resident    {g(sm['peak'] + sm['resident'])}",
      f"  PEAK                       {g(r['peak_per_chip'])}   of {r['hbm_per_chip'] / GiB:.0f} GiB HBM",
      f"learner: {r['learner']['flops_analytic'] / 1e12:.1f} TFLOP per chip (analytic; XLA cost analysis, "
      f"loop bodies once: {r['learner']['cost']['flops'] / 1e12:.2f} TFLOP) -> roofline {r['learner']['roofline_s']:.2f} s",
      f"sampler: {r['sampler']['cost']['flops'] / 1e12:.1f} TFLOP, {r['sampler']['cost']['bytes'] / GiB:.1f} GiB "
      f"read per chip (analytic prefill + decode) -> roofline {r['sampler']['roofline_s']:.2f} s",
      *[f"{n}: collectives per chip (loops x trip count) " + ", ".join(
          f"{k} {v / GiB:.2f} GiB" for k, v in r[n]["collective_bytes"].items() if v) +
        f" -> ICI {r[n]['roofline_terms_s']['ici']:.2f} s; bound: {r[n]['bound']}" for n in ("learner", "sampler")],
      f"RL step estimate (sampler + learner, each its largest of compute / HBM / ICI): {r['step_s']:.2f} s "
      f"({r['step_serial_s']:.2f} s with no overlap)",
  ]
  for name in ("learner", "sampler"):
    if r[name]["largest"]:
      lines.append(f"largest {name} buffers per chip: " + ", ".join(f"{s} {g(n).strip()}" for n, s in r[name]["largest"]))
  if r["replicated"]:
    lines.append("replicated large arrays (name, shape, spec, per chip, copies):")
    lines += [f"  {n} {s} {sp} {g(bb)} x{f}" for n, s, sp, bb, f in r["replicated"]]
  else:
    lines.append("replicated large arrays: none")
  lines.append("verdict: " + r["verdict"])
  return "\n".join(lines)


def main(argv):
  del argv
  import json

  from absl import flags

  report = plan(_CONFIG.value, flags.FLAGS.topology,
                replicated_threshold=int(flags.FLAGS.replicated_threshold_mib * 2**20))
  print(format_report(report))
  if flags.FLAGS.json:
    with open(flags.FLAGS.json, "w") as f:
      json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py:arg), as for trm_jax.main.",
                                            lock_config=True)
  flags.DEFINE_string("topology", "v5e:4x4", "TPU slice: v4|v5e|v5p|v6e:AxB[xC]")
  flags.DEFINE_float("replicated_threshold_mib", 64.0, "list replicated arrays at least this large per chip")
  flags.DEFINE_string("json", "", "also write the report as JSON here")
  flags.mark_flag_as_required("config")
  app.run(main)
