"""Continuous batching: a fixed number of decode slots, each taking the next pending response when its
row stops, until every prompt x G sample is done (`rollout.slots`).

A static batch decodes all N responses together, so every step costs N rows until the LONGEST one stops;
with long-tailed lengths (most answers short, a few reaching T) most of that is finished rows. Here S < N
slots decode; a slot whose row emits a stop id (or reaches T) is refilled from the queue with the next
response (prompt i, sample j): its prompt's KV cache (one prefill per prompt, shared by the G samples) is
copied into the slot and decoding resumes from the prompt's last logits. The work then follows the real
tokens, sum_i len_i / S steps of S rows, plus the drain of the last slots.

Same outputs as the static sampler for the same key: each response's randomness is keyed by (prompt,
sample, position) (`sampler.row_keys`), and a slot holds its response at exactly the cache slots,
positions and key-validity the static batch gives it (prompt in slots 0..P-1, token t at P+t), so the
per-row arithmetic is the same (tests/test_continuous.py checks tokens, log-probs, logits and MoE routes).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from trm_jax.models.transformer import positions_from_valid


def _buffers(shapes: dict, N: int, T: int, pad_id) -> dict:
  """Output buffers [N, T, ...] of the per-step outputs (pad token, mask / log-prob 0 until written)."""
  return {k: (jnp.full((N, T) + s.shape[1:], pad_id, s.dtype) if k == "tokens" else
              jnp.zeros((N, T) + s.shape[1:], s.dtype)) for k, s in shapes.items()}


def _refill(st, pcache, plogits, prompt_mask, G: int, N: int, P: int, T: int):
  """Gives every empty slot the next pending response, in order: the prompt's prefill KV (slots 0..P-1)
  and validity are copied in, the response position restarts at 0. Runs only when some slot is empty."""
  S = st["req"].shape[0]
  empty = st["req"] == N
  new = st["next"] + jnp.cumsum(empty) - 1
  take = empty & (new < N)

  def copy(st):
    p = jnp.where(take, new // G, 0)
    at = jnp.where(take, jnp.arange(S), S)  # out of range = not written
    c = st["cache"]
    valid = jnp.concatenate([prompt_mask[p], jnp.zeros((S, T), bool)], axis=1)
    cache = c.replace(k=c.k.at[:, at, :P].set(pcache.k[:, p, :P], mode="drop"),
                      v=c.v.at[:, at, :P].set(pcache.v[:, p, :P], mode="drop"),
                      valid=c.valid.at[at].set(valid, mode="drop"), index=jnp.where(take, P, c.index))
    return {**st, "cache": cache, "req": jnp.where(take, new, st["req"]), "t": jnp.where(take, 0, st["t"]),
            "logits": jnp.where(take[:, None], plogits[p], st["logits"]), "next": st["next"] + jnp.sum(take)}

  return jax.lax.cond(jnp.any(take), copy, lambda st: st, st)


def decode_continuous(model, prompt, prompt_mask, choose, keys, *, T: int, numerics, group_size: int, slots: int,
                      pad_id):
  """Continuous-batching decode of N = B responses (rows i*G .. i*G+G-1 share prompt i) in `slots` slots.

  Args: as `sampler._decode_cached` (prompt [B,P] left padded with G identical rows per group; `choose`
  the sampler's per-step draw; keys [B] the responses' keys), plus slots: S, the decode batch.
  Returns (outputs {name: [B, T, ...]}, done [B], routes [n_moe, B, T, k] or None).
  """
  B, P = prompt.shape
  G, N, S = group_size, prompt.shape[0], slots
  moe = model.cfg.n_moe_layers > 0
  first = lambda x: x[::G] if G > 1 else x
  pmask = first(prompt_mask)
  n_valid = jnp.sum(pmask, axis=-1).astype(jnp.int32)
  # One prefill per prompt, in a cache as long as the static batch's (same attention shapes, same numbers).
  pcache = model.init_cache(pmask.shape[0], P + T, numerics)
  h, pcache, _ = model.hidden(first(prompt), positions_from_valid(pmask), pmask, numerics=numerics, cache=pcache)
  plogits = model.unembed(h[:, -1], numerics=numerics)

  st = {"req": jnp.full((S,), N, jnp.int32), "t": jnp.zeros((S,), jnp.int32), "next": jnp.int32(0),
        "logits": jnp.zeros((S,) + plogits.shape[1:], plogits.dtype), "cache": model.init_cache(S, P + T, numerics),
        "stopped": jnp.zeros((N,), bool)}
  probe = jax.eval_shape(lambda: choose(st["logits"], st["t"], st["req"] < N, keys[:S])[0])
  st["bufs"] = _buffers(probe, N, T, pad_id)
  if moe:
    k = model.cfg.experts_top_k
    st["bufs"]["routes"] = jnp.zeros((N, T, model.cfg.n_moe_layers, k), jnp.int32)

  def body(st):
    st = _refill(st, pcache, plogits, pmask, G, N, P, T)
    req, t = st["req"], st["t"]
    live = req < N
    out, stopped = choose(st["logits"], t, live, keys[jnp.minimum(req, N - 1)])
    # Idle slots write (harmlessly, key-invalid) at slot P; live ones at P + t as in the static batch.
    cache = st["cache"].replace(index=jnp.where(live, P + t, P))
    pos = jnp.where(live, n_valid[jnp.where(live, req // G, 0)] + t, 0)
    h, cache, aux = model.hidden(out["tokens"][:, None], pos[:, None], live[:, None], numerics=numerics, cache=cache)
    if moe:
      out["routes"] = jnp.moveaxis(aux["routes"][:, :, 0], 0, 1)  # [S, n_moe, k]: the fed token's experts
    row = jnp.where(live, req, N)  # out of range = dropped
    bufs = {name: b.at[row, t].set(out[name].astype(b.dtype), mode="drop") for name, b in st["bufs"].items()}
    finished = live & (stopped | (t + 1 == T))
    return {**st, "cache": cache, "bufs": bufs, "logits": model.unembed(h[:, 0], numerics=numerics),
            "req": jnp.where(finished, N, req), "t": t + 1,
            "stopped": st["stopped"].at[row].set(stopped, mode="drop")}

  cond = lambda st: (st["next"] < N) | jnp.any(st["req"] < N)
  st = jax.lax.while_loop(cond, body, st)
  outs = st["bufs"]
  routes = jnp.moveaxis(outs.pop("routes"), 2, 0) if moe else None  # [n_moe, B, T, k]
  return outs, st["stopped"], routes
