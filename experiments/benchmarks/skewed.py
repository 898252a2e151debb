"""Learner on a long-tailed batch: sequence packing (learner.packing=auto) against the padded update.

  learner_skewed_speedup = padded / packed step time, one fused update each (same state, same batch), on a
  length distribution where 10% of the responses reach T and the rest are geometric with median T/8.
Interleaved rounds (experiments/benchmarks/timing.py), as every speed figure.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.learner import Stepper, build_step, learner_config, make_batch
from experiments.benchmarks.timing import interleave, log, medians, paired_ratio, timed
from trm_jax import packing as pk_lib
from trm_jax import sharding as sharding_lib

LENGTHS_DOC = ("10% of rows (rounded up) exactly T; the rest Geometric(p) on {1, 2, ...}, p = 1 - 2^(-1/(T/8)) (median "
               "T/8), clipped to [1, T]; rows shuffled; seed 0")


def skewed_lengths(B: int, T: int, seed: int = 0) -> np.ndarray:
  """Response lengths [B]: ceil(B / 10) rows at T, the rest geometric with median T / 8 (LENGTHS_DOC)."""
  r = np.random.default_rng(seed)
  n_long = -(-B // 10)
  p = 1.0 - 2.0 ** (-1.0 / max(T / 8, 1.0))
  rest = np.clip(r.geometric(p, size=B - n_long), 1, T)
  return r.permutation(np.concatenate([np.full(n_long, T), rest]))


def skewed_batch(B, G, P, T, V, seed: int = 0):
  """make_batch's random batch with the skewed response lengths."""
  lengths = skewed_lengths(B, T, seed)
  batch = make_batch(B, G, P, T, V, seed=seed)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  return batch.replace(response_mask=jnp.asarray(mask), response=batch.response * jnp.asarray(mask, jnp.int32),
                       rollout_logp=batch.rollout_logp * jnp.asarray(mask)), lengths


def bench_skewed(shape: dict, repeats: int) -> dict:
  """Interleaved step times of the padded and the packed learner update on one skewed batch; see module doc."""
  dims, B, G, P, T, V = shape["dims"], shape["B"], shape["G"], shape["P"], shape["T"], shape["V"]
  over = {"trm.criterion": "max_avg", "trm.source": "sampled", "trm.divergence": "k2", "trm.divergence_avg": "k3"}
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  host_batch, lengths = skewed_batch(B, G, P, T, V)
  batch = sharding_lib.shard_batch(host_batch, mesh)
  steppers, compile_s, holder, rows = {}, {}, None, None
  for name, packing in (("padded", "none"), ("packed", "auto")):
    cfg = learner_config(dims, B=B, G=G, P=P, T=T, overrides={**over, "learner.packing": packing})
    state, step, *_ = build_step(cfg, V, mesh)
    steppers[name] = Stepper(step, None if holder else state, batch, holder=holder)
    holder = steppers[name].holder
    compile_s[name] = timed(steppers[name])
    if isinstance(step, pk_lib.PackedStep):
      rows = step.last_rows
    log(f"skewed: compiled {name} ({compile_s[name]:.1f}s)")
  for st in steppers.values():
    st()
  times = interleave(steppers, repeats, "skewed")
  real = int(lengths.sum())
  return {"shape": shape, "lengths": LENGTHS_DOC, "response_lengths": lengths.tolist(),
          "median_length": float(np.median(lengths)), "real_response_tokens": real,
          "real_fraction": real / (B * T), "packed_rows": rows, "median_step_s": medians(times),
          "compile_s": compile_s, "times_s": times, "repeats": repeats,
          "speedup": paired_ratio(times, "padded", "packed")}
