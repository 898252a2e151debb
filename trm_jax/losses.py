"""Policy-gradient surrogates and their aggregation over tokens (paper Sec. 3, Algorithm 1).

Per-token terms are multiplied by `weights` [B, T] (masking.Correction.token_weight: response mask,
sequence mask M_i and any IS weight already folded in) and reduced by `aggregate`. Every path is
NaN-free when everything is masked: the loss and its gradient are then exactly 0.

Gradient accumulation (learner.microbatches): a slice of a larger batch passes `denom`, the WHOLE batch's
denominator (`denominator` on the whole batch); the slice then returns its numerator / denom, so the slices'
losses and gradients sum to the whole batch's. A per-slice mean instead would weight each slice's rows by
1 / its own count.

Composition of IS weights and ratios (masking.py's module docstring decides it): the ratio a loss forms is
against its `behaviour_logp` argument, and the weights carry only what that ratio does not. With
rl.ratio_base="rollout" the behaviour is pi_roll and the weights are 0/1 masks; with "learner" (decoupled
PPO) the behaviour is pi_prox (stop-gradient pre-update learner log-probs) and the weights carry the
(truncated) IS weight pi_prox/pi_roll. d loss / d log pi_theta(y_t) = -A_i w_t r_t / denominator when r_t is
not clipped, 0 when it is.
"""
from typing import Optional

import chex
import jax
import jax.numpy as jnp

Array = chex.Array

# rl.aggregation names (see `aggregate`).
AGGREGATIONS = ("seq_total", "token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


def aggregate(per_token: Array, weights: Array, mode: str = "seq_total",
              mask: Optional[Array] = None, denom: Optional[Array] = None) -> Array:
  """Reduces weighted per-token terms [..., T] to a scalar.

  With x = per_token * weights and "valid" = mask > 0 if `mask` is given, else weights != 0:
    seq_total:           sum_{i,t} x / N, N = number of sequences (all leading axes), rejected and empty
                         ones included: the paper's (1/N) sum_i M_i ... (rejection sampling, Sec. 3).
    token_mean:          sum_{i,t} x / (number of valid tokens in the whole batch). Pass the response
                         mask to count rejected sequences' tokens too (same rejection-sampling
                         semantics); without it only kept tokens are counted.
    seq_mean_token_sum:  mean over sequences with a valid token of sum_t x.
    seq_mean_token_mean: mean over sequences with a valid token of (sum_t x / valid tokens of the seq).
  Denominators are floored at 1, so an all-masked batch gives 0.

  Args:
    per_token: [..., T] per-token loss terms.
    weights: [..., T] token weights.
    mode: one of AGGREGATIONS.
    mask: optional [..., T] defining which tokens / sequences count in the denominators.
    denom: optional denominator to divide by instead of this batch's own (a slice's share of a larger
      batch: see the module docstring); the numerator is the same sum as above.
  """
  chex.assert_equal_shape([per_token, weights])
  weights = jnp.asarray(weights, jnp.float32)
  # where, not just a product: a masked position may hold inf/NaN (e.g. padding), and 0 * inf = NaN.
  x = jnp.where(weights != 0, jnp.asarray(per_token, jnp.float32) * weights, 0.0)
  valid = ((weights != 0) if mask is None else (jnp.asarray(mask) > 0)).astype(jnp.float32)
  return numerator(x, valid, mode) / (denominator(weights, mode, mask) if denom is None else denom)


def numerator(x: Array, valid: Array, mode: str) -> Array:
  """What `aggregate` divides by its denominator: sum_{i,t} x, or for seq_mean_token_mean
  sum_i (sum_t x / valid tokens of row i). Per-row, so it sums over slices of the rows."""
  if mode == "seq_mean_token_mean":
    return jnp.sum(jnp.sum(x, axis=-1) / jnp.maximum(jnp.sum(valid, axis=-1), 1.0))
  if mode in AGGREGATIONS:
    return jnp.sum(x)
  raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")


def denominator(weights: Array, mode: str = "seq_total", mask: Optional[Array] = None) -> Array:
  """The denominator `aggregate` divides by (float32 scalar), for logging (rl/loss_denominator)."""
  weights = jnp.asarray(weights, jnp.float32)
  valid = ((weights != 0) if mask is None else (jnp.asarray(mask) > 0)).astype(jnp.float32)
  if mode == "seq_total":
    return jnp.float32(max(int(weights[..., 0].size), 1))
  if mode == "token_mean":
    return jnp.maximum(jnp.sum(valid), 1.0)
  if mode in ("seq_mean_token_sum", "seq_mean_token_mean"):
    return jnp.maximum(jnp.sum((jnp.sum(valid, axis=-1) > 0).astype(jnp.float32)), 1.0)
  raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")


def _log_ratio(learner_logp, reference_logp, weights):
  # The reference (behaviour / rollout) policy is data: no gradient flows into it. Zeroing masked
  # positions first keeps exp() finite there, so their (zero) gradient is not NaN.
  lr = jnp.asarray(learner_logp, jnp.float32) - jax.lax.stop_gradient(
      jnp.asarray(reference_logp, jnp.float32))
  return jnp.where(jnp.asarray(weights) != 0, lr, 0.0)


def _ratio_stats(ratio, valid):
  n = jnp.maximum(jnp.sum(valid), 1.0)
  any_valid = jnp.sum(valid) > 0
  r = jax.lax.stop_gradient(ratio)
  return dict(
      ratio_mean=jnp.sum(r * valid) / n,
      ratio_max=jnp.where(any_valid, jnp.max(jnp.where(valid > 0, r, -jnp.inf)), 1.0),
      ratio_min=jnp.where(any_valid, jnp.min(jnp.where(valid > 0, r, jnp.inf)), 1.0),
  )


def ppo_clip_loss(learner_logp: Array, behaviour_logp: Array, advantages: Array, weights: Array, *,
                  eps_low: float, eps_high: float, dual_clip: Optional[float] = None,
                  aggregation: str = "seq_total", mask: Optional[Array] = None,
                  denom: Optional[Array] = None):
  """PPO clipped surrogate with clip-higher and optional dual clip.

  r_t = pi_theta / pi_behaviour (behaviour stop-gradient), A = advantages[i] broadcast over t:
    pg_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high));
    dual clip c > 1: for A < 0, pg_t = min(pg_t, -c A) (caps the unclipped r > 1 + eps_high, A < 0 case).
  Paper Sec. 2 (Table 2): r > 1+eps with A > 0 and r < 1-eps with A < 0 are clipped (zero gradient);
  r > 1+eps with A < 0 and r < 1-eps with A > 0 are not.

  Args:
    learner_logp, behaviour_logp: [B, T] sampled-token log-probs.
    advantages: [B].
    weights: [B, T] token weights (Correction.token_weight).
    eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high].
    dual_clip: optional c > 1.
    aggregation, mask, denom: see `aggregate`.

  Returns:
    (loss scalar, aux dict of scalars: clip_frac, dual_clip_frac, ratio_mean, ratio_max, ratio_min).
  """
  chex.assert_rank([learner_logp, behaviour_logp, weights, advantages], [2, 2, 2, 1])
  chex.assert_equal_shape([learner_logp, behaviour_logp, weights])
  if dual_clip is not None and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
  ratio = jnp.exp(_log_ratio(learner_logp, behaviour_logp, weights))
  adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))[:, None]
  pg_unclipped = -adv * ratio
  pg_clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = jnp.maximum(pg_unclipped, pg_clipped)
  valid = (jnp.asarray(weights) != 0).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(valid), 1.0)
  aux = dict(clip_frac=jnp.sum((pg_clipped > pg_unclipped) * valid) / n)
  if dual_clip is not None:
    capped = (adv < 0) & (pg > -dual_clip * adv)
    pg = jnp.where(adv < 0, jnp.minimum(pg, -dual_clip * adv), pg)
    aux["dual_clip_frac"] = jnp.sum(capped * valid) / n
  else:
    aux["dual_clip_frac"] = jnp.zeros((), jnp.float32)
  aux.update(_ratio_stats(ratio, valid),
             loss_denominator=denominator(weights, aggregation, mask) if denom is None else denom)
  return aggregate(pg, weights, aggregation, mask, denom), aux


