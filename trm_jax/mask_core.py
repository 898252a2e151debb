"""What every mask and weight shares: the `Correction` it returns, the `CorrectionInputs` it reads, and
the finishing step that folds the masks into the token weight and computes the statistics (paper Sec. 3).

masking.py (the TRM criteria, the tables and the dispatch) and baselines.py (IS / token / geo / DPPO /
CPPO) both build on this module; it imports neither.
"""
from typing import Optional, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp

from trm_jax import divergence

Array = chex.Array


@flax.struct.dataclass
class Correction:
  """Per-token loss weights [B, T], sequence mask [B] and scalar statistics."""
  token_weight: Array
  seq_mask: Array
  stats: dict


@flax.struct.dataclass
class CorrectionInputs:
  """Everything a criterion or baseline may read, as one pytree (a rule takes what it needs).

  mask:          [B, T] valid response positions.
  learner_logp:  [B, T] pi_prox(y_t), the learner's sampled-token log-probs at the PRE-update parameters
                 (stop-gradient; the rules stop it again).
  rollout_logp:  [B, T] pi_roll(y_t).
  div:           optional [B, T] per-position divergence of the max criteria (trm.divergence: the exact
                 KL(roll||theta) for the paper's criterion); None -> the sampled fallback k2.
  div_avg:       optional [B, T] divergence of the average criteria (trm.divergence_avg); None -> div,
                 else k3.
  tv:            optional [B, T] exact TV per position (criterion "tv"); None -> tv_est = 1/2|rho - 1|.
  advantages:    optional [B] advantages (DPPO's and CPPO's direction gates need them).
  length_edges:  static bucket edges for accept_rate/len_<lo>_<hi>, or None.
  """
  mask: Array
  learner_logp: Array
  rollout_logp: Array
  div: Optional[Array] = None
  div_avg: Optional[Array] = None
  tv: Optional[Array] = None
  advantages: Optional[Array] = None
  length_edges: Optional[tuple] = flax.struct.field(pytree_node=False, default=None)


def rows_with_tokens(mask: Array) -> Array:
  """[B] float32: 1 for rows with at least one valid token, 0 for padding rows."""
  return (jnp.sum(jnp.asarray(mask, jnp.float32), axis=-1) > 0).astype(jnp.float32)


def row_mean(x: Array, mask: Array) -> Array:
  """Mean of the per-row values x [B] over rows with a valid token (padding rows excluded); 0 if none."""
  has = rows_with_tokens(mask)
  return jnp.sum(jnp.where(has > 0, jnp.asarray(x, jnp.float32), 0.0)) / jnp.maximum(jnp.sum(has), 1.0)


def accept_rate_by_length(seq_mask: Array, lengths: Array, edges: Sequence[int]) -> dict:
  """Acceptance rate per response-length bucket [lo, hi) (paper Sec. 3: long answers are rejected more).

  Keys are "len_<lo>_<hi>" for consecutive edges (static, so jit-safe). A bucket with no sequence of
  length >= 1 gets -1.0 (a NaN-free sentinel: jit needs the key to exist). Lengths outside every
  bucket are not counted.

  Args:
    seq_mask: [B] 0/1 acceptance.
    lengths: [B] number of valid response tokens; length 0 rows (padding) are ignored.
    edges: increasing python ints.
  """
  seq_mask = jnp.asarray(seq_mask, jnp.float32)
  lengths = jnp.asarray(lengths, jnp.float32)
  out = {}
  for lo, hi in zip(edges[:-1], edges[1:]):
    inside = ((lengths >= lo) & (lengths < hi) & (lengths > 0)).astype(jnp.float32)
    n = jnp.sum(inside)
    out[f"len_{lo}_{hi}"] = jnp.where(n > 0, jnp.sum(seq_mask * inside) / jnp.maximum(n, 1.0), -1.0)
  return out


def finish(seq_mask: Array, token_weight: Array, mask: Array, extra: Optional[dict] = None,
           length_edges: Optional[Sequence[int]] = None) -> Correction:
  """Folds the masks into token_weight, stops gradients and adds the common statistics.

  Every rate counts only rows with a valid token (padding rows are not sequences):
    accept_rate       = accepted rows / rows with a token;
    token_accept_rate = valid tokens with nonzero weight / valid tokens;
    num_rejected      = rows with a token that the sequence mask rejects;
    accept_rate/len_<lo>_<hi> (when length_edges is given).
  `extra` per-row statistics are the caller's; pass them through `row_mean`.
  """
  mask = jnp.asarray(mask, jnp.float32)
  seq_mask = jax.lax.stop_gradient(jnp.asarray(seq_mask, jnp.float32))
  token_weight = jax.lax.stop_gradient(
      jnp.asarray(token_weight, jnp.float32) * mask * seq_mask[..., None])
  lengths = jnp.sum(mask, axis=-1)
  has = rows_with_tokens(mask)
  stats = dict(
      accept_rate=jnp.sum(seq_mask * has) / jnp.maximum(jnp.sum(has), 1.0),
      token_accept_rate=jnp.sum((token_weight != 0) * mask) / jnp.maximum(jnp.sum(mask), 1.0),
      num_rejected=jnp.sum((1.0 - seq_mask) * has),
  )
  if length_edges is not None:
    stats.update({f"accept_rate/{k}": v for k, v in
                  accept_rate_by_length(seq_mask, lengths, length_edges).items()})
  stats.update({k: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)) for k, v in (extra or {}).items()})
  return Correction(token_weight=token_weight, seq_mask=seq_mask, stats=stats)


def stop(*xs):
  """float32 stop-gradient copies (masks and weights select samples; they are not differentiated)."""
  return [jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)) for x in xs]


def log_rho(learner_logp, rollout_logp, mask):
  """log rho_t = log pi_prox - log pi_roll [B, T] (stop-gradient), 0 off the mask."""
  learner_logp, rollout_logp = stop(learner_logp, rollout_logp)
  # Masked positions may hold padding garbage (even -inf); zero them before any exp.
  return jnp.where(jnp.asarray(mask) > 0, learner_logp - rollout_logp, 0.0)


def rho(log_ratio):
  """exp of a log ratio clipped at +-LOG_RATIO_CLIP, so it stays finite."""
  clip = divergence.LOG_RATIO_CLIP
  return jnp.exp(jnp.clip(log_ratio, -clip, clip))


def none(mask: Array, *, length_edges=None) -> Correction:
  """No correction: every valid token has weight 1."""
  mask_f = jnp.asarray(mask, jnp.float32)
  return finish(jnp.ones(mask_f.shape[:-1]), jnp.ones_like(mask_f), mask, None, length_edges)
