"""`ModelConfig` (static shape and architecture options of the policy), size presets, and the `model` config.

Architectures are options of one model family (trm_jax/models/transformer.py), computed as transformers
computes them: `arch="qwen3"` (per-head q/k RMSNorm, no attention bias), `arch="qwen2"` (q/k/v bias, no
q/k norm), `arch="toy"` (neither: the project's own models); `kind="moe"` adds Qwen3-MoE routed experts.
The Qwen3 presets carry the values of the checkpoints' config.json, so a config builds the right
(abstract) shapes before any weight is loaded.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from trm_jax.models.layers import DTYPES

KINDS = ("dense", "moe")
ARCHS = {  # arch -> attention options
    "toy": dict(qk_norm=False, qkv_bias=False),
    "qwen3": dict(qk_norm=True, qkv_bias=False),
    "qwen2": dict(qk_norm=False, qkv_bias=True),
}
DIM_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")
DEFAULT_MAX_LEN = 16384

# Toy presets (character vocabularies); parameter counts exclude the embeddings.
PRESETS = {
    # ~80k: unit tests and laptop smoke runs.
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128),
    # ~3M.
    "small": dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=768),
    # ~75M.
    "base": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64, d_ff=2048),
    # ~0.76B (+ embeddings), a Llama-like 1B shape.
    "1b": dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128, d_ff=5632),
}
MOE_PRESET = dict(n_experts=8, experts_top_k=2, moe_every=1)

# Qwen3 checkpoints (Hugging Face config.json values). `d_ff` is intermediate_size, `moe_d_ff`
# moe_intermediate_size, `moe_every` decoder_sparse_step; vocab_size is the embedding's row count
# (larger than the tokenizer's, padded).
_QWEN3 = dict(arch="qwen3", vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, max_len=40960, head_dim=128)
HF_PRESETS = {
    "qwen3-0.6b": dict(_QWEN3, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, d_ff=3072,
                       tie_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8, d_ff=6144,
                       tie_embeddings=True),
    "qwen3-4b": dict(_QWEN3, d_model=2560, n_layers=36, n_heads=32, n_kv_heads=8, d_ff=9728,
                     tie_embeddings=True),
    "qwen3-8b": dict(_QWEN3, d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, d_ff=12288,
                     tie_embeddings=False),
    "qwen3-30b-a3b": dict(_QWEN3, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, d_ff=6144,
                          tie_embeddings=False, kind="moe", n_experts=128, experts_top_k=8, moe_d_ff=768,
                          moe_every=1, norm_topk_prob=True),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static shape and architecture options of the policy network (hashable: lives in the graphdef)."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int  # SwiGLU width of the dense layers (HF intermediate_size)
  max_len: int = DEFAULT_MAX_LEN
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of each q and k head, before RoPE
  qkv_bias: bool = False  # Qwen2: bias on the q/k/v projections
  o_bias: bool = False  # bias on the output projection (Qwen3 with attention_bias=True)
  kind: str = "dense"
  n_experts: int = 0
  experts_top_k: int = 0
  moe_d_ff: int = 0  # expert SwiGLU width (HF moe_intermediate_size); 0 = d_ff
  moe_every: int = 1  # HF decoder_sparse_step: layer i is MoE iff (i + 1) % moe_every == 0 ...
  mlp_only_layers: tuple = ()  # ... and i is not listed here (HF mlp_only_layers)
  norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
  moe_dispatch: str = "sparse"  # sparse: each token through its k experts only; dense: all experts (reference)
  param_dtype: str = "float32"
  tie_embeddings: bool = False
  scan_layers: bool = True  # scan over the stacked layers (False: unrolled loop over the same params)

  def __post_init__(self):
    object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
    if self.kind not in KINDS:
      raise ValueError(f"model.kind must be one of {KINDS}, got {self.kind!r}")
    if self.param_dtype not in DTYPES:
      raise ValueError(f"model.param_dtype must be one of {tuple(DTYPES)}, got {self.param_dtype!r}")
    for f in ("vocab_size",) + DIM_FIELDS + ("max_len",):
      if getattr(self, f) <= 0:
        raise ValueError(f"model.{f} must be positive, got {getattr(self, f)}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                       f"({self.n_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
    if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
      raise ValueError(f"model.rope_theta and model.rms_norm_eps must be > 0, got {self.rope_theta}, "
                       f"{self.rms_norm_eps}")
    if self.kind == "moe":
      if not 0 < self.experts_top_k <= self.n_experts:
        raise ValueError(f"model.experts_top_k must be in [1, n_experts={self.n_experts}], "
                         f"got {self.experts_top_k}")
      if not 0 < self.moe_every <= self.n_layers:
        raise ValueError(f"model.moe_every must be in [1, n_layers], got {self.moe_every}")
      if self.moe_dispatch not in ("sparse", "dense"):
        raise ValueError(f"model.moe_dispatch must be sparse or dense, got {self.moe_dispatch!r}")
      if self.moe_d_ff < 0:
        raise ValueError(f"model.moe_d_ff must be >= 0 (0 = d_ff), got {self.moe_d_ff}")
    bad = [i for i in self.mlp_only_layers if not 0 <= i < self.n_layers]
    if bad:
      raise ValueError(f"model.mlp_only_layers entries must be layer indices in [0, {self.n_layers}), got {bad}")

  def is_moe_layer(self, i: int) -> bool:
    """HF Qwen3-MoE's rule: MoE iff num_experts > 0, (i+1) % decoder_sparse_step == 0, i not in mlp_only_layers."""
    return self.kind == "moe" and (i + 1) % self.moe_every == 0 and i not in self.mlp_only_layers

  @property
  def moe_layers(self) -> tuple:
    """Indices of the MoE layers, in order (row j of the stacked `moe` params is layer moe_layers[j])."""
    return tuple(i for i in range(self.n_layers) if self.is_moe_layer(i))

  @property
  def dense_layers(self) -> tuple:
    """Indices of the dense-MLP layers, in order (row j of the stacked `mlp` params)."""
    return tuple(i for i in range(self.n_layers) if not self.is_moe_layer(i))

  @property
  def n_moe_layers(self) -> int:
    return len(self.moe_layers)


