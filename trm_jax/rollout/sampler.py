"""Autoregressive sampler: jitted prefill + KV-cache decode ("cached") or full recompute ("full").

The rollout policy pi_roll of the paper is whatever this computes under a backend's `Numerics`; `logp`
is the log-prob of each sampled token under the distribution actually sampled from
(`sampling.processed_logprobs`), which the learner recomputes to measure the mismatch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from trm_jax.models import LEARNER, Numerics
from trm_jax.models.transformer import positions_from_valid
from trm_jax.rollout.sampling import check_sampling_args, processed_logprobs

KERNELS = ("cached", "full")


@struct.dataclass
class SampleOutput:
  """Sampled responses; row i continues prompt i (responses start at array slot P).

  tokens [B,T] int32 (pad after EOS); mask [B,T] float32 (1 up to and including EOS); logp [B,T]
  float32 (processed distribution, 0 where mask is 0); logits [B,T,V] float32 raw rollout logits (before
  temperature/top-k/top-p) or None; topk_logp / topk_ids [B,T,K] top-K of the processed log-probs or
  None; routes [n_moe_layers,B,T,k] int32 expert choices of the response tokens (MoE) or None.
  """

  tokens: jax.Array
  mask: jax.Array
  logp: jax.Array
  logits: jax.Array | None = None
  topk_logp: jax.Array | None = None
  topk_ids: jax.Array | None = None
  routes: jax.Array | None = None


def sequence_inputs(prompt, prompt_mask, response, response_mask=None):
  """(tokens, positions, valid) [B,P+T] of prompt + response for a full forward.

  Positions match the sampler's; the logits predicting response token t sit at slot P-1+t, i.e.
  `logits[:, P-1:P-1+T]`.
  """
  if response_mask is None:
    response_mask = jnp.ones(response.shape, bool)
  tokens = jnp.concatenate([prompt, response], axis=1).astype(jnp.int32)
  valid = jnp.concatenate([prompt_mask.astype(bool), response_mask.astype(bool)], axis=1)
  return tokens, positions_from_valid(valid), valid


def _choose(logits, t, done, rng, eos_id, pad_id, temperature, top_p, top_k, return_logits, topk):
  """Samples one token per row from `logits` [B,V]; returns (per-step outputs, new done)."""
  lp = processed_logprobs(logits, temperature, top_p, top_k)
  tok = jax.random.categorical(jax.random.fold_in(rng, t), lp, axis=-1).astype(jnp.int32)
  tok_lp = jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
  live = ~done
  tok = jnp.where(live, tok, pad_id)
  out = {"tokens": tok, "mask": live.astype(jnp.float32), "logp": jnp.where(live, tok_lp, 0.0)}
  if return_logits:
    out["logits"] = logits.astype(jnp.float32)
  if topk:
    out["topk_logp"], out["topk_ids"] = jax.lax.top_k(lp, topk)
  return out, done | (live & (tok == eos_id))


def _sample_impl(graphdef, params, prompt, prompt_mask, rng, eos_id, pad_id, *, max_new_tokens,
                 temperature, top_p, top_k, numerics, kernel, return_logits, topk):
  model = nnx.merge(graphdef, params)
  B, P = prompt.shape
  T = max_new_tokens
  if P + T > model.cfg.max_len:
    raise ValueError(f"prompt length {P} + max_new_tokens {T} exceeds model.max_len {model.cfg.max_len}")
  choose = functools.partial(_choose, rng=rng, eos_id=eos_id, pad_id=pad_id, temperature=temperature,
                             top_p=top_p, top_k=top_k, return_logits=return_logits, topk=topk)
  n_valid = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
  done0 = jnp.zeros((B,), bool)
  moe = model.cfg.n_moe_layers > 0

  if kernel == "cached":
    # The cache is created inside this program, so the scan carry updates it in place: no copies,
    # nothing to donate across the jit boundary.
    cache = model.init_cache(B, P + T, numerics)
    h, cache, _ = model.hidden(prompt, positions_from_valid(prompt_mask), prompt_mask,
                               numerics=numerics, cache=cache)
    logits0 = model.unembed(h[:, -1], numerics=numerics)

    def step(carry, t):
      cache, logits, done = carry
      out, done = choose(logits, t, done)
      # Feed the new token; the routes of this forward are the response token's expert choices.
      h, cache, aux = model.hidden(out["tokens"][:, None], (n_valid + t)[:, None], jnp.ones((B, 1), bool),
                                   numerics=numerics, cache=cache)
      if moe:
        out["routes"] = aux["routes"][:, :, 0]
      return (cache, model.unembed(h[:, 0], numerics=numerics), done), out

    _, outs = jax.lax.scan(step, (cache, logits0, done0), jnp.arange(T))
    routes = jnp.moveaxis(outs.pop("routes"), 0, 2) if moe else None
  else:
    buf0 = jnp.concatenate([prompt, jnp.full((B, T), pad_id, jnp.int32)], axis=1)
    resp_slot = jnp.arange(T)[None, :]

    def step(carry, t):
      buf, done = carry
      valid = jnp.concatenate([prompt_mask, jnp.broadcast_to(resp_slot < t, (B, T))], axis=1)
      h, _, _ = model.hidden(buf, positions_from_valid(valid), valid, numerics=numerics)
      logits = model.unembed(jax.lax.dynamic_index_in_dim(h, P - 1 + t, axis=1, keepdims=False),
                             numerics=numerics)
      out, done = choose(logits, t, done)
      buf = jax.lax.dynamic_update_slice(buf, out["tokens"][:, None], (0, P + t))
      return (buf, done), out

    (buf, _), outs = jax.lax.scan(step, (buf0, done0), jnp.arange(T))
    routes = None
    if moe:
      _, _, aux = model.hidden(*sequence_inputs(prompt, prompt_mask, buf[:, P:]), numerics=numerics)
      routes = aux["routes"][:, :, P:]

  bt = lambda x: None if x is None else jnp.moveaxis(x, 0, 1)  # [T,B,...] -> [B,T,...]
  return SampleOutput(tokens=bt(outs["tokens"]), mask=bt(outs["mask"]), logp=bt(outs["logp"]),
                      logits=bt(outs.get("logits")), topk_logp=bt(outs.get("topk_logp")),
                      topk_ids=bt(outs.get("topk_ids")), routes=routes)


_sample_jit = jax.jit(
    _sample_impl, static_argnums=(0,),
    static_argnames=("max_new_tokens", "temperature", "top_p", "top_k", "numerics", "kernel",
                     "return_logits", "topk"))


def sample(graphdef, params, prompt, prompt_mask, rng, *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, eos_id: int = 2, pad_id: int = 0,
           numerics: Numerics = LEARNER, kernel: str = "cached", return_logits: bool = False,
           topk: int = 0) -> SampleOutput:
  """Samples `max_new_tokens` response tokens per prompt (one compiled program per shape/settings).

  Args:
    graphdef, params: from `nnx.split(model)` (params: the nnx.State, possibly sharded).
    prompt: [B,P] int32, LEFT padded; prompt_mask: [B,P] (0 on the left padding).
    rng: a PRNG key; the output is a deterministic function of it. Step t uses fold_in(rng, t).
    max_new_tokens: T. temperature / top_p / top_k: see `sampling.processed_logprobs`.
    eos_id, pad_id: after EOS a row emits pad with mask 0 (traced: changing them does not recompile).
    numerics: how the rollout engine computes (a backend's `Numerics`).
    kernel: "cached" (prefill + KV-cache decode) or "full" (full forward per step; reference / baseline).
    return_logits: also return the raw rollout logits [B,T,V].
    topk: if > 0, also return the top-`topk` processed log-probs and their token ids.
  """
  check_sampling_args(temperature, top_p, top_k)
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
  if max_new_tokens <= 0 or topk < 0:
    raise ValueError(f"max_new_tokens must be > 0 and topk >= 0, got {max_new_tokens}, {topk}")
  return _sample_jit(graphdef, params, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_mask).astype(bool),
                     rng, jnp.int32(eos_id), jnp.int32(pad_id), max_new_tokens=int(max_new_tokens),
                     temperature=float(temperature), top_p=float(top_p), top_k=int(top_k), numerics=numerics,
                     kernel=kernel, return_logits=bool(return_logits), topk=int(topk))


def sample_groups(graphdef, params, prompt, prompt_mask, rng, *, group_size: int, **kwargs) -> SampleOutput:
  """`sample` with each prompt repeated `group_size` times contiguously (rows i*G .. i*G+G-1)."""
  prompt = jnp.repeat(jnp.asarray(prompt), group_size, axis=0)
  prompt_mask = jnp.repeat(jnp.asarray(prompt_mask), group_size, axis=0)
  return sample(graphdef, params, prompt, prompt_mask, rng, **kwargs)
