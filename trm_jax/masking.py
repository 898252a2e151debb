"""Sequence masks and token weights: the TRM criteria, the name -> rule tables and the dispatch (paper Sec. 3).

Every criterion and baseline returns a `Correction` (mask_core.py):
  token_weight [B, T]  the final per-token multiplier for the loss. It already includes the response
                       mask, the sequence mask and any importance weight, so a loss multiplies its
                       per-token terms by it and nothing else;
  seq_mask [B]         1 for accepted sequences, 0 for rejected ones (M(x, y) of the paper);
  stats                dict of float32 scalars over rows with a valid token (padding rows excluded):
                       accept_rate, token_accept_rate, num_rejected and, when `length_edges` is given,
                       "accept_rate/len_<lo>_<hi>" (see accept_rate_by_length).
Weights and masks are stop-gradient'ed: they select and weight samples, they are not differentiated.

The tables: CRITERIA (trm.criterion) and BASELINES (baseline.kind) map a config name to a `Rule`: one
function `fn(inputs: CorrectionInputs, **params) -> Correction` and `params`, the map from fn's keywords
to the config fields (under trm.* for criteria, baseline.* for baselines) that hold their values. A new
method is one entry; config validation, dispatch and docs read these tables.

Composition rule (the one place it is decided; losses.py and rl.ratio_base follow it). `learner_logp` here
is pi_prox: the learner's log-probs at the PRE-update parameters (stop-gradient). Every correction factor
is applied exactly once:
  rl.ratio_base = "rollout": the surrogate's ratio is pi_theta/pi_roll (the paper's rho); the corrections
    may only mask (0/1 weights). The IS baselines (Rule.is_weight: tis, seq_is) are refused by config
    validation: their weight already carries pi/pi_roll, and multiplying it into a pi_theta/pi_roll ratio
    applies it twice.
  rl.ratio_base = "learner" (decoupled PPO): the surrogate's ratio is pi_theta/pi_prox and the token weight
    carries the rollout -> proximal IS weight pi_prox/pi_roll: min(rho, cap) per token for tis,
    min(prod_t rho_t, cap) per sequence for seq_is, and the untruncated rho (`proximal_weight`) for any
    other baseline. The gradient weight of token t is then A * w_t * r_t (unless PPO clips r_t), w_t the IS
    weight and r_t = pi_theta/pi_prox, which is 1 at the first optimizer step after the forward.
`compose` applies this rule.
"""
import dataclasses
from typing import Callable, Mapping

import chex
import jax.numpy as jnp

from trm_jax import bounds, divergence
from trm_jax.baselines import (binary_tv, cppo, dppo, geo_mask, proximal_weight, seq_tis, token_mask,
                               token_tis)
from trm_jax.mask_core import (Correction, CorrectionInputs, accept_rate_by_length, finish, log_rho,
                               none, rho, row_mean, stop)

Array = chex.Array

__all__ = [
    "BASELINES", "CRITERIA", "Correction", "CorrectionInputs", "IS_BASELINES", "Rule", "accept_rate_by_length",
    "apply_correction", "binary_tv", "compose", "cppo", "dppo", "geo_mask", "ln_trm", "none", "proximal_weight",
    "seq_tis", "ser", "token_mask", "token_tis", "trm_avg", "trm_max", "trm_max_avg",
]


# ----------------------------------------------------------------------------- TRM criteria


def trm_max(div: Array, mask: Array, delta, *, length_edges=None) -> Correction:
  """TRM-Max: M = 1[max_t div(c_t) <= delta] (paper Sec. 3). Feed exact kl (or k2, tv, tv_est).

  Args: div, mask [B, T]; delta scalar threshold (independent of T).
  """
  chex.assert_rank([div, mask], 2)
  (div,) = stop(div)
  m = divergence.seq_max(div, mask)
  return finish(m <= delta, jnp.ones_like(div), mask, dict(div_max_mean=row_mean(m, mask)), length_edges)


def trm_avg(div: Array, mask: Array, delta_avg, *, length_edges=None) -> Correction:
  """TRM-Avg: M = 1[(1/T) sum_t div(c_t) <= delta_avg] (paper Sec. 3). Feed exact kl (or k3).

  Args: div, mask [B, T]; delta_avg scalar.
  """
  chex.assert_rank([div, mask], 2)
  (div,) = stop(div)
  a = divergence.seq_mean(div, mask)
  return finish(a <= delta_avg, jnp.ones_like(div), mask, dict(div_avg_mean=row_mean(a, mask)), length_edges)


