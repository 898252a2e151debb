"""trm_jax experiments: paper figures and benchmarks."""