def default_model_config() -> ml_collections.ConfigDict:
  """The `model` config subtree; fields left at 0 / "" take the value of the `size` preset."""
  c = ml_collections.ConfigDict()
  c.size = "tiny"  # tiny | small | base | 1b | qwen3-0.6b | qwen3-1.7b | qwen3-4b | qwen3-8b | qwen3-30b-a3b | custom
  c.arch = ""  # toy | qwen3 (q/k norm) | qwen2 (q/k/v bias); "" = the preset's (toy for toy presets / custom)
  c.kind = ""  # dense | moe; "" = the preset's (dense except qwen3-30b-a3b)
  c.vocab_size = 0  # embedding rows; 0 = the preset's (Qwen: 151936) or the tokenizer's vocabulary
  c.d_model = 0  # residual width
  c.n_layers = 0  # transformer blocks
  c.n_heads = 0  # query heads
  c.n_kv_heads = 0  # key/value heads (grouped-query attention)
  c.head_dim = 0  # per-head width; 0 with d_model/n_heads overridden -> d_model // n_heads
  c.d_ff = 0  # SwiGLU hidden width of the dense layers (and of the experts unless moe_d_ff)
  c.n_experts = 0  # MoE experts (toy preset 8)
  c.experts_top_k = 0  # experts chosen per token (toy preset 2)
  c.moe_d_ff = 0  # expert SwiGLU width; 0 = the preset's, else d_ff
  c.moe_every = 0  # an MoE block every k layers (HF decoder_sparse_step; preset 1: every layer)
  c.mlp_only_layers = ()  # layer indices that stay dense in an MoE model (HF mlp_only_layers)
  c.norm_topk_prob = True  # renormalise the chosen experts' router probabilities (Qwen3-MoE: true)
  c.moe_dispatch = "sparse"  # sparse: dropless grouped matmul over each token's k experts | dense: all experts
  c.param_dtype = "float32"  # float32 | bfloat16: storage dtype of the parameters
  c.max_len = 0  # longest prompt + response the model accepts (toy presets 16384, Qwen3 40960)
  c.rope_theta = 0.0  # RoPE base; 0 = the preset's (toy 10000, Qwen3 1e6)
  c.rms_norm_eps = 0.0  # RMSNorm epsilon; 0 = the preset's (1e-6)
  c.tie_embeddings = False  # unembedding = embedding transpose (Qwen presets: their checkpoint's value)
  c.scan_layers = True  # run the stacked layers with lax.scan (False: unrolled; same parameters)
  c.hf_path = ""  # local Hugging Face checkpoint dir: its config.json + weights replace the fields above (zero-RL)
  return c


