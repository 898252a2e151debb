"""Off-policy correction baselines composed with the TRM mask: IS weights, token / geometric masks, and the
Binary-TV trust regions of DPPO and CPPO (paper Sec. 2-3 for the first four; sources cited per function).

Every function takes sampled-token log-probs [B, T] (learner_logp = pi_prox, the pre-update learner,
stop-gradient) and returns a mask_core.Correction. The name -> function tables are in masking.py.
"""
import chex
import jax
import jax.numpy as jnp

from trm_jax import divergence
from trm_jax.mask_core import Correction, finish, log_rho, rho, row_mean

Array = chex.Array


def proximal_weight(learner_logp: Array, rollout_logp: Array, mask: Array) -> Array:
  """Untruncated rollout -> proximal IS weight rho_t = pi_prox / pi_roll [B, T] (decoupled PPO), 0 off mask.

  The log-ratio is clipped at +-LOG_RATIO_CLIP before exp so it stays finite.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  w = rho(log_rho(learner_logp, rollout_logp, mask))
  return jax.lax.stop_gradient(jnp.where(jnp.asarray(mask) > 0, w, 0.0))


def token_tis(learner_logp: Array, rollout_logp: Array, mask: Array, cap, *,
              length_edges=None) -> Correction:
  """Token-level truncated IS: token weight min(rho_t, cap), rho_t = pi_prox / pi_roll (stop-gradient).

  pi_prox = learner_logp (pre-update). Use with a surrogate whose ratio is pi_theta/pi_prox
  (rl.ratio_base="learner"; see masking.py's module docstring), never pi_theta/pi_roll.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  r = rho(log_rho(learner_logp, rollout_logp, mask))
  truncated = divergence.seq_mean((r > cap).astype(jnp.float32), mask)
  return finish(jnp.ones(r.shape[:-1]), jnp.minimum(r, cap), mask,
                dict(truncated_frac=row_mean(truncated, mask)), length_edges)


def token_mask(learner_logp: Array, rollout_logp: Array, mask: Array, low, high, *,
               length_edges=None) -> Correction:
  """Token masking (IcePop / MIS): weight 1[low <= rho_t <= high]; the sequence itself is kept.

  Note (paper Sec. 2): zeroing tokens does not change delta, so it gives no guarantee.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  r = rho(log_rho(learner_logp, rollout_logp, mask))
  keep = ((r >= low) & (r <= high)).astype(jnp.float32)
  return finish(jnp.ones(r.shape[:-1]), keep, mask, None, length_edges)


def seq_tis(learner_logp: Array, rollout_logp: Array, mask: Array, cap, *,
            length_edges=None) -> Correction:
  """Sequence-level truncated IS: every token of sequence i gets min(prod_t rho_t, cap), rho_t = pi_prox/pi_roll.

  As token_tis: pair it with the ratio pi_theta/pi_prox (rl.ratio_base="learner").
  The product is formed in log space, exp(min(sum_t log rho_t, log cap)), so it never overflows.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  log_w = divergence.seq_sum(log_rho(learner_logp, rollout_logp, mask), mask)
  w = jnp.exp(jnp.minimum(log_w, jnp.log(jnp.asarray(cap, jnp.float32))))
  return finish(jnp.ones_like(w), jnp.broadcast_to(w[..., None], jnp.shape(mask)), mask,
                dict(seq_weight_mean=row_mean(w, mask)), length_edges)


def geo_mask(learner_logp: Array, rollout_logp: Array, mask: Array, low, high, *,
             length_edges=None) -> Correction:
  """Geometric-mean sequence mask: M = 1[low <= exp((1/T) sum_t log rho_t) <= high]."""
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  geo = jnp.exp(divergence.seq_mean(log_rho(learner_logp, rollout_logp, mask), mask))
  return finish((geo >= low) & (geo <= high), jnp.ones(jnp.shape(mask)), mask,
                dict(geo_ratio_mean=row_mean(geo, mask)), length_edges)


def _probs(learner_logp, rollout_logp, mask):
  """pi_prox(y_t), pi_roll(y_t) [B, T] (stop-gradient), 0 off the mask."""
  valid = jnp.asarray(mask) > 0
  lp, rp = (jnp.where(valid, jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)), -jnp.inf)
            for x in (learner_logp, rollout_logp))
  return jnp.exp(lp), jnp.exp(rp)


def binary_tv(learner_logp: Array, rollout_logp: Array, mask: Array) -> Array:
  """Binary TV per token [B, T]: |pi_prox(y_t) - pi_roll(y_t)|, the TV between the two Bernoulli
  distributions "y_t vs any other token" (DPPO's Binary approximation, arXiv 2602.04879); 0 off the mask.

  It lower-bounds the full-vocabulary TV(c_t) (data processing), so a mask on it is not TRM's guarantee.
  """
  p, q = _probs(learner_logp, rollout_logp, mask)
  return jnp.abs(p - q)


