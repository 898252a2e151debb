"""Rollout: the sampling distribution, the KV-cache sampler and the mismatch backends."""
from trm_jax.rollout.backends import (
    RolloutBackend,
    backend_from_config,
    default_backend_config,
)
from trm_jax.rollout.sampler import SampleOutput, sample, sample_groups, sequence_inputs
from trm_jax.rollout.sampling import processed_logprobs

__all__ = [
    "RolloutBackend", "SampleOutput", "backend_from_config", "default_backend_config",
    "processed_logprobs", "sample", "sample_groups", "sequence_inputs",
]
