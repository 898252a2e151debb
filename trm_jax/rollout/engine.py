"""One rollout engine: prompts -> sampled responses -> scored, for training and eval alike.

The engine holds the sampler's settings (`SamplingSettings`, plain values resolved from the config once by
the run-setup module) and the run's mesh; the task scores itself (`score(tokens, mask, answer, answer_mask)
-> RewardOutput`, host numpy). Two modes, as tunix configures one rollout per mode:

  rollout(params, prompts, rng, score)  -> (RolloutBatch, metrics)   training: this process's rows
  sample_scored(params, prompts, rng, score) -> (host arrays, RewardOutput)  eval: every row on every host

Microbatches (`rollout.microbatches` = m): the batch is generated as m sequential slices of B / m rows
(whole groups), so the sampler's KV cache and logits hold B / m rows at a time. Each response's draws are
keyed by its row in the whole batch (`sampler.row_keys`; slice i passes first_row = i * B / m), so every
m gives the same RolloutBatch, and so does every `rollout.slots` (continuous batching: S decode slots per
slice refilled as rows stop; 0 = all rows of a slice decode together).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from trm_jax import sharding as sharding_lib
from trm_jax.rollout import sampler as sampler_lib
from trm_jax.rollout.batch import RolloutBatch


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How a rollout samples (hashable): sampler.sample's arguments besides params, prompts and the key."""

  max_new_tokens: int
  temperature: float
  top_p: float
  top_k: int
  numerics: Any
  kernel: str
  group_size: int
  return_logits: bool = False
  topk: int = 0
  microbatches: int = 1
  slots: int = 0  # continuous batching: decode slots per slice (0 = static batch)


