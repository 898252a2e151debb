"""Learner parts of the bench: TRM overhead, learner throughput (FLOP/s vs peak), scaling over devices.

Every speed figure is a ratio of interleaved runs (experiments/benchmarks/timing.py).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import common
from experiments.benchmarks.timing import interleave, log, medians, paired_ratio, timed
from trm_jax import config as config_lib
from trm_jax import learner as learner_lib
from trm_jax import logprobs as lp
from trm_jax import sharding as sharding_lib
from trm_jax.models import Transformer, model_config_from
from trm_jax.rollout.backends import backend_from_config
from trm_jax.rollout.batch import RolloutBatch

DIM_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")


def learner_config(dims: dict, *, B: int, G: int, P: int, T: int, overrides: dict | None = None):
  """The default config with a custom model shape, the batch shape and `overrides` (dotted keys)."""
  o = {"model.size": "custom", "model.max_len": P + T, "rl.prompts_per_step": B // G, "rl.group_size": G,
       # the recompute row needs a rollout engine that differs from the learner (else XLA may CSE the
       # second forward away): a bf16 engine, the usual case. No effect on the other sources.
       "rollout.backend.precision": "bfloat16"}
  o.update({f"model.{k}": int(dims[k]) for k in DIM_KEYS})
  o.update(overrides or {})
  return config_lib.validate(config_lib.with_overrides(config_lib.default_config(), o))


def make_batch(B, G, P, T, V, *, logits: bool = False, seed: int = 0) -> RolloutBatch:
  """A random rollout batch: full-length responses (every position counts), random rewards."""
  r = np.random.default_rng(seed)
  lengths = np.maximum(T - r.integers(0, max(T // 8, 1), size=B), 1)  # a few shorter rows
  response_mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  batch = RolloutBatch(
      prompt=jnp.asarray(r.integers(3, V, size=(B, P)), jnp.int32), prompt_mask=jnp.ones((B, P), jnp.float32),
      response=jnp.asarray(r.integers(3, V, size=(B, T)) * response_mask, jnp.int32),
      response_mask=jnp.asarray(response_mask),
      rollout_logp=jnp.asarray(-r.uniform(0.5, 4.0, size=(B, T)) * response_mask, jnp.float32),
      rewards=jnp.asarray(r.uniform(size=B), jnp.float32), group_size=G)
  if logits:
    batch = batch.replace(rollout_logits=jnp.asarray(r.standard_normal((B, T, V), np.float32)))
  return batch


def build_step(cfg, V: int, mesh):
  """(state, step) exactly as the trainer builds them (tests/test_learner.py), on `mesh`."""
  with nnx.use_eager_sharding(False):
    model_def, params = learner_lib.split_model(Transformer(model_config_from(cfg.model, V), rngs=nnx.Rngs(0)))
  psh = sharding_lib.state_shardings(params, mesh)
  params = jax.device_put(params, psh)
  tx = learner_lib.make_optimizer(cfg.optim, 10)
  opt_state = sharding_lib.init_sharded(tx.init, params, mesh)
  # The step counter is placed replicated on the mesh, as make_learner_step's out_shardings put it: a
  # plain jnp.zeros (uncommitted, no sharding) makes the SECOND call retrace and recompile (the
  # output's sharding differs from the first input's), doubling compile time.
  step0 = jax.device_put(jnp.zeros((), jnp.int32), sharding_lib.replicated(mesh))
  state = learner_lib.TrainState(params=params, opt_state=opt_state, step=step0)
  step = learner_lib.make_learner_step(cfg, model_def, tx, backend_from_config(cfg.rollout.backend), mesh, psh,
                                       jax.tree.map(lambda x: x.sharding, opt_state), stale=False)
  return state, step, model_def, tx


def ppo_only_step(cfg, model_def, tx):
  """Plain PPO with NO pre-update forward (ratio against the rollout log-probs, every row kept).

  Not a config of trm_jax: the learner always runs the pre-update pass (its log-probs feed the
  metrics even with trm.criterion = none). This is the cheapest PPO update the codebase's pieces
  allow, to show what that pass costs. Uses learner internals; returns None if they moved.
  """
  try:
    adv_fn, mb_update = learner_lib._advantages, learner_lib._make_minibatch_update
  except AttributeError:
    return None

  def fn(state, batch):
    mask = batch.response_mask.astype(jnp.float32)
    rollout_logp = batch.rollout_logp.astype(jnp.float32)
    adv = adv_fn(cfg, batch.rewards.astype(jnp.float32), batch.group_size, (mask.sum(-1) > 0).astype(jnp.float32))
    n_mb, b = cfg.rl.minibatches, batch.response.shape[0]
    data = dict(prompt=batch.prompt, prompt_mask=batch.prompt_mask, response=batch.response, response_mask=mask,
                rollout_logp=rollout_logp, behaviour=rollout_logp, adv=adv, weights=mask)
    data = jax.tree.map(lambda x: x.reshape(n_mb, b // n_mb, *x.shape[1:]), data)
    (params, opt_state), aux = jax.lax.scan(mb_update(cfg, model_def, tx), (state.params, state.opt_state), data)
    return learner_lib.TrainState(params=params, opt_state=opt_state, step=state.step + 1), {
        "loss": aux["loss"].mean()}

  return jax.jit(fn, donate_argnums=(0,))


class Stepper:
  """Calls step(state, batch) and blocks; the donated state is threaded through.

  `holder`: a dict shared by several Steppers whose programs take the same TrainState (same model and
  optimizer), so one set of parameters / optimizer moments serves all of them (memory at V = 152k)."""

  def __init__(self, step, state, batch, holder=None):
    self.step, self.batch, self.metrics = step, batch, None
    self.holder = {"state": state} if holder is None else holder

  @property
  def state(self):
    return self.holder["state"]

  def __call__(self):
    self.holder["state"], self.metrics = self.step(self.holder["state"], self.batch)
    jax.block_until_ready((self.holder["state"], self.metrics))


# ----------------------------------------------------------------------------------------------------
# 1. TRM overhead
# ----------------------------------------------------------------------------------------------------

OVERHEAD_CONFIGS = {
    # name: (overrides, batch carries rollout logits)
    "ppo_none": ({"trm.criterion": "none", "trm.source": "sampled"}, False),
    "trm_est": ({"trm.criterion": "max_avg", "trm.source": "sampled", "trm.divergence": "k2",
                 "trm.divergence_avg": "k3", "trm.delta": 0.004, "trm.delta_avg": 0.001}, False),
    "trm_exact_stored": ({"trm.criterion": "max_avg", "trm.source": "stored", "trm.divergence": "exact",
                          "trm.divergence_avg": "exact"}, True),
    "trm_exact_recompute": ({"trm.criterion": "max_avg", "trm.source": "recompute", "trm.divergence": "exact",
                             "trm.divergence_avg": "exact"}, False),
}


def bench_overhead(shape: dict, repeats: int, names=tuple(OVERHEAD_CONFIGS), no_preupdate: bool = True,
                   share_state: bool = False) -> dict:
  """Interleaved step times of the OVERHEAD_CONFIGS in `names` (ppo_none first: every ratio is against it).

  share_state: every config steps the same parameters / optimizer state (one copy in memory)."""
  dims, B, G, P, T, V = shape["dims"], shape["B"], shape["G"], shape["P"], shape["T"], shape["V"]
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  steppers, compile_s, holder = {}, {}, None
  for name in names:
    over, logits = OVERHEAD_CONFIGS[name]
    cfg = learner_config(dims, B=B, G=G, P=P, T=T, overrides=over)
    state, step, model_def, tx = build_step(cfg, V, mesh)
    batch = sharding_lib.shard_batch(make_batch(B, G, P, T, V, logits=logits), mesh)
    if share_state and holder is not None:
      state = None  # this config steps the first config's state
    steppers[name] = Stepper(step, state, batch, holder=holder)
    if share_state:
      holder = steppers[name].holder
    compile_s[name] = timed(steppers[name])  # compile + first step
    log(f"overhead: compiled {name} ({compile_s[name]:.1f}s)")
    if name == "ppo_none" and no_preupdate:
      fn = ppo_only_step(cfg, model_def, tx)
      if fn is not None:
        state2, *_ = build_step(cfg, V, mesh)
        steppers["ppo_no_preupdate"] = Stepper(fn, state2, batch)
        compile_s["ppo_no_preupdate"] = timed(steppers["ppo_no_preupdate"])
  for st in steppers.values():  # a second call: any retrace on the output state's sharding happens here
    st()
  times = interleave(steppers, repeats, "overhead")
  med = medians(times)
  ratio = lambda a: paired_ratio(times, a, "ppo_none") if a in times else None
  out = {"shape": {k: v for k, v in shape.items()}, "median_step_s": med, "compile_s": compile_s, "times_s": times,
         "estimator": ratio("trm_est"), "exact_stored": ratio("trm_exact_stored"),
         "exact_recompute": ratio("trm_exact_recompute"), "repeats": repeats, "fused": is_fused(cfg)}
  if "ppo_no_preupdate" in times:
    out["estimator_vs_ppo_no_preupdate"] = paired_ratio(times, "trm_est", "ppo_no_preupdate")
    out["ppo_none_vs_ppo_no_preupdate"] = paired_ratio(times, "ppo_none", "ppo_no_preupdate")
  return out


def _two_logsoftmax_reference(a, b, tok):
  """The earlier chunk computation (kept here only as the profile's baseline): log_softmax of both
  sides, then exp of both, KL / reverse KL / TV / entropy as separate sums (4-5 exp passes)."""
  la, lb = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(b, -1)
  p, q = jnp.exp(la), jnp.exp(lb)
  g = lambda x: jnp.take_along_axis(x, tok[..., None], -1)[..., 0]
  return {"learner_logp": g(lb), "rollout_logp_recomputed": g(la), "entropy": -jnp.sum(jnp.exp(lb) * lb, -1),
          "kl": jnp.sum(p * (la - lb), -1), "kl_reverse": jnp.sum(q * (lb - la), -1),
          "tv": 0.5 * jnp.sum(jnp.abs(p - q), -1)}


def profile_chunk(shape: dict, repeats: int = 5, chunk: int = 128) -> dict:
  """Where the exact criterion's time goes: one [B, C, V] chunk's pieces timed separately (forward only).

  unembed      h [B,C,D] @ W [D,V] (the matmul every variant pays, x2 with recompute)
  learner      unembed + learner log-prob + entropy (trm.source = sampled: what ppo_none computes)
  exact        unembed + logprobs.exact_chunk on stored logits (learner logp, entropy, rollout logp, KL,
               reverse KL, TV: one lse per side)
  exact_old    unembed + the previous two-log_softmax computation (_two_logsoftmax_reference)
  The exact criterion's extra cost per chunk forward is exact - learner (the matmul cancels).
  """
  dims, B, V = shape["dims"], shape["B"], shape["V"]
  C, D = min(chunk, shape["T"]), dims["d_model"]
  r = np.random.default_rng(0)
  h = jnp.asarray(r.standard_normal((B, C, D)), jnp.float32)
  w = jnp.asarray(r.standard_normal((D, V)) / np.sqrt(D), jnp.float32)
  stored = jnp.asarray(r.standard_normal((B, C, V)), jnp.float32)
  tok = jnp.asarray(r.integers(0, V, (B, C)), jnp.int32)
  s = (1.0, 1.0, 0)
  fns = {
      "unembed": jax.jit(lambda h, w, a: jnp.sum(h @ w, -1)),
      "learner": jax.jit(lambda h, w, a: lp.learner_chunk(h @ w, tok, s)),
      "exact": jax.jit(lambda h, w, a: lp.exact_chunk(a, h @ w, tok, s)),
      "exact_old": jax.jit(lambda h, w, a: _two_logsoftmax_reference(a, h @ w, tok)),
  }
  calls = {}
  for k, f in fns.items():
    jax.block_until_ready(f(h, w, stored))
    calls[k] = (lambda f=f: jax.block_until_ready(f(h, w, stored)))
  times = interleave(calls, repeats, "profile")
  med = medians(times)
  return {"shape": {"B": B, "C": C, "D": D, "V": V}, "median_s": med, "times_s": times,
          "exact_extra_over_learner": med["exact"] - med["learner"],
          "exact_old_extra_over_learner": med["exact_old"] - med["learner"],
          "exact_vs_exact_old": paired_ratio(times, "exact", "exact_old")}


# ----------------------------------------------------------------------------------------------------
# 4. Learner throughput and FLOP/s vs the matmul peak
# ----------------------------------------------------------------------------------------------------

def matmul_peak(n_list=(1024, 2048, 4096), dtype=jnp.float32, repeats: int = 3) -> dict:
  """Best FLOP/s of a square jnp.dot on the default backend (the machine's matmul peak, measured)."""
  best, per = 0.0, {}
  f = jax.jit(jnp.dot)
  for n in n_list:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f(a, a).block_until_ready()
    t = min(timed(lambda a=a: f(a, a).block_until_ready()) for _ in range(repeats))
    per[n] = 2 * n ** 3 / t
    best = max(best, per[n])
  return {"flops_per_s": best, "by_n": per, "dtype": jnp.dtype(dtype).name}


def is_fused(cfg) -> bool:
  """Whether learner_update takes its fused single-forward path (learner.fuse, 1 epoch x 1 minibatch)."""
  return bool(cfg.learner.get("fuse", False)) and cfg.rl.epochs * cfg.rl.minibatches == 1


def analytic_flops(dims: dict, V: int, B: int, P: int, T: int, fused: bool = False,
                   logits_remat: bool = True) -> dict:
  """FLOPs of one learner update (1 epoch, any number of minibatches), counted from the shapes.

  N_layers = matmul params of the blocks; N_unembed = D*V; S = P + T (the blocks see prompt + response,
  the unembedding only the T response positions). Attention as implemented (full S x S scores, no causal
  skipping): forward 4*S^2*H*Dh per layer per sequence.
    model (MFU convention)  = 6*N_layers*B*S + 6*N_unembed*B*T + 12*L*B*S^2*H*Dh
    executed                = model + with logits_remat (learner.logits_remat) the backward's recompute of
                              the chunked logits (2*N_unembed*B*T)
                              + unless fused: the pre-update no-grad forward (2*N_layers*B*S + 2*N_unembed*B*T
                              + 4*L*B*S^2*H*Dh)
  (fused = learner.fuse with 1 epoch x 1 minibatch: one forward serves the statistics and the gradient.)
  """
  d, L, H, K, Dh, F = (dims[k] for k in DIM_KEYS)
  n_layers = L * (d * H * Dh * 2 + d * K * Dh * 2 + 3 * d * F)
  n_unembed = d * V
  S = P + T
  attn_fwd = 4 * L * B * S * S * H * Dh
  model = 6 * n_layers * B * S + 6 * n_unembed * B * T + 3 * attn_fwd
  pre = 2 * n_layers * B * S + 2 * n_unembed * B * T + attn_fwd
  remat = 2 * n_unembed * B * T if logits_remat else 0
  return {"model": float(model), "executed": float(model + (0 if fused else pre) + remat),
          "n_layers_params": n_layers, "n_unembed_params": n_unembed, "fused": fused}


def bench_throughput(shape: dict, repeats: int, peak: dict) -> dict:
  dims, B, G, P, T, V = shape["dims"], shape["B"], shape["G"], shape["P"], shape["T"], shape["V"]
  over = {"trm.criterion": "max_avg", "trm.source": "sampled", "trm.divergence": "k2", "trm.divergence_avg": "k3",
          "model.param_dtype": shape.get("param_dtype", "float32")}
  cfg = learner_config(dims, B=B, G=G, P=P, T=T, overrides=over)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  state, step, *_ = build_step(cfg, V, mesh)
  batch = sharding_lib.shard_batch(make_batch(B, G, P, T, V), mesh)
  cost = None
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()  # one compile: the timed calls use this executable
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    cost = float(ca.get("flops", 0.0)) or None
  except Exception as e:  # noqa: BLE001 - cost analysis is optional per backend
    log(f"throughput: cost_analysis unavailable ({type(e).__name__}: {e})")
  st = Stepper(compiled, state, batch)
  st()
  st()
  compile_s = time.perf_counter() - t0
  log(f"throughput: compiled ({compile_s:.1f}s); peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
  # interleave with the peak matmul so both see the same machine load
  n = max(peak["by_n"], key=peak["by_n"].get)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(peak["dtype"]))
  f = jax.jit(jnp.dot)
  times = interleave({"learner": st, "matmul": lambda: f(a, a).block_until_ready()}, repeats, "throughput")
  t = float(statistics.median(times["learner"]))
  local_peak = max(peak["flops_per_s"], 2 * n ** 3 / min(times["matmul"]))
  fl = analytic_flops(dims, V, B, P, T, fused=is_fused(cfg),
                      logits_remat=lp.logits_remat(cfg.learner.logits_remat, cfg.learner.remat, B, T, V))
  tokens = B * (P + T)
  out = {"shape": shape, "median_step_s": t, "tokens_per_s": tokens / t, "response_tokens_per_s": B * T / t,
         "flops_analytic_executed": fl["executed"], "flops_analytic_model": fl["model"],
         "flops_cost_analysis": cost, "peak_flops_per_s": local_peak, "peak_dtype": peak["dtype"],
         "achieved_flops_per_s": fl["executed"] / t,
         "peak_fraction": fl["executed"] / t / local_peak, "mfu_model_flops": fl["model"] / t / local_peak,
         "params": fl, "times_s": times}
  if cost:
    out["peak_fraction_cost_analysis"] = cost / t / local_peak
  return out


# ----------------------------------------------------------------------------------------------------
# 5. Scaling over fake CPU devices (run in a subprocess: the device count is fixed when jax starts)
# ----------------------------------------------------------------------------------------------------

def scaling_worker(shape: dict, device_counts, repeats: int) -> dict:
  """Same global batch, meshes over jax.devices()[:n]; returns loss and step time per n."""
  dims, B, G, P, T, V = shape["dims"], shape["B"], shape["G"], shape["P"], shape["T"], shape["V"]
  # thresholds that accept every row of the random batch, so the loss is not trivially 0
  over = {"trm.criterion": "max_avg", "trm.source": "sampled", "trm.divergence": "k2", "trm.divergence_avg": "k3",
          "trm.delta": 1e9, "trm.delta_avg": 1e9}
  cfg = learner_config(dims, B=B, G=G, P=P, T=T, overrides=over)
  host_batch = make_batch(B, G, P, T, V)
  steppers, first = {}, {}
  for n in device_counts:
    if n > len(jax.devices()):
      continue
    mesh = sharding_lib.make_mesh({"data": n, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:n])
    state, step, *_ = build_step(cfg, V, mesh)
    st = Stepper(step, state, sharding_lib.shard_batch(host_batch, mesh))
    st()  # compile; the metrics of this first step are the ones compared (same initial params)
    first[n] = {k: float(v) for k, v in jax.device_get(st.metrics).items()}
    st()
    steppers[n] = st
    log(f"scaling: {n} device(s) loss={first[n]['loss']:.8f}")
  times = interleave({str(n): s for n, s in steppers.items()}, repeats, "scaling")
  ns = sorted(first)
  base = first[ns[0]]
  return {"device_counts": ns, "loss": {str(n): first[n]["loss"] for n in ns},
          "max_abs_loss_diff": max(abs(first[n]["loss"] - base["loss"]) for n in ns),
          "max_abs_grad_norm_diff": max(abs(first[n]["grad_norm"] - base["grad_norm"]) for n in ns),
          "grad_norm": {str(n): first[n]["grad_norm"] for n in ns},
          "accept_rate": {str(n): first[n]["trm/accept_rate"] for n in ns},
          "median_step_s": {str(n): float(statistics.median(times[str(n)])) for n in ns}, "times_s": times,
          "n_visible_devices": len(jax.devices()), "shape": shape}


def bench_scaling(shape: dict, device_counts, repeats: int, timeout: int = 900) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={max(device_counts)}"])
  env.setdefault("JAX_PLATFORMS", "cpu")
  arg = json.dumps({"shape": shape, "device_counts": list(device_counts), "repeats": repeats})
  proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.bench", "--_scaling_worker", arg], env=env,
                        cwd=common.REPO, capture_output=True, text=True, timeout=timeout, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("[bench"):
      print(line, flush=True)
  if proc.returncode != 0:
    raise RuntimeError(f"scaling subprocess failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
  marker = "SCALING_JSON "
  line = next(l for l in proc.stdout.splitlines() if l.startswith(marker))
  return json.loads(line[len(marker):])
