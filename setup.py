"""trm_jax: Trust Region Masking (arXiv 2512.23075) for long-horizon LLM RL in JAX/Flax."""
import setuptools

setuptools.setup(
    name="trm_jax",
    version="0.1.0",
    description="Trust Region Masking for long-horizon LLM reinforcement learning, in JAX/Flax NNX.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    # experiments/ installs too, so `python -m experiments.benchmarks.bench` works from any directory.
    packages=setuptools.find_packages(include=["trm_jax", "trm_jax.*", "experiments", "experiments.*"]),
    python_requires=">=3.10",
    # Loose pins: lower bounds are the versions this was built and tested with
    # (jax 0.10 here, 0.11 on the GPU machines); pods run newer.
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.88",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "tensorflow-datasets>=4.9",
        "importlib_resources>=6.0",  # tfds.data_source without TensorFlow needs it
        "array_record>=0.5",
        "grain>=0.2",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "pyarrow>=14",  # parquet files for the math data builders
        "safetensors>=0.6",  # Hugging Face checkpoints (trm_jax.models.hf), sliced reads per process
        "tokenizers>=0.19",  # Hugging Face tokenizer.json, without transformers at run time
        "jinja2>=3.1",  # chat templates, rendered the way transformers renders them
        "math-verify>=0.7",  # optional math reward checker (data.text.reward=math_verify), in worker processes
    ],
    extras_require={
        "test": ["pytest>=8"],
        # jax[tpu] brings libtpu (matching jax), the ahead-of-time compiler `python -m trm_jax.plan` (and
        # tests/test_plan.py) uses to compile for a TPU topology on a CPU. Its own extra: where libtpu is
        # installed but no TPU is attached, every `import jax` prints TPU-discovery warnings.
        "tpu": ["jax[tpu]; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        # python -m experiments.benchmarks.bench compares with HF transformers / PyTorch on CPU.
        "bench": ["torch>=2.3", "transformers>=4.51"],  # Qwen3 + logits_to_keep
    },
)
