"""Data layer: tokenizer, synthetic verifiable tasks, TFDS builders, grain pipeline, real math data.

Submodules are imported on demand (`from trm_jax.data import pipeline`) so that importing the
tokenizer or the tasks does not pull in TFDS / grain.
"""
