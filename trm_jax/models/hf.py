"""Hugging Face interop: local Qwen3 / Qwen3-MoE / Qwen2 checkpoints <-> the trm_jax `Transformer`.

    model = load_pretrained("/ckpt/Qwen3-8B-Base", mesh=mesh)      # logits = model(tokens, positions, valid)
    save_pretrained(model, "/out/policy", dtype="bfloat16")         # transformers / vLLM load it
    python -m trm_jax.models.hf export --workdir=RUN --out=DIR      # a training run's policy -> HF directory

Loading reads `config.json` and `model.safetensors` or `model.safetensors.index.json` (+ its shards). Each
parameter is created directly in its sharding with `jax.make_array_from_callback`: a process reads, through
safetensors' lazy `get_slice`, only the slices its own devices hold, and transposes / splits heads / stacks
layers per slice, so no host ever holds a whole 8B model. Every checkpoint tensor must feed exactly one
parameter and every parameter must be filled; anything else is an error naming the tensor and file.

The name/layout table (`param_sources`) is the only place that knows both trees. A parameter is a stack
(layers, and experts) of "cores"; a core is one HF tensor whose dims each hold one or more core dims in
row-major order: e.g. q_proj.weight [H*Dh, D] holds core wq [D, H, Dh] as groups ((1, 2), (0,)).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from trm_jax import sharding as sharding_lib
from trm_jax.models.layers import DTYPES
from trm_jax.models.transformer import DEFAULT_MAX_LEN, ModelConfig, Transformer

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CONFIG, SINGLE, INDEX, GENERATION = ("config.json", "model.safetensors", "model.safetensors.index.json",
                                     "generation_config.json")
# Files copied next to an export so the directory is a complete HF model (tokenizer, chat template, stops).
SIDE_FILES = (GENERATION, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "merges.txt", "chat_template.jinja")
ST_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}  # safetensors dtypes the loader reads (and casts)


class HFCheckpointError(ValueError):
  """A checkpoint directory trm_jax cannot (or refuses to) read; the message names the file/tensor/field."""


# ----------------------------------------------------------------------------- config.json


def read_hf_config(path: str) -> dict:
  file = os.path.join(path, CONFIG)
  if not os.path.isfile(file):
    raise HFCheckpointError(f"{file}: missing (a Hugging Face checkpoint directory needs config.json)")
  with open(file) as f:
    return json.load(f)


def model_config_from_hf(path_or_config, *, dtype: str = "float32", max_len: int | None = None,
                         scan_layers: bool = True) -> ModelConfig:
  """The `ModelConfig` of a checkpoint's config.json (a directory or the parsed dict); rejects what the model
  does not compute exactly as transformers does (rope scaling, sliding windows, other activations), by name."""
  hc = read_hf_config(path_or_config) if isinstance(path_or_config, str) else dict(path_or_config)
  where = os.path.join(path_or_config, CONFIG) if isinstance(path_or_config, str) else CONFIG
  mt = hc.get("model_type")
  if mt not in ARCHITECTURES:
    raise HFCheckpointError(f"{where}: model_type={mt!r} is not supported; trm_jax reads {tuple(ARCHITECTURES)}")
  archs = hc.get("architectures") or [ARCHITECTURES[mt]]
  if archs != [ARCHITECTURES[mt]]:
    raise HFCheckpointError(f"{where}: architectures={archs} is not [{ARCHITECTURES[mt]!r}] (model_type={mt!r})")
  bad = lambda field, value, why: HFCheckpointError(f"{where}: {field}={value!r} is not supported ({why})")
  rope = hc.get("rope_parameters") or {}
  if any(isinstance(v, dict) for v in rope.values()):
    raise bad("rope_parameters", rope, "per-layer-type RoPE settings")
  if hc.get("rope_scaling"):
    raise bad("rope_scaling", hc["rope_scaling"], "only plain RoPE is implemented")
  if rope.get("rope_type", "default") != "default":
    raise bad("rope_parameters.rope_type", rope["rope_type"], "only plain RoPE is implemented")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise bad("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"], "RoPE covers head_dim")
  if hc.get("use_sliding_window"):
    raise bad("use_sliding_window", True, "every layer attends to the full context")
  if any(t != "full_attention" for t in hc.get("layer_types") or ()):
    raise bad("layer_types", hc["layer_types"], "every layer attends to the full context")
  if hc.get("quantization_config"):
    raise bad("quantization_config", hc["quantization_config"].get("quant_method", "?"), "load a bf16/f32 checkpoint")
  if hc.get("hidden_act", "silu") != "silu":
    raise bad("hidden_act", hc["hidden_act"], "the MLP is SwiGLU with silu")
  theta = rope.get("rope_theta", hc.get("rope_theta", 10000.0))
  n_heads = int(hc["num_attention_heads"])
  moe = {}
  if mt == "qwen3_moe":
    if hc.get("shared_expert_intermediate_size"):
      raise bad("shared_expert_intermediate_size", hc["shared_expert_intermediate_size"], "no shared expert")
    n_experts = int(hc.get("num_experts", hc.get("num_local_experts", 0)))
    moe = dict(kind="moe", n_experts=n_experts, experts_top_k=int(hc["num_experts_per_tok"]),
               moe_d_ff=int(hc["moe_intermediate_size"]), moe_every=int(hc.get("decoder_sparse_step", 1)),
               mlp_only_layers=tuple(hc.get("mlp_only_layers") or ()),
               norm_topk_prob=bool(hc.get("norm_topk_prob", False)))
    if n_experts <= 0:  # HF then builds a dense model; say so rather than guess
      raise bad("num_experts", n_experts, "a qwen3_moe checkpoint without experts")
  attn_bias = bool(hc.get("attention_bias", False))
  return ModelConfig(
      vocab_size=int(hc["vocab_size"]), d_model=int(hc["hidden_size"]), n_layers=int(hc["num_hidden_layers"]),
      n_heads=n_heads, n_kv_heads=int(hc.get("num_key_value_heads") or n_heads),
      head_dim=int(hc.get("head_dim") or int(hc["hidden_size"]) // n_heads), d_ff=int(hc["intermediate_size"]),
      max_len=int(max_len or hc.get("max_position_embeddings") or DEFAULT_MAX_LEN), rope_theta=float(theta),
      rms_norm_eps=float(hc.get("rms_norm_eps", 1e-6)), qk_norm=mt != "qwen2", qkv_bias=mt == "qwen2" or attn_bias,
      o_bias=mt != "qwen2" and attn_bias, tie_embeddings=bool(hc.get("tie_word_embeddings", False)),
      param_dtype=dtype, scan_layers=scan_layers, **moe)


def hf_config_from_model_config(cfg: ModelConfig, *, dtype: str) -> dict:
  """config.json for `cfg`, in the transformers 4.x spelling that 4.x, 5.x and vLLM all read."""
  if cfg.qk_norm:
    if cfg.qkv_bias != cfg.o_bias:
      raise HFCheckpointError(f"Qwen3's attention_bias sets q/k/v and o biases together; got qkv_bias="
                              f"{cfg.qkv_bias}, o_bias={cfg.o_bias}")
    mt = "qwen3_moe" if cfg.kind == "moe" else "qwen3"
  elif cfg.qkv_bias and not cfg.o_bias and cfg.kind == "dense":
    mt = "qwen2"
  else:
    raise HFCheckpointError(f"no HF architecture for qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias}, o_bias="
                            f"{cfg.o_bias}, kind={cfg.kind!r}: Qwen3(-MoE) needs qk_norm, Qwen2 dense q/k/v bias only")
  hc = dict(architectures=[ARCHITECTURES[mt]], model_type=mt, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
            max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
            rope_scaling=None, tie_word_embeddings=cfg.tie_embeddings, use_sliding_window=False,
            sliding_window=None, attention_dropout=0.0, torch_dtype=dtype, use_cache=True)
  if mt != "qwen2":
    hc["attention_bias"] = cfg.o_bias
  if mt == "qwen3_moe":
    hc.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_top_k,
              moe_intermediate_size=cfg.moe_d_ff or cfg.d_ff, decoder_sparse_step=cfg.moe_every,
              mlp_only_layers=list(cfg.mlp_only_layers), norm_topk_prob=cfg.norm_topk_prob,
              output_router_logits=False, router_aux_loss_coef=0.001)
  return hc


# ----------------------------------------------------------------------------- the name / layout table


@dataclasses.dataclass(frozen=True)
class Source:
  """A parameter = a stack (shape names.shape) of cores; core = HF tensor names[i] regrouped by `groups`."""

  names: np.ndarray  # object array of HF tensor names, shape = the parameter's leading stack dims
  groups: tuple  # per HF tensor dim: the core dims it holds, outermost first (row-major)
  core_shape: tuple

  @property
  def hf_shape(self) -> tuple:
    return tuple(math.prod(self.core_shape[d] for d in g) for g in self.groups)


def param_sources(cfg: ModelConfig) -> dict[str, Source]:
  """nnx parameter path ("layers.attn.wq") -> where its values live in the HF checkpoint."""
  D, H, K, Dh, V, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.n_experts
  F, Fm = cfg.d_ff, cfg.moe_d_ff or cfg.d_ff
  lay = lambda i, s: f"model.layers.{i}.{s}"
  stack = lambda layers, s: np.array([lay(i, s) for i in layers], dtype=object)
  experts = lambda layers, s: np.array([[lay(i, s.format(e=e)) for e in range(E)] for i in layers], dtype=object)
  one = lambda name: np.array(name, dtype=object)
  T = ((1,), (0,))  # a Linear weight [out, in] holding a core [in, out]
  out = {"embed": Source(one("model.embed_tokens.weight"), ((0,), (1,)), (V, D)),
         "final_norm.scale": Source(one("model.norm.weight"), ((0,),), (D,))}
  if not cfg.tie_embeddings:
    out["unembedding"] = Source(one("lm_head.weight"), T, (D, V))
  L = range(cfg.n_layers)
  out["layers.attn_norm.scale"] = Source(stack(L, "input_layernorm.weight"), ((0,),), (D,))
  out["layers.mlp_norm.scale"] = Source(stack(L, "post_attention_layernorm.weight"), ((0,),), (D,))
  for p, n in (("q", H), ("k", K), ("v", K)):
    out[f"layers.attn.w{p}"] = Source(stack(L, f"self_attn.{p}_proj.weight"), ((1, 2), (0,)), (D, n, Dh))
    if cfg.qkv_bias:
      out[f"layers.attn.b{p}"] = Source(stack(L, f"self_attn.{p}_proj.bias"), ((0, 1),), (n, Dh))
  out["layers.attn.wo"] = Source(stack(L, "self_attn.o_proj.weight"), ((2,), (0, 1)), (H, Dh, D))
  if cfg.o_bias:
    out["layers.attn.bo"] = Source(stack(L, "self_attn.o_proj.bias"), ((0,),), (D,))
  if cfg.qk_norm:
    out["layers.attn.q_norm.scale"] = Source(stack(L, "self_attn.q_norm.weight"), ((0,),), (Dh,))
    out["layers.attn.k_norm.scale"] = Source(stack(L, "self_attn.k_norm.weight"), ((0,),), (Dh,))
  if cfg.dense_layers:
    for p in ("gate", "up"):
      out[f"mlp.w_{p}"] = Source(stack(cfg.dense_layers, f"mlp.{p}_proj.weight"), T, (D, F))
    out["mlp.w_down"] = Source(stack(cfg.dense_layers, "mlp.down_proj.weight"), T, (F, D))
  if cfg.moe_layers:
    out["moe.router"] = Source(stack(cfg.moe_layers, "mlp.gate.weight"), T, (D, E))
    for p in ("gate", "up"):
      out[f"moe.w_{p}"] = Source(experts(cfg.moe_layers, f"mlp.experts.{{e}}.{p}_proj.weight"), T, (D, Fm))
    out["moe.w_down"] = Source(experts(cfg.moe_layers, "mlp.experts.{e}.down_proj.weight"), T, (Fm, D))
  return out


# ----------------------------------------------------------------------------- reading


class CheckpointReader:
  """Tensor headers of a (sharded) safetensors checkpoint and per-slice reads, with a count of bytes read."""

  def __init__(self, path: str):
    self.path = path
    index, single = os.path.join(path, INDEX), os.path.join(path, SINGLE)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise HFCheckpointError(f"{index}: no 'weight_map' object")
    elif os.path.isfile(single):
      weight_map = None
    else:
      raise HFCheckpointError(f"{path}: neither {SINGLE} nor {INDEX} found")
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
    self.tensors = {}  # name -> (file, shape, dtype)
    self._handles = {}
    for file in files:
      full = os.path.join(path, file)
      if not os.path.isfile(full):
        raise HFCheckpointError(f"{full}: listed in {INDEX} but missing")
      h = self._open(file)
      for name in h.keys():
        if name in self.tensors:
          raise HFCheckpointError(f"tensor {name!r} appears in both {self.tensors[name][0]} and {file}")
        if weight_map is not None and weight_map.get(name) != file:
          raise HFCheckpointError(f"tensor {name!r} is in {file} but {INDEX} maps it to {weight_map.get(name)!r}")
        sl = h.get_slice(name)
        self.tensors[name] = (file, tuple(sl.get_shape()), sl.get_dtype())
    if weight_map is not None and set(weight_map) - set(self.tensors):
      lost = sorted(set(weight_map) - set(self.tensors))
      raise HFCheckpointError(f"{os.path.join(path, INDEX)} lists tensors no shard holds: {lost[:5]}")
    self.bytes_read = 0
    self.total_bytes = sum(math.prod(s) * ST_ITEMSIZE.get(d, 4) for _, s, d in self.tensors.values())

  def _open(self, file: str):
    if file not in self._handles:
      self._handles[file] = safe_open(os.path.join(self.path, file), framework="np")
    return self._handles[file]

  def read(self, name: str, index: tuple) -> np.ndarray:
    block = self._open(self.tensors[name][0]).get_slice(name)[index]
    self.bytes_read += block.nbytes
    return block

  def release(self) -> None:
    """Closes the memory maps: the file pages a parameter's slices touched leave this process's memory."""
    self._handles = {}


def check_tensors(sources: dict[str, Source], reader: CheckpointReader, *, tied: bool = False) -> None:
  """Every checkpoint tensor is used exactly once, every parameter's tensors exist with the right shapes.

  With tied embeddings a checkpoint may still store lm_head.weight; it is accepted only if equal to the embedding.
  """
  wanted = {}
  if tied and "lm_head.weight" in reader.tensors:
    _check_tied_copy(reader)
    wanted["lm_head.weight"] = ("embed (tied)", reader.tensors["model.embed_tokens.weight"][1])
  for path, src in sources.items():
    for name in src.names.reshape(-1):
      assert name not in wanted, (name, path, wanted.get(name))  # the table itself maps each name once
      wanted[name] = (path, src.hf_shape)
  missing = sorted(set(wanted) - set(reader.tensors))
  if missing:
    raise HFCheckpointError(f"{reader.path}: missing tensor {missing[0]!r} (for parameter {wanted[missing[0]][0]})"
                            + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
  extra = sorted(set(reader.tensors) - set(wanted))
  if extra:
    raise HFCheckpointError(f"{reader.path}: unexpected tensor {extra[0]!r} in {reader.tensors[extra[0]][0]} "
                            "(no parameter of this config.json uses it)"
                            + (f"; and {len(extra) - 1} more" if len(extra) > 1 else ""))
  for name, (path, shape) in wanted.items():
    file, got, dtype = reader.tensors[name]
    if got != shape:
      raise HFCheckpointError(f"{reader.path}/{file}: tensor {name!r} has shape {list(got)}, config.json implies "
                              f"{list(shape)} (parameter {path})")
    if dtype not in ST_ITEMSIZE:
      raise HFCheckpointError(f"{reader.path}/{file}: tensor {name!r} has dtype {dtype}; expected one of "
                              f"{tuple(ST_ITEMSIZE)}")


def _check_tied_copy(reader: CheckpointReader, rows: int = 8192) -> None:
  a, b = "model.embed_tokens.weight", "lm_head.weight"
  if a not in reader.tensors or reader.tensors[a][1] != reader.tensors[b][1]:
    return  # check_tensors reports the missing / misshapen tensor
  n = reader.tensors[a][1][0]
  for r in range(0, n, rows):
    block = (slice(r, min(r + rows, n)),)
    if not np.array_equal(reader.read(a, block), reader.read(b, block)):
      raise HFCheckpointError(f"{reader.path}: config.json has tie_word_embeddings=true but tensor 'lm_head.weight' "
                              f"differs from 'model.embed_tokens.weight' (rows {r}..)")


def _read_core(reader: CheckpointReader, name: str, src: Source, core_index: tuple) -> np.ndarray:
  """The block core[core_index] of one HF tensor: read the outer-dim ranges, split dims, transpose, slice."""
  core_index = tuple(s.indices(n) for s, n in zip(core_index, src.core_shape))
  hf_index, block_shape, order = [], [], []
  for g in src.groups:
    inner = math.prod(src.core_shape[d] for d in g[1:])
    start, stop, _ = core_index[g[0]]
    hf_index.append(slice(start * inner, stop * inner))
    block_shape += [stop - start] + [src.core_shape[d] for d in g[1:]]
    order += list(g)
  block = reader.read(name, tuple(hf_index)).reshape(block_shape).transpose(np.argsort(order))
  inner_dims = {d for g in src.groups for d in g[1:]}  # head_dim is never sharded: these are usually whole
  return block[tuple(slice(*core_index[d][:2]) if d in inner_dims else slice(None) for d in range(len(core_index)))]


def read_param(reader: CheckpointReader, src: Source, index: tuple, dtype) -> np.ndarray:
  """Parameter block [index] (a tuple of slices over stack dims + core dims), cast to `dtype`."""
  ns = src.names.ndim
  names = np.array(src.names[index[:ns]], dtype=object)
  cores = [_read_core(reader, n, src, index[ns:]).astype(dtype) for n in names.reshape(-1)]
  return np.stack(cores).reshape(names.shape + cores[0].shape) if ns else cores[0]


def _flat_paths(state) -> list[str]:
  paths = []
  jax.tree_util.tree_map_with_path(lambda p, _: paths.append(_path(p)), state)
  return paths


def _path(keypath) -> str:
  parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath]
  return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def load_params(path: str, cfg: ModelConfig, abstract_params, shardings, *, reader: CheckpointReader | None = None):
  """Fills `abstract_params` (the nnx.State of an abstract `Transformer(cfg)`) from the checkpoint at `path`.

  `shardings` is a matching tree of `jax.sharding.Sharding`s; every parameter is built by
  `jax.make_array_from_callback`, so this process reads only the slices of its own devices (each distinct
  slice once). Returns the filled State.
  """
  reader = reader or CheckpointReader(path)
  sources = param_sources(cfg)
  paths = _flat_paths(abstract_params)
  unknown = sorted(set(paths) - set(sources))
  if unknown:  # the model grew a parameter the table does not know: a trm_jax bug, not the user's
    raise HFCheckpointError(f"parameter {unknown[0]} has no Hugging Face counterpart in trm_jax.models.hf")
  check_tensors({p: sources[p] for p in paths}, reader, tied=cfg.tie_embeddings)
  leaves, treedef = jax.tree.flatten(abstract_params)
  filled = []
  for p, leaf, sharding in zip(paths, leaves, jax.tree.leaves(shardings)):
    src, cache = sources[p], {}
    if tuple(leaf.shape) != src.names.shape + src.core_shape:
      raise HFCheckpointError(f"parameter {p}: model shape {leaf.shape} != table {src.names.shape + src.core_shape}")

    def callback(index, src=src, cache=cache, dtype=leaf.dtype):
      key = tuple((s.start, s.stop) for s in index)
      if key not in cache:  # devices holding the same slice (replicas) share one read
        cache[key] = read_param(reader, src, index, dtype)
      return cache[key]

    filled.append(jax.make_array_from_callback(tuple(leaf.shape), sharding, callback))
    reader.release()
  return jax.tree.unflatten(treedef, filled)


def abstract_model(cfg: ModelConfig):
  """(graphdef, abstract param State) of `Transformer(cfg)` without allocating anything."""
  def init():
    with nnx.use_eager_sharding(False):
      return Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(nnx.eval_shape(init), nnx.Param)
  return graphdef, params


def load_pretrained(path: str, *, dtype: str = "float32", mesh=None, max_len: int | None = None,
                    scan_layers: bool = True, return_stats: bool = False):
  """A Hugging Face Qwen3 / Qwen3-MoE / Qwen2 checkpoint directory -> `Transformer` (parameters in `dtype`).

  With `mesh`, parameters are sharded by trm_jax.sharding's logical-axis rules and each process reads only
  its devices' slices; without, they live on the default device. `return_stats` also returns
  {"bytes_read", "checkpoint_bytes"} of this process.
  """
  cfg = model_config_from_hf(path, dtype=dtype, max_len=max_len, scan_layers=scan_layers)
  reader = CheckpointReader(path)
  graphdef, abstract = abstract_model(cfg)
  if mesh is not None:
    shardings = sharding_lib.state_shardings(abstract, mesh)
  else:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  model = nnx.merge(graphdef, load_params(path, cfg, abstract, shardings, reader=reader))
  if return_stats:
    return model, {"bytes_read": reader.bytes_read, "checkpoint_bytes": reader.total_bytes}
  return model


# ----------------------------------------------------------------------------- writing


def _host(x) -> np.ndarray:
  """The whole value of a (possibly multi-process sharded) array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def hf_tensors(model, dtype: str | None = None):
  """Yields (HF tensor name, numpy array in HF layout) for every parameter of `model`, one parameter at a time."""
  cfg = model.cfg
  _, params = nnx.split(model, nnx.Param)
  sources = param_sources(cfg)
  leaves = jax.tree.leaves(params)
  for p, leaf in zip(_flat_paths(params), leaves):
    src = sources[p]
    full = _host(leaf)
    if dtype is not None:
      full = full.astype(DTYPES[dtype])
    order = [d for g in src.groups for d in g]
    for i in np.ndindex(src.names.shape):
      yield src.names[i], np.ascontiguousarray(full[i].transpose(order).reshape(src.hf_shape))


