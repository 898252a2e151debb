"""Group-relative advantages over contiguous groups of responses to the same prompt (paper Sec. 4: GRPO).

B = num_groups * group_size with groups contiguous. `valid` [B] removes members (e.g. sequences
rejected by the trust-region mask) from the group statistics and sets their advantage to 0.
Outputs are float32 [B], stop-gradient (advantages are data).
"""
from typing import Optional

import chex
import jax
import jax.numpy as jnp

Array = chex.Array


def _grouped(rewards: Array, group_size: int, valid: Optional[Array]):
  chex.assert_rank(rewards, 1)
  B = rewards.shape[0]
  if group_size < 1 or B % group_size:
    raise ValueError(f"batch size {B} is not a multiple of group_size {group_size}")
  r = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32)).reshape(-1, group_size)
  v = (jnp.ones((B,), jnp.float32) if valid is None
       else (jnp.asarray(valid) > 0).astype(jnp.float32)).reshape(-1, group_size)
  n = jnp.sum(v, axis=-1, keepdims=True)
  mean = jnp.sum(r * v, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
  return r, v, n, mean


def grpo(rewards: Array, group_size: int, valid: Optional[Array] = None, eps: float = 1e-6,
         normalize_std: bool = True) -> Array:
  """GRPO: A_i = (R_i - mean_g R) / (std_g R + eps) over the valid members of i's group.

  std is the unbiased (ddof = 1) sample standard deviation over valid members, as torch.std in the
  common GRPO implementations; a group with < 2 valid members has std 0 (and R_i - mean = 0 for a
  single member). Invalid members get 0.

  Args:
    rewards: [B]; group_size: static int; valid: optional [B] 0/1.
  """
  r, v, n, mean = _grouped(rewards, group_size, valid)
  centred = (r - mean) * v
  if normalize_std:
    var = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
    centred = centred / (jnp.sqrt(var) + eps)
  return centred.reshape(-1)


def dr_grpo(rewards: Array, group_size: int, valid: Optional[Array] = None) -> Array:
  """Dr. GRPO: A_i = R_i - mean_g R over valid members (no std normalisation); invalid -> 0."""
  return grpo(rewards, group_size, valid, normalize_std=False)


def rloo(rewards: Array, group_size: int, valid: Optional[Array] = None) -> Array:
  """RLOO: A_i = R_i - (sum_{j != i, valid} R_j) / (n_g - 1); groups with < 2 valid members -> 0.

  Args:
    rewards: [B]; group_size: static int; valid: optional [B] 0/1.
  """
  r, v, n, _ = _grouped(rewards, group_size, valid)
  total = jnp.sum(r * v, axis=-1, keepdims=True)
  loo_mean = (total - r * v) / jnp.maximum(n - 1.0, 1.0)
  adv = jnp.where(n >= 2, (r - loo_mean) * v, 0.0)
  return adv.reshape(-1)
