"""Hugging Face config.json <-> trm_jax `ModelConfig` for Qwen3 / Qwen3-MoE / Qwen2, and the file names of an
HF checkpoint directory.

`model_config_from_hf` rejects, by field name, whatever the `Transformer` would not compute exactly as
transformers does (rope scaling, sliding windows, other activations, quantization).
"""
from __future__ import annotations

import json
import os

from trm_jax.models.presets import DEFAULT_MAX_LEN, ModelConfig

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CONFIG, SINGLE, INDEX, GENERATION = ("config.json", "model.safetensors", "model.safetensors.index.json",
                                     "generation_config.json")
# Files copied next to an export so the directory is a complete HF model (tokenizer, chat template, stops).
SIDE_FILES = (GENERATION, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "merges.txt", "chat_template.jinja")


class HFCheckpointError(ValueError):
  """A checkpoint directory trm_jax cannot (or refuses to) read; the message names the file/tensor/field."""


def read_hf_config(path: str) -> dict:
  """The parsed config.json of the checkpoint directory `path`."""
  file = os.path.join(path, CONFIG)
  if not os.path.isfile(file):
    raise HFCheckpointError(f"{file}: missing (a Hugging Face checkpoint directory needs config.json)")
  with open(file) as f:
    return json.load(f)


def model_config_from_hf(path_or_config, *, dtype: str = "float32", max_len: int | None = None,
                         scan_layers: bool = True) -> ModelConfig:
  """The `ModelConfig` of a checkpoint's config.json (a directory or the parsed dict); rejects what the model
  does not compute exactly as transformers does (rope scaling, sliding windows, other activations), by name."""
  hc = read_hf_config(path_or_config) if isinstance(path_or_config, str) else dict(path_or_config)
  where = os.path.join(path_or_config, CONFIG) if isinstance(path_or_config, str) else CONFIG
  mt = hc.get("model_type")
  if mt not in ARCHITECTURES:
    raise HFCheckpointError(f"{where}: model_type={mt!r} is not supported; trm_jax reads {tuple(ARCHITECTURES)}")
  archs = hc.get("architectures") or [ARCHITECTURES[mt]]
  if archs != [ARCHITECTURES[mt]]:
    raise HFCheckpointError(f"{where}: architectures={archs} is not [{ARCHITECTURES[mt]!r}] (model_type={mt!r})")
  bad = lambda field, value, why: HFCheckpointError(f"{where}: {field}={value!r} is not supported ({why})")
  rope = hc.get("rope_parameters") or {}
  if any(isinstance(v, dict) for v in rope.values()):
    raise bad("rope_parameters", rope, "per-layer-type RoPE settings")
  if hc.get("rope_scaling"):
    raise bad("rope_scaling", hc["rope_scaling"], "only plain RoPE is implemented")
  if rope.get("rope_type", "default") != "default":
    raise bad("rope_parameters.rope_type", rope["rope_type"], "only plain RoPE is implemented")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise bad("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"], "RoPE covers head_dim")
  if hc.get("use_sliding_window"):
    raise bad("use_sliding_window", True, "every layer attends to the full context")
  if any(t != "full_attention" for t in hc.get("layer_types") or ()):
    raise bad("layer_types", hc["layer_types"], "every layer attends to the full context")
  if hc.get("quantization_config"):
    raise bad("quantization_config", hc["quantization_config"].get("quant_method", "?"), "load a bf16/f32 checkpoint")
  if hc.get("hidden_act", "silu") != "silu":
    raise bad("hidden_act", hc["hidden_act"], "the MLP is SwiGLU with silu")
  theta = rope.get("rope_theta", hc.get("rope_theta", 10000.0))
  n_heads = int(hc["num_attention_heads"])
  moe = {}
  if mt == "qwen3_moe":
    if hc.get("shared_expert_intermediate_size"):
      raise bad("shared_expert_intermediate_size", hc["shared_expert_intermediate_size"], "no shared expert")
    n_experts = int(hc.get("num_experts", hc.get("num_local_experts", 0)))
    moe = dict(kind="moe", n_experts=n_experts, experts_top_k=int(hc["num_experts_per_tok"]),
               moe_d_ff=int(hc["moe_intermediate_size"]), moe_every=int(hc.get("decoder_sparse_step", 1)),
               mlp_only_layers=tuple(hc.get("mlp_only_layers") or ()),
               norm_topk_prob=bool(hc.get("norm_topk_prob", False)))
    if n_experts <= 0:  # HF then builds a dense model; say so rather than guess
      raise bad("num_experts", n_experts, "a qwen3_moe checkpoint without experts")
  attn_bias = bool(hc.get("attention_bias", False))
  return ModelConfig(
      vocab_size=int(hc["vocab_size"]), d_model=int(hc["hidden_size"]), n_layers=int(hc["num_hidden_layers"]),
      n_heads=n_heads, n_kv_heads=int(hc.get("num_key_value_heads") or n_heads),
      head_dim=int(hc.get("head_dim") or int(hc["hidden_size"]) // n_heads), d_ff=int(hc["intermediate_size"]),
      max_len=int(max_len or hc.get("max_position_embeddings") or DEFAULT_MAX_LEN), rope_theta=float(theta),
      rms_norm_eps=float(hc.get("rms_norm_eps", 1e-6)), qk_norm=mt != "qwen2", qkv_bias=mt == "qwen2" or attn_bias,
      o_bias=mt != "qwen2" and attn_bias, tie_embeddings=bool(hc.get("tie_word_embeddings", False)),
      param_dtype=dtype, scan_layers=scan_layers, **moe)


def hf_config_from_model_config(cfg: ModelConfig, *, dtype: str) -> dict:
  """config.json for `cfg`, in the transformers 4.x spelling that 4.x, 5.x and vLLM all read."""
  if cfg.qk_norm:
    if cfg.qkv_bias != cfg.o_bias:
      raise HFCheckpointError(f"Qwen3's attention_bias sets q/k/v and o biases together; got qkv_bias="
                              f"{cfg.qkv_bias}, o_bias={cfg.o_bias}")
    mt = "qwen3_moe" if cfg.kind == "moe" else "qwen3"
  elif cfg.qkv_bias and not cfg.o_bias and cfg.kind == "dense":
    mt = "qwen2"
  else:
    raise HFCheckpointError(f"no HF architecture for qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias}, o_bias="
                            f"{cfg.o_bias}, kind={cfg.kind!r}: Qwen3(-MoE) needs qk_norm, Qwen2 dense q/k/v bias only")
  hc = dict(architectures=[ARCHITECTURES[mt]], model_type=mt, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
            max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
            rope_scaling=None, tie_word_embeddings=cfg.tie_embeddings, use_sliding_window=False,
            sliding_window=None, attention_dropout=0.0, torch_dtype=dtype, use_cache=True)
  if mt != "qwen2":
    hc["attention_bias"] = cfg.o_bias
  if mt == "qwen3_moe":
    hc.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_top_k,
              moe_intermediate_size=cfg.moe_d_ff or cfg.d_ff, decoder_sparse_step=cfg.moe_every,
              mlp_only_layers=list(cfg.mlp_only_layers), norm_topk_prob=cfg.norm_topk_prob,
              output_router_logits=False, router_aux_loss_coef=0.001)
  return hc
