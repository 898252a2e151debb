"""Sequence masks and token weights: TRM criteria and the off-policy correction baselines (paper Sec. 3).

Every criterion returns a `Correction`:
  token_weight [B, T]  the final per-token multiplier for the loss. It already includes the response
                       mask, the sequence mask and any importance weight, so a loss multiplies its
                       per-token terms by it and nothing else;
  seq_mask [B]         1 for accepted sequences, 0 for rejected ones (M(x, y) of the paper);
  stats                dict of float32 scalars: accept_rate (accepted / sequences with a valid token),
                       token_accept_rate (valid tokens with nonzero weight / valid tokens) and, when
                       `length_edges` is given, "accept_rate/len_<lo>_<hi>" (see accept_rate_by_length).
Weights and masks are stop-gradient'ed: they select and weight samples, they are not differentiated.

Composition rule (the one place it is decided; losses.py and rl.ratio_base follow it). `learner_logp` here
is pi_prox: the learner's log-probs at the PRE-update parameters (stop-gradient). Every correction factor
is applied exactly once:
  rl.ratio_base = "rollout": the surrogate's ratio is pi_theta/pi_roll (the paper's rho); the corrections
    may only mask (0/1 weights). The IS baselines tis / seq_is are refused by config.validate(): their
    weight already carries pi/pi_roll, and multiplying it into a pi_theta/pi_roll ratio applies it twice.
  rl.ratio_base = "learner" (decoupled PPO): the surrogate's ratio is pi_theta/pi_prox and the token weight
    carries the rollout -> proximal IS weight pi_prox/pi_roll: min(rho, cap) per token for tis,
    min(prod_t rho_t, cap) per sequence for seq_is, and the untruncated rho (`proximal_weight`) for any
    other baseline. The gradient weight of token t is then A * w_t * r_t (unless PPO clips r_t), w_t the IS
    weight and r_t = pi_theta/pi_prox, which is 1 at the first optimizer step after the forward.
"""
from typing import Optional, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp

from trm_jax import bounds, divergence

Array = chex.Array


@flax.struct.dataclass
class Correction:
  """Per-token loss weights [B, T], sequence mask [B] and scalar statistics."""
  token_weight: Array
  seq_mask: Array
  stats: dict


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


def _finish(seq_mask: Array, token_weight: Array, mask: Array, extra: Optional[dict] = None,
            length_edges: Optional[Sequence[int]] = None) -> Correction:
  """Folds the masks into token_weight, stops gradients and adds the common statistics."""
  mask = jnp.asarray(mask, jnp.float32)
  seq_mask = jax.lax.stop_gradient(jnp.asarray(seq_mask, jnp.float32))
  token_weight = jax.lax.stop_gradient(
      jnp.asarray(token_weight, jnp.float32) * mask * seq_mask[..., None])
  lengths = jnp.sum(mask, axis=-1)
  has = (lengths > 0).astype(jnp.float32)
  stats = dict(
      accept_rate=jnp.sum(seq_mask * has) / jnp.maximum(jnp.sum(has), 1.0),
      token_accept_rate=jnp.sum((token_weight != 0) * mask) / jnp.maximum(jnp.sum(mask), 1.0),
  )
  if length_edges is not None:
    stats.update({f"accept_rate/{k}": v for k, v in
                  accept_rate_by_length(seq_mask, lengths, length_edges).items()})
  stats.update({k: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)) for k, v in (extra or {}).items()})
  return Correction(token_weight=token_weight, seq_mask=seq_mask, stats=stats)


def _sg(*xs):
  return [jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)) for x in xs]


def _log_rho(learner_logp, rollout_logp, mask):
  learner_logp, rollout_logp = _sg(learner_logp, rollout_logp)
  # Masked positions may hold padding garbage (even -inf); zero them before any exp.
  return jnp.where(jnp.asarray(mask) > 0, learner_logp - rollout_logp, 0.0)


def _rho(log_rho):
  clip = divergence.LOG_RATIO_CLIP
  return jnp.exp(jnp.clip(log_rho, -clip, clip))


