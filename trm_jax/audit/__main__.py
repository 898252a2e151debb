"""python -m trm_jax.audit --dump=FILE --format=jsonl|vllm|openai --hf_path=DIR --out=DIR [options]."""
from __future__ import annotations

import argparse
import json
import sys

from trm_jax.audit import adapters, analysis, auditor, report, schema

DESCRIPTION = """\
TRM statistics for rollouts made elsewhere: reads a rollout dump and the HF checkpoint of the policy that made
it, recomputes the learner's log-probs (batched, sharded over every device, at --learner_dtype) and reports
what TRM would have masked, how acceptance falls with length, which bound is tightest and how far apart the two
engines are. No RL job is run.

Outputs in --out:
  summary.json         sequences, tokens, bad_rows [{line, reason}], log_ratio_abs_mean (token mean of
                       |log pi_theta(y_t) - log pi_roll(y_t)|), k3_mean (token mean of r - 1 - log r, r = pi_theta /
                       pi_roll), ppl_gap, accept_rate {delta: fraction TRM-Max keeps on max_t k2}, accept (every
                       criterion x threshold), accept_by_length, bounds (delta, eps, kl_seq, tv_seq, T, each bound,
                       unified = B*, tightest, valid), divergence_source (sampled | topk | stored | recompute), ...
  sequences.jsonl      one row per audited sequence: line, length, log_ratio_abs_max, k2_max, k3_mean, kl_max
                       (when known), ppl_gap, bound_unified, bound_tightest, accept_<criterion>@<threshold> flags
  acceptance_by_length.png, max_kl_hist.png, bound_vs_T.png

"""


def parse(argv) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m trm_jax.audit", description=DESCRIPTION,
                               epilog=schema.SCHEMA + "\n" + adapters.FORMATS_DOC,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  floats = lambda s: tuple(float(x) for x in s.split(",") if x)
  th = analysis.Thresholds()
  ap.add_argument("--dump", required=True, help="the rollout dump (one JSON object per line)")
  ap.add_argument("--format", default="jsonl", choices=sorted(adapters.ADAPTERS), help="dump format (below)")
  ap.add_argument("--hf_path", required=True, help="HF checkpoint directory of the policy (Qwen3 / Qwen3-MoE / Qwen2)")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--learner_dtype", default="float32", choices=("float32", "bfloat16"),
                  help="weights and activations of the learner side (float32 = the reference)")
  ap.add_argument("--deltas", type=floats, default=th.deltas, help="TRM-Max thresholds on max_t k2 / KL")
  ap.add_argument("--delta_avgs", type=floats, default=th.delta_avgs, help="TRM-Avg thresholds (mean_t KL or k3)")
  ap.add_argument("--eps", type=floats, default=th.eps, help="TV-criterion thresholds on max_t TV (or tv_est)")
  ap.add_argument("--delta_ws", type=floats, default=th.delta_ws, help="LN-TRM thresholds on W/Z")
  ap.add_argument("--delta_sers", type=floats, default=th.delta_sers, help="SER thresholds on mean_t |rho - 1|")
  ap.add_argument("--length_buckets", type=lambda s: tuple(int(x) for x in s.split(",")), default=th.length_buckets,
                  help="increasing response-length bucket edges for acceptance by length")
  ap.add_argument("--recompute_rollout", default=None, metavar="KEY=VALUE,...",
                  help="exact KL / TV against the rollout re-run under a trm_jax rollout backend, e.g. "
                       "'precision=bfloat16' or 'precision=bfloat16,attention=alt_order' (rollout.backend fields); "
                       "'' = the default backend")
  ap.add_argument("--batch_size", type=int, default=32, help="sequences per learner batch (rounded up to the devices)")
  ap.add_argument("--per_token", action="store_true", help="also write each sequence's per-token log ratios")
  ap.add_argument("--no_progress", action="store_true", help="no progress bar")
  return ap.parse_args(argv)


def settings(args: argparse.Namespace) -> auditor.Settings:
  th = analysis.Thresholds(deltas=args.deltas, delta_avgs=args.delta_avgs, eps=args.eps, delta_ws=args.delta_ws,
                           delta_sers=args.delta_sers, length_buckets=args.length_buckets)
  return auditor.Settings(dump=args.dump, hf_path=args.hf_path, format=args.format, learner_dtype=args.learner_dtype,
                          thresholds=th, recompute_rollout=args.recompute_rollout, batch_size=args.batch_size,
                          progress=not args.no_progress)


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  result = auditor.audit(settings(args))
  report.write(result, args.out, per_token=args.per_token)
  s = result.summary
  print(json.dumps({k: s.get(k) for k in ("sequences", "tokens", "bad_row_count", "divergence_source",
                                            "log_ratio_abs_mean", "k3_mean", "ppl_gap", "accept_rate")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
