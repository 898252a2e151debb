"""`sampler_continuous_speedup`: continuous batching (rollout.slots) over the static batch, long-tailed lengths.

The length distribution of long-horizon RL (most answers stop early, a few run to T) is made on a random model
by two edits of its weights, both along one random unit direction u of the residual stream:

  * a class per token: 10% of the vocabulary gets +gamma u in its embedding and +kappa u in its unembedding
    column, the rest -gamma u / -kappa u, so the next token keeps the current token's class (sticky);
  * an EOS bias: the EOS column gets -lam u, so EOS is likely only in the second class.

A prompt ending in a first-class token (every 10th prompt) never stops and runs to T; the others stop at a
geometric-like length whose median is set by lam, found by bisection so that the batch's median is T / 8.
Both samplers then generate the same responses (same key; the equality is checked and reported), and the
figure is tokens per second, continuous over static, as the median of interleaved rounds.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.sampler import random_model
from experiments.benchmarks.timing import interleave, log as default_log, paired_ratio
from trm_jax.rollout import sampler

LONG_FRAC, GAMMA, KAPPA = 0.1, 1.0, 8.0


def long_tailed_model(dims: dict, V: int, max_len: int, lam: float, seed: int = 0):
  """(graphdef, params, eos id, number of first-class tokens) of the edited random model (module docstring)."""
  graphdef, params = random_model(dims, V, max_len)
  D = dims["d_model"]
  rng = np.random.default_rng(seed)
  u = rng.normal(size=D)
  u /= np.linalg.norm(u)
  eos, n_long = V - 1, int(V * LONG_FRAC)
  cls = np.where(np.arange(V) < n_long, 1.0, -1.0)
  cls[eos] = 0.0
  emb = np.asarray(params["embed"][...], np.float64)
  emb = emb + GAMMA * np.std(emb) * np.sqrt(D) * cls[:, None] * u[None]
  w = np.asarray(params["unembedding"][...], np.float64) + KAPPA * np.outer(u, cls)
  w[:, eos] -= lam * u
  params["embed"][...] = jnp.asarray(emb, jnp.float32)
  params["unembedding"][...] = jnp.asarray(w, jnp.float32)
  return graphdef, params, eos, n_long


def long_tailed_prompts(N: int, P: int, V: int, n_long: int, seed: int = 0) -> np.ndarray:
  """[N, P] prompts; every 10th ends in a first-class token (runs to T), the others in a second-class one."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(3, V - 1, size=(N, P)).astype(np.int32)
  long = np.arange(N) % round(1 / LONG_FRAC) == 0
  prompt[:, -1] = np.where(long, rng.integers(3, n_long, N), rng.integers(n_long, V - 1, N))
  return prompt


def _lengths(dims, V, prompt, T, lam, slots):
  g, p, eos, _ = long_tailed_model(dims, V, prompt.shape[1] + T, lam)
  out = sampler.sample(g, p, jnp.asarray(prompt), jnp.ones(prompt.shape, bool), jax.random.key(0),
                       max_new_tokens=T, eos_id=eos, slots=slots)
  return np.asarray(out.mask).sum(1)


def calibrate(dims: dict, V: int, prompt: np.ndarray, T: int, slots: int, steps: int = 7, log=default_log) -> float:
  """lam with the batch's median length closest to T / 8 (bisection: a larger lam stops rows sooner; sampled
  with the continuous sampler, the faster one)."""
  lo, hi, best = KAPPA, KAPPA + 2.0, None
  for _ in range(steps):
    lam = 0.5 * (lo + hi)
    med = float(np.median(_lengths(dims, V, prompt, T, lam, slots)))
    if best is None or abs(med - T / 8) < abs(best[1] - T / 8):
      best = (lam, med)
    lo, hi = (lam, hi) if med > T / 8 else (lo, lam)
  log(f"continuous: EOS bias lam = {best[0]:.4f} gives median length {best[1]} (target T/8 = {T / 8})")
  return best[0]


def bench_continuous(dims: dict, V: int, N: int, P: int, T: int, slots: int, repeats: int, log=default_log) -> dict:
  prompt = long_tailed_prompts(N, P, V, int(V * LONG_FRAC))
  lam = calibrate(dims, V, prompt, T, slots, log=log)
  g, params, eos, _ = long_tailed_model(dims, V, P + T, lam)
  args = (g, params, jnp.asarray(prompt), jnp.ones((N, P), bool), jax.random.key(0))

  def run(s):
    return sampler.sample(*args, max_new_tokens=T, eos_id=eos, slots=s)

  static, cont = jax.device_get(run(0)), jax.device_get(run(slots))  # also the compile
  lengths = np.asarray(static.mask).sum(1)
  tokens = {"static": float(lengths.sum()), "continuous": float(np.asarray(cont.mask).sum())}
  same = float(np.mean(np.all(np.asarray(static.tokens) == np.asarray(cont.tokens), axis=1)))
  fns = {k: (lambda s=s: jax.block_until_ready(run(s).tokens)) for k, s in (("static", 0), ("continuous", slots))}
  times = interleave(fns, repeats, desc="continuous", log=log)
  # tokens / s ratio = (tokens_c / t_c) / (tokens_s / t_s), per round
  speedup = paired_ratio(times, "static", "continuous") * tokens["continuous"] / tokens["static"]
  out = {"speedup": speedup, "slots": slots, "N": N, "P": P, "T": T, "V": V, "dims": dims, "eos_bias": lam,
         "median_len": float(np.median(lengths)), "frac_at_T": float(np.mean(lengths == T)),
         "mean_len": float(lengths.mean()), "rows_identical": same, "tokens": tokens, "times_s": times,
         "how": "random model with sticky token classes + EOS bias (experiments/benchmarks/continuous.py)"}
  log(f"continuous: {N} responses, T {T}, median {out['median_len']}, {out['frac_at_T']:.0%} at T, "
      f"{slots} slots: {speedup:.2f}x tokens/s over static ({same:.1%} of rows identical)")
  return out
