"""The learner side of an audit: per-token log-probs (and divergences) of dump rows under an HF checkpoint.

Rows are grouped by sampler settings, padded into batches (prompts LEFT padded, responses right padded, as the
trainer's rollouts are; lengths rounded up to powers of two so a dump compiles a handful of programs), sharded
on the batch axis over every device (`sharding.make_mesh` / `shard_batch`, parameters by the logical-axis rules)
and run through the learner's own chunked pass (`logprobs.response_hidden` + `logprobs.token_stats`), so no
[B, T, V] float32 array is ever held whole. The rollout side of each source:
  sampled    only the sampler's log-probs of the sampled tokens (estimators k1 / k2 / k3 / |log rho|);
  topk       + the sampler's top-K: `divergence.topk_divergences` gives kl_lower, the TV bracket [tv_lower, tv];
  stored     + the sampler's raw logits (.npy side file): exact full-vocabulary KL / TV;
  recompute  the rollout re-run under a `RolloutBackend`'s numerics (--recompute_rollout): exact KL / TV.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from trm_jax import divergence, logprobs as lp, sharding
from trm_jax.audit.schema import Row
from trm_jax.models import LEARNER, Numerics
from trm_jax.models import hf
from trm_jax.rollout import backends
from trm_jax.rollout.sampling import processed_logits

SOURCES = ("sampled", "topk", "stored", "recompute")


@dataclasses.dataclass(frozen=True)
class Learner:
  """The audited policy: NNX graph + parameters (sharded on `mesh`) and the numerics it is computed with."""
  graphdef: nnx.GraphDef
  params: nnx.State
  numerics: Numerics
  mesh: jax.sharding.Mesh


def learner_numerics(dtype: str) -> Numerics:
  """float32 = the reference learner; bfloat16 = bf16 weights and activations (as learner.dtype does)."""
  return LEARNER if dtype == "float32" else Numerics(dtype=dtype, weight_dtype=dtype)


def load_learner(hf_path: str, dtype: str = "float32", devices=None) -> Learner:
  """Loads the checkpoint sharded over a ("data": all devices) mesh, parameters in `dtype`."""
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"--learner_dtype must be float32 or bfloat16, got {dtype!r}")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
  graphdef, params = nnx.split(hf.load_pretrained(hf_path, dtype=dtype, mesh=mesh))
  return Learner(graphdef, params, learner_numerics(dtype), mesh)


def recompute_backend(spec: str) -> backends.RolloutBackend:
  """A rollout backend from "key=value,..." over `rollout.backend`'s fields (e.g. "precision=bfloat16")."""
  cfg = backends.default_backend_config()
  for item in filter(None, spec.split(",")):
    key, _, value = item.partition("=")
    if key not in cfg:
      raise ValueError(f"--recompute_rollout: unknown backend field {key!r}; fields: {sorted(cfg.keys())}")
    with cfg.ignore_type():
      cfg[key] = type(cfg[key])(value)
  backend = backends.backend_from_config(cfg, prefix="--recompute_rollout")
  if backend.staleness_k:
    raise ValueError("--recompute_rollout: staleness_k needs the older parameters, which a dump does not carry")
  return backend


def source_of(rows: Sequence[Row], backend: Optional[backends.RolloutBackend]) -> str:
  """The best rollout side every row supports (one per dump, so its statistics are comparable)."""
  if backend is not None:
    return "recompute"
  if rows and all(r.logits is not None for r in rows):
    return "stored"
  if rows and all(r.topk_ids is not None for r in rows):
    return "topk"
  return "sampled"


def _bucket(n: int, lo: int = 8) -> int:
  return max(lo, 1 << (max(n, 1) - 1).bit_length())


def _side_logits(row: Row, T: int, vocab: int, cache: dict) -> np.ndarray:
  path, i = row.logits
  if path not in cache:
    cache[path] = np.load(path, mmap_mode="r")
  arr = cache[path] if i is None else cache[path][i]
  out = np.zeros((T, vocab), np.float32)
  out[:len(row.response)] = arr[:len(row.response)]
  return out


