"""trm_jax: Trust Region Masking (arXiv 2512.23075) for long-horizon LLM RL in JAX/Flax NNX."""
