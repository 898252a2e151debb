"""Pod-scale run mirroring the paper's Qwen3-8B-Base experiment (arXiv 2512.23075, Sec. 4), minus the checkpoint.

  python -m trm_jax.main --config=configs/pod_qwen3_8b.py --workdir=gs://.../trm_qwen3_8b   # on every host
  python -m trm_jax.main --config=configs/pod_qwen3_8b.py:variant=ppo_clip,seed=1
  python -m trm_jax.main --config=configs/pod_qwen3_8b.py:variant=loose_max_avg,T=8192

What mirrors the paper: GRPO advantages, group size 16, 32 prompts per rollout batch = per train batch
(one optimizer step per rollout batch), learning rate 1e-6, sampling temperature 1.0, PPO clip range
[0.8, 1.28] (clip_low=0.2, clip_high=0.28, the paper's baseline), TRM-Max delta=0.05 AND TRM-Avg
delta_avg=0.001 (criterion=max_avg) with exact KL over the full vocabulary from recomputed rollout
logits, a bf16 rollout engine with a different attention reduction order against an f32 learner
(the vLLM-vs-FSDP kernel gap), FSDP over all devices (mesh.fsdp=-1), multi-host
(distributed.initialize=True), a long horizon (data.horizon=4096 tokens).

What does NOT (the user's steps):
  * The model. trm_jax has no Qwen3 architecture or weights: `model.size="1b"` is the largest preset
    (a Llama-like ~0.76B dense transformer with a character-level vocabulary) and it starts from random
    init + the synthetic warm start below. Loading a real Qwen3-8B checkpoint needs what is missing today:
    (1) a checkpoint converter from the Hugging Face safetensors (q/k/v/o, gate/up/down, RMSNorm, embed,
    lm_head; Qwen3's per-head q/k RMSNorm) into trm_jax.models.Transformer's NNX parameter tree with its
    logical axis names, (2) a Qwen3 preset (d_model 4096, 36 layers, 32 heads, 8 KV heads, head_dim 128,
    d_ff 12288, rope_theta 1e6, q/k-norm) and (3) a BPE tokenizer in place of the character-level
    `trm_jax.data.tokenizer.Tokenizer` (vocab 151,936). With those, set warmstart.steps=0 (zero-RL from the
    base model, as the paper does).
  * The data. The paper trains on deduplicated DAPO-Math-17k and evaluates AIME25 avg@32 (top-p 0.95).
    trm_jax.data.math_data has TFDS builders for those files (data.math_manual_dir) but `data.task`
    accepts only the synthetic tasks today, so this config uses the synthetic long-horizon `running_sum`
    task at T=4096 with problem sizes drawn uniformly (data.min_size=2), so responses have many lengths and
    the accept rate by length bucket is informative. eval.temperature=1.0 matches; the eval has no top-p knob.
  * The number of steps is not stated in the paper; 500 is a guess.

Arguments: variant (one of VARIANTS: the paper's figure runs), plus smoke, T, seed, steps, task.
`sweep()` lists the variants (one pod job each). Validated by trm_jax.config.validate in
tests/test_experiments.py; never run on CPU (a 4096-token horizon with a 1b model needs accelerators).
"""
from trm_jax import config as config_lib

# The runs of the paper's three figures: (trm.criterion, trm.delta, trm.delta_avg, baseline.kind).
VARIANTS = {
    "max_avg": ("max_avg", 0.05, 0.001, "none"),  # TRM-Max 0.05 & TRM-Avg 0.001 (default)
    "max": ("max", 0.05, 0.001, "none"),  # fig. 2: TRM-Max
    "avg": ("avg", 0.05, 0.001, "none"),  # fig. 2: TRM-Avg
    "ppo_clip": ("none", 0.05, 0.001, "none"),  # figs. 1-2: PPO clip [0.8, 1.28], no mask
    "tis": ("none", 0.05, 0.001, "tis"),  # fig. 1: token-level truncated IS
    "loose_max": ("max", 0.1, 0.002, "none"),  # fig. 3: loose Max alone
    "loose_avg": ("avg", 0.1, 0.002, "none"),  # fig. 3: loose Avg alone
    "loose_max_avg": ("max_avg", 0.1, 0.002, "none"),  # fig. 3: both loose, combined
}


def get_config(arg: str = ""):
  args = config_lib.parse_arg(arg, variant="max_avg", **config_lib.COMMON_ARGS)
  if args.variant not in VARIANTS:
    raise ValueError(f"config argument variant must be one of {sorted(VARIANTS)}, got {args.variant!r}")
  c = config_lib.apply_backend_preset(config_lib.default_config(), "bf16")

  c.model.size = "1b"  # largest preset; see the module docstring for what a real Qwen3-8B needs

  c.data.task = "running_sum"
  c.data.horizon = 4096
  c.data.min_size = 2  # response lengths spread over [~10, 4096] tokens
  c.data.num_train = 32768
  c.data.num_eval = 1024

  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0

  c.rl.steps = 500
  c.rl.prompts_per_step = 32  # paper: 32 prompts per rollout batch
  c.rl.group_size = 16  # paper: G = 16
  c.rl.advantage = "grpo"
  c.rl.loss = "ppo_clip"
  c.rl.clip_low = 0.2  # ratio in [0.8, 1.28]
  c.rl.clip_high = 0.28
  c.rl.aggregation = "seq_total"  # the paper's normaliser: total batch size N
  c.rl.epochs = 1
  c.rl.minibatches = 1  # train batch = rollout batch: one update per rollout

  criterion, delta, delta_avg, baseline = VARIANTS[args.variant]
  c.trm.criterion = criterion
  c.trm.divergence = "exact"
  c.trm.divergence_avg = "exact"
  c.trm.source = "recompute"
  c.trm.delta = delta
  c.trm.delta_avg = delta_avg
  c.baseline.kind = baseline

  c.optim.lr = 1e-6  # paper
  c.optim.schedule = "constant"
  c.optim.grad_clip = 1.0

  # Synthetic stand-in for a pretrained base model (set steps=0 once a real checkpoint is loaded).
  c.warmstart.steps = 2000
  c.warmstart.batch_size = 64
  c.warmstart.lr = 3e-4

  c.learner.chunk_size = 256  # time chunks of the [B, T, V] log-prob / KL pass
  c.learner.remat = True

  c.eval.every = 10
  c.eval.num_prompts = 512
  c.eval.temperature = 1.0

  c.mesh.data = 1
  c.mesh.fsdp = -1  # FSDP over every device (paper: PyTorch FSDP)
  c.mesh.tensor = 1
  c.distributed.initialize = True

  c.checkpoint.every = 10
  c.checkpoint.keep = 3
  c.log.progress = True
  return config_lib.apply_common_args(c, args)


def sweep():
  """One pod job per figure run of the paper (experiments/sweep.py-style list of get_config arguments)."""
  return [{"variant": v} for v in VARIANTS]
