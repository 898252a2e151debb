"""The batch certificate the learner logs: plug-in estimates of the paper's bounds, before and after the
update (paper Sec. 2-3). Pure functions of arrays; the learner calls them.

    source_flags(source, has_exact) -> {mismatch/source, mismatch/exact, bounds/exact, bounds/plugin_valid}
    batch_certificate(learner_logp, rollout_logp, mask, *, kl, tv, source, reward_range, surrogate)
        -> bounds.certificate's dict (statistics, every bound, dbar [L])
    certificate_metrics(learner_logp, rollout_logp, mask, *, kl, tv, source, reward_range)
        -> flags + bounds/<name> for every scalar of batch_certificate       (pre-update, pi_prox vs pi_roll)
    post_update_metrics(learner_logp, rollout_logp, rewards, mask, seq_mask, *, kl, tv, source, reward_range)
        -> bounds/certified_improvement, bounds/post/*, bounds/accepted/*     (updated theta' vs pi_roll)

What the numbers are. The paper's bound needs delta = max_t KL(c_t) and eps = max_t TV(c_t) over EVERY
reachable context, kl_seq and Dbar_t as expectations under pi_roll, and T the horizon. From a batch we have
sample maxima over the sampled contexts (lower bounds of delta, eps), sample means (unbiased for kl_seq and
Dbar_t) and the longest response in the batch. So every `bounds/<name>` is a PLUG-IN ESTIMATE of the
bound, not the bound: it can be smaller than the true bound (a context never sampled can carry a larger
divergence; paper Proposition: no average certifies a maximum). `bounds/plugin_valid` = 1 says only that
the per-position divergences the plug-in uses are exact or upper bounds (stored / recompute: exact; top-k:
the TV upper bound, B* = min(Coupling, Mixed-TV, Adaptive-TV)); 0 for the sampled estimators k3 and
1/2|rho - 1|, whose plug-in is a heuristic twice over.

Top-p / top-k rollouts: the exact divergences are between the rollout's truncated distribution and the
learner restricted (renormalised) to the rollout's kept set, so the certificate is about THAT restricted
learner, the policy the surrogate's ratio uses, not the untruncated learner.

The rewards' range: every bound is scaled by hi - lo of `reward_range` (bounds.py module docstring; the
paper's R in [0, 1] is the default). Pass the reward function's a-priori range, not the batch's.

bounds/certified_improvement (whole batch, updated theta'): L'hat - B*hat with
  L'hat = (1/N) sum_i R_i sum_t (rho'_t - 1), rho'_t = pi_theta'(y_t) / pi_roll(y_t), N = rows with a token,
  an unbiased estimate of L'(theta') = E_roll[R sum_t (rho'_t - 1)] with variance Var_roll[R sum_t
  (rho'_t - 1)] / N (its standard error is logged as bounds/post/surrogate_se), and B*hat the plug-in of
  B*(theta' vs pi_roll). A positive value licenses J(theta') > J(pi_roll) only if the plug-in statistics
  are the true ones and the sampling error of L'hat is negligible: L'hat - 2 surrogate_se - B*hat > 0 is
  the stricter reading. It is not a high-probability certificate.
bounds/accepted/selected_margin (was bounds/accepted/certified_improvement): the same difference on the
  rows the mask accepted. The rows are selected by the statistics it then reports (their max KL is <= delta
  by construction) and the surrogate over a selected subset is not L' of any policy pair the theorem
  covers, so it is a HEURISTIC margin: its sign says nothing about J (a 200-step CPU run had 4,542 of
  10,852 positive values with J going down). The other bounds/accepted/* are descriptive statistics of the
  selected rows.
"""
from typing import Optional

import chex
import jax.numpy as jnp

from trm_jax import bounds, divergence

Array = chex.Array

# trm.source names; mismatch/source logs the index.
SOURCES = ("sampled", "stored", "topk", "recompute")
# The statistics logged for the post-update and accepted-row certificates.
CERT_STATS = ("delta", "eps", "kl_seq", "tv_seq", "unified")


def source_flags(source: str, has_exact: bool) -> dict:
  """mismatch/source = index of `source` in SOURCES; mismatch/exact = bounds/exact = 1 iff the per-position
  divergences are the exact full-vocabulary values (stored, recompute); bounds/plugin_valid = 1 iff the
  plug-in B* is built from exact or upper-bounding per-position divergences (exact sources, top-k's TV
  upper bound). Static per config (python floats become float32 scalars)."""
  if source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  exact = bool(has_exact) and source in ("stored", "recompute")
  return {"mismatch/source": jnp.float32(SOURCES.index(source)),
          "mismatch/exact": jnp.float32(exact), "bounds/exact": jnp.float32(exact),
          "bounds/plugin_valid": jnp.float32(exact or (bool(has_exact) and source == "topk"))}


