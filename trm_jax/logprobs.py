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

from typing import Callable

import jax
import jax.numpy as jnp

from trm_jax import divergence
from trm_jax.rollout.sampler import sequence_inputs
from trm_jax.rollout.sampling import processed_logprobs


def response_hidden(model, prompt, prompt_mask, response, response_mask, *, numerics):
  """Hidden states that predict each response token: [B, T, D], plus the model's aux (MoE routes)."""
  tokens, positions, valid = sequence_inputs(prompt, prompt_mask, response, response_mask)
  # Response tokens after EOS are padding; keep them out of every key set but still compute them.
  h, _, aux = model.hidden(tokens, positions, valid, numerics=numerics)
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


def default_chunk(t: int, chunk_size: int) -> int:
  return chunk_size if chunk_size > 0 else min(t, 128)


def token_logp(model, h, tokens, *, numerics, temperature: float, chunk: int, remat: bool = True):
  """Per-token log-prob [B, T] (differentiable) and entropy [B, T] of the learner, chunked.

  The learner's policy is the model's softmax at the sampling temperature (top-p / top-k shape only
  what the rollout engine samples from; they are a mismatch the divergences measure).
  """
  out = token_stats(model, h, tokens, learner_numerics=numerics, sampling=(temperature, 1.0, 0), chunk=chunk,
                    grad_logp=True, remat=remat)
  return out["learner_logp"], out["entropy"]


def _gather(logp_v, tokens):
  """The log-prob of each sampled token: [B, C, V], [B, C] -> [B, C]."""
  return jnp.take_along_axis(logp_v, tokens[..., None], axis=-1)[..., 0]


def token_stats(learner, h_learner, tokens, *, learner_numerics, sampling, chunk: int, rollout_side=None,
                grad_logp: bool = False, remat: bool = True):
  """One pass over time chunks: learner log-probs, entropy and, if given, exact divergences.

  Everything is stop-gradient except `learner_logp` when grad_logp=True (the fused learner update
  differentiates it; with remat the backward recomputes each chunk's logits instead of storing them).

  Args:
    learner: the learner model (merged NNX module); h_learner: [B, T, D] hidden states.
    tokens: [B, T] response tokens.
    sampling: (temperature, top_p, top_k) of the rollout engine.
    rollout_side: how to get the rollout distribution of a chunk, one of
      ("recompute", rollout_model, h_rollout [B,T,D], rollout_numerics)  exact, never stored whole;
      ("stored", logits [B,T,V])                                          exact, memory heavy;
      ("topk", topk_logp [B,T,K], topk_ids [B,T,K])                       bounds (see divergence);
      None                                                                sampled estimators only.
  Returns:
    dict of [B, T] float32: learner_logp, entropy, and for exact sides rollout_logp_recomputed, kl,
    kl_reverse, tv (topk: kl = the lower bound kl_lower, tv = the upper bound, no kl_reverse).
  """
  temperature, top_p, top_k = sampling
  kind = rollout_side[0] if rollout_side else None

  def learner_part(h_c, tok_c):
    logp_v = processed_logprobs(learner.unembed(h_c, numerics=learner_numerics), temperature, 1.0, 0)
    return logp_v, {"learner_logp": _gather(logp_v, tok_c), "entropy": divergence.entropy(logp_v)}

  def with_rollout_logp(logp_v, out, roll_v, tok_c):
    out["rollout_logp_recomputed"] = _gather(roll_v, tok_c)
    out.update(divergence.divergences_from_logprobs(roll_v, logp_v))
    return out

  if kind == "recompute":
    _, rollout_model, h_roll, roll_numerics = rollout_side

    def one(h_c, tok_c, hr_c):
      logp_v, out = learner_part(h_c, tok_c)
      roll_v = processed_logprobs(rollout_model.unembed(hr_c, numerics=roll_numerics), temperature, top_p, top_k)
      return with_rollout_logp(logp_v, out, roll_v, tok_c)

    extra = (h_roll,)
  elif kind == "stored":
    def one(h_c, tok_c, logits_c):
      logp_v, out = learner_part(h_c, tok_c)
      roll_v = processed_logprobs(logits_c.astype(jnp.float32), temperature, top_p, top_k)
      return with_rollout_logp(logp_v, out, roll_v, tok_c)

    extra = (rollout_side[1],)
  elif kind == "topk":
    def one(h_c, tok_c, tl_c, ti_c):
      logp_v, out = learner_part(h_c, tok_c)
      # log-probs are logits whose log_softmax is themselves.
      d = divergence.topk_divergences(tl_c, ti_c, logp_v)
      out.update(kl=d["kl_lower"], tv=d["tv"])  # no kl_reverse: the unseen tail leaves it unknown
      return out

    extra = (rollout_side[1], rollout_side[2])
  elif kind is None:
    def one(h_c, tok_c):
      return learner_part(h_c, tok_c)[1]

    extra = ()
  else:
    raise ValueError(f"unknown rollout side {kind!r}")

  def one_sg(*xs):
    out = one(*xs)
    return {k: v if (grad_logp and k == "learner_logp") else jax.lax.stop_gradient(v) for k, v in out.items()}

  return map_chunks(one_sg, chunk, h_learner, tokens, *extra, remat=remat and grad_logp)
