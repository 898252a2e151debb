"""The statistics pass of the update: the rollout side and the learner's per-token statistics (no gradient).

  rollout_side   how the chunked pass gets pi_roll (trm.source): sampled | stored | topk | recompute (one more
                 forward under the backend's numerics, in the learner's attention query blocks)
  learner_stats  one chunked pass of the learner: log-probs, entropy, exact KL / TV against the rollout side,
                 MoE routing-flip fraction (logprobs.token_stats, divergence.routing_flip_frac)
  sliced_stats   the same over k row slices in sequence (learner.microbatches): the pass holds B / k rows, the
                 statistics are the whole batch's (per-row arrays concatenated, the flip fraction token-weighted)
With a `packing` layout (learner.packing) both forwards run on packed rows (trm_jax/packing.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from trm_jax import divergence
from trm_jax import logprobs as lp
from trm_jax import packing as pk_lib
from trm_jax.models import LEARNER, Numerics
from trm_jax.rollout.backends import RolloutBackend
from trm_jax.rollout.batch import RolloutBatch


def learner_numerics(cfg) -> Numerics:
  """The learner's numerics: float32 (default) or bfloat16 activations and weights (master params stay
  float32 in the optimizer), e.g. for MFU on GPUs and TPUs."""
  block = int(cfg.learner.attention_block)
  if cfg.learner.dtype == "float32":
    return dataclasses.replace(LEARNER, query_block=block)
  return Numerics(dtype=cfg.learner.dtype, weight_dtype=cfg.learner.dtype, query_block=block)


def chunk_remat(cfg, rows: int, t: int, vocab: int) -> bool:
  """Whether this pass's backward recomputes each chunk's logits (learner.logits_remat, learner.remat)."""
  return lp.logits_remat(cfg.learner.get("logits_remat", "auto"), cfg.learner.remat, rows, t, vocab)


def rollout_side(cfg, model_def, rollout_params, batch: RolloutBatch, backend: RolloutBackend, packing=None):
  """How token_stats gets the rollout distribution (trm.source), plus the rollout forward's aux.
  `packing` (a packing.Packing): the recompute forward runs on the packed rows; the side stays padded
  otherwise (learner_stats moves it to the response slots)."""
  source = cfg.trm.source
  if source == "recompute":  # one extra forward under the backend's numerics; no [B,T,V] stored
    roll_model = model_def.merge(rollout_params)
    # Attention in the learner's query blocks: the same per-row computation, so the same rollout numbers.
    numerics = dataclasses.replace(backend.numerics, query_block=int(cfg.learner.attention_block))
    if packing is not None:
      h_roll, aux_roll = pk_lib.packed_hidden(roll_model, packing, batch.prompt, batch.response, numerics=numerics)
    else:
      h_roll, aux_roll = lp.response_hidden(roll_model, batch.prompt, batch.prompt_mask, batch.response,
                                            batch.response_mask, numerics=numerics)
    return ("recompute", roll_model, jax.lax.stop_gradient(h_roll), backend.numerics), aux_roll
  if source == "stored":
    return ("stored", batch.rollout_logits), {}
  if source == "topk":
    return ("topk", batch.rollout_topk_logp, batch.rollout_topk_ids), {}
  return None, {}


def learner_stats(cfg, learner, batch: RolloutBatch, side, aux_roll, *, grad_logp: bool, packing=None):
  """One chunked pass of the learner: per-token log-probs (differentiable if grad_logp), entropy and
  the exact divergences against the rollout side; plus the MoE routing-flip fraction.

  `packing` (learner.packing): the body runs on packed rows and the per-token pass on their response slots
  (trm_jax/packing.py); the statistics come back as [B, T], as the padded path's."""
  numerics, T = learner_numerics(cfg), batch.response.shape[1]
  if packing is None:
    h, aux = lp.response_hidden(learner, batch.prompt, batch.prompt_mask, batch.response, batch.response_mask,
                                numerics=numerics, remat=cfg.learner.remat)
    tokens = batch.response
    valid = jnp.concatenate([batch.prompt_mask, batch.response_mask], axis=1) > 0
  else:
    h, aux = pk_lib.packed_hidden(learner, packing, batch.prompt, batch.response, numerics=numerics,
                                  remat=cfg.learner.remat)
    tokens, side, valid = pk_lib.gather_rows(batch.response, packing), pk_lib.pack_side(side, packing), packing.valid
  stats = lp.token_stats(learner, h if grad_logp else jax.lax.stop_gradient(h), tokens,
                         learner_numerics=numerics,
                         sampling=(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k),
                         chunk=lp.default_chunk(T, cfg.learner.chunk_size, rows=h.shape[0],
                                                vocab=learner.cfg.vocab_size),
                         rollout_side=side, grad_logp=grad_logp,
                         remat=chunk_remat(cfg, h.shape[0], T, learner.cfg.vocab_size))
  if packing is not None:
    stats = {k: pk_lib.unpack(v, packing, *batch.response.shape) for k, v in stats.items()}
  extra = {}
  if "routes" in aux and "routes" in aux_roll:
    extra["moe/routing_flip_frac"] = divergence.routing_flip_frac(aux["routes"], aux_roll["routes"], valid)
  return stats, extra


def sliced_stats(cfg, model_def, params, rollout_params, batch: RolloutBatch, backend: RolloutBackend, k: int):
  """`rollout_side` + `learner_stats` over k sequential slices of the rows (lax.map): the statistics of the
  whole batch while only B / k rows are alive at once. Only for what needs no full-batch rollout side later
  (no top-p / top-k kept set, no post-update certificate: see learner_update)."""
  rows = batch.response.shape[0] // k
  take = lambda i: jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=0), batch)

  def one(i):
    sl = take(i)
    side, aux_roll = rollout_side(cfg, model_def, rollout_params, sl, backend)
    stats, extra = learner_stats(cfg, model_def.merge(params), sl, side, aux_roll, grad_logp=False)
    valid = jnp.sum(jnp.concatenate([sl.prompt_mask, sl.response_mask], axis=1) > 0).astype(jnp.float32)
    return stats, extra, valid

  stats, extra, valid = jax.lax.map(one, jnp.arange(k))
  stats = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), stats)
  # A per-slice fraction of valid tokens, weighted by the slice's valid tokens: the whole batch's fraction.
  extra = {key: jnp.sum(v * valid) / jnp.maximum(jnp.sum(valid), 1.0) for key, v in extra.items()}
  return stats, extra


def truncated(cfg) -> bool:
  return cfg.rollout.top_p < 1.0 or cfg.rollout.top_k > 0


def split_side(side, model_def, rollout_params):
  """The rollout side's per-row arrays (leading axis B, so minibatches can slice them) and a function that
  rebuilds the side from one minibatch's rows. Only needed with top-p / top-k: the learner's log-prob must be
  renormalised over the rollout's kept set (paper-faithful ratio), which needs the rollout distribution."""
  kind = side[0] if side is not None else None
  if kind == "recompute":
    numerics = side[3]
    return {"side_h": side[2]}, lambda mb: ("recompute", model_def.merge(rollout_params), mb["side_h"], numerics)
  if kind == "stored":
    return {"side_logits": side[1]}, lambda mb: ("stored", mb["side_logits"])
  if kind == "topk":
    return ({"side_topk_logp": side[1], "side_topk_ids": side[2]},
            lambda mb: ("topk", mb["side_topk_logp"], mb["side_topk_ids"]))
  return {}, lambda mb: None
