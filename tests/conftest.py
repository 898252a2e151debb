"""Test setup: 8 fake CPU devices so every test can exercise sharding.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Tests compare against float64 references only where they ask for it explicitly.
jax.config.update("jax_default_matmul_precision", "highest")

# The end-to-end tests build the same programs several times (a run, its resumed twin, the CLI):
# a persistent compilation cache (per test session) turns the repeats into cache hits.
import tempfile  # noqa: E402

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="trm_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
