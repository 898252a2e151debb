"""The corrections users compare TRM against, under the same backend as configs/trm.py.

  python -m trm_jax.main --config=configs/baselines.py:name=ppo_clip
  python -m trm_jax.main --config=configs/baselines.py:name=tis        # token-level truncated IS
  python -m trm_jax.main --config=configs/baselines.py:name=token_mask # IcePop / MIS ratio band
  python -m trm_jax.main --config=configs/baselines.py:name=seq_is     # sequence-level truncated IS
  python -m trm_jax.main --config=configs/baselines.py:name=geo_mask   # geometric-mean sequence mask
  python -m trm_jax.main --config=configs/baselines.py:name=none       # no correction, plain IS surrogate
  python -m trm_jax.main --config=configs/baselines.py:name=dppo       # DPPO binary-TV token mask (prime-rl's loss)
  python -m trm_jax.main --config=configs/baselines.py:name=cppo       # CPPO position-weighted binary-TV budgets

tis / seq_is run decoupled PPO (rl.ratio_base="learner"); ppo_clip, token_mask and geo_mask take the PPO ratio
against pi_roll (the paper's rho). Arguments: name, backend (as configs/trm.py), plus smoke, T, seed, steps, task. None of these mask
by the maximum token divergence, so none certifies anything (paper section 2, Proposition).
"""
from trm_jax import config as config_lib

NAMES = ("none", "ppo_clip", "tis", "token_mask", "seq_is", "geo_mask", "dppo", "cppo")


def get_config(arg: str = ""):
  args = config_lib.parse_arg(arg, name="ppo_clip", backend="bf16", **config_lib.COMMON_ARGS)
  if args.name not in NAMES:
    raise ValueError(f"config argument name must be one of {NAMES}, got {args.name!r}")
  c = config_lib.apply_backend_preset(config_lib.default_config(), args.backend)
  c.trm.criterion = "none"
  c.trm.source = "recompute"  # no mask, but the exact mismatch is still measured and the bounds logged
  if args.name == "none":
    c.rl.loss = "is"  # the plain IS surrogate (Algorithm 1 without a mask)
  elif args.name in ("dppo", "cppo"):
    c.rl.loss = "is"  # both train the IS surrogate without a ratio clip, as their sources do (masking.BASELINES)
    c.baseline.kind = args.name
  else:
    c.rl.loss = "ppo_clip"
    c.baseline.kind = "none" if args.name == "ppo_clip" else args.name
    if args.name in ("tis", "seq_is"):
      # Decoupled PPO (rl.ratio_base): the truncated IS weight min(pi_prox/pi_roll, cap) corrects rollout ->
      # proximal and the PPO ratio is pi_theta/pi_prox, so each ratio is applied once. At one epoch and one
      # minibatch (the default) pi_theta = pi_prox at the single step: the ratio is 1, the clip never acts and
      # the gradient weight is A * min(rho, cap) (verl's token TIS).
      c.rl.ratio_base = "learner"
  return config_lib.apply_common_args(c, args)