def dppo(learner_logp: Array, rollout_logp: Array, mask: Array, advantages: Array, low, high, *,
         length_edges=None) -> Correction:
  """DPPO's Binary-TV trust region (Qi et al. 2026, arXiv 2602.04879; the default loss of prime-rl).

  With D_t = pi_prox(y_t) - pi_roll(y_t) (signed; |D_t| is the Binary TV) and A_i the advantage:
    keep_t = 1[D_t <= high]   if A_i > 0   (the update may not raise the token's probability further),
    keep_t = 1[D_t >= -low]   otherwise    (nor lower it further; A_i = 0 rows carry no gradient anyway).
  A token moving back toward the rollout is always kept; the sequence is never rejected. The source's
  loss is -keep_t A_i r_t with r_t = pi_theta/pi_roll and no ratio clip (rl.loss="is",
  rl.ratio_base="rollout" here); prime-rl's optional kl_tau (log r)^2 term is not part of this mask.
  Defaults of prime-rl: low = high = 0.2 (the paper's verl scripts use 0.15). The equations are read from
  prime-rl's default_loss_fn and the authors' Stable-RL verl fork (compute_policy_loss_dppo_tv: the same
  mask); of the paper only the abstract was readable here.

  Args:
    learner_logp, rollout_logp, mask: [B, T]; advantages: [B]; low, high: scalars > 0.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask, advantages], [2, 2, 2, 1])
  p, q = _probs(learner_logp, rollout_logp, mask)
  d = p - q
  positive = (jnp.asarray(advantages, jnp.float32) > 0)[:, None]
  keep = jnp.where(positive, d <= high, d >= -low).astype(jnp.float32)
  return finish(jnp.ones(jnp.shape(mask)[:-1]), keep, mask, None, length_edges)


def _masked_quantile(x: Array, mask: Array, q) -> Array:
  """Per-row q-quantile [B] of x [B, T] over the valid positions, linear interpolation between order
  statistics (torch.quantile's default): h = q (n - 1), x_(floor h) + (h - floor h)(x_(ceil h) - x_(floor h)).
  0 for a row without valid positions."""
  valid = jnp.asarray(mask) > 0
  n = jnp.sum(valid, axis=-1)
  xs = jnp.sort(jnp.where(valid, x, jnp.inf), axis=-1)
  h = q * jnp.maximum(n - 1, 0).astype(jnp.float32)
  lo = jnp.floor(h).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
  x_lo = jnp.take_along_axis(xs, lo[:, None], -1)[:, 0]
  x_hi = jnp.take_along_axis(xs, hi[:, None], -1)[:, 0]
  return jnp.where(n > 0, x_lo + (h - lo) * (x_hi - x_lo), 0.0)


def cppo(learner_logp: Array, rollout_logp: Array, mask: Array, advantages: Array, delta, w_min, delta_b,
         quantile, *, length_edges=None) -> Correction:
  """CPPO's Binary-TV prefix budget (UniRL, unirl/algorithms/cppo.py, `_cppo_mask`, which cites its paper's Eq. 8-11).

  Per sequence of length T, positions t = 1..T, D_t = |pi_prox(y_t) - pi_roll(y_t)| (Binary TV):
    w_t     = 1 - (1 - w_min) (t - 1) / max(T - 1, 1)              linear position weight, 1 -> w_min;
    Z_t     = w_t D_t;  S_{t-1} = sum_{s<t} Z_s;  W_{t-1} = sum_{s<t} w_s;
    b       = clip(Q_quantile(D_1..D_T), delta_b, 2 delta_b)       per-token budget, clamped to the row's
                                                                    90th percentile (linear interpolation);
    c_t     = min(delta, delta + b W_{t-1} - S_{t-1})              the prefix budget left at t;
    keep_t  = 1[A (r_t - 1) <= 0]  OR  1[Z_t <= c_t]               direction gate OR feasible,
  with r_t = pi_prox/pi_roll: a token whose ratio already moves against its advantage (toward the
  rollout) is always kept. No ratio clip: the source's loss is -keep_t A r_t (rl.loss="is"). The source
  recomputes the mask at every optimizer step with the current policy; here it is fixed at pi_prox, which is
  the same at the first (or only, fused) step. Defaults from the source: delta 0.2, w_min 0.8,
  delta_b 0.02, quantile 0.9.

  Args:
    learner_logp, rollout_logp, mask: [B, T] (valid tokens a prefix of each row, as responses are);
    advantages: [B]; delta, w_min, delta_b, quantile: scalars.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask, advantages], [2, 2, 2, 1])
  m = jnp.asarray(mask, jnp.float32)
  d = binary_tv(learner_logp, rollout_logp, mask)
  r = rho(log_rho(learner_logp, rollout_logp, mask))
  toward = jnp.asarray(advantages, jnp.float32)[:, None] * (r - 1.0) <= 0.0
  pos = jnp.cumsum(m, axis=-1)  # t = 1..T over the valid positions
  length = jnp.sum(m, axis=-1, keepdims=True)
  w = (1.0 - (1.0 - w_min) * (pos - 1.0) / jnp.maximum(length - 1.0, 1.0)) * m
  z = w * d
  s_prev, w_prev = jnp.cumsum(z, -1) - z, jnp.cumsum(w, -1) - w
  budget = jnp.clip(_masked_quantile(d, mask, quantile), delta_b, 2.0 * delta_b)
  c = jnp.minimum(delta, delta + budget[:, None] * w_prev - s_prev)
  keep = (toward | (z <= c)).astype(jnp.float32)
  gated = divergence.seq_mean((toward & (z > c)).astype(jnp.float32), mask)
  return finish(jnp.ones(jnp.shape(mask)[:-1]), keep, mask,
                dict(budget_mean=row_mean(budget, mask), gate_kept_frac=row_mean(gated, mask)), length_edges)
