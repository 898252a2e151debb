"""Learner (and recomputed rollout) log-probs of a response, chunked over time.

At long horizons the [B, T, V] float32 logits are the memory wall (T = 32k, V = 150k is ~20 GB per
sequence). Everything here runs the transformer once to hidden states [B, T, D] and then maps over
time chunks: unembed a chunk [B, C, D] -> [B, C, V] logits, reduce it to per-token numbers
(log-prob of the sampled token, entropy, divergences) and drop it. With `remat`, the backward pass
recomputes each chunk's logits instead of storing them, so memory holds one chunk of logits.

Sequence layout (see trm_jax/rollout): prompts are LEFT padded to P, the response follows, so the
hidden state that predicts response token t sits at position P - 1 + t for every row.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from trm_jax import divergence
from trm_jax.models import sequence_inputs
from trm_jax.rollout.sampling import is_truncated, processed_logits


def response_hidden(model, prompt, prompt_mask, response, response_mask, *, numerics, remat: str = "none"):
  """Hidden states that predict each response token: [B, T, D], plus the model's aux (MoE routes).

  `remat`: the layers' rematerialisation policy in the backward pass (config learner.remat)."""
  tokens, positions, valid = sequence_inputs(prompt, prompt_mask, response, response_mask)
  # Response tokens after EOS are padding; keep them out of every key set but still compute them.
  h, _, aux = model.hidden(tokens, positions, valid, numerics=numerics, remat=remat)
  p, t = prompt.shape[1], response.shape[1]
  return h[:, p - 1:p - 1 + t], aux


def map_chunks(fn: Callable, chunk: int, *arrays, remat: bool = False):
  """Applies fn to time chunks of [B, T, ...] arrays and concatenates the [B, C, ...] outputs.

  Each chunk is a `dynamic_slice` of the inputs, so no transposed copy of a [B, T, D] input is ever
  made (only a ragged last chunk pads). Inside a compiled program lax.map runs the chunks one after
  another, so at most one chunk's temporaries ([B, C, V] logits) are live. Measured with
  experiments/bench.py: 6144 -> 643 MiB temp at B=8, T=32k, D=2048 against a pad+reshape version.
  """
  t = arrays[0].shape[1]
  chunk = max(1, min(chunk, t))
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    arrays = tuple(None if x is None else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                   for x in arrays)
  body = jax.checkpoint(fn) if remat else fn

  def one(i):
    return body(*(None if x is None else jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)
                  for x in arrays))

  out = jax.lax.map(one, jnp.arange(n))

  def merge(y):  # [n, B, C, ...] -> [B, T, ...]
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], n * chunk, *y.shape[3:])[:, :t]

  return jax.tree.map(merge, out)


# Auto time chunk: at most this many logits per device per chunk (16 MiB of float32 per [rows, C, V] array).
CHUNK_ELEMENTS = 1 << 22