def trm_max_avg(div_max: Array, div_avg: Array, mask: Array, delta, delta_avg, *,
                length_edges=None) -> Correction:
  """Combined TRM: M = 1[max_t div_max <= delta] * 1[mean_t div_avg <= delta_avg] (paper Sec. 3).

  The divergences may differ (the co-released code uses k2 for the max and k3 for the average).
  Args: div_max, div_avg, mask [B, T]; delta, delta_avg scalars.
  """
  chex.assert_rank([div_max, div_avg, mask], 2)
  div_max, div_avg = stop(div_max, div_avg)
  m = divergence.seq_max(div_max, mask)
  a = divergence.seq_mean(div_avg, mask)
  return finish((m <= delta) & (a <= delta_avg), jnp.ones_like(div_max), mask,
                 dict(div_max_mean=row_mean(m, mask), div_avg_mean=row_mean(a, mask)), length_edges)


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
  r = rho(log_rho(learner_logp, rollout_logp, mask))
  lengths = jnp.sum(mask_f, axis=-1)
  w = bounds.ln_trm_weights(lengths, delta, eps, t_max=mask_f.shape[-1])
  score = (jnp.sum(jnp.abs(r - 1.0) * w * mask_f, axis=-1)
           / jnp.maximum(bounds.ln_trm_normaliser(lengths, delta, eps, t_max=mask_f.shape[-1]), 1e-12))
  return finish(score <= delta_w, jnp.ones_like(mask_f), mask, dict(ln_score_mean=row_mean(score, mask)),
                 length_edges)


def ser(learner_logp: Array, rollout_logp: Array, mask: Array, delta_ser, *,
        length_edges=None) -> Correction:
  """Sequence error ratio: M = 1[(1/T) sum_t |rho_t - 1| <= delta_ser] (paper Sec. 3; 0.03-0.10).

  Args: learner_logp, rollout_logp, mask [B, T]; delta_ser scalar.
  """
  chex.assert_rank([learner_logp, rollout_logp, mask], 2)
  r = rho(log_rho(learner_logp, rollout_logp, mask))
  s = divergence.seq_mean(jnp.abs(r - 1.0), mask)
  return finish(s <= delta_ser, jnp.ones_like(r), mask, dict(ser_mean=row_mean(s, mask)), length_edges)


# ----------------------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True)
class Rule:
  """One criterion or baseline: `fn(inputs, **params) -> Correction`; `params` maps each keyword of fn to
  the config field holding it (trm.<field> for CRITERIA, baseline.<field> for BASELINES); `is_weight`: the
  weight is an IS ratio pi_prox/pi_roll (needs rl.ratio_base="learner"); `needs_advantages`: the rule
  reads inputs.advantages (compute the advantages before it)."""
  fn: Callable[..., Correction]
  params: Mapping[str, str] = dataclasses.field(default_factory=dict)
  is_weight: bool = False
  needs_advantages: bool = False


def _estimators(x: CorrectionInputs) -> dict:
  return divergence.sampled_estimators(x.learner_logp, x.rollout_logp, x.mask)


def _div_max(x: CorrectionInputs) -> Array:
  """The max criteria's divergence: inputs.div, else the co-released code's sampled k2 (a heuristic)."""
  return x.div if x.div is not None else _estimators(x)["k2"]


def _div_avg(x: CorrectionInputs) -> Array:
  """The average criteria's divergence: inputs.div_avg, else inputs.div, else sampled k3 (unbiased)."""
  if x.div_avg is not None:
    return x.div_avg
  return x.div if x.div is not None else _estimators(x)["k3"]


def _max(x, *, delta):
  return trm_max(_div_max(x), x.mask, delta, length_edges=x.length_edges)


def _avg(x, *, delta_avg):
  return trm_avg(_div_avg(x), x.mask, delta_avg, length_edges=x.length_edges)


def _max_avg(x, *, delta, delta_avg):
  return trm_max_avg(_div_max(x), _div_avg(x), x.mask, delta, delta_avg, length_edges=x.length_edges)


def _tv(x, *, eps):
  """max_t TV <= eps on the exact TV (inputs.tv), else on tv_est = 1/2|rho - 1| (its rollout mean is TV)."""
  tv = x.tv if x.tv is not None else _estimators(x)["tv_est"]
  return trm_max(tv, x.mask, eps, length_edges=x.length_edges)


