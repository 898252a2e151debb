"""Policy models: the decoder-only transformer (dense / MoE; toy, Qwen3, Qwen3-MoE, Qwen2 options) and the
`Numerics` it is computed with."""
from trm_jax.models.layers import LEARNER, Numerics
from trm_jax.models.presets import HF_PRESETS, PRESETS, ModelConfig, default_model_config, model_config_from
from trm_jax.models.transformer import REMAT_POLICIES, KVCache, Transformer, positions_from_valid, sequence_inputs

__all__ = [
    "HF_PRESETS", "KVCache", "LEARNER", "ModelConfig", "Numerics", "PRESETS", "REMAT_POLICIES", "Transformer",
    "default_model_config", "model_config_from", "positions_from_valid", "sequence_inputs",
]