# ----------------------------------------------------------------------------- TRM criteria


def trm_max(div: Array, mask: Array, delta, *, length_edges=None) -> Correction:
  """TRM-Max: M = 1[max_t div(c_t) <= delta] (paper Sec. 3). Feed exact kl (or k2, tv, tv_est).

  Args: div, mask [B, T]; delta scalar threshold (independent of T).
  """
  chex.assert_rank([div, mask], 2)
  (div,) = _sg(div)
  m = divergence.seq_max(div, mask)
  return _finish(m <= delta, jnp.ones_like(div), mask, dict(div_max_mean=jnp.mean(m)), length_edges)


def trm_avg(div: Array, mask: Array, delta_avg, *, length_edges=None) -> Correction:
  """TRM-Avg: M = 1[(1/T) sum_t div(c_t) <= delta_avg] (paper Sec. 3). Feed exact kl (or k3).

  Args: div, mask [B, T]; delta_avg scalar.
  """
  chex.assert_rank([div, mask], 2)
  (div,) = _sg(div)
  a = divergence.seq_mean(div, mask)
  return _finish(a <= delta_avg, jnp.ones_like(div), mask, dict(div_avg_mean=jnp.mean(a)), length_edges)


def trm_max_avg(div_max: Array, div_avg: Array, mask: Array, delta, delta_avg, *,
                length_edges=None) -> Correction:
  """Combined TRM: M = 1[max_t div_max <= delta] * 1[mean_t div_avg <= delta_avg] (paper Sec. 3).

  The divergences may differ (the co-released code uses k2 for the max and k3 for the average).
  Args: div_max, div_avg, mask [B, T]; delta, delta_avg scalars.
  """
  chex.assert_rank([div_max, div_avg, mask], 2)
  div_max, div_avg = _sg(div_max, div_avg)
  m = divergence.seq_max(div_max, mask)
  a = divergence.seq_mean(div_avg, mask)
  return _finish((m <= delta) & (a <= delta_avg), jnp.ones_like(div_max), mask,
                 dict(div_max_mean=jnp.mean(m), div_avg_mean=jnp.mean(a)), length_edges)


def ln_trm(learner_logp: Array, rollout_logp: Array, mask: Array, delta, eps, delta_w, *,
           length_edges=None) -> Correction:
  """Length-neutral TRM: M = 1[W / Z(T) <= delta_w] (paper Sec. 3).

  W = sum_t |rho_t - 1| w_t, w_t = min(1, (T-t) eps, sqrt((T-t) delta/2)), Z(T) = sum_t w_t, with T the
  sequence's own length (sum of its mask; responses start at position 1). A length-1 sequence has
  Z = W = 0 and is accepted.

  Args: learner_logp, rollout_logp, mask [B, T] (sampled-token log-probs); delta, eps, delta_w scalars.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  mask_f = jnp.asarray(mask, jnp.float32)
  rho = _rho(_log_rho(learner_logp, rollout_logp, mask))
  lengths = jnp.sum(mask_f, axis=-1)
  w = bounds.ln_trm_weights(lengths, delta, eps, t_max=mask_f.shape[-1])
  score = (jnp.sum(jnp.abs(rho - 1.0) * w * mask_f, axis=-1)
           / jnp.maximum(bounds.ln_trm_normaliser(lengths, delta, eps, t_max=mask_f.shape[-1]), 1e-12))
  return _finish(score <= delta_w, jnp.ones_like(mask_f), mask, dict(ln_score_mean=jnp.mean(score)),
                 length_edges)


def ser(learner_logp: Array, rollout_logp: Array, mask: Array, delta_ser, *,
        length_edges=None) -> Correction:
  """Sequence error ratio: M = 1[(1/T) sum_t |rho_t - 1| <= delta_ser] (paper Sec. 3; 0.03-0.10).

  Args: learner_logp, rollout_logp, mask [B, T]; delta_ser scalar.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  rho = _rho(_log_rho(learner_logp, rollout_logp, mask))
  s = divergence.seq_mean(jnp.abs(rho - 1.0), mask)
  return _finish(s <= delta_ser, jnp.ones_like(rho), mask, dict(ser_mean=jnp.mean(s)), length_edges)