def _sampled(fn):
  """A rule for a function of (learner_logp, rollout_logp, mask, *params)."""
  def rule(x, **params):
    return fn(x.learner_logp, x.rollout_logp, x.mask, **params, length_edges=x.length_edges)
  return rule


def _with_advantages(fn):
  def rule(x, **params):
    if x.advantages is None:
      raise ValueError(f"{fn.__name__} needs CorrectionInputs.advantages")
    return fn(x.learner_logp, x.rollout_logp, x.mask, x.advantages, **params, length_edges=x.length_edges)
  return rule


_NONE = Rule(lambda x: none(x.mask, length_edges=x.length_edges))

CRITERIA = {
    "none": _NONE,
    "max": Rule(_max, {"delta": "delta"}),
    "avg": Rule(_avg, {"delta_avg": "delta_avg"}),
    "max_avg": Rule(_max_avg, {"delta": "delta", "delta_avg": "delta_avg"}),
    "tv": Rule(_tv, {"eps": "eps"}),
    "ln": Rule(_sampled(ln_trm), {"delta": "delta", "eps": "eps", "delta_w": "delta_w"}),
    "ser": Rule(_sampled(ser), {"delta_ser": "delta_ser"}),
}

BASELINES = {
    "none": _NONE,
    "tis": Rule(_sampled(token_tis), {"cap": "tis_cap"}, is_weight=True),
    "token_mask": Rule(_sampled(token_mask), {"low": "token_low", "high": "token_high"}),
    "seq_is": Rule(_sampled(seq_tis), {"cap": "seq_cap"}, is_weight=True),
    "geo_mask": Rule(_sampled(geo_mask), {"low": "geo_low", "high": "geo_high"}),
    "dppo": Rule(_with_advantages(dppo), {"low": "dppo_low", "high": "dppo_high"}, needs_advantages=True),
    "cppo": Rule(_with_advantages(cppo), {"delta": "cppo_delta", "w_min": "cppo_w_min",
                                          "delta_b": "cppo_delta_b", "quantile": "cppo_quantile"},
                 needs_advantages=True),
}

# Corrections whose weight is an IS ratio pi_prox/pi_roll (need rl.ratio_base="learner").
IS_BASELINES = tuple(name for name, rule in BASELINES.items() if rule.is_weight)


def _rule(name: str) -> Rule:
  if name in CRITERIA:
    return CRITERIA[name]
  if name in BASELINES:
    return BASELINES[name]
  raise ValueError(f"unknown correction {name!r}; expected a criterion {sorted(CRITERIA)} "
                   f"or a baseline {sorted(BASELINES)}")


def apply_correction(name: str, inputs: CorrectionInputs, **params) -> Correction:
  """Dispatches to a criterion (CRITERIA) or baseline (BASELINES) by its config name.

  Args:
    name: a key of CRITERIA or BASELINES ("none" is in both, the same rule).
    inputs: the arrays (see CorrectionInputs: which divergence each rule reads, and its fallback).
    **params: exactly the keywords of the rule (Rule.params' keys).
  """
  rule = _rule(name)
  missing = [k for k in rule.params if k not in params]
  extra = [k for k in params if k not in rule.params]
  if missing or extra:
    raise ValueError(f"correction {name!r} takes {tuple(rule.params)}; missing {missing}, unexpected {extra}")
  return rule.fn(inputs, **params)


def compose(criterion: str, baseline: str, inputs: CorrectionInputs, *, criterion_params: Mapping,
            baseline_params: Mapping, ratio_base: str = "rollout") -> Correction:
  """The TRM criterion composed with a baseline (weights and sequence masks multiply), plus the untruncated
  IS weight pi_prox/pi_roll under ratio_base="learner" unless the baseline is itself an IS weight (the
  composition rule of the module docstring). Statistics: the criterion's, and the baseline's under
  "baseline/<name>" (its per-length rates are not repeated)."""
  trm = apply_correction(criterion, inputs, **criterion_params)
  if ratio_base == "learner" and not BASELINES[baseline].is_weight:
    trm = trm.replace(token_weight=trm.token_weight * proximal_weight(inputs.learner_logp, inputs.rollout_logp,
                                                                      inputs.mask))
  if baseline == "none":
    return trm
  base = apply_correction(baseline, inputs, **baseline_params)
  stats = dict(trm.stats, **{f"baseline/{k}": v for k, v in base.stats.items() if "/" not in k})
  return Correction(token_weight=trm.token_weight * base.token_weight, seq_mask=trm.seq_mask * base.seq_mask,
                    stats=stats)
