"""Policy models: the decoder-only transformer (dense / MoE) and the `Numerics` it is computed with."""
from trm_jax.models.layers import LEARNER, Numerics
from trm_jax.models.transformer import (
    KVCache,
    ModelConfig,
    Transformer,
    default_model_config,
    model_config_from,
    positions_from_valid,
)

__all__ = [
    "KVCache", "LEARNER", "ModelConfig", "Numerics", "Transformer", "default_model_config",
    "model_config_from", "positions_from_valid",
]
