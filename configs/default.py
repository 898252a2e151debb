"""The main job: warm start, then GRPO + TRM-Max (exact KL, recomputed rollout) under a bf16 rollout.

  python -m trm_jax.main                                          # this file, a few minutes on CPU
  python -m trm_jax.main --config=configs/default.py:smoke        # under a minute
  python -m trm_jax.main --config=configs/default.py:T=128,seed=1 --config.trm.delta=0.02

Arguments: smoke, T (horizon), seed, steps, task. The rollout engine computes in bfloat16 with a
different attention reduction order, as an inference server's kernels would, and the learner in
float32: the mismatch is real, measured every step, and masked by TRM. Every step also logs the
post-update certificate (bounds/certified_improvement = L'(theta') - B*, bounds.certify_update).
"""
from trm_jax import config as config_lib


def get_config(arg: str = ""):
  args = config_lib.parse_arg(arg, **config_lib.COMMON_ARGS)
  c = config_lib.apply_backend_preset(config_lib.default_config(), "bf16")
  c.trm.criterion = "max"
  c.trm.divergence = "exact"
  c.trm.source = "recompute"
  c.trm.delta = 0.05
  # The certificate is what no other RL stack logs: one more no-grad forward of the updated policy per step.
  c.bounds.certify_update = True
  return config_lib.apply_common_args(c, args)