# ----------------------------------------------------------------------------- baselines


def none(mask: Array, *, length_edges=None) -> Correction:
  """No correction: every valid token has weight 1."""
  mask_f = jnp.asarray(mask, jnp.float32)
  return _finish(jnp.ones(mask_f.shape[:-1]), jnp.ones_like(mask_f), mask, None, length_edges)


IS_BASELINES = ("tis", "seq_is")  # corrections whose weight is an IS ratio pi_prox/pi_roll (need ratio_base=learner)


def proximal_weight(learner_logp: Array, rollout_logp: Array, mask: Array) -> Array:
  """Untruncated rollout -> proximal IS weight rho_t = pi_prox / pi_roll [B, T] (decoupled PPO), 0 off mask.

  The log-ratio is clipped at +-LOG_RATIO_CLIP before exp so it stays finite.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  w = _rho(_log_rho(learner_logp, rollout_logp, mask))
  return jax.lax.stop_gradient(jnp.where(jnp.asarray(mask) > 0, w, 0.0))


def token_tis(learner_logp: Array, rollout_logp: Array, mask: Array, cap, *,
              length_edges=None) -> Correction:
  """Token-level truncated IS: token weight min(rho_t, cap), rho_t = pi_prox / pi_roll (stop-gradient).

  pi_prox = learner_logp (pre-update). Use with a surrogate whose ratio is pi_theta/pi_prox
  (rl.ratio_base="learner"; see the module docstring), never pi_theta/pi_roll.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  rho = _rho(_log_rho(learner_logp, rollout_logp, mask))
  w = jnp.minimum(rho, cap)
  return _finish(jnp.ones(rho.shape[:-1]), w, mask,
                 dict(truncated_frac=divergence.seq_mean((rho > cap).astype(jnp.float32), mask).mean()),
                 length_edges)


def token_mask(learner_logp: Array, rollout_logp: Array, mask: Array, low, high, *,
               length_edges=None) -> Correction:
  """Token masking (IcePop / MIS): weight 1[low <= rho_t <= high]; the sequence itself is kept.

  Note (paper Sec. 2): zeroing tokens does not change delta, so it gives no guarantee.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  rho = _rho(_log_rho(learner_logp, rollout_logp, mask))
  keep = ((rho >= low) & (rho <= high)).astype(jnp.float32)
  return _finish(jnp.ones(rho.shape[:-1]), keep, mask, None, length_edges)


def seq_tis(learner_logp: Array, rollout_logp: Array, mask: Array, cap, *,
            length_edges=None) -> Correction:
  """Sequence-level truncated IS: every token of sequence i gets min(prod_t rho_t, cap), rho_t = pi_prox/pi_roll.

  As token_tis: pair it with the ratio pi_theta/pi_prox (rl.ratio_base="learner").

  The product is formed in log space, exp(min(sum_t log rho_t, log cap)), so it never overflows.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  log_w = divergence.seq_sum(_log_rho(learner_logp, rollout_logp, mask), mask)
  w = jnp.exp(jnp.minimum(log_w, jnp.log(jnp.asarray(cap, jnp.float32))))
  return _finish(jnp.ones_like(w), jnp.broadcast_to(w[..., None], jnp.shape(mask)), mask,
                 dict(seq_weight_mean=jnp.mean(w)), length_edges)


def geo_mask(learner_logp: Array, rollout_logp: Array, mask: Array, low, high, *,
             length_edges=None) -> Correction:
  """Geometric-mean sequence mask: M = 1[low <= exp((1/T) sum_t log rho_t) <= high]."""
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  geo = jnp.exp(divergence.seq_mean(_log_rho(learner_logp, rollout_logp, mask), mask))
  return _finish((geo >= low) & (geo <= high), jnp.ones(jnp.shape(mask)), mask,
                 dict(geo_ratio_mean=jnp.mean(geo)), length_edges)


# ----------------------------------------------------------------------------- dispatch

