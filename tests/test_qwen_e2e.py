"""The paper's path end to end on CPU: a tiny random Qwen3 checkpoint written by trm_jax's own HF export, a tiny
BPE tokenizer trained here, a DAPO-format parquet and an AIME-format jsonl written here. One RL step with
TRM (exact KL, bf16 rollout engine), the step-0 AIME evaluation and a checkpoint; then the same config
(`python -m trm_jax.main --config=configs/qwen3.py:smoke,hf_path=...,data=...` runs exactly this through
trainer.train) with 2 steps resumes it for the second step and evaluates avg@k / pass@k again.
"""
import importlib.util
import json
import os

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from trm_jax import config as config_lib
from trm_jax import trainer
from trm_jax.data import math_data
from trm_jax.data.tokenizer import load_tokenizer
from trm_jax.models import ModelConfig, hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_AIME = 20, 5


def _tokenizer_script():
  path = os.path.join(REPO, "scripts", "make_tokenizer_fixture.py")
  spec = importlib.util.spec_from_file_location("make_tokenizer_fixture", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _write_checkpoint(path: str) -> int:
  """A random 2-layer Qwen3 (q/k norm, rope 1e6) exported with hf.save_pretrained, plus the tokenizer files."""
  _tokenizer_script().train_tiny_bpe(path)
  vocab = load_tokenizer(path).vocab_size
  cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                    max_len=256, rope_theta=1e6, qk_norm=True, tie_embeddings=True)
  # Weights drawn with numpy (no per-shape random-init programs to compile); norm scales near 1.
  graphdef, state = hf.abstract_model(cfg)
  rng = np.random.default_rng(0)
  draw = lambda path, x: (("norm" in jax.tree_util.keystr(path)) + rng.normal(0.0, 0.3, x.shape)).astype(np.float32)
  state = jax.tree_util.tree_map_with_path(draw, state)
  hf.save_pretrained(nnx.merge(graphdef, state), path)
  return vocab


def _write_data(path: str) -> None:
  """20 DAPO problems (verl parquet layout, each twice: the loader deduplicates) + 5 AIME 2025 problems (jsonl)."""
  os.makedirs(path)
  rows = [{"data_source": "math_dapo", "ability": "MATH",
           "prompt": [{"role": "user", "content": math_data.DAPO_PREFIX + f"What is {i}+{i}?" + math_data.DAPO_SUFFIX}],
           "reward_model": {"ground_truth": str(2 * i), "style": "rule-lighteval/MATH_v2"},
           "extra_info": {"index": f"id-{i}"}} for i in range(N_TRAIN)]
  # One more problem, longer than the smoke prompt_len (128 tokens): dropped and counted, never silently.
  long = {**rows[0], "prompt": [{"role": "user", "content": math_data.DAPO_PREFIX + "Add one to three. " * 100 +
                                 math_data.DAPO_SUFFIX}], "extra_info": {"index": "id-long"}}
  pq.write_table(pa.Table.from_pylist(rows + rows + [long]), os.path.join(path, "dapo-math-17k.parquet"))
  with open(os.path.join(path, "aime-2025.jsonl"), "w") as f:
    for i in range(N_AIME):
      f.write(json.dumps({"problem": f"Find {i} times 3.", "answer": str(3 * i)}) + "\n")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("qwen_e2e")
  ckpt, data = str(root / "tiny_qwen3"), str(root / "math")
  vocab = _write_checkpoint(ckpt)
  _write_data(data)
  return {"ckpt": ckpt, "data": data, "tfds": str(root / "tfds"), "vocab": vocab}


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_qwen3_smoke_rl_eval_checkpoint_resume(inputs, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  arg = f"smoke,hf_path={inputs['ckpt']},data={inputs['data']}"
  cfg = config_lib.with_overrides(config_lib.load_config("qwen3", arg),
                                  {"data.data_dir": inputs["tfds"], "rl.steps": 1})
  # Run 1 (in process): step-0 eval, one RL step, checkpoint 1.
  trainer.train(cfg, workdir)
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [0, 1]
  # Step 0 says how many problems the run uses: 20 DAPO problems kept, the long one dropped (and said so on
  # the console), the 5 AIME problems.
  counts = {k: v for k, v in rows[0].items() if k.startswith("data/")}
  assert counts == {"data/train/prompts": N_TRAIN, "data/train/prompts_dropped_long": 1,
                    "data/eval/aime25/prompts": N_AIME, "data/eval/aime25/prompts_dropped_long": 0}
  said = [line for line in capsys.readouterr().out.splitlines() if "prompts kept; dropped" in line]
  assert len(said) == 1 and "20 of 21 prompts kept; dropped 1 longer than data.text.prompt_len=" in said[0], said
  first = rows[1]
  assert -1.0 <= first["reward/mean"] <= 1.0  # the DAPO checker's +1 / -1
  assert 0.0 <= first["trm/accept_rate"] <= 1.0 and first["mismatch/kl_max"] > 0  # bf16 engine vs f32 learner
  assert 0.0 <= first["response/clip_frac"] <= 1.0
  assert 1.0 <= first["response_length/mean"] <= cfg.data.horizon
  assert "reward/timeouts" in first
  # Run 2: the same command with 2 steps resumes at step 1, runs step 2, evaluates at the end, saves 2.
  capsys.readouterr()
  trainer.train(config_lib.with_overrides(cfg, {"rl.steps": 2}), workdir)
  assert "resumed" in capsys.readouterr().out
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [0, 1, 2]
  for r in (rows[0], rows[2]):  # step 0 (the base checkpoint) and the final step: AIME avg@2 / pass@k
    for key in ("eval/aime25/avg@4", "eval/aime25/pass@1", "eval/aime25/pass@2", "eval/aime25/pass@4"):
      assert 0.0 <= r[key] <= 1.0, (key, r)
    assert r["eval/aime25/avg@4"] == pytest.approx(r["eval/aime25/pass@1"])
    assert r["eval/aime25/pass@4"] >= r["eval/aime25/pass@2"] >= r["eval/aime25/pass@1"]
    assert 1.0 <= r["eval/aime25/response_length_mean"] <= cfg.data.horizon
  ckpts = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert ckpts[-1] == 2
  # The eval set is the 5 AIME problems; the training set the 20 distinct DAPO problems (duplicates dropped).
  assert np.isfinite([rows[2][k] for k in rows[2] if isinstance(rows[2][k], float)]).all()
