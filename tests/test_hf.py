"""Hugging Face interop (trm_jax.models.hf): parity with transformers, round trip, errors, sharded loading.

Golden logits come from transformers in float64 (scripts/make_hf_fixtures.py, committed under
tests/fixtures/hf/); no torch here.
"""
import functools
import json
import os
import runpy
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from trm_jax import sharding as sharding_lib
from trm_jax.models import Numerics
from trm_jax.models import hf

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = ("qwen3", "qwen3_tied", "qwen3_sharded", "qwen3_moe", "qwen3_moe_nonorm", "qwen2")
BF16 = Numerics(dtype="bfloat16", weight_dtype="bfloat16")
# Mean per-token KL(transformers fp64 || trm_jax with bf16 weights + activations) at valid positions; measured
# 3.6e-5 (qwen3) .. 4.0e-4 (qwen3_moe: bf16 flips a few routes) on these fixtures, whose logits are large
# (weights drawn far above HF's init). Bound: 5x the worst.
BF16_MEAN_KL = 2e-3


def golden(name):
  return dict(np.load(os.path.join(FIXTURES, name, "golden.npz")))


@functools.lru_cache(maxsize=None)
def loaded(name, dtype="float32"):
  return hf.load_pretrained(os.path.join(FIXTURES, name), dtype=dtype)


def logits_at(model, g, numerics=None):
  graphdef, params = nnx.split(model)
  kw = {} if numerics is None else {"numerics": numerics}
  fwd = jax.jit(lambda p, t, pos, v: nnx.merge(graphdef, p)(t, pos, v, **kw))
  out = np.asarray(fwd(params, g["tokens"], g["positions"], g["valid"]), np.float64)
  return out[:, g["pos_idx"]]


def rel_err(out, g):
  """max |trm_jax - transformers| / max |transformers| over valid positions."""
  sel = g["valid"][:, g["pos_idx"]][..., None]
  return np.abs(np.where(sel, out - g["logits"], 0.0)).max() / np.abs(g["logits"]).max()


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
  g = golden(name)
  assert rel_err(logits_at(loaded(name), g), g) <= 1e-4


def test_padding_is_left_and_logits_are_nontrivial():
  # The parity above would be weak if the batch had no padding or the logits were flat.
  g = golden("qwen3_moe")
  assert (~g["valid"][:, 0]).sum() == 2 and g["valid"][:, -1].all()
  assert np.std(g["logits"][0], axis=-1).min() > 0.3


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2"])
def test_bf16_kl_is_small(name):
  g = golden(name)
  out = logits_at(loaded(name, "bfloat16"), g, BF16)
  ref = g["logits"].astype(np.float64)
  lp = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  kl = (np.exp(lp(ref)) * (lp(ref) - lp(out))).sum(-1)
  sel = g["valid"][:, g["pos_idx"]]
  assert 0 < kl[sel].mean() <= BF16_MEAN_KL


@pytest.mark.parametrize("name,dtype", [("qwen3_moe", "float32"), ("qwen2", "float32"), ("qwen3_tied", "float32"),
                                        ("qwen3_sharded", "bfloat16")])
def test_round_trip_is_bit_identical(name, dtype, tmp_path):
  src = os.path.join(FIXTURES, name)
  model = loaded(name, dtype)
  files = hf.save_pretrained(model, str(tmp_path), max_shard_bytes=30_000, copy_from=src)
  assert len(files) > 1 and os.path.exists(tmp_path / hf.INDEX) and os.path.exists(tmp_path / hf.GENERATION)
  again = hf.load_pretrained(str(tmp_path), dtype=dtype)
  a, b = nnx.state(model, nnx.Param), nnx.state(again, nnx.Param)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  # The exported tensors are the original checkpoint's, bit for bit, under the same names.
  orig = {k: v for f in os.listdir(src) if f.endswith(".safetensors")
          for k, v in load_file(os.path.join(src, f)).items()}
  new = {k: v for f in files for k, v in load_file(str(tmp_path / f)).items()}
  assert sorted(orig) == sorted(new)
  for k in orig:
    assert orig[k].dtype == new[k].dtype and np.array_equal(orig[k].view(np.uint8), new[k].view(np.uint8)), k
  assert hf.model_config_from_hf(str(tmp_path)) == hf.model_config_from_hf(src)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def ckpt(tmp_path):
  """A writable copy of the qwen3 fixture: (dir, tensors dict, config dict)."""
  d = tmp_path / "ckpt"
  shutil.copytree(os.path.join(FIXTURES, "qwen3"), d)
  with open(d / "config.json") as f:
    return d, load_file(str(d / "model.safetensors")), json.load(f)


