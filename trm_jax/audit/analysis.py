"""From per-token statistics of a dump to TRM's answers: estimators, per-sequence divergences, masks, bounds.

Everything here composes the project's paper modules on [N, T] arrays of the whole dump (N audited rows):
`divergence.sampled_estimators` / `seq_max` / `seq_mean` / `log_ppl_gap`, the criteria of `masking`
(TRM-Max, TRM-Avg, the TV criterion = TRM-Max on TV, LN-TRM, SER) and `bounds.certificate`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import bounds, divergence, masking

EXACT = ("stored", "recompute")  # sources whose kl / tv are the exact full-vocabulary divergences


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """The grids the decisions are taken on (defaults: the paper's values and their loose twins)."""
  deltas: tuple = (0.05, 0.1)  # TRM-Max on max_t k2 (and on max_t KL when the dump gives KL)
  delta_avgs: tuple = (0.001, 0.002)  # TRM-Avg on mean_t KL (exact sources) or k3
  eps: tuple = (0.05, 0.1)  # TV criterion on max_t TV (exact / top-k upper bound) or tv_est
  delta_ws: tuple = (0.05,)  # LN-TRM on W/Z, with the trust region (deltas[0], eps[0])
  delta_sers: tuple = (0.03, 0.05, 0.1)  # SER on mean_t |rho - 1|
  length_buckets: tuple = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def key(x: float) -> str:
  """A threshold as a JSON key: 0.05 -> "0.05"."""
  return f"{x:g}"


def estimators(p: dict) -> dict:
  """k1, k2, k3, |log rho|, tv_est per position ([N, T]) from the learner's and the sampler's log-probs."""
  return divergence.sampled_estimators(p["learner_logp"], p["rollout_logp"], p["mask"])


def token_mean(x, mask) -> float:
  return float(jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0))


def sequence_stats(p: dict, est: dict, source: str) -> dict:
  """Per-sequence [N] numpy statistics: length, max / mean divergences, PPL gap (and the source's extras)."""
  m = p["mask"]
  out = dict(length=jnp.sum(m, -1), log_ratio_abs_max=divergence.seq_max(est["abs_log_ratio"], m),
             log_ratio_abs_mean=divergence.seq_mean(est["abs_log_ratio"], m),
             k1_mean=divergence.seq_mean(est["k1"], m), k2_max=divergence.seq_max(est["k2"], m),
             k3_mean=divergence.seq_mean(est["k3"], m), k3_max=divergence.seq_max(est["k3"], m),
             tv_est_max=divergence.seq_max(est["tv_est"], m),
             ppl_gap=jnp.abs(divergence.seq_mean(est["k1"], m)))  # |mean_t log rho_t|, paper Sec. 4
  if source != "sampled":
    out.update(kl_max=divergence.seq_max(p["kl"], m), kl_mean=divergence.seq_mean(p["kl"], m),
               tv_max=divergence.seq_max(p["tv"], m), tv_mean=divergence.seq_mean(p["tv"], m))
  if source == "topk":
    out["tv_lower_max"] = divergence.seq_max(p["tv_lower"], m)
  if source == "recompute":  # how well the backend reproduces the real engine's log-probs
    gap = jnp.abs(p["rollout_logp_recomputed"] - p["rollout_logp"])
    out["recompute_log_ratio_abs_mean"] = divergence.seq_mean(gap, m)
  return {k: np.asarray(v) for k, v in out.items()}


def _criteria(p: dict, est: dict, source: str, th: Thresholds):
  """(name, threshold, fn(length_edges) -> Correction) for every decision of the audit."""
  m, lrn, roll = p["mask"], p["learner_logp"], p["rollout_logp"]
  avg_div = p["kl"] if source in EXACT else est["k3"]
  tv = est["tv_est"] if source == "sampled" else p["tv"]
  out = [("max_k2", d, lambda e, d=d: masking.trm_max(est["k2"], m, d, length_edges=e)) for d in th.deltas]
  if source != "sampled":  # exact KL, or the top-k lower bound (a heuristic there, see divergence.topk_divergences)
    out += [("max_kl", d, lambda e, d=d: masking.trm_max(p["kl"], m, d, length_edges=e)) for d in th.deltas]
  out += [("avg", d, lambda e, d=d: masking.trm_avg(avg_div, m, d, length_edges=e)) for d in th.delta_avgs]
  out += [("tv", x, lambda e, x=x: masking.trm_max(tv, m, x, length_edges=e)) for x in th.eps]
  out += [("ln", w, lambda e, w=w: masking.ln_trm(lrn, roll, m, th.deltas[0], th.eps[0], w, length_edges=e))
          for w in th.delta_ws]
  out += [("ser", s, lambda e, s=s: masking.ser(lrn, roll, m, s, length_edges=e)) for s in th.delta_sers]
  return out


def decisions(p: dict, est: dict, source: str, th: Thresholds):
  """Accept flags per sequence, acceptance rates and acceptance by length bucket for every criterion.

  Returns (flags {"accept_<criterion>@<threshold>": [N] bool}, rates {criterion: {threshold: rate}},
  by_length {criterion: {threshold: {"len_<lo>_<hi>": rate}}}; buckets without a sequence are left out).
  """
  flags, rates, by_length = {}, {}, {}
  for name, thr, fn in _criteria(p, est, source, th):
    c = fn(tuple(th.length_buckets))
    flags[f"accept_{name}@{key(thr)}"] = np.asarray(c.seq_mask) > 0
    rates.setdefault(name, {})[key(thr)] = float(c.stats["accept_rate"])
    by_length.setdefault(name, {})[key(thr)] = {
        k.split("/", 1)[1]: float(v) for k, v in c.stats.items() if k.startswith("accept_rate/") and v >= 0}
  return flags, rates, by_length