def save_pretrained(model, out_dir: str, *, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
                    generation_config: dict | None = None, copy_from: str | None = None) -> list[str]:
  """Writes `model` as a Hugging Face checkpoint directory that transformers.AutoModelForCausalLM loads.

  Args:
    model: a `Transformer` (e.g. from `load_pretrained`, or nnx.merge of a trainer's params).
    dtype: "float32" | "bfloat16" storage dtype; None keeps the parameters' dtype (bit-exact round trip).
    max_shard_bytes: above this, safetensors shards model-0000i-of-0000N + model.safetensors.index.json.
    generation_config: written as generation_config.json (eos_token_id may be a list).
    copy_from: a directory whose tokenizer / generation files (SIDE_FILES) are copied alongside.
  Returns the written safetensors file names. Only process 0 writes; every process must call it.
  """
  from safetensors.numpy import save_file  # noqa: PLC0415
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"save_pretrained dtype must be one of {tuple(DTYPES)} or None, got {dtype!r}")
  cfg = model.cfg
  dname = dtype or cfg.param_dtype
  hc = hf_config_from_model_config(cfg, dtype=dname)
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):  # stale weights of an earlier export would shadow or contradict the new ones
      if f in (SINGLE, INDEX) or (f.startswith("model-") and f.endswith(".safetensors")):
        os.remove(os.path.join(out_dir, f))
  shards, current, size, total = [], {}, 0, 0

  def flush():
    nonlocal current, size
    if current and writer:
      save_file(current, os.path.join(out_dir, f"part-{len(shards)}.tmp"), metadata={"format": "pt"})
    shards.append(sorted(current))
    current, size = {}, 0

  for name, t in hf_tensors(model, dtype):
    if current and size + t.nbytes > max_shard_bytes:
      flush()
    current[name], size, total = t, size + t.nbytes, total + t.nbytes
  flush()
  n = len(shards)
  files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  if writer:
    for i, f in enumerate(files):
      os.replace(os.path.join(out_dir, f"part-{i}.tmp"), os.path.join(out_dir, f))
    if n > 1:
      index = {"metadata": {"total_size": total}, "weight_map": {k: f for f, ks in zip(files, shards) for k in ks}}
      with open(os.path.join(out_dir, INDEX), "w") as fh:
        json.dump(index, fh, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, CONFIG), "w") as fh:
      json.dump(hc, fh, indent=2, sort_keys=True)
    if copy_from:
      for f in SIDE_FILES:
        if os.path.isfile(os.path.join(copy_from, f)):
          shutil.copyfile(os.path.join(copy_from, f), os.path.join(out_dir, f))
    if generation_config is not None:
      with open(os.path.join(out_dir, GENERATION), "w") as fh:
        json.dump(generation_config, fh, indent=2, sort_keys=True)
  return files