def rewrite(d, tensors=None, config=None):
  if tensors is not None:
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
  if config is not None:
    with open(d / "config.json", "w") as f:
      json.dump(config, f)


def test_error_missing_tensor(ckpt):
  d, t, _ = ckpt
  del t["model.layers.1.self_attn.k_norm.weight"]
  rewrite(d, tensors=t)
  with pytest.raises(hf.HFCheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_norm\.weight'"):
    hf.load_pretrained(str(d))


def test_error_extra_tensor(ckpt):
  d, t, _ = ckpt
  t["model.layers.0.mlp.shared_expert.weight"] = np.zeros((4, 4), np.float32)
  rewrite(d, tensors=t)
  with pytest.raises(hf.HFCheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.shared_expert\.weight'"):
    hf.load_pretrained(str(d))


def test_error_wrong_shape(ckpt):
  d, t, _ = ckpt
  t["model.layers.0.mlp.up_proj.weight"] = np.zeros((63, 32), np.float32)
  rewrite(d, tensors=t)
  with pytest.raises(hf.HFCheckpointError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \[63, 32\].*"
                                                 r"\[64, 32\]"):
    hf.load_pretrained(str(d))


@pytest.mark.parametrize("edit,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
    ({"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"architectures": ["Qwen3ForSequenceClassification"]}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config='fp8'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "per-layer-type"),
])
def test_error_unsupported_config(ckpt, edit, match):
  d, _, c = ckpt
  rewrite(d, config={**c, **edit})
  with pytest.raises(hf.HFCheckpointError, match=match) as e:
    hf.load_pretrained(str(d))
  assert "config.json" in str(e.value)


def test_error_missing_files(ckpt, tmp_path):
  d, _, _ = ckpt
  os.remove(d / "model.safetensors")
  with pytest.raises(hf.HFCheckpointError, match="neither model.safetensors nor"):
    hf.load_pretrained(str(d))
  with pytest.raises(hf.HFCheckpointError, match="config.json: missing"):
    hf.load_pretrained(str(tmp_path / "nowhere"))
  sharded = tmp_path / "sharded"
  shutil.copytree(os.path.join(FIXTURES, "qwen3_sharded"), sharded)
  os.remove(sharded / "model-00002-of-00002.safetensors")
  with pytest.raises(hf.HFCheckpointError, match="model-00002-of-00002.safetensors: listed in"):
    hf.load_pretrained(str(sharded))


def test_tied_checkpoint_with_lm_head_copy(tmp_path):
  d = tmp_path / "tied"
  shutil.copytree(os.path.join(FIXTURES, "qwen3_tied"), d)
  t = load_file(str(d / "model.safetensors"))
  t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
  rewrite(d, tensors=t)
  hf.load_pretrained(str(d))  # an identical copy is accepted (some tied checkpoints store one)
  t["lm_head.weight"][3, 1] += 1.0
  rewrite(d, tensors=t)
  with pytest.raises(hf.HFCheckpointError, match="'lm_head.weight' differs"):
    hf.load_pretrained(str(d))


# ----------------------------------------------------------------------------- sharded loading


def test_sharded_load_on_fsdp_x_tensor_mesh():
  assert jax.device_count() == 8
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  name = "qwen3_moe"
  model, stats = hf.load_pretrained(os.path.join(FIXTURES, name), mesh=mesh, return_stats=True)
  params = nnx.state(model, nnx.Param)
  # The intended shardings: logical axes through trm_jax.sharding's rules (spelled out for three of them).
  want = sharding_lib.state_shardings(params, mesh)
  for leaf, s in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert leaf.sharding.is_equivalent_to(s, leaf.ndim), (leaf.shape, leaf.sharding, s)
  assert params["layers"]["attn"]["wq"][...].sharding.spec == P(None, "fsdp", "tensor", None)
  assert params["moe"]["w_down"][...].sharding.spec == P(None, None, "tensor", "fsdp")
  assert params["embed"][...].sharding.spec == P("tensor", "fsdp")
  # Each distinct slice is read once: one process holding all 8 devices reads the checkpoint exactly once.
  assert stats["bytes_read"] == stats["checkpoint_bytes"]
  g = golden(name)
  sharded, single = logits_at(model, g), logits_at(loaded(name), g)
  np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5 * np.abs(single).max())
  assert rel_err(sharded, g) <= 1e-4


def test_each_device_reads_only_its_slice():
  # One device's block of a [L, D, H, Dh] (layers, embed, heads, head_dim) weight = a [D/2, H/4 * Dh] window of
  # each layer's q_proj.weight^T: count the bytes and check the values against a whole-tensor reference.
  path = os.path.join(FIXTURES, "qwen3")
  cfg = hf.model_config_from_hf(path)
  src = hf.param_sources(cfg)["layers.attn.wq"]
  reader = hf.CheckpointReader(path)
  index = (slice(0, 2), slice(16, 32), slice(1, 2), slice(0, 8))
  block = hf.read_param(reader, src, index, np.float32)
  whole = load_file(os.path.join(path, "model.safetensors"))
  for i in range(2):
    ref = whole[f"model.layers.{i}.self_attn.q_proj.weight"].T.reshape(32, 4, 8)[16:32, 1:2, :]
    np.testing.assert_array_equal(block[i], ref)
  assert reader.bytes_read == block.nbytes == 2 * 16 * 8 * 4


def test_export_policy_of_a_run_checkpoint(tmp_path, monkeypatch):
  # A run's checkpoint (trainer layout: {"state": TrainState, "history"} + meta config) -> HF directory via the CLI
  # `python -m trm_jax.models.hf export` (its __main__ runs trm_jax.export.main), run in-process.
  from trm_jax import checkpoint as ckpt_lib
  from trm_jax import learner as learner_lib
  src = os.path.join(FIXTURES, "qwen3_moe")
  model = loaded("qwen3_moe")
  params = nnx.state(model, nnx.Param)
  state = learner_lib.TrainState(params=params, opt_state=({"mu": params},), step=np.int32(7))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  ck.save(7, {"state": state, "history": ()}, {"config": {"model": {"hf_path": src}}})
  ck.close()
  monkeypatch.setattr(sys, "argv", ["trm_jax.models.hf", "export", f"--workdir={tmp_path}",
                                    f"--out={tmp_path / 'out'}", "--dtype=keep"])
  runpy.run_module("trm_jax.models.hf", run_name="__main__", alter_sys=True)
  assert os.path.exists(tmp_path / "out" / hf.GENERATION)  # copied from hf_path with the tokenizer files
  again = nnx.state(hf.load_pretrained(str(tmp_path / "out")), nnx.Param)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    assert np.array_equal(np.asarray(x), np.asarray(y))


# The released config.json files (transformers 4.51 spelling), copied by hand from the Qwen/Qwen3-8B and
# Qwen/Qwen3-30B-A3B model cards: the loader must read them as the size presets describe them.
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}


@pytest.mark.parametrize("size,config", [("qwen3-8b", QWEN3_8B), ("qwen3-30b-a3b", QWEN3_30B_A3B)])
def test_released_config_json_matches_size_preset(size, config):
  from trm_jax.models import model_config_from
  assert hf.model_config_from_hf(config) == model_config_from({"size": size}, 151669)
  # and the export writes back what transformers needs to rebuild the same model
  assert hf.model_config_from_hf(hf.hf_config_from_model_config(hf.model_config_from_hf(config), dtype="bfloat16")) \
      == hf.model_config_from_hf(config)


@pytest.mark.parametrize("opts", [dict(qk_norm=False, qkv_bias=False), dict(qk_norm=False, qkv_bias=True, o_bias=True),
                                  dict(qk_norm=True, qkv_bias=True, o_bias=False)])
def test_export_refuses_models_without_an_hf_architecture(opts):
  from trm_jax.models import ModelConfig
  cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8, **opts)
  with pytest.raises(hf.HFCheckpointError, match="o_bias"):
    hf.hf_config_from_model_config(cfg, dtype="float32")
