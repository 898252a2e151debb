"""The one frozen pytree that carries a rollout batch to the learner."""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax


@flax.struct.dataclass
class RolloutBatch:
  """What the rollout produced; everything the learner needs, nothing it recomputes.

  Rows are grouped: the G responses to one prompt are contiguous (B = num_prompts * G).
  Prompts are left padded to P so every response starts at position P.

  Attributes:
    prompt: [B, P] int32; prompt_mask: [B, P] (1 on real tokens).
    response: [B, T] int32; response_mask: [B, T] (1 up to and including EOS).
    rollout_logp: [B, T] float32, log-prob of each sampled token under the distribution the rollout
      engine actually sampled from (after temperature / top-p / top-k).
    rewards: [B] float32 (synthetic tasks: in [0, 1]; the DAPO text reward: +1 / -1, 0 on a checker timeout).
    rollout_logits: [B, T, V] or None (trm.source = stored).
    rollout_topk_logp, rollout_topk_ids: [B, T, K] or None (trm.source = topk).
    group_size: G, static.
  """
  prompt: jax.Array
  prompt_mask: jax.Array
  response: jax.Array
  response_mask: jax.Array
  rollout_logp: jax.Array
  rewards: jax.Array
  rollout_logits: Optional[jax.Array] = None
  rollout_topk_logp: Optional[jax.Array] = None
  rollout_topk_ids: Optional[jax.Array] = None
  group_size: int = flax.struct.field(pytree_node=False, default=1)

  @property
  def lengths(self) -> jax.Array:
    return self.response_mask.sum(-1)