# ----------------------------------------------------------------------------- a training run's policy -> HF


def export_checkpoint(workdir: str, out_dir: str, *, step: int | None = None, dtype: str | None = "bfloat16",
                      max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes the policy (learner parameters) of a trm_jax run's checkpoint as a Hugging Face directory.

  Restores only `state.params` of step `step` (default: the newest) from `workdir/checkpoints`; the model shape
  comes from the run's config (meta["config"]["model"]: its `hf_path` checkpoint's config.json, whose tokenizer
  and generation files are copied along, else its size / arch fields). Returns `out_dir`.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from trm_jax import checkpoint as ckpt_lib  # noqa: PLC0415
  from trm_jax.models.transformer import model_config_from  # noqa: PLC0415
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step() if step is None else int(step)
  if step is None or step not in ck.all_steps():
    raise HFCheckpointError(f"{ck.directory}: no checkpoint {'at all' if step is None else f'at step {step}'} "
                            f"(steps: {ck.all_steps()})")
  mcfg = (ck.restore_meta(step).get("config") or {}).get("model") or {}
  item = os.path.join(ck.directory, str(step), "state")
  saved = ocp.PyTreeCheckpointer().metadata(item)
  saved = getattr(saved, "item_metadata", saved) or saved
  saved_params = saved["state"]["params"]
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # an export holds the params on one host
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one), saved_params)
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=one), target)
  restored = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item={"state": {"params": target}}, restore_args={"state": {"params": restore_args}}, partial_restore=True))
  flat = {}
  jax.tree_util.tree_map_with_path(lambda p, x: flat.__setitem__(_path(p), x), restored["state"]["params"])
  hf_path = mcfg.get("hf_path") or ""
  pdt = str(np.dtype(flat["embed"].dtype)) if "embed" in flat else "float32"
  if hf_path:
    cfg = model_config_from_hf(hf_path, dtype=pdt, max_len=mcfg.get("max_len") or None)
  else:
    cfg = model_config_from(mcfg, int(flat["embed"].shape[0]))
    cfg = dataclasses.replace(cfg, param_dtype=pdt)
  graphdef, abstract = abstract_model(cfg)

  def fill(path, leaf):
    p = _path(path)
    if p not in flat or tuple(flat[p].shape) != tuple(leaf.shape):
      raise HFCheckpointError(f"{item}: parameter {p} is {'missing' if p not in flat else flat[p].shape}, the run's "
                              f"config implies {leaf.shape}")
    return flat.pop(p)

  params = jax.tree_util.tree_map_with_path(fill, abstract)
  if flat:
    raise HFCheckpointError(f"{item}: parameters {sorted(flat)[:3]} are not in the model the run's config builds")
  save_pretrained(nnx.merge(graphdef, params), out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                  copy_from=hf_path or None)
  return out_dir


def main(argv=None) -> None:
  import argparse  # noqa: PLC0415
  p = argparse.ArgumentParser(prog="python -m trm_jax.models.hf", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  e = sub.add_parser("export", help="a run's checkpointed policy -> a Hugging Face model directory")
  e.add_argument("--workdir", required=True, help="the run's --workdir (holds checkpoints/)")
  e.add_argument("--out", required=True, help="output directory (config.json + safetensors + tokenizer files)")
  e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  e.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "keep"),
                 help="storage dtype of the exported weights (keep: the run's parameter dtype)")
  e.add_argument("--max_shard_bytes", type=int, default=5 * 2**30)
  a = p.parse_args(argv)
  out = export_checkpoint(a.workdir, a.out, step=a.step, dtype=None if a.dtype == "keep" else a.dtype,
                          max_shard_bytes=a.max_shard_bytes)
  print(f"[trm_jax] exported {a.workdir} -> {out}")


if __name__ == "__main__":
  main()