def batch_certificate(learner_logp: Array, rollout_logp: Array, mask: Array, *, kl: Optional[Array] = None,
                      tv: Optional[Array] = None, source: str, reward_range=(0.0, 1.0),
                      surrogate: Optional[Array] = None) -> dict:
  """bounds.certificate of one batch (plug-in estimates, module docstring), from the divergences at hand.

  Exact kl / tv (stored, recompute): the paper's statistics. top-k: only its TV upper bound counts (its kl
  is a lower bound): tv_only, B* = bounds.unified_tv. Sampled (kl = tv = None): the estimators k3 and
  1/2|rho - 1| of the sampled tokens stand in (bounds/plugin_valid = 0).

  Args:
    learner_logp, rollout_logp: [B, L] sampled-token log-probs (used only for the sampled stand-ins).
    mask: [B, L] valid response positions (rows without one are padding and do not count).
    kl, tv: optional [B, L] per-position divergences of the rollout side.
    source: one of SOURCES.
    reward_range: (lo, hi) of the reward; every bound is scaled by hi - lo.
    surrogate: optional scalar L'hat; adds certified_improvement = surrogate - unified.
  """
  if source == "topk" and tv is not None:
    return bounds.certificate(None, tv, mask, surrogate=surrogate, tv_only=True, reward_range=reward_range)
  if kl is None or tv is None:
    est = divergence.sampled_estimators(learner_logp, rollout_logp, mask)
    kl, tv = est["k3"], est["tv_est"]
  return bounds.certificate(kl, tv, mask, surrogate=surrogate, reward_range=reward_range)


def certificate_metrics(learner_logp: Array, rollout_logp: Array, mask: Array, *, kl: Optional[Array] = None,
                        tv: Optional[Array] = None, source: str, reward_range=(0.0, 1.0)) -> dict:
  """The pre-update metrics: source_flags and bounds/<name> for every scalar of batch_certificate
  (delta, eps, kl_seq, tv_seq, T, every bound, unified; dbar_t is a curve and is not logged)."""
  cert = batch_certificate(learner_logp, rollout_logp, mask, kl=kl, tv=tv, source=source,
                           reward_range=reward_range)
  out = source_flags(source, kl is not None or tv is not None)
  out.update({f"bounds/{k}": v for k, v in cert.items() if jnp.ndim(v) == 0})
  return out


def surrogate_estimate(learner_logp: Array, rollout_logp: Array, rewards: Array, mask: Array,
                       rows: Array) -> tuple:
  """L'hat = (1/N) sum_{i in rows} R_i sum_t (rho_t - 1) and its standard error sqrt(s^2 / N), s^2 the
  unbiased sample variance of the per-row terms; N = sum(rows) (paper Sec. 1: L' = E_roll[R sum_t (rho_t - 1)]).

  Args: learner_logp, rollout_logp, mask [B, L]; rewards [B]; rows [B] 0/1 rows that count.
  Returns: (L'hat, standard error, N), float32 scalars; 0 for an empty selection.
  """
  clip = divergence.LOG_RATIO_CLIP
  lr = jnp.asarray(learner_logp, jnp.float32) - jnp.asarray(rollout_logp, jnp.float32)
  rho_m1 = jnp.where(jnp.asarray(mask) > 0, jnp.expm1(jnp.clip(lr, -clip, clip)), 0.0)
  per_row = jnp.asarray(rewards, jnp.float32) * jnp.sum(rho_m1, axis=-1)
  rows = jnp.asarray(rows, jnp.float32)
  n = jnp.sum(rows)
  mean = jnp.sum(rows * per_row) / jnp.maximum(n, 1.0)
  var = jnp.sum(rows * jnp.square(per_row - mean)) / jnp.maximum(n - 1.0, 1.0)
  return mean, jnp.sqrt(var / jnp.maximum(n, 1.0)), n


def post_update_metrics(learner_logp: Array, rollout_logp: Array, rewards: Array, mask: Array, seq_mask: Array,
                        *, kl: Optional[Array] = None, tv: Optional[Array] = None, source: str,
                        reward_range=(0.0, 1.0)) -> dict:
  """The certificate of the UPDATED policy theta' on the batch (module docstring for what each number is).

  Args:
    learner_logp: [B, L] log pi_theta'(y_t) of the updated policy; rollout_logp: [B, L] log pi_roll(y_t).
    rewards: [B] R_i (the reward itself, in reward_range); mask: [B, L]; seq_mask: [B] rows TRM accepted.
    kl, tv: optional [B, L] divergences of theta' vs the rollout side; source, reward_range: as above.

  Returns:
    bounds/certified_improvement, bounds/post/{delta,eps,kl_seq,tv_seq,unified,surrogate,surrogate_se,
    num_sequences} over all rows with a token; bounds/accepted/{the same} and bounds/accepted/selected_margin
    over the accepted ones (keys of CERT_STATS missing for top-k: delta, kl_seq).
  """
  mask = jnp.asarray(mask, jnp.float32)
  rows = (jnp.sum(mask, -1) > 0).astype(jnp.float32)
  out = {}
  for name, keep in (("post", rows), ("accepted", rows * (jnp.asarray(seq_mask) > 0))):
    surrogate, se, n = surrogate_estimate(learner_logp, rollout_logp, rewards, mask, keep)
    sub = mask * keep[:, None]
    cert = batch_certificate(learner_logp, rollout_logp, sub, kl=kl, tv=tv, source=source,
                             reward_range=reward_range, surrogate=surrogate)
    out.update({f"bounds/{name}/{k}": cert[k] for k in CERT_STATS if k in cert})
    out.update({f"bounds/{name}/surrogate": surrogate, f"bounds/{name}/surrogate_se": se,
                f"bounds/{name}/num_sequences": n})
    margin = cert["certified_improvement"]
    out["bounds/certified_improvement" if name == "post" else "bounds/accepted/selected_margin"] = margin
  return out