# name -> required threshold keyword names (optional ones listed separately).
THRESHOLDS = {
    "none": (), "max": ("delta",), "avg": ("delta_avg",), "max_avg": ("delta", "delta_avg"),
    "tv": ("eps",), "ln": ("delta", "eps", "delta_w"), "ser": ("delta_ser",), "tis": ("cap",),
    "token_mask": ("low", "high"), "seq_is": ("cap",), "geo_mask": ("low", "high"),
}
_OPTIONAL = {"tv": ("eps_avg",)}


def apply_correction(name: str, *, mask: Array, learner_logp: Array, rollout_logp: Array,
                     div: Optional[Array] = None, div_avg: Optional[Array] = None,
                     length_edges: Optional[Sequence[int]] = None, **thresholds) -> Correction:
  """Dispatches to a criterion by its config name (see THRESHOLDS for each name's keywords).

  max|avg|max_avg use `div` (max) and `div_avg` (average); give the exact per-position kl for the
  paper's criterion. When `div` is None they fall back to the sampled estimators of the co-released
  code: k2 for the max, k3 for the average (heuristics: the guarantee needs exact KL). With `div` given
  and `div_avg` None, max_avg uses `div` for both. tv uses `div` (exact tv) or else tv_est = 1/2|rho-1|,
  threshold eps on the max and optionally eps_avg on the average.

  Args:
    name: none|max|avg|max_avg|tv|ln|ser|tis|token_mask|seq_is|geo_mask.
    mask, learner_logp, rollout_logp: [B, T] response mask and sampled-token log-probs.
    div, div_avg: optional [B, T] per-position divergences.
    length_edges: optional static bucket edges for accept_rate/len_<lo>_<hi> statistics.
    **thresholds: exactly the keywords THRESHOLDS[name] (+ optional ones).
  """
  if name not in THRESHOLDS:
    raise ValueError(f"unknown correction {name!r}; expected one of {sorted(THRESHOLDS)}")
  required, optional = THRESHOLDS[name], _OPTIONAL.get(name, ())
  missing = [k for k in required if k not in thresholds]
  extra = [k for k in thresholds if k not in required + optional]
  if missing or extra:
    raise ValueError(f"correction {name!r} takes thresholds {required + optional}; "
                     f"missing {missing}, unexpected {extra}")
  kw = dict(length_edges=length_edges)
  lp, rp = learner_logp, rollout_logp
  if name in ("max", "avg", "max_avg", "tv"):
    est = divergence.sampled_estimators(lp, rp, mask)
  if name == "none":
    return none(mask, **kw)
  if name == "max":
    return trm_max(est["k2"] if div is None else div, mask, thresholds["delta"], **kw)
  if name == "avg":
    d = div_avg if div_avg is not None else (est["k3"] if div is None else div)
    return trm_avg(d, mask, thresholds["delta_avg"], **kw)
  if name == "max_avg":
    d_max = est["k2"] if div is None else div
    d_avg = div_avg if div_avg is not None else (est["k3"] if div is None else div)
    return trm_max_avg(d_max, d_avg, mask, thresholds["delta"], thresholds["delta_avg"], **kw)
  if name == "tv":
    d = est["tv_est"] if div is None else div
    if "eps_avg" in thresholds:
      d_avg = div_avg if div_avg is not None else d
      return trm_max_avg(d, d_avg, mask, thresholds["eps"], thresholds["eps_avg"], **kw)
    return trm_max(d, mask, thresholds["eps"], **kw)
  if name == "ln":
    return ln_trm(lp, rp, mask, thresholds["delta"], thresholds["eps"], thresholds["delta_w"], **kw)
  if name == "ser":
    return ser(lp, rp, mask, thresholds["delta_ser"], **kw)
  if name == "tis":
    return token_tis(lp, rp, mask, thresholds["cap"], **kw)
  if name == "token_mask":
    return token_mask(lp, rp, mask, thresholds["low"], thresholds["high"], **kw)
  if name == "seq_is":
    return seq_tis(lp, rp, mask, thresholds["cap"], **kw)
  return geo_mask(lp, rp, mask, thresholds["low"], thresholds["high"], **kw)