def resolve_slots(slots: int, slice_rows: int, divisor: int) -> int:
  """`rollout.slots`: -1 (auto) = a quarter of a slice's rows rounded up to the mesh's data*fsdp, 0 (static)
  where that leaves no row waiting; a number >= the slice's rows is the static batch too."""
  if slots == -1:
    slots = -(-max(slice_rows // 4, 1) // divisor) * divisor
  return 0 if slots >= slice_rows else slots


def stop_ids(tokenizer) -> tuple:
  """Token ids that end a response (a chat model's EOS and end-of-turn; the synthetic EOS)."""
  return tuple(getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,))


def host_all(x) -> np.ndarray:
  """Every row of a (possibly multi-process sharded) array, on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def local_rows(tree: dict, mesh) -> dict:
  """This process's rows of a global numpy batch (all rows on one process)."""
  if jax.process_count() == 1:
    return tree
  rows = sharding_lib.host_rows(mesh, len(next(iter(tree.values()))))
  return {k: v[rows] for k, v in tree.items()}


class RolloutEngine:
  """Samples batches of `batch_size` rows (G consecutive rows per prompt) under `settings` on `mesh`."""

  def __init__(self, graphdef, settings: SamplingSettings, *, stop_ids: tuple, pad_id: int, mesh,
               batch_size: int):
    m = settings.microbatches
    div = sharding_lib.batch_divisor(mesh)
    if m < 1 or batch_size % (m * settings.group_size) or (batch_size // m) % div:
      raise ValueError(f"rollout.microbatches={m} must split the batch of {batch_size} rows into slices of "
                       f"whole groups (group_size {settings.group_size}) that are multiples of the mesh's "
                       f"data*fsdp = {div}")
    if settings.slots < 0 or settings.slots % div:
      raise ValueError(f"rollout.slots={settings.slots} must be 0 (static batch) or a positive multiple of the "
                       f"mesh's data*fsdp = {div} (the slots are sharded like the batch)")
    self.settings, self.mesh, self.batch_size = settings, mesh, batch_size
    self.slice_rows = batch_size // m
    self.stop_ids, self.pad_id = tuple(stop_ids), int(pad_id)
    s, rows = settings, self.slice_rows

    def one_slice(params, prompt, prompt_mask, rng, first_row=0):
      # Traced under the mesh: the KV cache (and its group broadcast) is batch-sharded over data x fsdp with KV
      # heads over tensor, the hidden states as in the learner (models.transformer.constrain_*).
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return _sample_slice(params, prompt, prompt_mask, rng, first_row)

    def _sample_slice(params, prompt, prompt_mask, rng, first_row):
      out = sampler_lib.sample(graphdef, params, prompt, prompt_mask, rng, max_new_tokens=s.max_new_tokens,
                               temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, eos_id=self.stop_ids,
                               pad_id=self.pad_id, numerics=s.numerics, kernel=s.kernel,
                               return_logits=s.return_logits, topk=s.topk, group_size=s.group_size,
                               slots=s.slots, first_row=first_row)
      # Outputs stay sharded over the batch as the learner takes them (XLA alone returned them replicated).
      return sharding_lib.constrain_batch(out, mesh, rows)

    # The sampler program of one slice (trm_jax.plan compiles it): (params, prompt, mask, rng[, first_row])
    # -> SampleOutput.
    self.program = jax.jit(one_slice)
    self._take = jax.jit(lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, rows, axis=0),
                         out_shardings=sharding_lib.batch_sharding(mesh, 2))
    self._join = jax.jit(lambda outs: sharding_lib.constrain_batch(
        jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outs), mesh, batch_size))

  def generate(self, params, prompt, prompt_mask, rng) -> sampler_lib.SampleOutput:
    """SampleOutput of the global [B, P] `prompt` / `prompt_mask` (sharded on the batch axes)."""
    m, b = self.settings.microbatches, self.slice_rows
    if m == 1:
      return self.program(params, prompt, prompt_mask, rng)
    # Sequential calls: one slice's KV cache is freed before the next slice's is allocated.
    outs = [self.program(params, self._take(prompt, i * b), self._take(prompt_mask, i * b), rng, i * b)
            for i in range(m)]
    return self._join(outs)

  def rollout(self, params, prompts: dict, rng, score: Callable) -> tuple[RolloutBatch, dict]:
    """Training: `prompts` = this process's rows (numpy; prompt, prompt_mask, answer, answer_mask) of the
    global batch -> (RolloutBatch sharded on the batch axes, reward metrics of this process's rows)."""
    batch = sharding_lib.shard_batch({k: prompts[k] for k in ("prompt", "prompt_mask")}, self.mesh)
    out = self.generate(params, batch["prompt"], batch["prompt_mask"], rng)
    rows = sharding_lib.host_rows(self.mesh, self.batch_size)
    r = score(host_all(out.tokens)[rows], host_all(out.mask)[rows], prompts["answer"], prompts["answer_mask"])
    rewards, correct = sharding_lib.shard_batch([np.asarray(r.reward, np.float32),
                                                 np.asarray(r.correct, np.float32)], self.mesh)
    # Fractions of the global batch (reduced on device, readable on every host); the checker's counts in
    # r.metrics are this process's rows.
    metrics = {**r.metrics, "reward/correct_frac": float(_mean(correct)),
               "response/clip_frac": float(sampler_lib.clip_frac(out))}
    return RolloutBatch(prompt=batch["prompt"], prompt_mask=batch["prompt_mask"], response=out.tokens,
                        response_mask=out.mask, rollout_logp=out.logp, rewards=rewards, rollout_logits=out.logits,
                        rollout_topk_logp=out.topk_logp, rollout_topk_ids=out.topk_ids,
                        group_size=self.settings.group_size), metrics

  def sample_scored(self, params, prompts: dict, rng, score: Callable) -> tuple[dict, Any]:
    """Eval: `prompts` = every row (numpy) -> ({"mask", "clipped"} host arrays, RewardOutput of every row)."""
    batch = sharding_lib.shard_batch(local_rows({k: prompts[k] for k in ("prompt", "prompt_mask")}, self.mesh),
                                     self.mesh)
    out = self.generate(params, batch["prompt"], batch["prompt_mask"], rng)
    mask = host_all(out.mask)
    r = score(host_all(out.tokens), mask, prompts["answer"], prompts["answer_mask"])
    return {"mask": mask, "clipped": host_all(out.clipped)}, r


@jax.jit
def _mean(x):
  return jnp.mean(x)