def _certificate_inputs(p: dict, est: dict, source: str):
  """(kl, tv, tv_only, valid): exact sources are certificates; top-k keeps only the TV-supported bounds; the
  sampled source uses the stand-ins k3 / tv_est (an estimate, not an upper bound)."""
  if source in EXACT:
    return p["kl"], p["tv"], False, True
  if source == "topk":
    return None, p["tv"], True, True
  return est["k3"], est["tv_est"], False, False


def _tightest(values: dict, names) -> str:
  members = [n for n in names if n != "unified" and n in values]
  return min(members, key=lambda n: float(values[n]))


def bound_table(p: dict, est: dict, source: str) -> dict:
  """The dump's certificate: delta, eps, kl_seq, tv_seq, T, every bound, B* and which bound is tightest."""
  kl, tv, tv_only, valid = _certificate_inputs(p, est, source)
  cert = bounds.certificate(kl, tv, p["mask"], tv_only=tv_only)
  names = bounds.TV_BOUND_NAMES if tv_only else bounds.BOUND_NAMES
  out = {k: float(v) for k, v in cert.items() if k != "dbar"}
  out.update(tightest=_tightest(out, names), valid=valid, tv_only=tv_only)
  return out


def per_sequence_bounds(p: dict, est: dict, source: str) -> dict:
  """B* and its tightest member for each sequence alone (its own T, delta, eps, kl_seq): [N] arrays."""
  kl, tv, tv_only, _ = _certificate_inputs(p, est, source)
  names = bounds.TV_BOUND_NAMES if tv_only else bounds.BOUND_NAMES
  members = [n for n in names if n != "unified"]

  def one(kl_i, tv_i, m_i):
    c = bounds.certificate(None if tv_only else kl_i[None], tv_i[None], m_i[None], tv_only=tv_only)
    return c["unified"], jnp.stack([c[n] for n in members])

  kl = jnp.zeros_like(tv) if kl is None else kl
  unified, table = jax.jit(jax.vmap(one))(kl, tv, p["mask"])
  return {"bound_unified": np.asarray(unified),
          "bound_tightest": np.asarray(members)[np.argmin(np.asarray(table), axis=1)]}


def bound_curve(table: dict, t_max: int, points: int = 64) -> dict:
  """Each bound as a function of the horizon T at the dump's token maxima delta, eps (worst case in T:
  kl_seq = T delta, tv_seq = min(1, T eps), dbar_t = min(1, eps, sqrt(delta/2)) inside B*)."""
  T = np.unique(np.geomspace(1, max(t_max, 2), points).round().astype(np.int64))
  t, eps = jnp.asarray(T, jnp.float32), table["eps"]
  out = {"T": T.tolist(), "coupling": bounds.coupling(t, eps, t_max=int(T[-1])), "linear": bounds.linear(t, eps),
         "classical_tv": bounds.classical_tv(t, eps)}
  if not table["tv_only"]:
    delta = table["delta"]
    out.update(classical_kl=bounds.classical_kl(t, delta),
               pinsker_marginal_kl=bounds.pinsker_marginal_kl(t, delta, t_max=int(T[-1])),
               pinsker_marginal_tv=bounds.pinsker_marginal_tv(t, delta, eps, t_max=int(T[-1])),
               unified=bounds.unified(t, delta, eps, t * delta, jnp.minimum(1.0, t * eps), t_max=int(T[-1])))
  return {k: v if k == "T" else np.asarray(v, np.float64).tolist() for k, v in out.items()}


def summary_numbers(p: dict, est: dict, source: str) -> dict:
  """Token means of the dump and its PPL gap (the headline numbers of summary.json)."""
  m = p["mask"]
  out = {"tokens": int(jnp.sum(m)), "log_ratio_abs_mean": token_mean(est["abs_log_ratio"], m),
         "log_ratio_abs_max": float(jnp.max(est["abs_log_ratio"] * m)), "k1_mean": token_mean(est["k1"], m),
         "k2_mean": token_mean(est["k2"], m), "k3_mean": token_mean(est["k3"], m),
         "tv_est_mean": token_mean(est["tv_est"], m),
         "ppl_gap": float(divergence.log_ppl_gap(p["learner_logp"], p["rollout_logp"], m)),
         "entropy_mean": token_mean(p["entropy"], m)}
  if source != "sampled":
    out.update(kl_mean=token_mean(p["kl"], m), kl_max=float(jnp.max(p["kl"] * m)),
               tv_mean=token_mean(p["tv"], m), tv_max=float(jnp.max(p["tv"] * m)))
  if source == "topk":
    out["tv_lower_mean"] = token_mean(p["tv_lower"], m)
  if source == "recompute":
    out["recompute_log_ratio_abs_mean"] = token_mean(jnp.abs(p["rollout_logp_recomputed"] - p["rollout_logp"]), m)
  return out
