"""Hugging Face interop: local Qwen3 / Qwen3-MoE / Qwen2 checkpoints <-> the trm_jax `Transformer`.

    model = load_pretrained("/ckpt/Qwen3-8B-Base", mesh=mesh)      # logits = model(tokens, positions, valid)
    save_pretrained(model, "/out/policy", dtype="bfloat16")         # transformers / vLLM load it
    python -m trm_jax.models.hf export --workdir=RUN --out=DIR      # a run's policy -> HF (trm_jax.export)

`config`: config.json <-> `ModelConfig`; `weights`: the name / layout table, sliced sharded loading, writing.
Exporting a training run's checkpoint lives in trm_jax.export (it reads the run's checkpoints).
"""
from trm_jax.models.hf.config import (ARCHITECTURES, CONFIG, GENERATION, INDEX, SIDE_FILES, SINGLE, HFCheckpointError,
                                      hf_config_from_model_config, model_config_from_hf, read_hf_config)
from trm_jax.models.hf.weights import (ST_ITEMSIZE, CheckpointReader, Source, abstract_model, check_tensors,
                                       flat_paths, hf_tensors, load_params, load_pretrained, param_path,
                                       param_sources, read_param, save_pretrained)

__all__ = [
    "ARCHITECTURES", "CONFIG", "GENERATION", "INDEX", "SIDE_FILES", "SINGLE", "ST_ITEMSIZE", "CheckpointReader",
    "HFCheckpointError", "Source", "abstract_model", "check_tensors", "flat_paths", "hf_config_from_model_config",
    "hf_tensors", "load_params", "load_pretrained", "model_config_from_hf", "param_path", "param_sources",
    "read_hf_config", "read_param", "save_pretrained",
]