def model_config_from(cfg_model, vocab_size: int) -> ModelConfig:
  """Builds a `ModelConfig` from the `model` config subtree; explicit nonzero fields override the preset.

  `vocab_size` is the tokenizer's; the model's embedding may be larger (Qwen presets), never smaller.
  """
  get = lambda k, d=0: cfg_model.get(k, d) if hasattr(cfg_model, "get") else getattr(cfg_model, k, d)
  size = get("size", "tiny")
  opts = {}
  if size == "custom":
    dims = {}
    for f in DIM_FIELDS:
      if not get(f) and f != "head_dim":  # head_dim may follow from d_model // n_heads
        raise ValueError(f"model.{f} must be set (nonzero) when model.size='custom'")
  elif size in PRESETS:
    dims = dict(PRESETS[size])
  elif size in HF_PRESETS:
    opts = dict(HF_PRESETS[size])
    dims = {f: opts.pop(f) for f in DIM_FIELDS}
    if get("tie_embeddings", False) and not opts["tie_embeddings"]:
      raise ValueError(f"model.tie_embeddings=True contradicts the untied checkpoint of model.size={size!r}")
  else:
    raise ValueError(f"model.size must be one of {tuple(PRESETS) + tuple(HF_PRESETS) + ('custom',)}, "
                     f"got {size!r}")
  for f in DIM_FIELDS:
    if get(f):
      dims[f] = int(get(f))
  if not get("head_dim") and (get("d_model") or get("n_heads") or size == "custom"):
    dims["head_dim"] = dims["d_model"] // dims["n_heads"]
  arch = get("arch", "") or opts.pop("arch", "toy")
  opts.pop("arch", None)
  if arch not in ARCHS:
    raise ValueError(f"model.arch must be one of {tuple(ARCHS)}, got {arch!r}")
  kind = get("kind", "") or opts.pop("kind", "dense")
  opts.pop("kind", None)
  vocab = int(get("vocab_size") or opts.pop("vocab_size", 0) or vocab_size)
  opts.pop("vocab_size", None)
  if vocab_size > vocab:
    raise ValueError(f"the tokenizer's vocabulary ({vocab_size}) exceeds model.vocab_size ({vocab})")
  moe = {}
  if kind == "moe":
    moe = {f: int(get(f) or opts.get(f) or MOE_PRESET[f]) for f in MOE_PRESET}
    moe["moe_d_ff"] = int(get("moe_d_ff") or opts.get("moe_d_ff", 0))
    moe["mlp_only_layers"] = tuple(get("mlp_only_layers", ()) or ())
    moe["norm_topk_prob"] = bool(get("norm_topk_prob", True))
    moe["moe_dispatch"] = str(get("moe_dispatch", "sparse"))
  return ModelConfig(
      vocab_size=vocab, kind=kind, max_len=int(get("max_len") or opts.get("max_len", DEFAULT_MAX_LEN)),
      rope_theta=float(get("rope_theta") or opts.get("rope_theta", 10000.0)),
      rms_norm_eps=float(get("rms_norm_eps") or opts.get("rms_norm_eps", 1e-6)),
      param_dtype=get("param_dtype", "float32"),
      tie_embeddings=bool(opts.get("tie_embeddings", get("tie_embeddings", False))),
      scan_layers=bool(get("scan_layers", True)), **ARCHS[arch], **dims, **moe)