def is_loss(learner_logp: Array, rollout_logp: Array, advantages: Array, weights: Array,
            aggregation: str = "seq_total", mask: Optional[Array] = None, denom: Optional[Array] = None):
  """Plain IS surrogate of Algorithm 1: -(1/N) sum_i M_i A_i sum_t w_t rho_t,i (paper Sec. 3).

  rho_t = exp(log pi_theta - log pi_ref) with the reference log-prob stop-gradient, so the gradient is
  -(1/N) sum_i M_i A_i sum_t w_t rho_t grad log pi_theta(y_t|c_t) (with seq_total aggregation). The
  reference is pi_roll (the paper) or, for decoupled PPO, pi_prox with w_t carrying pi_prox/pi_roll.

  Args:
    learner_logp, rollout_logp: [B, T] (rollout_logp: the reference policy's log-probs); advantages: [B];
    weights: [B, T] (M_i and any IS weight folded in). aggregation, mask, denom: see `aggregate`.

  Returns:
    (loss scalar, aux dict: ratio_mean, ratio_max, ratio_min, loss_denominator).
  """
  chex.assert_rank([learner_logp, rollout_logp, weights, advantages], [2, 2, 2, 1])
  chex.assert_equal_shape([learner_logp, rollout_logp, weights])
  rho = jnp.exp(_log_ratio(learner_logp, rollout_logp, weights))
  adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))[:, None]
  valid = (jnp.asarray(weights) != 0).astype(jnp.float32)
  aux = dict(_ratio_stats(rho, valid),
             loss_denominator=denominator(weights, aggregation, mask) if denom is None else denom)
  return aggregate(-adv * rho, weights, aggregation, mask, denom), aux


# rl.loss name -> surrogate. Both take (learner_logp, behaviour_logp, advantages, weights, ..., aggregation,
# mask) and return (loss, aux); ppo_clip also takes eps_low / eps_high / dual_clip (rl.clip_low /
# rl.clip_high / rl.dual_clip); `denom` (optional) is the whole batch's denominator for a slice of it.
SURROGATES = {"ppo_clip": ppo_clip_loss, "is": is_loss}
