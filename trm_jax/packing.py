"""Sequence packing for the learner (learner.packing): compute follows the real tokens, not B x (P + T).

A long-tailed batch (a few responses reach T, most stop far earlier) spends most of a padded update on
padding. Packing lays the rows' real tokens (prompt + response) end to end in R < B packed rows of the same
width L = P + T, one segment per sequence: attention stays inside a segment (`Transformer.hidden(...,
segment_ids=)`), RoPE positions restart at 0 per segment, so every real token's hidden state is the padded
path's. The per-token pass (unembedding over V, divergences) then runs over each packed row's response
slots [R, Lr] (Lr <= L: the positions that predict a response token), stored rollout logits gathered per
chunk; its per-token results are scattered back to [B, T], so masks, bounds, losses and metrics downstream
are unchanged.

  plan_packing   host: the layout (first-fit decreasing over segment lengths; R and Lr bucketed so only a
                 few programs compile), or None when packing would not save rows
  packed_hidden  in the jit: gather tokens into packed rows, run the body, take the response slots
  pack_side      the rollout side (stored / topk) in the response-slot layout
  unpack         [R, Lr, ...] -> [B, T, ...] (dropped slots stay 0)
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import logprobs as lp


@flax.struct.dataclass
class Packing:
  """A packed layout. Packed rows [R, L]: source row / slot of each token in the [B, P + T] sequence,
  segment ids (-1 on padding), RoPE positions, valid. Response slots [R, Lr]: the packed-row position
  whose hidden state predicts response token (resp_b, resp_t); resp_b = B on unused slots (dropped)."""
  src_row: jax.Array
  src_pos: jax.Array
  segments: jax.Array
  positions: jax.Array
  valid: jax.Array
  resp_pos: jax.Array
  resp_b: jax.Array
  resp_t: jax.Array


def _bucket(n: int, quantum: int, cap: int) -> int:
  """n rounded up to a multiple of quantum, at most cap."""
  return min(cap, -(-max(n, 1) // quantum) * quantum)


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
  """Bins (lists of item indices) holding items of `lengths` (each <= capacity): first-fit decreasing."""
  bins, room = [], []
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    n = lengths[i]
    for j, r in enumerate(room):
      if r >= n:
        bins[j].append(i)
        room[j] -= n
        break
    else:
      bins.append([i])
      room.append(capacity - n)
  return bins


def row_quantum(batch: int, divisor: int) -> int:
  """Packed-row counts are multiples of this: of the mesh's batch divisor, about B / 8 (<= 8 programs)."""
  q = max(1, batch // 8)
  return -(-q // divisor) * divisor


def plan_packing(prompt_len, response_len, P: int, T: int, *, divisor: int = 1, chunk: int = 128):
  """The packed layout of a batch from its lengths (host numpy), or None where packing saves no rows.

  Args:
    prompt_len, response_len: [B] real tokens per row; prompts LEFT padded to P, responses a prefix of T.
    divisor: the packed row count is a multiple of it (sharding.batch_divisor(mesh)).
    chunk: the per-token pass's time chunk; the response-slot width Lr is bucketed on multiples of it.
  """
  plen, rlen = np.asarray(prompt_len, np.int64), np.asarray(response_len, np.int64)
  B, L = plen.shape[0], P + T
  seg_len = np.where(rlen > 0, plen + rlen, plen)
  items = [int(b) for b in np.nonzero(seg_len > 0)[0]]
  bins = first_fit_decreasing([int(seg_len[b]) for b in items], L)
  R = _bucket(len(bins), row_quantum(B, divisor), B)
  if R >= B:
    return None
  bins = [[items[i] for i in bn] for bn in bins] + [[] for _ in range(R - len(bins))]
  resp_total = max([int(rlen[bn].sum()) for bn in bins if bn] or [1])
  Lr = _bucket(resp_total, min(chunk, L), L)
  out = {"src_row": np.zeros((R, L), np.int32), "src_pos": np.zeros((R, L), np.int32),
         "segments": np.full((R, L), -1, np.int32), "positions": np.zeros((R, L), np.int32),
         "valid": np.zeros((R, L), bool), "resp_pos": np.zeros((R, Lr), np.int32),
         "resp_b": np.full((R, Lr), B, np.int32), "resp_t": np.zeros((R, Lr), np.int32)}
  for r, bn in enumerate(bins):
    at, slot = 0, 0
    for s, b in enumerate(bn):
      n_p, n_r = int(plen[b]), int(rlen[b])
      span = slice(at, at + n_p + n_r)
      out["src_row"][r, span] = b
      out["src_pos"][r, span] = np.concatenate([np.arange(P - n_p, P), P + np.arange(n_r)])
      out["segments"][r, span] = s
      out["positions"][r, span] = np.arange(n_p + n_r)
      out["valid"][r, span] = True
      # response token t is predicted by the segment's token before it: slot at + n_p - 1 + t
      out["resp_pos"][r, slot:slot + n_r] = at + n_p - 1 + np.arange(n_r)
      out["resp_b"][r, slot:slot + n_r] = b
      out["resp_t"][r, slot:slot + n_r] = np.arange(n_r)
      at, slot = at + n_p + n_r, slot + n_r
  return out


def host_lengths(prompt_mask, response_mask):
  """[B] prompt and response lengths from host masks, or None when the masks are not left-padded prompts
  followed by prefix responses (the layout packing assumes), or a response has no prompt token before it."""
  pm, rm = np.asarray(prompt_mask) > 0, np.asarray(response_mask) > 0
  plen, rlen = pm.sum(-1), rm.sum(-1)
  P, T = pm.shape[1], rm.shape[1]
  if not (np.array_equal(pm, np.arange(P)[None] >= P - plen[:, None])
          and np.array_equal(rm, np.arange(T)[None] < rlen[:, None])):
    return None
  if np.any((plen == 0) & (rlen > 0)):
    return None
  return plen, rlen


def packed_hidden(model, pk: Packing, prompt, response, *, numerics, remat: str = "none"):
  """Hidden states at the response slots [R, Lr, D] and the model's aux (over the packed rows [R, L])."""
  seq = jnp.concatenate([prompt, response], axis=1).astype(jnp.int32)
  tokens = seq.at[pk.src_row, pk.src_pos].get(mode="clip")
  h, _, aux = model.hidden(tokens, pk.positions, pk.valid, numerics=numerics, remat=remat,
                           segment_ids=pk.segments)
  return jnp.take_along_axis(h, pk.resp_pos[..., None], axis=1), aux


def gather_rows(x, pk: Packing):
  """[B, T, ...] -> the response slots' values [R, Lr, ...] (unused slots read row B - 1, then dropped)."""
  return x.at[pk.resp_b, pk.resp_t].get(mode="clip")


def pack_side(side, pk: Packing):
  """A padded rollout side in the response-slot layout: stored logits stay [B, T, V] and are gathered per
  chunk (logprobs.token_stats "stored_rows"), top-k arrays are gathered; recompute is built packed."""
  kind = side[0] if side is not None else None
  if kind == "stored":
    return ("stored_rows", side[1], pk.resp_b, pk.resp_t)
  if kind == "topk":
    return ("topk", gather_rows(side[1], pk), gather_rows(side[2], pk))
  return side


def unpack(x, pk: Packing, B: int, T: int):
  """Response-slot values [R, Lr, ...] -> [B, T, ...]; positions no slot holds are 0."""
  out = jnp.zeros((B, T) + x.shape[2:], x.dtype)
  return out.at[pk.resp_b, pk.resp_t].set(x, mode="drop")


def device_packing(layout: dict, mesh) -> Packing:
  """The host layout as global arrays sharded on the packed-row axis over the mesh's data x fsdp."""
  from trm_jax import sharding as sharding_lib  # noqa: PLC0415 - keeps this module free of mesh imports

  def put(x):
    sh = sharding_lib.batch_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

  return Packing(**{k: put(v) for k, v in layout.items()})


def _host(x) -> np.ndarray:
  """A (possibly multi-process) global array on this host, whole."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


class PackedStep:
  """The learner step with learner.packing on: per call, the layout is planned on the host from the batch's
  masks and the packed program runs (one compile per bucketed (R, Lr)); the padded program runs where packing
  saves no rows or the masks are not in the padded layout. `lower` lowers the padded (worst-case) program."""

  def __init__(self, padded, packed, mesh, chunk_size: int):
    self.padded, self.packed, self.mesh, self.chunk_size = padded, packed, mesh, chunk_size
    self.last_rows = None  # packed rows of the last call (None: padded)

  def layout(self, batch):
    from trm_jax import sharding as sharding_lib  # noqa: PLC0415
    lengths = host_lengths(_host(batch.prompt_mask), _host(batch.response_mask))
    if lengths is None:
      return None
    P, T = batch.prompt.shape[1], batch.response.shape[1]
    return plan_packing(*lengths, P, T, divisor=sharding_lib.batch_divisor(self.mesh),
                        chunk=lp.default_chunk(T, self.chunk_size))

  def __call__(self, state, batch, *rest):
    layout = self.layout(batch)
    self.last_rows = None if layout is None else layout["valid"].shape[0]
    if layout is None:
      return self.padded(state, batch, *rest)
    return self.packed(state, batch, device_packing(layout, self.mesh), *rest)

  def lower(self, *args):
    return self.padded.lower(*args)
