"""Config-file helpers: big_vision-style argument strings and the presets every configs/*.py shares."""
import ml_collections


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """big_vision-style config arguments: "smoke,T=256,delta=0.05" -> ConfigDict with typed values.

  Every key must be declared in `defaults` (its type converts the string); a bare word sets a bool.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is not known; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if not eq:
      if kind is not bool:
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


COMMON_ARGS = dict(smoke=False, T=0, seed=-1, steps=-1, task="")


def apply_common_args(config: ml_collections.ConfigDict, args: ml_collections.ConfigDict):
  """The arguments every config file accepts: smoke, T (horizon), seed, steps, task."""
  if args.smoke:  # a laptop-sized run that finishes in under a minute on 2 CPU cores
    config.model.size = "tiny"
    config.data.horizon = 32
    config.data.num_train = 256
    config.data.num_eval = 64
    config.warmstart.steps = 150  # enough for a non-zero reward, so RL's gradients are not all zero
    config.warmstart.batch_size = 16
    config.rl.steps = 3
    config.rl.prompts_per_step = 4
    config.rl.group_size = 4  # varied rewards within a group -> non-zero advantages
    config.eval.every = 3
    config.eval.num_prompts = 8
    config.checkpoint.every = 0
  if args.T:
    config.data.horizon = args.T
  if args.seed >= 0:
    config.seed = args.seed
  if args.steps >= 0:
    config.rl.steps = args.steps
  if args.task:
    config.data.task = args.task
  return config


# Named rollout-backend presets shared by configs/*.py (the mismatch sources of paper App. A).
BACKEND_PRESETS = {
    # bf16 rollout with a different attention reduction order (an inference server's kernels).
    "bf16": dict(precision="bfloat16", attention="alt_order"),
    # MoE routing flips: the router runs in bf16 with tiny jitter at rollout (needs model.kind=moe).
    "moe": dict(precision="bfloat16", moe_router="jitter", router_jitter=0.02),
    # An asynchronous pipeline: rollout parameters two updates old.
    "stale": dict(staleness_k=2),
    # Heavy-tailed logit noise for controlled studies.
    "noise": dict(logit_noise_scale=0.05, logit_noise_df=2.0),
}


def apply_backend_preset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  if name not in BACKEND_PRESETS:
    raise ValueError(f"config argument backend must be one of {sorted(BACKEND_PRESETS)}, got {name!r}")
  for k, v in BACKEND_PRESETS[name].items():
    config.rollout.backend[k] = v
  if name == "moe":
    config.model.kind = "moe"
  return config
