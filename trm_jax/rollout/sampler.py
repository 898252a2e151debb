"""Autoregressive sampler: jitted prefill + KV-cache decode ("cached") or full recompute ("full").

The rollout policy pi_roll of the paper is whatever this computes under a backend's `Numerics`; `logp`
is the log-prob of each sampled token under the distribution actually sampled from
(`sampling.processed_logprobs`), which the learner recomputes to measure the mismatch.

Decoding is a `lax.while_loop` over the per-token step that exits as soon as every row has emitted a
stop id, so a batch whose answers end early never pays for the configured maximum length (the DAPO
recipe allows 20k tokens); the program is compiled once per shape. `loop="scan"` runs the same step to
the maximum length (the reference the while loop is tested against, and fixed-length benchmarks).
With `group_size=G` the G rows of a group share one prefill: the prompt is run once and its KV cache
broadcast G times.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from trm_jax.models import LEARNER, Numerics
from trm_jax.models.transformer import constrain_kv, positions_from_valid, sequence_inputs
from trm_jax.rollout import continuous
from trm_jax.rollout.sampling import check_sampling_args, inverse_cdf, processed_logprobs

KERNELS = ("cached", "full")
LOOPS = ("while", "scan")


@struct.dataclass
class SampleOutput:
  """Sampled responses; row i continues prompt i (responses start at array slot P).

  tokens [B,T] int32 (pad after the stop token); mask [B,T] float32 (1 up to and including the stop
  token); logp [B,T] float32 (processed distribution, 0 where mask is 0); logits [B,T,V] float32 raw
  rollout logits (before temperature/top-k/top-p) or None; topk_logp / topk_ids [B,T,K] top-K of the
  processed log-probs or None; routes [n_moe_layers,B,T,k] int32 expert choices of the response tokens
  (MoE) or None; clipped [B] bool: the row reached T tokens without a stop id (cut at max length).
  Where mask is 0 the logits / top-k / routes are unspecified (zero once the whole batch has stopped).
  """

  tokens: jax.Array
  mask: jax.Array
  logp: jax.Array
  logits: jax.Array | None = None
  topk_logp: jax.Array | None = None
  topk_ids: jax.Array | None = None
  routes: jax.Array | None = None
  clipped: jax.Array | None = None


def clip_frac(out: SampleOutput) -> jax.Array:
  """`response/clip_frac`: fraction of rows cut at max length (no stop id within T tokens)."""
  return jnp.mean(out.clipped.astype(jnp.float32))


def row_keys(rng, n_rows: int, first_row=0) -> jax.Array:
  """The key of every response [n_rows]: fold_in(rng, r) for response r = prompt index * G + sample index.

  Each response's randomness depends only on (prompt index, sample index, position) (step t of a row
  draws from fold_in(its key, t)), so any batching of the same responses (static, continuous slots,
  rollout.microbatches slices given their `first_row`, G shared prefills or none) samples the same tokens.
  """
  return jax.vmap(lambda r: jax.random.fold_in(rng, r))(first_row + jnp.arange(n_rows))


def _choose(logits, t, live, keys, stop_ids, pad_id, temperature, top_p, top_k, return_logits, topk):
  """Samples one token per row from `logits` [B,V] at response positions t (scalar or [B]) with the rows'
  keys [B]; returns (per-step outputs, stopped [B]). Rows that are not `live` emit pad / mask 0."""
  lp = processed_logprobs(logits, temperature, top_p, top_k)
  t = jnp.broadcast_to(t, live.shape)
  u = jax.vmap(lambda k, i: jax.random.uniform(jax.random.fold_in(k, i)))(keys, t)  # one draw per row
  tok = inverse_cdf(lp, u)
  tok_lp = jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
  tok = jnp.where(live, tok, pad_id)
  out = {"tokens": tok, "mask": live.astype(jnp.float32), "logp": jnp.where(live, tok_lp, 0.0)}
  if return_logits:
    out["logits"] = logits.astype(jnp.float32)
  if topk:
    out["topk_logp"], out["topk_ids"] = jax.lax.top_k(lp, topk)
  return out, live & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)


def _decode(step, carry0, done_of, T: int, loop: str, pad_id):
  """Runs `step(carry, t) -> (carry, out)` for t = 0.. and stacks the outputs time-major [T, ...].

  "while" stops once `done_of(carry)` is all True; the slots never written keep their initial value,
  which is what the step itself emits for finished rows (pad token, mask 0, logp 0). Returns
  (outputs, final done).
  """
  if loop == "scan":
    carry, outs = jax.lax.scan(step, carry0, jnp.arange(T))
    return outs, done_of(carry)
  shapes = jax.eval_shape(lambda c: step(c, jnp.int32(0))[1], carry0)
  bufs = {k: (jnp.full((T,) + s.shape, pad_id, s.dtype) if k == "tokens" else jnp.zeros((T,) + s.shape, s.dtype))
          for k, s in shapes.items()}

  def cond(state):
    t, carry, _ = state
    return (t < T) & ~jnp.all(done_of(carry))

  def body(state):
    t, carry, bufs = state
    carry, out = step(carry, t)
    bufs = {k: jax.lax.dynamic_update_index_in_dim(bufs[k], out[k].astype(bufs[k].dtype), t, 0) for k in bufs}
    return t + 1, carry, bufs

  _, carry, outs = jax.lax.while_loop(cond, body, (jnp.int32(0), carry0, bufs))
  return outs, done_of(carry)


def _broadcast_cache(model, cache, group_size: int, n_prompts: int, max_len: int, numerics):
  """Repeats every row of a cache built for `n_prompts` rows `group_size` times (contiguous groups).

  The batch axis of each leaf is found by comparing the abstract caches of both batch sizes, so any
  cache layout (per-layer tuples, layer-stacked arrays) works.
  """
  small = jax.eval_shape(lambda: model.init_cache(n_prompts, max_len, numerics))
  big = jax.eval_shape(lambda: model.init_cache(n_prompts * group_size, max_len, numerics))

  def rep(x, s, b):
    axes = [i for i, (m, n) in enumerate(zip(s.shape, b.shape)) if m != n]
    if not axes:
      return x
    if len(axes) != 1 or b.shape[axes[0]] != s.shape[axes[0]] * group_size:
      raise ValueError(f"cannot find the batch axis of a KV-cache leaf: {s.shape} vs {b.shape}")
    return jnp.repeat(x, group_size, axis=axes[0])

  return jax.tree.map(rep, cache, small, big)


def _sample_impl(graphdef, params, prompt, prompt_mask, rng, stop_ids, pad_id, first_row, *, max_new_tokens,
                 temperature, top_p, top_k, numerics, kernel, return_logits, topk, group_size, loop, slots):
  model = nnx.merge(graphdef, params)
  (B, P), T = prompt.shape, max_new_tokens
  if P + T > model.cfg.max_len:
    raise ValueError(f"prompt length {P} + max_new_tokens {T} exceeds model.max_len {model.cfg.max_len}")
  choose = functools.partial(_choose, stop_ids=stop_ids, pad_id=pad_id, temperature=temperature,
                             top_p=top_p, top_k=top_k, return_logits=return_logits, topk=topk)
  keys = row_keys(rng, B, first_row)
  if slots:
    outs, done, routes = continuous.decode_continuous(model, prompt, prompt_mask, choose, keys, T=T,
                                                      numerics=numerics, group_size=group_size, slots=slots,
                                                      pad_id=pad_id)
    bt = lambda x: x
  else:
    decode = _decode_cached if kernel == "cached" else _decode_full
    outs, done, routes = decode(model, prompt, prompt_mask, choose, keys, T=T, numerics=numerics,
                                group_size=group_size, loop=loop, pad_id=pad_id)
    bt = lambda x: None if x is None else jnp.moveaxis(x, 0, 1)  # [T,B,...] -> [B,T,...]
  return SampleOutput(tokens=bt(outs["tokens"]), mask=bt(outs["mask"]), logp=bt(outs["logp"]),
                      logits=bt(outs.get("logits")), topk_logp=bt(outs.get("topk_logp")),
                      topk_ids=bt(outs.get("topk_ids")), routes=routes, clipped=~done)


def _decode_cached(model, prompt, prompt_mask, choose, keys, *, T, numerics, group_size, loop, pad_id):
  """KV-cached decoding: one prefill per group (its rows share the prompt), then T one-token forwards.

  The cache is created inside this program, so the loop carry updates it in place: no copies, nothing
  to donate across the jit boundary. Returns (per-step outputs [T,B,...], done [B], routes or None).
  """
  (B, P), moe = prompt.shape, model.cfg.n_moe_layers > 0
  n_valid = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
  n = B // group_size
  first = lambda x: x[::group_size] if group_size > 1 else x
  cache = model.init_cache(n, P + T, numerics)
  h, cache, _ = model.hidden(first(prompt), positions_from_valid(first(prompt_mask)), first(prompt_mask),
                             numerics=numerics, cache=cache)
  logits0 = model.unembed(h[:, -1], numerics=numerics)
  if group_size > 1:
    cache = _broadcast_cache(model, cache, group_size, n, P + T, numerics)
    cache = cache.replace(k=constrain_kv(cache.k), v=constrain_kv(cache.v))
    logits0 = jnp.repeat(logits0, group_size, axis=0)

  def step(carry, t):
    cache, logits, done = carry
    out, stopped = choose(logits, t, ~done, keys)
    done = done | stopped
    # Feed the new token; the routes of this forward are the response token's expert choices.
    h, cache, aux = model.hidden(out["tokens"][:, None], (n_valid + t)[:, None], jnp.ones((B, 1), bool),
                                 numerics=numerics, cache=cache)
    if moe:
      out["routes"] = aux["routes"][:, :, 0]
    return (cache, model.unembed(h[:, 0], numerics=numerics), done), out

  outs, done = _decode(step, (cache, logits0, jnp.zeros((B,), bool)), lambda c: c[2], T, loop, pad_id)
  routes = jnp.moveaxis(outs.pop("routes"), 0, 2) if moe else None  # [n_moe, B, T, top_k]
  return outs, done, routes


def _decode_full(model, prompt, prompt_mask, choose, keys, *, T, numerics, group_size, loop, pad_id):
  """Reference decoding without a cache: each step re-runs the whole [B, P+T] buffer (O(T^2) work).

  Same outputs as `_decode_cached` (the test of the cache); MoE routes come from one final forward.
  """
  del group_size  # every row runs its own forward here
  B, P = prompt.shape
  buf0 = jnp.concatenate([prompt, jnp.full((B, T), pad_id, jnp.int32)], axis=1)
  resp_slot = jnp.arange(T)[None, :]

  def step(carry, t):
    buf, done = carry
    valid = jnp.concatenate([prompt_mask, jnp.broadcast_to(resp_slot < t, (B, T))], axis=1)
    h, _, _ = model.hidden(buf, positions_from_valid(valid), valid, numerics=numerics)
    logits = model.unembed(jax.lax.dynamic_index_in_dim(h, P - 1 + t, axis=1, keepdims=False),
                           numerics=numerics)
    out, stopped = choose(logits, t, ~done, keys)
    done = done | stopped
    buf = jax.lax.dynamic_update_slice(buf, out["tokens"][:, None], (0, P + t))
    return (buf, done), out

  outs, done = _decode(step, (buf0, jnp.zeros((B,), bool)), lambda c: c[1], T, loop, pad_id)
  routes = None
  if model.cfg.n_moe_layers > 0:
    response = jnp.moveaxis(outs["tokens"], 0, 1)
    _, _, aux = model.hidden(*sequence_inputs(prompt, prompt_mask, response), numerics=numerics)
    routes = aux["routes"][:, :, P:]
  return outs, done, routes


_sample_jit = jax.jit(
    _sample_impl, static_argnums=(0,),
    static_argnames=("max_new_tokens", "temperature", "top_p", "top_k", "numerics", "kernel",
                     "return_logits", "topk", "group_size", "loop", "slots"))


def stop_id_array(eos_id: int | Sequence[int]) -> jax.Array:
  """[K] int32 stop ids from one id or a sequence of ids (e.g. a tokenizer's EOS and end-of-turn)."""
  ids = [int(eos_id)] if np.ndim(eos_id) == 0 else [int(i) for i in eos_id]
  if not ids:
    raise ValueError("eos_id: give at least one stop id (use -1 for 'never stop')")
  return jnp.asarray(ids, jnp.int32)


def sample(graphdef, params, prompt, prompt_mask, rng, *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, eos_id: int | Sequence[int] = 2, pad_id: int = 0,
           numerics: Numerics = LEARNER, kernel: str = "cached", return_logits: bool = False,
           topk: int = 0, group_size: int = 1, loop: str = "while", slots: int = 0,
           first_row: int = 0) -> SampleOutput:
  """Samples up to `max_new_tokens` response tokens per prompt (one compiled program per shape/settings).

  Args:
    graphdef, params: from `nnx.split(model)` (params: the nnx.State, possibly sharded).
    prompt: [B,P] int32, LEFT padded; prompt_mask: [B,P] (0 on the left padding).
    rng: a PRNG key; the output is a deterministic function of it. Response r (row r + first_row of the
      whole batch) draws its token t with fold_in(fold_in(rng, r), t): one uniform, inverse CDF.
    max_new_tokens: T (the output's static length).
    temperature / top_p / top_k: see `sampling.processed_logprobs`.
    eos_id: one stop id or a sequence of them (any one ends a row); after it a row emits `pad_id` with
      mask 0. Traced: other values of the same count do not recompile. -1 never fires.
    numerics: how the rollout engine computes (a backend's `Numerics`).
    kernel: "cached" (prefill + KV-cache decode) or "full" (full forward per step; reference / baseline).
    return_logits: also return the raw rollout logits [B,T,V].
    topk: if > 0, also return the top-`topk` processed log-probs and their token ids.
    group_size: G; rows i*G .. i*G+G-1 must hold the same prompt: the cached kernel prefills it once
      and broadcasts its KV cache (same outputs as G = 1, G times less prefill).
    loop: "while" (stop once every row has stopped) or "scan" (always T steps).
    slots: 0 = static batch (all B rows decode together); S in 1..B = continuous batching in S decode
      slots (trm_jax/rollout/continuous.py; same outputs, cached kernel and while loop only).
    first_row: index of row 0 in the whole batch (rollout.microbatches slices), traced.
  """
  check_sampling_args(temperature, top_p, top_k)
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
  if loop not in LOOPS:
    raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
  if max_new_tokens <= 0 or topk < 0:
    raise ValueError(f"max_new_tokens must be > 0 and topk >= 0, got {max_new_tokens}, {topk}")
  if slots and (slots < 0 or kernel != "cached" or loop != "while"):
    raise ValueError(f"slots={slots}: continuous batching needs slots >= 0, kernel 'cached' and loop 'while'")
  if group_size < 1 or prompt.shape[0] % group_size:
    raise ValueError(f"group_size must be >= 1 and divide the batch {prompt.shape[0]}, got {group_size}")
  return _sample_jit(graphdef, params, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_mask).astype(bool),
                     rng, stop_id_array(eos_id), jnp.int32(pad_id), jnp.int32(first_row),
                     max_new_tokens=int(max_new_tokens),
                     temperature=float(temperature), top_p=float(top_p), top_k=int(top_k), numerics=numerics,
                     kernel=kernel, return_logits=bool(return_logits), topk=int(topk),
                     group_size=int(group_size), loop=loop, slots=min(int(slots), prompt.shape[0]))


def sample_groups(graphdef, params, prompt, prompt_mask, rng, *, group_size: int, **kwargs) -> SampleOutput:
  """`sample` with each prompt repeated `group_size` times contiguously (rows i*G .. i*G+G-1), one
  prefill per prompt."""
  prompt = jnp.repeat(jnp.asarray(prompt), group_size, axis=0)
  prompt_mask = jnp.repeat(jnp.asarray(prompt_mask), group_size, axis=0)
  return sample(graphdef, params, prompt, prompt_mask, rng, group_size=group_size, **kwargs)
