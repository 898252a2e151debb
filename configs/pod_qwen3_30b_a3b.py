"""The paper's MoE run (arXiv 2512.23075, Sec. 4): Qwen3-30B-A3B-Base, zero-RL GRPO on DAPO-Math-17k, on a pod.

MoE routing flips between the rollout engine and the learner are one of the mismatch sources the paper names;
this is the 8B recipe (configs/pod_qwen3_8b.py: data, reward, GRPO 16 x 32, lr 1e-6, PPO clip [0.8, 1.28],
TRM-Max 0.05 & Avg 0.001 exact, bf16 rollout vs f32 learner, AIME25 avg@32) on Qwen3-30B-A3B (48 layers,
128 experts, top-8, 3B active), with the sparse (dropless grouped-matmul) expert dispatch.

  ARGS=hf_path=/ckpt/Qwen3-30B-A3B-Base,data=/data/math
  python -m trm_jax.plan --config=configs/pod_qwen3_30b_a3b.py:$ARGS --topology=v5p:4x4x8   # plan first
  python -m trm_jax.main --config=configs/pod_qwen3_30b_a3b.py:$ARGS --workdir=gs://B/moe_max_avg
  python -m trm_jax.main --config=configs/pod_qwen3_30b_a3b.py:$ARGS,variant=ppo_clip --workdir=gs://B/moe_ppo_clip

Planned 2026-12-04 on v5p:4x4x8 (128 chips): fits, peak 37.69 GiB of 95 per chip at T = 20480 (README, "TPU plan").

Arguments: those of configs/qwen3.py (hf_path, data, variant, backend, T, seed, steps); size is fixed to
30b_a3b. What still differs from the paper: as listed in configs/pod_qwen3_8b.py.
"""
import importlib.util
import os


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = ""):
  if "size=" in (arg or ""):
    raise ValueError("configs/pod_qwen3_30b_a3b.py is the 30B-A3B run; use configs/qwen3.py:size=... for others")
  c = _load("qwen3").get_config(",".join(filter(None, ["size=30b_a3b", arg])))
  c.model.moe_dispatch = "sparse"  # only each token's 8 experts run (the dense reference pays 16x)
  return _load("pod_qwen3_8b").pod_settings(c)


def sweep():
  """One pod job per run of the paper's figures, as for the 8B run."""
  return _load("pod_qwen3_8b").sweep()
