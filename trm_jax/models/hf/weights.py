"""Hugging Face safetensors <-> trm_jax `Transformer` parameters: the name / layout table, sliced sharded
loading, and writing.

    model = load_pretrained("/ckpt/Qwen3-8B-Base", mesh=mesh)      # logits = model(tokens, positions, valid)
    save_pretrained(model, "/out/policy", dtype="bfloat16")         # transformers / vLLM load it

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
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from trm_jax import sharding as sharding_lib
from trm_jax.models.hf.config import (CONFIG, GENERATION, INDEX, SIDE_FILES, SINGLE, HFCheckpointError,
                                      hf_config_from_model_config, model_config_from_hf)
from trm_jax.models.layers import DTYPES
from trm_jax.models.transformer import ModelConfig, Transformer

ST_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}  # safetensors dtypes the loader reads (and casts)


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


def flat_paths(state) -> list[str]:
  """The dotted parameter paths ("layers.attn.wq") of a State's leaves, in leaf order."""
  paths = []
  jax.tree_util.tree_map_with_path(lambda p, _: paths.append(param_path(p)), state)
  return paths


def param_path(keypath) -> str:
  """A pytree key path -> the dotted parameter path `param_sources` is keyed by."""
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
  paths = flat_paths(abstract_params)
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
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def hf_tensors(model, dtype: str | None = None):
  """Yields (HF tensor name, numpy array in HF layout) for every parameter of `model`, one parameter at a time."""
  cfg = model.cfg
  _, params = nnx.split(model, nnx.Param)
  sources = param_sources(cfg)
  leaves = jax.tree.leaves(params)
  for p, leaf in zip(flat_paths(params), leaves):
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
