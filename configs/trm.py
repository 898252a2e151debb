"""TRM variants (paper section 3) under one mismatched rollout backend.

  python -m trm_jax.main --config=configs/trm.py:criterion=max,delta=0.05
  python -m trm_jax.main --config=configs/trm.py:criterion=avg,delta_avg=0.001
  python -m trm_jax.main --config=configs/trm.py:criterion=max_avg,delta=0.1,delta_avg=0.002   # loose, combined
  python -m trm_jax.main --config=configs/trm.py:criterion=max,divergence=k2,source=sampled     # estimator fallback
  python -m trm_jax.main --config=configs/trm.py:criterion=ln   |  criterion=ser  |  criterion=tv

Arguments: criterion (none|max|avg|max_avg|tv|ln|ser), divergence (exact|k1|k2|k3|abs_log|tv_est),
divergence_avg, source (sampled|stored|topk|recompute), delta, delta_avg, backend (bf16|moe|stale|noise),
plus smoke, T, seed, steps, task. `sweep()` lists the T x delta grid run by experiments/sweep.py.
"""
from trm_jax import config as config_lib



def get_config(arg: str = ""):
  args = config_lib.parse_arg(arg, criterion="max", divergence="exact", divergence_avg="exact",
                              source="recompute", delta=0.05, delta_avg=0.001, backend="bf16",
                              **config_lib.COMMON_ARGS)
  c = config_lib.apply_backend_preset(config_lib.default_config(), args.backend)
  c.trm.criterion = args.criterion
  c.trm.divergence = args.divergence
  c.trm.divergence_avg = args.divergence_avg
  c.trm.source = args.source
  c.trm.delta = args.delta
  c.trm.delta_avg = args.delta_avg
  return config_lib.apply_common_args(c, args)


def sweep():
  """The T x delta grid (experiments/sweep.py runs it; one job per point on a pod)."""
  return [{"T": t, "delta": d} for t in (32, 64, 128) for d in (0.01, 0.05, 0.2)]
