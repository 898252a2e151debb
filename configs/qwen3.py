"""Qwen3 zero-RL on DAPO-Math-17k with TRM, evaluated on AIME25 avg@k: the paper's experiment at any size.

  python -m trm_jax.main --config=configs/qwen3.py:size=8b,hf_path=/ckpt/Qwen3-8B-Base,data=/data/math \\
      --workdir=runs/qwen3_8b_max_avg
  python -m trm_jax.main \
      --config=configs/qwen3.py:size=0.6b,hf_path=/ckpt/Qwen3-0.6B-Base,data=/data/math,variant=ppo_clip
  python -m trm_jax.main --config=configs/qwen3.py:smoke,hf_path=/tmp/tiny_qwen3,data=/tmp/math   # CPU, seconds

`hf_path` is a local Hugging Face checkpoint directory (config.json, model*.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json); its weights are the starting policy (no warm start) and
its tokenizer renders the prompts with its chat template. `data` is a directory holding the DAPO-Math-17k
parquet (a file name containing "dapo") and the AIME 2025 file (name containing "aime25"; jsonl or parquet,
see trm_jax/data/math_data.py). Nothing is downloaded.

Arguments:
  size     0.6b | 1.7b | 4b | 8b | 30b_a3b: the Qwen3 preset (shapes when no hf_path is given, and the
           per-size batch / mesh defaults below); with hf_path the checkpoint's config.json decides the shapes.
  hf_path  the checkpoint directory ("" = random init of the preset: plumbing and benchmarks only).
  data     data.math_manual_dir.
  variant  one of VARIANTS: the runs of the paper's three figures.
  backend  the rollout engine's mismatch (configs/trm.py presets; default bf16: bf16 activations and another
           attention reduction order against the float32 learner).
  smoke    tiny local checkpoint on CPU: 2 RL steps of 2 prompts x 4, 16-token responses, AIME avg@4.
  plus T (max response tokens), seed, steps.
`sweep()` lists the variants (one job each). configs/pod_qwen3_8b.py is this file at size=8b on a pod.
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
FIGURES = {1: ("tis", "ppo_clip"), 2: ("max", "avg", "ppo_clip"), 3: ("loose_max", "loose_avg", "loose_max_avg")}

# size -> (model.size preset, eval problems per sampler call: x 32 samples, x 20k tokens of KV cache)
SIZES = {"0.6b": ("qwen3-0.6b", 30), "1.7b": ("qwen3-1.7b", 15), "4b": ("qwen3-4b", 8),
         "8b": ("qwen3-8b", 4), "30b_a3b": ("qwen3-30b-a3b", 4)}


def get_config(arg: str = ""):
  args = config_lib.parse_arg(arg, size="8b", hf_path="", data="", variant="max_avg", backend="bf16",
                              **config_lib.COMMON_ARGS)
  if args.size not in SIZES:
    raise ValueError(f"config argument size must be one of {sorted(SIZES)}, got {args.size!r}")
  if args.variant not in VARIANTS:
    raise ValueError(f"config argument variant must be one of {sorted(VARIANTS)}, got {args.variant!r}")
  c = config_lib.apply_backend_preset(config_lib.default_config(), args.backend)
  preset, eval_batch = SIZES[args.size]

  c.model.size = preset
  c.model.hf_path = args.hf_path
  c.model.param_dtype = "float32"  # float32 master weights; the rollout engine computes in bf16 (backend)

  c.data.task = "dapo_math"
  c.data.math_manual_dir = args.data
  c.data.horizon = 20480  # max response tokens (the DAPO recipe's 20k; the paper does not state its own)
  c.data.text.tokenizer_path = args.hf_path
  c.data.text.prompt_len = 2048  # DAPO's max prompt length; longer prompts are dropped and counted
  c.data.text.extra_stop_tokens = "<|im_end|>"  # a base checkpoint's eos is <|endoftext|>; the template ends turns
  c.data.text.reward = "dapo"  # +1 / -1 on the last "Answer:" line (DAPO's rule checker)

  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0

  c.rl.steps = 500  # not stated in the paper
  c.rl.prompts_per_step = 32  # paper: 32 prompts per rollout batch = per train batch
  c.rl.group_size = 16  # paper: G = 16
  c.rl.advantage = "grpo"
  c.rl.loss = "ppo_clip"
  c.rl.clip_low = 0.2  # ratio in [0.8, 1.28]
  c.rl.clip_high = 0.28
  c.rl.aggregation = "seq_total"  # the paper's normaliser: total batch size N
  c.rl.epochs = 1
  c.rl.minibatches = 1  # one optimizer step per rollout batch

  criterion, delta, delta_avg, baseline = VARIANTS[args.variant]
  c.trm.criterion = criterion
  c.trm.divergence = "exact"  # KL over the full 152k vocabulary, not sampled-token estimators
  c.trm.divergence_avg = "exact"
  c.trm.source = "recompute"  # the rollout engine's logits recomputed in the update (never stored [B,T,V])
  c.trm.delta = delta
  c.trm.delta_avg = delta_avg
  c.baseline.kind = baseline
  if baseline in ("tis", "seq_is"):  # decoupled PPO: the IS weight corrects rollout -> proximal
    c.rl.ratio_base = "learner"

  c.optim.lr = 1e-6  # paper
  c.optim.schedule = "constant"
  c.optim.grad_clip = 1.0

  c.warmstart.steps = 0  # zero-RL from the base checkpoint
  c.warmstart.batch_size = 8

  c.learner.chunk_size = 512  # time chunks of the [B, C, 152k] log-prob / KL pass
  c.learner.remat = "full"

  c.eval.sets = "aime25"
  c.eval.k = 32  # paper: AIME25 avg@32
  c.eval.pass_k = (1, 8)
  c.eval.temperature = 1.0  # paper: temperature 1, top-p 0.95 in eval
  c.eval.top_p = 0.95
  c.eval.max_new_tokens = 0  # = data.horizon
  c.eval.num_prompts = 0  # the whole set (30 problems)
  c.eval.batch_prompts = eval_batch  # x 32 samples per sampler call
  c.eval.rollout_numerics = True  # evaluated by the bf16 rollout engine, as vLLM evaluates in the paper
  c.eval.every = 10
  c.eval.at_start = True

  c.mesh.data = 1
  c.mesh.fsdp = -1  # FSDP over every device (paper: PyTorch FSDP)
  c.mesh.tensor = 1

  c.checkpoint.every = 10
  c.checkpoint.keep = 3

  if args.smoke:  # a tiny local checkpoint on CPU (tests/test_qwen_e2e.py): seconds, not hours
    c.data.horizon = 16
    c.data.text.prompt_len = 128
    c.data.num_threads = 1
    c.rl.steps = 2
    c.rl.prompts_per_step = 2
    c.rl.group_size = 4
    c.optim.lr = 1e-3  # large enough that two steps visibly move a random tiny model
    c.learner.chunk_size = 8
    c.eval.k = 4  # 2 problems x 4 samples per sampler call
    c.eval.pass_k = (1, 2)
    c.eval.batch_prompts = 2
    c.eval.every = 2
    c.checkpoint.every = 1
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.log.tensorboard = False
    c.log.plot = False
    c.log.progress = False
    args.smoke = False  # the common smoke switch shrinks a synthetic run; this one is done
  return config_lib.apply_common_args(c, args)


def sweep():
  """One job per run of the paper's three figures (same size / hf_path / data arguments for each)."""
  return [{"variant": v} for v in VARIANTS]