def default_chunk(t: int, chunk_size: int, rows: int = 0, vocab: int = 0) -> int:
  """The time chunk C of the per-token pass: `chunk_size` if > 0 (learner.chunk_size), else automatic.

  Automatic: C = min(T, 128); given the pass's rows and vocabulary, when one [rows per device, C, V] chunk
  would exceed CHUNK_ELEMENTS logits, C shrinks (powers of two) to fit it, but not below 128 rows x C per
  device (the unembedding matmul's M). Why: the exact divergences stream each chunk 5 times and the backward
  once more, so a chunk that outgrows the cache turns them memory-bound: at B 8, T 128, V 32768, d 256 on
  2 CPU cores the exact update is 1.34x faster at C 16 than at 128, while B 2 (256 rows per chunk) is flat
  (experiments/benchmarks/profile.py). Rows per device: `rows` over the batch axes of the current mesh.
  """
  if chunk_size > 0:
    return chunk_size
  c = min(t, 128)
  if rows and vocab:
    per = _rows_per_device(rows)
    if per * c * vocab > CHUNK_ELEMENTS:
      fit = 1 << max(0, (CHUNK_ELEMENTS // (per * vocab)).bit_length() - 1)  # largest power of two that fits
      floor = 1 << max(0, (-(-128 // per) - 1).bit_length())  # smallest power of two with per x C >= 128
      c = min(c, max(fit, floor))
  return c


def _rows_per_device(rows: int) -> int:
  """`rows` over the batch axes (data x fsdp) of the mesh being traced under (1 shard outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  shards = 1 if mesh.empty else math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp"))
  return -(-rows // shards)


# learner.logits_remat = auto: keep the chunks' logit residuals while all of them together are at most this
# many logits per device ([rows per device, T, V]; 128 MiB per float32 array).
KEEP_LOGITS = 1 << 25


def logits_remat(mode: str, layer_remat: str, rows: int, t: int, vocab: int) -> bool:
  """Whether the backward pass recomputes each time chunk's logits (config learner.logits_remat).

  always / never as named; auto: never when learner.remat = none (no recompute anywhere), else recompute
  only when the whole pass's logits exceed KEEP_LOGITS per device, rows x T x V > 2^25. Why: storing them
  saves the backward one unembedding matmul of 2 x B x T x D x V FLOPs, 1.06x per exact update at B 8,
  T 128, V 32768, d 256 and 1.09x at B 2, T 512, V 32000 on 2 CPU cores (temp 247 -> 331 MiB and
  -> 575 MiB); past that size the saved [B, C, V] residuals of every chunk are what would not fit (at
  T = 32k, V = 150k one row's logits are ~20 GB), so the recompute is what makes long horizons fit.
  """
  if mode not in ("auto", "always", "never"):
    raise ValueError(f"learner.logits_remat must be auto, always or never, got {mode!r}")
  if mode != "auto":
    return mode == "always"
  return layer_remat != "none" and _rows_per_device(rows) * t * vocab > KEEP_LOGITS


def token_logp(model, h, tokens, *, numerics, temperature: float, chunk: int, remat: bool = True,
               top_p: float = 1.0, top_k: int = 0, rollout_side=None):
  """Per-token log-prob [B, T] (differentiable) and entropy [B, T] of the learner, chunked.

  The learner's policy is the model's softmax at the sampling temperature, renormalised over the kept set
  when top_p < 1 or top_k > 0 (see `token_stats`: the rollout's kept set when `rollout_side` gives the
  rollout distribution, else the learner's own).
  """
  out = token_stats(model, h, tokens, learner_numerics=numerics, sampling=(temperature, top_p, top_k),
                    chunk=chunk, rollout_side=rollout_side, grad_logp=True, remat=remat)
  return out["learner_logp"], out["entropy"]


def _gather(x, tokens):
  """x at each sampled token: [B, C, V], [B, C] -> [B, C]."""
  return jnp.take_along_axis(x, tokens[..., None], axis=-1)[..., 0]


def _scaled(logits, temperature):
  x = logits.astype(jnp.float32)
  return x if temperature == 1.0 else x / temperature


def learner_chunk(logits, tokens, sampling):
  """Learner log-prob of each token and entropy from one chunk of logits [B, C, V], with NO rollout distribution.

  One max and one exp pass: lse = max + log sum e^{b - max}, H = lse - E_q[b]. With top_p < 1 or
  top_k > 0 the learner is renormalised over ITS OWN kept set (the rollout's is unknown here); a sampled
  token outside it keeps log-prob b_tok - lse_kept (finite, so the ratio and its gradient stay defined).
  """
  temperature, top_p, top_k = sampling
  b_all = _scaled(logits, temperature)
  b = processed_logits(b_all, 1.0, top_p, top_k) if is_truncated(top_p, top_k) else b_all
  b_sg = jax.lax.stop_gradient(b)
  (mx,) = divergence.max_last(b_sg)
  e = jnp.exp(b_sg - mx)
  s, eb = divergence.sum_last(e, jnp.where(b_sg > -jnp.inf, e * (b_sg - mx), 0.0))
  lse = divergence.logsumexp_with_value(b, (mx + jnp.log(s))[..., 0])
  ent = jnp.maximum((jnp.log(s) - eb / s)[..., 0], 0.0)
  return {"learner_logp": _gather(b_all, tokens) - lse, "entropy": ent}


def exact_chunk(rollout_logits, learner_logits, tokens, sampling):
  """Learner log-probs, entropy, recomputed rollout log-probs and exact divergences of one chunk [B, C, V].

  One read of each chunk, one log-sum-exp per side, shared (`divergence.divergences_from_logits`). The
  rollout side is the distribution sampled from (temperature, top-k, top-p); with truncation its KEPT SET
  K (a function of the rollout logits alone) also restricts the learner: pi_theta(v) = q_v / q(K) on K,
  for the ratio and the divergences ("keep sampling mask", vLLM / prime-rl), so equal logits give ratio 1
  and divergence 0. The logit difference is taken before dividing by the temperature (no extra rounding).
  """
  temperature, top_p, top_k = sampling
  a_raw, b_raw = rollout_logits.astype(jnp.float32), learner_logits.astype(jnp.float32)
  a = processed_logits(a_raw, temperature, top_p, top_k)
  b_all = _scaled(b_raw, temperature)
  b = jnp.where(a > -jnp.inf, b_all, -jnp.inf) if is_truncated(top_p, top_k) else b_all
  diff = None if temperature == 1.0 else (b_raw - a_raw) / temperature
  out = divergence.divergences_from_logits(a, b, logit_diff=diff, same_support=True)
  return {"learner_logp": _gather(b_all, tokens) - out.pop("learner_lse"),
          "rollout_logp_recomputed": _gather(a, tokens) - out.pop("rollout_lse"), **out}


def token_stats(learner, h_learner, tokens, *, learner_numerics, sampling, chunk: int, rollout_side=None,
                grad_logp: bool = False, remat: bool = True):
  """One pass over time chunks: learner log-probs, entropy and, if given, exact divergences.

  Each [B, C, V] chunk of learner logits (and of rollout logits, recomputed or stored) is read once; see
  `exact_chunk` / `learner_chunk`. Everything is stop-gradient except `learner_logp` when grad_logp=True
  (the fused learner update differentiates it; with remat the backward recomputes each chunk's logits
  instead of storing them).

  Top-p / top-k (sampling[1:]): the learner is renormalised over the rollout's kept set, rebuilt per chunk
  from the rollout logits (recompute, stored; never a stored [B,T,V] mask). Without a rollout
  distribution (None = sampled, topk) it is renormalised over its own kept set, which equals the
  rollout's when the two policies agree; topk then bounds the divergences against that learner.

  Args:
    learner: the learner model (merged NNX module); h_learner: [B, T, D] hidden states.
    tokens: [B, T] response tokens.
    sampling: (temperature, top_p, top_k) of the rollout engine.
    rollout_side: how to get the rollout distribution of a chunk, one of
      ("recompute", rollout_model, h_rollout [B,T,D], rollout_numerics)  exact, never stored whole;
      ("stored", logits [B,T,V])                                          exact, memory heavy;
      ("stored_rows", logits [B,T,V], rows [B',T'], times [B',T'])        the same, h_learner [B',T',D] at
                                                                          those (row, time) (packing.py);
      ("topk", topk_logp [B,T,K], topk_ids [B,T,K])                       bounds (see divergence);
      None                                                                sampled estimators only.
  Returns:
    dict of [B, T] float32: learner_logp, entropy, and for exact sides rollout_logp_recomputed, kl,
    kl_reverse, tv (topk: kl = the lower bound kl_lower, tv = the upper bound, no kl_reverse).
  """
  kind = rollout_side[0] if rollout_side else None
  logits = lambda h_c: learner.unembed(h_c, numerics=learner_numerics)

  if kind == "recompute":
    _, rollout_model, h_roll, roll_numerics = rollout_side

    def one(h_c, tok_c, hr_c):
      return exact_chunk(rollout_model.unembed(hr_c, numerics=roll_numerics), logits(h_c), tok_c, sampling)

    extra = (h_roll,)
  elif kind == "stored":
    def one(h_c, tok_c, logits_c):
      return exact_chunk(logits_c, logits(h_c), tok_c, sampling)

    extra = (rollout_side[1],)
  elif kind == "stored_rows":  # packed response slots: stored [B,T,V] logits gathered per chunk
    stored = rollout_side[1]

    def one(h_c, tok_c, b_c, t_c):
      return exact_chunk(stored.at[b_c, t_c].get(mode="clip"), logits(h_c), tok_c, sampling)

    extra = (rollout_side[2], rollout_side[3])
  elif kind == "topk":
    def one(h_c, tok_c, tl_c, ti_c):
      b = logits(h_c)
      out = learner_chunk(b, tok_c, sampling)
      temperature, top_p, top_k = sampling
      d = divergence.topk_divergences(tl_c, ti_c, processed_logits(b, temperature, top_p, top_k))
      out.update(kl=d["kl_lower"], tv=d["tv"])  # no kl_reverse: the unseen tail leaves it unknown
      return out

    extra = (rollout_side[1], rollout_side[2])
  elif kind is None:
    def one(h_c, tok_c):
      return learner_chunk(logits(h_c), tok_c, sampling)

    extra = ()
  else:
    raise ValueError(f"unknown rollout side {kind!r}")

  def one_sg(*xs):
    out = one(*xs)
    return {k: v if (grad_logp and k == "learner_logp") else jax.lax.stop_gradient(v) for k, v in out.items()}

  return map_chunks(one_sg, chunk, h_learner, tokens, *extra, remat=remat and grad_logp)
