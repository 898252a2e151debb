"""The tiny model every rollout test samples from: one definition, so the tests agree on it."""
from flax import nnx

from trm_jax.models import ModelConfig, Transformer


def build(kind: str, *, vocab: int, max_len: int = 64, n_experts: int = 4, seed: int = 0, **options):
  """(graphdef, state) of a 2-layer d_model=32 dense or MoE (top-2 of n_experts) transformer.

  `options` override ModelConfig fields (e.g. qk_norm=True, n_layers=3, mlp_only_layers=(0,) for a
  Qwen3-MoE-like layout)."""
  cfg = ModelConfig(**{**dict(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                              d_ff=64, max_len=max_len, kind=kind, n_experts=n_experts if kind == "moe" else 0,
                              experts_top_k=2 if kind == "moe" else 0), **options})
  with nnx.use_eager_sharding(False):
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
