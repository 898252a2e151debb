"""Memory part of the bench: XLA's compiled temp bytes, chunked (ours) vs naive [B,T,V] logits.

Compile only (jax.jit(f).lower(*ShapeDtypeStructs).compile().memory_analysis()); nothing is executed
or allocated, so T = 32k, V = 150k fits on a laptop.

ours        trm_jax.logprobs.token_stats with a recompute rollout side: hidden [B,T,D] of both policies +
            their unembeddings -> per-token learner logp, entropy, rollout logp, kl, kl_reverse, tv,
            chunked over T by trm_jax.logprobs.map_chunks (logprobs.exact_chunk per chunk: one lse per side).
ours+grad   the same, plus the gradient of sum(learner logp) w.r.t. (h, W) via trm_jax.logprobs.token_logp
            (remat: the backward recomputes each chunk's logits).
naive       the same numbers from the full [B,T,V] logits of both policies.
naive+grad  naive plus the gradient of sum(learner logp) through the full [B,T,V] log_softmax.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from trm_jax import divergence
from trm_jax import logprobs as lp
from trm_jax.models import LEARNER

SAMPLING = (1.0, 1.0, 0)


class _Unembed:
  """The one method token_stats / token_logp use: unembed(h, numerics) -> f32 logits."""

  def __init__(self, w):
    self.w = w

  def unembed(self, h, *, numerics):
    del numerics
    return jnp.einsum("...d,dv->...v", h, self.w).astype(jnp.float32)


def _chunk(t, chunk_size):
  return lp.default_chunk(t, chunk_size)


def ours(chunk_size=0):
  def fn(h, h_roll, w, w_roll, tokens):
    return lp.token_stats(_Unembed(w), h, tokens, learner_numerics=LEARNER, sampling=SAMPLING,
                          chunk=_chunk(h.shape[1], chunk_size), rollout_side=("recompute", _Unembed(w_roll), h_roll,
                                                                               LEARNER))
  return fn


def ours_grad(chunk_size=0):
  stats = ours(chunk_size)

  def fn(h, h_roll, w, w_roll, tokens):
    def loss(h, w):
      logp, _ = lp.token_logp(_Unembed(w), h, tokens, numerics=LEARNER, temperature=1.0,
                              chunk=_chunk(h.shape[1], chunk_size), remat=True)
      return logp.sum()
    return stats(h, h_roll, w, w_roll, tokens), jax.grad(loss, argnums=(0, 1))(h, w)
  return fn


def naive(h, h_roll, w, w_roll, tokens):
  logp_v = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w), axis=-1)
  roll_v = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h_roll, w_roll), axis=-1)
  out = divergence.divergences_from_logprobs(roll_v, logp_v)
  out["learner_logp"] = jnp.take_along_axis(logp_v, tokens[..., None], axis=-1)[..., 0]
  out["rollout_logp_recomputed"] = jnp.take_along_axis(roll_v, tokens[..., None], axis=-1)[..., 0]
  out["entropy"] = divergence.entropy(logp_v)
  return out


def naive_grad(h, h_roll, w, w_roll, tokens):
  def loss(h, w):
    logp_v = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w), axis=-1)
    return jnp.take_along_axis(logp_v, tokens[..., None], axis=-1).sum()
  return naive(h, h_roll, w, w_roll, tokens), jax.grad(loss, argnums=(0, 1))(h, w)


def temp_bytes(fn, B, T, V, D) -> tuple[int, float]:
  S = jax.ShapeDtypeStruct
  args = (S((B, T, D), jnp.float32), S((B, T, D), jnp.float32), S((D, V), jnp.float32), S((D, V), jnp.float32),
          S((B, T), jnp.int32))
  t0 = time.perf_counter()
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  if m is None:
    raise RuntimeError("memory_analysis() is not available on this backend")
  return int(m.temp_size_in_bytes), time.perf_counter() - t0


def bench_memory(grid, D: int, log=print) -> dict:
  """grid: iterable of (B, T, V). Returns rows with temp bytes of the four programs and the ratios."""
  rows = []
  for i, (B, T, V) in enumerate(grid):
    r = {"B": B, "T": T, "V": V, "D": D, "chunk": _chunk(T, 0)}
    secs = 0.0
    for name, fn in (("ours", ours()), ("ours_grad", ours_grad()), ("naive", naive), ("naive_grad", naive_grad)):
      r[name], s = temp_bytes(fn, B, T, V, D)
      secs += s
    r["naive_over_ours"] = r["naive"] / r["ours"]
    r["naive_grad_over_ours_grad"] = r["naive_grad"] / r["ours_grad"]
    r["one_chunk_logits_bytes"] = 4 * B * r["chunk"] * V
    r["full_logits_bytes"] = 4 * B * T * V
    # what is left of ours once the T-proportional but V-free buffers (chunked copies of the two
    # hidden states, the [B,T] outputs) are set aside, in units of one chunk of f32 logits
    r["ours_in_chunks"] = r["ours"] / r["one_chunk_logits_bytes"]
    r["ours_minus_hidden_in_chunks"] = (r["ours"] - 2 * 4 * B * T * D) / r["one_chunk_logits_bytes"]
    rows.append(r)
    log(f"memory {i + 1}/{len(grid)}: B={B} T={T} V={V}: ours {r['ours'] / 2**20:.0f} MiB, "
        f"ours+grad {r['ours_grad'] / 2**20:.0f} MiB, naive {r['naive'] / 2**30:.2f} GiB, "
        f"naive+grad {r['naive_grad'] / 2**30:.2f} GiB (x{r['naive_over_ours']:.1f}; {secs:.1f}s compile)")
  return {"rows": rows, "D": D}


def summarise(mem: dict, T_ref: int, V_ref: int) -> dict:
  rows = mem["rows"]
  ref = [r for r in rows if r["T"] == T_ref and r["V"] == V_ref] or rows
  headline = min(min(r["naive_over_ours"], r["naive_grad_over_ours_grad"]) for r in ref)
  # growth check: for fixed (B, V), ours(T) - ours(T_min) against what it would grow if it held
  # the [B,T,V] logits; "V-free growth" = the part explained by B*T*D hidden-state copies.
  growth = []
  for r in rows:
    same = [q for q in rows if q["B"] == r["B"] and q["V"] == r["V"]]
    lo = min(same, key=lambda q: q["T"])
    if r["T"] > lo["T"]:
      extra = r["ours"] - lo["ours"]
      hidden = 2 * 4 * r["B"] * (r["T"] - lo["T"]) * r["D"]
      growth.append({"B": r["B"], "V": r["V"], "T_from": lo["T"], "T_to": r["T"], "ours_growth_bytes": extra,
                     "logits_growth_bytes": 4 * r["B"] * (r["T"] - lo["T"]) * r["V"],
                     "hidden_copies_growth_bytes": hidden,
                     "growth_minus_hidden_over_one_chunk": (extra - hidden) / r["one_chunk_logits_bytes"]})
  # The V*T term: for fixed B and two vocabularies V1 < V2, d(T) = ours(T, V2) - ours(T, V1) is the
  # V-dependent part of ours' temp memory. It must not grow with T (beyond one chunk of logits at V2);
  # a program holding [B,T,V] logits would grow it by 4*B*(T - T_min)*(V2 - V1) bytes.
  vt = []
  for B in sorted({r["B"] for r in rows}):
    vs = sorted({r["V"] for r in rows if r["B"] == B})
    ts = sorted({r["T"] for r in rows if r["B"] == B})
    at = {(r["T"], r["V"]): r for r in rows if r["B"] == B}
    for v1, v2 in zip(vs, vs[1:]):
      full = [t for t in ts if (t, v1) in at and (t, v2) in at]
      if len(full) < 2:
        continue
      chunk_v2 = at[(full[-1], v2)]["one_chunk_logits_bytes"]
      for prog in ("ours", "ours_grad"):
        d = {t: at[(t, v2)][prog] - at[(t, v1)][prog] for t in full}
        vt.append({"program": prog, "B": B, "V1": v1, "V2": v2, "d_by_T": d,
                   "vt_growth_in_chunks": (max(d.values()) - d[full[0]]) / chunk_v2,
                   "naive_would_grow_in_chunks": 4 * B * (full[-1] - full[0]) * (v2 - v1) / chunk_v2})
  max_chunks = max(r["ours_minus_hidden_in_chunks"] for r in rows)
  worst = max((g["vt_growth_in_chunks"] for g in vt), default=None)
  return {"naive_over_ours_ref": headline, "ref": {"T": T_ref, "V": V_ref}, "growth": growth, "vt_growth": vt,
          "max_ours_minus_hidden_in_chunks": max_chunks, "worst_vt_growth_in_chunks": worst}
