"""The paper's run (arXiv 2512.23075, Sec. 4): Qwen3-8B-Base, zero-RL GRPO on DAPO-Math-17k, AIME25 avg@32, on a pod.

One command on every host (TPU pod; SLURM: the same under srun), one job per run of each figure:

  ARGS=hf_path=/ckpt/Qwen3-8B-Base,data=/data/math        # local dirs on every host (see below)
  # Figure 1: token-level IS vs PPO clipping
  python -m trm_jax.main --config=configs/pod_qwen3_8b.py:$ARGS,variant=tis      --workdir=gs://B/fig1_tis
  python -m trm_jax.main --config=configs/pod_qwen3_8b.py:$ARGS,variant=ppo_clip --workdir=gs://B/ppo_clip
  # Figure 2: TRM-Max 0.05 and TRM-Avg 0.001 vs PPO clipping (ppo_clip as above)
  python -m trm_jax.main --config=configs/pod_qwen3_8b.py:$ARGS,variant=max      --workdir=gs://B/fig2_max
  python -m trm_jax.main --config=configs/pod_qwen3_8b.py:$ARGS,variant=avg      --workdir=gs://B/fig2_avg
  # Figure 3: loose Max 0.1 alone, loose Avg 0.002 alone, both combined
  python -m trm_jax.main --config=configs/pod_qwen3_8b.py:$ARGS,variant=loose_max     --workdir=gs://B/fig3_max
  python -m trm_jax.main --config=configs/pod_qwen3_8b.py:$ARGS,variant=loose_avg     --workdir=gs://B/fig3_avg
  python -m trm_jax.main --config=configs/pod_qwen3_8b.py:$ARGS,variant=loose_max_avg --workdir=gs://B/fig3_both
  # The recommended setting (TRM-Max 0.05 & TRM-Avg 0.001, the default variant)
  python -m trm_jax.main --config=configs/pod_qwen3_8b.py:$ARGS --workdir=gs://B/max_avg

`hf_path`: the Qwen3-8B-Base directory (huggingface.co/Qwen/Qwen3-8B-Base: config.json,
model-0000x-of-00005.safetensors + model.safetensors.index.json, tokenizer.json, tokenizer_config.json,
generation_config.json). `data`: a directory with the DAPO-Math-17k parquet (huggingface.co/datasets/
BytedTsinghua-SIA/DAPO-Math-17k, file name containing "dapo") and AIME 2025 (e.g. huggingface.co/datasets/
yentinglin/aime_2025 or opencompass/AIME2025 as jsonl / parquet, file name containing "aime25" or "aime-2025").
Every figure plots `mismatch/ppl_gap` (the paper's log-PPL gap) and `eval/aime25/avg@32` against `step`.

What matches the paper: Qwen3-8B-Base from hf_path with no warm start (zero-RL); deduplicated DAPO-Math-17k
with the DAPO instruction and the tokenizer's chat template; the DAPO rule reward (+1 / -1 on the last
"Answer:" line); GRPO with G = 16 x 32 prompts, train batch = rollout batch (one optimizer step per rollout);
lr 1e-6; PPO clip [0.8, 1.28]; TRM-Max delta 0.05 & TRM-Avg delta_avg 0.001 on the EXACT full-vocabulary
KL(roll || theta) (loose: 0.1 / 0.002); rollout temperature 1; the normaliser is the total batch size N;
a bfloat16 rollout engine (bf16 activations, another attention reduction order) against a float32 learner
with float32 master weights; AIME25 avg@32 at temperature 1, top-p 0.95, evaluated at step 0 and every
10 steps.

What still differs from the paper (read before comparing curves):
  * The rollout engine is trm_jax's own JAX sampler under the bf16 backend, not vLLM, and the learner is
    trm_jax's JAX update, not PyTorch FSDP: the mismatch has the same kind of source (kernels and precision)
    but not the paper's magnitude, so the PPO-clip collapse may come later, sooner or not at all.
  * The eval is sampled by the same bf16 engine (eval.rollout_numerics), not vLLM.
  * Not stated in the paper, chosen here: max response length 20480 tokens (the DAPO recipe's; with no overlong
    penalty), prompt length 2048 (longer prompts are dropped and counted), 500 RL steps, Adam b1/b2 0.9/0.999,
    grad clip 1.0, no weight decay, chat template with default thinking settings, "<|im_end|>" also stops
    a response, and which divergence the paper's runs used (here exact KL; the co-released code uses k2-max /
    k3-mean estimators: add trm.divergence=k2, trm.divergence_avg=k3, trm.source=sampled to mimic it).
  * Token TIS (figure 1) is decoupled PPO here (ratio against the learner's own pre-update policy, the
    truncated weight pi_prox / pi_roll, verl's convention), see configs/baselines.py.

Arguments: those of configs/qwen3.py (hf_path, data, variant, backend, T, seed, steps); size is fixed to 8b.
`python -m trm_jax.plan --config=configs/pod_qwen3_8b.py:hf_path=... --topology=v5e:16x16` checks memory first
(it reads only config.json and the tokenizer). `sweep()` lists the variants (one pod job each).
"""
import importlib.util
import os

from trm_jax import config as config_lib


def _qwen3():
  spec = importlib.util.spec_from_file_location("qwen3_config", os.path.join(os.path.dirname(__file__), "qwen3.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


VARIANTS = _qwen3().VARIANTS


def get_config(arg: str = ""):
  if "size=" in (arg or ""):
    raise ValueError("configs/pod_qwen3_8b.py is the 8B run; use configs/qwen3.py:size=... for other sizes")
  return pod_settings(_qwen3().get_config(",".join(filter(None, ["size=8b", arg]))))


def pod_settings(c):
  """Multi-host, the mesh and the memory knobs of the pod runs (also configs/pod_qwen3_30b_a3b.py)."""
  c.distributed.initialize = True  # multi-host: jax.distributed.initialize() on every host
  c.mesh.data = 1
  c.mesh.fsdp = -1  # FSDP over the other chips (paper: PyTorch FSDP)
  c.mesh.tensor = 4  # heads / KV heads / MLP / vocab over 4 chips: the KV cache and residuals / 4
  # Pod memory (trm_jax.plan: the 8B fits v5p:4x4x4 and v5e:16x16 at B = 512, T = 20480; README "TPU plan"):
  c.learner.microbatches = 8  # gradient accumulation: the same optimizer step in 8 slices of 64 rows
  c.learner.attention_block = 256  # scores [rows, heads, 256, P + T], not [rows, heads, P + T, P + T]
  c.rollout.microbatches = 2  # the KV cache of 256 rows at a time
  # Static batch: continuous batching's refill gathers a prompt's prefill from another batch shard, and XLA
  # then keeps the prompt caches whole per chip (v5e:16x16 planned 4.58 GiB against 2.61 GiB at T = 4096).
  c.rollout.slots = 0
  return c


def sweep():
  """One pod job per run of the paper's three figures (plus the recommended max_avg)."""
  return [{"variant": v} for v in VARIANTS]