def make_batch(rows: Sequence[Row], size: int, source: str, vocab: int, cache: dict) -> dict:
  """Numpy batch of `size` rows (missing ones repeat row 0 and are dropped later)."""
  rows = list(rows) + [rows[0]] * (size - len(rows))
  P, T = _bucket(max(len(r.prompt) for r in rows)), _bucket(max(len(r.response) for r in rows))
  b = {"prompt": np.zeros((size, P), np.int32), "prompt_mask": np.zeros((size, P), bool),
       "response": np.zeros((size, T), np.int32), "response_mask": np.zeros((size, T), bool)}
  if source == "topk":
    K = rows[0].topk_ids.shape[1]
    b["topk_ids"] = np.tile(np.arange(K, dtype=np.int32), (size, T, 1))
    b["topk_logp"] = np.full((size, T, K), -np.inf, np.float32)
  if source == "stored":
    b["logits"] = np.stack([_side_logits(r, T, vocab, cache) for r in rows])
  for i, r in enumerate(rows):
    p, t = len(r.prompt), len(r.response)
    b["prompt"][i, P - p:], b["prompt_mask"][i, P - p:] = r.prompt, True
    b["response"][i, :t], b["response_mask"][i, :t] = r.response, True
    if source == "topk":
      b["topk_ids"][i, :t], b["topk_logp"][i, :t] = r.topk_ids, r.topk_logprobs
  return b


def _topk_stats(model, h, b, numerics, sampling, chunk):
  """kl_lower and the TV bracket per position from the sampler's top-K (one unembed per chunk)."""
  def one(h_c, ids_c, logp_c):
    logits = processed_logits(model.unembed(h_c, numerics=numerics), *sampling)
    d = divergence.topk_divergences(logp_c, ids_c, logits)
    return {"kl": d["kl_lower"], "tv": d["tv"], "tv_lower": d["tv_lower"]}

  return lp.map_chunks(one, chunk, h, b["topk_ids"], b["topk_logp"])


def stats_fn(learner: Learner, sampling: tuple, source: str, backend=None):
  """jit(params, batch) -> dict of [B, T] float32 per-token statistics for one sampler setting and source."""
  def fn(params, b):
    model = nnx.merge(learner.graphdef, params)
    inputs = (b["prompt"], b["prompt_mask"], b["response"], b["response_mask"])
    h, _ = lp.response_hidden(model, *inputs, numerics=learner.numerics)
    chunk = lp.default_chunk(b["response"].shape[1], 0)
    side = None
    if source == "recompute":
      h_roll, _ = lp.response_hidden(model, *inputs, numerics=backend.numerics)
      side = ("recompute", model, h_roll, backend.numerics)
    elif source == "stored":
      side = ("stored", b["logits"])
    out = lp.token_stats(model, h, b["response"], learner_numerics=learner.numerics, sampling=sampling,
                         chunk=chunk, rollout_side=side, remat=False)
    if source == "topk":
      out.update(_topk_stats(model, h, b, learner.numerics, sampling, chunk))
    return out

  return jax.jit(fn)


def per_token(learner: Learner, rows: Sequence[Row], source: str, *, batch_size: int = 32, backend=None,
              vocab: int, progress: bool = True) -> list[dict]:
  """Per-row dicts of [T_i] float32 numpy arrays (learner_logp, entropy and the source's divergences)."""
  div = sharding.batch_divisor(learner.mesh)
  size = -(-batch_size // div) * div
  groups: dict = {}
  for i, r in enumerate(rows):
    key = r.sampling + ((r.topk_ids.shape[1],) if source == "topk" else ())
    groups.setdefault(key, []).append(i)
  fns, cache, results = {}, {}, [None] * len(rows)
  bar = tqdm(total=len(rows), desc="audit", unit="seq", disable=not progress)
  for key, idx in groups.items():
    idx = sorted(idx, key=lambda i: len(rows[i].response))  # similar lengths share a batch: less padding
    fn = fns.setdefault(key, stats_fn(learner, key[:3], source, backend))
    for s in range(0, len(idx), size):
      part = idx[s:s + size]
      batch = sharding.shard_batch(make_batch([rows[i] for i in part], size, source, vocab, cache), learner.mesh)
      out = jax.device_get(fn(learner.params, batch))
      for j, i in enumerate(part):
        results[i] = {k: np.asarray(v[j, :len(rows[i].response)], np.float32) for k, v in out.items()}
      bar.update(len(part))
  bar.close()
  return results


def padded(rows: Sequence[Row], tokens: Sequence[dict]) -> dict:
  """[N, T_max] arrays of the whole dump: mask, rollout_logp and every per-token statistic (0 past the end)."""
  n, t = len(rows), max((len(r.response) for r in rows), default=1)
  out = {"mask": np.zeros((n, t), np.float32), "rollout_logp": np.zeros((n, t), np.float32)}
  for k in (tokens[0] if tokens else {}):
    out[k] = np.zeros((n, t), np.float32)
  for i, (r, tok) in enumerate(zip(rows, tokens)):
    m = len(r.response)
    out["mask"][i, :m], out["rollout_logp"][i, :m] = 1.0, r.logprobs
    for k, v in tok.items():
      out[k][i, :m] = v
  return {k: jnp.asarray(v) for k, v in out.items()}
