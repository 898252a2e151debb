"""Benchmarks of trm_jax: speed, memory, peers."""
