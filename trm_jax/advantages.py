"""Group-relative advantages over contiguous groups of responses to the same prompt (paper Sec. 4: GRPO).

B = num_groups * group_size with groups contiguous. `valid` [B] marks the members whose advantage is
kept (e.g. sequences accepted by the trust-region mask); the others get advantage 0. `group_stats` says
which members the group statistics (mean, std, leave-one-out mean) are taken over:
  "all"       every one of the G responses, then the rejected rows' advantages are zeroed: the paper's
              GRPO and verl (statistics of the sampled group, so masking does not move the baseline);
  "accepted"  only the valid members (a rejected row leaves the statistics, as if it had not been sampled).
Outputs are float32 [B], stop-gradient (advantages are data).
"""
from typing import Optional

import chex
import jax
import jax.numpy as jnp

Array = chex.Array

GROUP_STATS = ("all", "accepted")


def _grouped(rewards: Array, group_size: int, valid: Optional[Array], group_stats: str):
  """Rewards [G', n], keep mask [G', n], statistics weights [G', n], their count and weighted mean."""
  chex.assert_rank(rewards, 1)
  B = rewards.shape[0]
  if group_size < 1 or B % group_size:
    raise ValueError(f"batch size {B} is not a multiple of group_size {group_size}")
  if group_stats not in GROUP_STATS:
    raise ValueError(f"group_stats must be one of {GROUP_STATS}, got {group_stats!r}")
  r = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32)).reshape(-1, group_size)
  keep = (jnp.ones((B,), jnp.float32) if valid is None
          else (jnp.asarray(valid) > 0).astype(jnp.float32)).reshape(-1, group_size)
  w = keep if group_stats == "accepted" else jnp.ones_like(keep)
  n = jnp.sum(w, axis=-1, keepdims=True)
  mean = jnp.sum(r * w, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
  return r, keep, w, n, mean


def grpo(rewards: Array, group_size: int, valid: Optional[Array] = None, eps: float = 1e-6,
         normalize_std: bool = True, group_stats: str = "all") -> Array:
  """GRPO: A_i = (R_i - mean_g R) / (std_g R + eps), statistics over group_stats' members of i's group.

  std is the unbiased (ddof = 1) sample standard deviation, as torch.std in the common GRPO
  implementations; statistics over < 2 members have std 0 (and R_i - mean = 0 for a single member).
  Rows with valid = 0 get 0.

  Args:
    rewards: [B]; group_size: static int; valid: optional [B] 0/1; group_stats: "all" | "accepted".
  """
  r, keep, w, n, mean = _grouped(rewards, group_size, valid, group_stats)
  centred = (r - mean) * w
  if normalize_std:
    var = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
    centred = centred / (jnp.sqrt(var) + eps)
  return (centred * keep).reshape(-1)


def dr_grpo(rewards: Array, group_size: int, valid: Optional[Array] = None, group_stats: str = "all") -> Array:
  """Dr. GRPO: A_i = R_i - mean_g R (no std normalisation), mean over group_stats' members; invalid -> 0."""
  return grpo(rewards, group_size, valid, normalize_std=False, group_stats=group_stats)


def rloo(rewards: Array, group_size: int, valid: Optional[Array] = None, group_stats: str = "all") -> Array:
  """RLOO: A_i = R_i - (sum_{j != i} R_j) / (n_g - 1) over group_stats' members j; invalid -> 0.

  With "accepted" a group with < 2 valid members gets 0; with "all" the leave-one-out mean is over the
  other G - 1 responses (0 when G = 1).

  Args:
    rewards: [B]; group_size: static int; valid: optional [B] 0/1; group_stats: "all" | "accepted".
  """
  r, keep, w, n, _ = _grouped(rewards, group_size, valid, group_stats)
  total = jnp.sum(r * w, axis=-1, keepdims=True)
  loo_mean = (total - r * w) / jnp.maximum(n - 1.0, 1.0)
  adv = jnp.where(n >= 2, (r - loo_mean) * keep, 0.0)
  return adv.reshape(-1)


# rl.advantage name -> estimator fn(rewards, group_size, valid=None, group_stats="all").
ESTIMATORS = {"grpo": grpo, "rloo": rloo, "dr_grpo": dr_grpo}
