"""Transformer: configs, logical axis names, KV-cache decode == full forward, padding, numerics, sharding;
the Qwen3 / Qwen2 / Qwen3-MoE options against a float64 reference, scanned == unrolled, remat, presets."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from trm_jax.models import (LEARNER, ModelConfig, Numerics, Transformer, default_model_config,
                            model_config_from, positions_from_valid)
from trm_jax.models.moe import MoE

V = 32
B, L = 8, 11  # every forward below uses this shape so each compiled function is reused
RULES = {"vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
         "experts": None, "head_dim": None, "layers": None, "batch": ("data", "fsdp")}
LOGICAL = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts", "layers"}


def tiny_config(kind):
  return ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                     max_len=64, kind=kind, n_experts=4 if kind == "moe" else 0,
                     experts_top_k=2 if kind == "moe" else 0, moe_every=1)


def build(cfg, seed=0):
  with nnx.use_eager_sharding(False):
    return Transformer(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def dense():
  return build(tiny_config("dense"))


@pytest.fixture(scope="module")
def moe():
  return build(tiny_config("moe"))


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
  return request.getfixturevalue(request.param)


@functools.partial(jax.jit, static_argnums=(0, 5))
def forward(graphdef, params, tokens, positions, valid, numerics=LEARNER):
  m = nnx.merge(graphdef, params)
  h, _, aux = m.hidden(tokens, positions, valid, numerics=numerics)
  return m.unembed(h, numerics=numerics), aux.get("routes")


@functools.partial(jax.jit, static_argnums=(0,))
def cached_step(graphdef, params, tokens, positions, valid, cache):
  m = nnx.merge(graphdef, params)
  h, cache, aux = m.hidden(tokens, positions, valid, numerics=LEARNER, cache=cache)
  return m.unembed(h), cache, aux.get("routes")


def left_padded(rng, lengths, width):
  """Random tokens [B,width] with lengths[i] valid tokens on the right, pad (0) on the left."""
  tok = jax.random.randint(rng, (len(lengths), width), 3, V)
  valid = jnp.arange(width)[None] >= (width - jnp.asarray(lengths))[:, None]
  return jnp.where(valid, tok, 0), valid


# ----------------------------------------------------------------------------- configs


def test_presets_and_overrides():
  c = default_model_config()
  tiny = model_config_from(c, 40)
  assert (tiny.d_model, tiny.n_layers, tiny.n_heads, tiny.n_kv_heads, tiny.d_ff) == (64, 2, 4, 2, 128)
  assert tiny.head_dim == 16 and tiny.vocab_size == 40 and tiny.kind == "dense"
  c.d_model, c.n_heads = 96, 6  # head_dim follows d_model // n_heads unless given
  cfg = model_config_from(c, 40)
  assert (cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.n_layers) == (96, 6, 16, 2)
  c.kind = "moe"
  moe = model_config_from(c, 40)
  assert (moe.n_experts, moe.experts_top_k, moe.moe_every, moe.n_moe_layers) == (8, 2, 1, 2)
  c.moe_every = 2
  assert model_config_from(c, 40).n_moe_layers == 1
  c = default_model_config()
  c.update(size="custom", d_model=48, n_layers=3, n_heads=6, n_kv_heads=3, d_ff=96, max_len=128)
  cfg = model_config_from(c, 40)
  assert (cfg.d_model, cfg.n_layers, cfg.head_dim, cfg.n_kv_heads, cfg.d_ff, cfg.max_len) == (48, 3, 8, 3, 96, 128)


def test_config_errors_name_the_field():
  c = default_model_config()
  c.size = "huge"
  with pytest.raises(ValueError, match="model.size"):
    model_config_from(c, 40)
  c = default_model_config()
  c.size = "custom"
  c.d_model = 32
  with pytest.raises(ValueError, match="model.n_layers"):
    model_config_from(c, 40)
  c = default_model_config()
  c.n_kv_heads = 3
  with pytest.raises(ValueError, match="model.n_kv_heads"):
    model_config_from(c, 40)
  c = default_model_config()
  c.param_dtype = "fp8"
  with pytest.raises(ValueError, match="model.param_dtype"):
    model_config_from(c, 40)


@pytest.mark.parametrize("size,lo,hi", [("tiny", 5e4, 5e5), ("small", 1e6, 5e6), ("base", 5e7, 1e8),
                                        ("1b", 7e8, 1.3e9)])
def test_preset_sizes(size, lo, hi):
  c = default_model_config()
  c.size = size
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transformer(model_config_from(c, 64), rngs=nnx.Rngs(0)))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert lo <= n <= hi, n


def test_params_carry_logical_axis_names(model):
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  values = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert len(leaves) == len(values) > 0
  for spec, value in zip(leaves, values):
    assert len(spec) == value.ndim and set(spec) <= LOGICAL, (spec, value.shape)


# ----------------------------------------------------------------------------- forward semantics


def test_cached_decode_matches_full_forward(model):
  """Prefill a left-padded prompt, decode token by token: logits and routes equal the full forward."""
  g, params = nnx.split(model)
  P_, T = 6, 5
  tokens, valid = left_padded(jax.random.key(1), [6, 3, 1, 5, 6, 2, 4, 1], P_ + T)
  valid = valid.at[:, P_:].set(True)
  prompt_valid = valid[:, :P_]
  tokens = jnp.where(valid, tokens, 0)
  positions = positions_from_valid(valid)
  full, full_routes = forward(g, params, tokens, positions, valid)

  cache = model.init_cache(tokens.shape[0], P_ + T, LEARNER)
  logits, cache, routes = cached_step(g, params, tokens[:, :P_], positions[:, :P_], prompt_valid, cache)
  np.testing.assert_allclose(logits[prompt_valid], full[:, :P_][prompt_valid], atol=1e-5, rtol=1e-5)
  step_logits, step_routes = [], []
  for t in range(P_, P_ + T):
    lg, cache, r = cached_step(g, params, tokens[:, t:t + 1], positions[:, t:t + 1], valid[:, t:t + 1], cache)
    step_logits.append(lg[:, 0])
    step_routes.append(r)
  assert np.all(np.asarray(cache.index) == P_ + T)
  np.testing.assert_allclose(jnp.stack(step_logits, 1), full[:, P_:], atol=1e-5, rtol=1e-5)
  if model.cfg.kind == "moe":
    assert full_routes.shape == (model.cfg.n_moe_layers, B, P_ + T, model.cfg.experts_top_k)
    np.testing.assert_array_equal(jnp.concatenate(step_routes, axis=2), full_routes[:, :, P_:])
  else:
    assert full_routes is None


def test_left_padding_is_invisible(model):
  """The same tokens give the same logits whatever the amount of left padding."""
  g, params = nnx.split(model)
  seq = np.asarray(jax.random.randint(jax.random.key(2), (5,), 3, V))
  pads = [0, 1, 2, 3, 4, 5, 6, 0]
  tokens = np.full((B, L), 7, np.int32)  # junk under the padding: must not matter
  valid = np.zeros((B, L), bool)
  for i, a in enumerate(pads):
    tokens[i, a:a + 5] = seq
    valid[i, a:a + 5] = True
  logits, _ = forward(g, params, tokens, positions_from_valid(valid), valid)
  for i, a in enumerate(pads):
    np.testing.assert_allclose(logits[i, a:a + 5], logits[0, :5], atol=1e-5, rtol=1e-5)
  # RoPE is relative: a constant shift changes nothing, stretching the distances does.
  pos = positions_from_valid(valid)
  shifted, _ = forward(g, params, tokens, pos + 3, valid)
  stretched, _ = forward(g, params, tokens, 2 * pos, valid)
  np.testing.assert_allclose(shifted[valid], logits[valid], atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(stretched - logits)[valid].max()) > 1e-3


def test_causal(model):
  g, params = nnx.split(model)
  tokens, valid = left_padded(jax.random.key(3), [11, 6, 3, 9, 11, 1, 5, 7], L)
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % V)
  pos = positions_from_valid(valid)
  a, _ = forward(g, params, tokens, pos, valid)
  b, _ = forward(g, params, changed, pos, valid)
  np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
  assert float(jnp.abs(a[:, -1] - b[:, -1]).max()) > 1e-3


@pytest.mark.parametrize("numerics,lo,hi", [
    (Numerics(attention="alt_order"), 0.0, 1e-4),  # same maths, other rounding
    (Numerics(dtype="bfloat16", weight_dtype="bfloat16"), 1e-3, 0.5),
    (Numerics(weight_dtype="bfloat16"), 1e-4, 0.5),  # bf16-rounded weights, float32 compute
    (Numerics(logit_noise_scale=0.1, logit_noise_df=2.0), 1e-3, 10.0),
])
def test_numerics_change_logits_a_little(dense, numerics, lo, hi):
  g, params = nnx.split(dense)
  tokens, valid = left_padded(jax.random.key(4), [11, 7, 4, 2, 9, 11, 5, 8], L)
  pos = positions_from_valid(valid)
  ref, _ = forward(g, params, tokens, pos, valid)
  out, _ = forward(g, params, tokens, pos, valid, numerics)
  assert out.dtype == jnp.float32
  diff = float(jnp.abs(out - ref)[valid].max())
  assert lo < diff < hi, diff
  again, _ = forward(g, params, tokens, pos, valid, numerics)  # deterministic: the learner can recompute
  np.testing.assert_array_equal(out, again)


def test_numerics_validation():
  assert hash(Numerics()) == hash(LEARNER) and Numerics() == LEARNER  # usable as a static jit arg
  with pytest.raises(ValueError, match="dtype"):
    Numerics(dtype="fp8")
  with pytest.raises(ValueError, match="attention"):
    Numerics(attention="paged")


def test_logit_noise_is_a_fixed_linear_function_of_h(dense):
  n = Numerics(logit_noise_scale=0.5, logit_noise_df=2.0)
  h = jax.random.normal(jax.random.key(5), (3, dense.cfg.d_model))
  d1 = dense.unembed(h, numerics=n) - dense.unembed(h)
  d2 = dense.unembed(2 * h, numerics=n) - dense.unembed(2 * h)
  np.testing.assert_allclose(d2, 2 * d1, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(d1).max()) > 0.1


def test_router_jitter_flips_routes_deterministically(moe):
  g, params = nnx.split(moe)
  tokens, valid = left_padded(jax.random.key(6), [L] * B, L)
  pos = positions_from_valid(valid)
  _, r0 = forward(g, params, tokens, pos, valid)
  jit = Numerics(router_jitter=0.5)
  _, r1 = forward(g, params, tokens, pos, valid, jit)
  _, r2 = forward(g, params, tokens, pos, valid, jit)
  np.testing.assert_array_equal(r1, r2)
  assert bool(jnp.any(jnp.sort(r0, -1) != jnp.sort(r1, -1)))


# ----------------------------------------------------------------------------- sharding


def shard_params(state, mesh):
  specs = nnx.get_partition_spec(state)

  def to_mesh(spec):
    return NamedSharding(mesh, P(*[RULES.get(name) if name else None for name in spec]))

  shardings = jax.tree.map(to_mesh, specs, is_leaf=lambda x: isinstance(x, P))
  return jax.device_put(state, shardings)


def test_sharded_forward_matches_single_device(model):
  assert jax.device_count() == 8
  # Auto axes: GSPMD propagates shardings from the logical-name placement (jax.make_mesh defaults to
  # Explicit axes, under which the embedding gather of fsdp-sharded rows is rejected).
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  g, params = nnx.split(model)
  sharded = shard_params(params, mesh)
  embed = sharded["embed"][...]
  assert embed.sharding.spec == P("tensor", "fsdp")
  assert len(embed.addressable_shards) == 8 and embed.addressable_shards[0].data.shape == (V // 2, 16)
  tokens, valid = left_padded(jax.random.key(7), [11, 4, 7, 1, 9, 2, 8, 5], L)
  pos = positions_from_valid(valid)
  ref, ref_routes = forward(g, params, tokens, pos, valid)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  put = lambda x: jax.device_put(x, batch)
  out, routes = forward(g, sharded, put(tokens), put(pos), put(valid))
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  if routes is not None:
    np.testing.assert_array_equal(routes, ref_routes)


# ----------------------------------------------------------------------------- architectures -----------

# Hand-chosen irregular MoE layout: moe_every=1 with layers 0 and 3 dense (HF mlp_only_layers) -> MoE at 1, 2, 4.
ARCH_CONFIGS = {
    "qwen3": dict(qk_norm=True, tie_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-5),
    "qwen2": dict(qkv_bias=True, rope_theta=5000.0),
    "qwen3_moe": dict(qk_norm=True, qkv_bias=True, o_bias=True, kind="moe", n_layers=5, n_experts=4,
                      experts_top_k=2, moe_d_ff=24, mlp_only_layers=(0, 3)),
    "moe_unnormalised": dict(kind="moe", n_experts=4, experts_top_k=3, norm_topk_prob=False),
}
MOE_LAYERS = {"qwen3": (), "qwen2": (), "qwen3_moe": (1, 2, 4), "moe_unnormalised": (0, 1)}


def arch_config(name, **over):
  base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_len=64)
  return ModelConfig(**{**base, **ARCH_CONFIGS[name], **over})


def perturbed(model, seed):
  """Params with every leaf moved (norm scales off 1, biases off 0) so each option shows in the logits."""
  g, params = nnx.split(model)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return g, jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="module", params=list(ARCH_CONFIGS))
def arch(request):
  g, params = perturbed(build(arch_config(request.param)), 11)
  return request.param, g, params


def reference_logits(name, params, tokens, valid):
  """Float64 numpy forward written from transformers' Qwen2/Qwen3/Qwen3-MoE modeling code (not trm_jax's)."""
  opts = {**dict(qk_norm=False, qkv_bias=False, o_bias=False, tie_embeddings=False, rope_theta=10000.0,
                 rms_norm_eps=1e-6, n_layers=2, experts_top_k=0, norm_topk_prob=True), **ARCH_CONFIGS[name]}
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(params))
  Bn, T = tokens.shape
  Dh, eps, moe_layers = 8, opts["rms_norm_eps"], MOE_LAYERS[name]
  pos = np.maximum(np.cumsum(valid, -1) - 1, 0)
  norm = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w
  inv_freq = 1.0 / opts["rope_theta"] ** (np.arange(0, Dh, 2) / Dh)
  emb = np.concatenate([pos[..., None] * inv_freq] * 2, -1)[:, :, None]  # [B,T,1,Dh]
  rotate_half = lambda x: np.concatenate([-x[..., Dh // 2:], x[..., :Dh // 2]], -1)
  rope = lambda x: x * np.cos(emb) + rotate_half(x) * np.sin(emb)
  mask = np.tril(np.ones((T, T), bool))[None] & valid[:, None, :]
  silu = lambda z: z / (1 + np.exp(-z))
  x = p["embed"][tokens]
  n_dense = n_moe = 0
  for i in range(opts["n_layers"]):
    lp = jax.tree.map(lambda a: a[i], p["layers"])
    at = lp["attn"]
    h = norm(x, lp["attn_norm"]["scale"])
    q, k, v = (np.einsum("btd,dhe->bthe", h, at[w]) for w in ("wq", "wk", "wv"))
    if opts["qkv_bias"]:
      q, k, v = q + at["bq"], k + at["bk"], v + at["bv"]
    if opts["qk_norm"]:  # over head_dim, per head
      q, k = norm(q, at["q_norm"]["scale"]), norm(k, at["k_norm"]["scale"])
    q, k = rope(q), rope(k)
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # 4 query heads share 2 kv heads
    s = np.einsum("bthe,bshe->bhts", q, k) / np.sqrt(Dh)
    s = np.where(mask[:, None], s, -1e30)  # finite: fully masked pad rows must not make NaN
    s = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("bhts,bshe->bthe", s / s.sum(-1, keepdims=True), v)
    x = x + np.einsum("bthe,hed->btd", o, at["wo"]) + (at["bo"] if opts["o_bias"] else 0.0)
    h = norm(x, lp["mlp_norm"]["scale"])
    if i in moe_layers:
      m = jax.tree.map(lambda a: a[n_moe], p["moe"])
      n_moe += 1
      logits = h @ m["router"]
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      top = np.argsort(-probs, -1)[..., :opts["experts_top_k"]]
      w = np.take_along_axis(probs, top, -1)
      if opts["norm_topk_prob"]:
        w = w / w.sum(-1, keepdims=True)
      weights = np.zeros_like(probs)
      np.put_along_axis(weights, top, w, -1)
      y = np.einsum("btef,efd->bted", silu(np.einsum("btd,edf->btef", h, m["w_gate"]))
                    * np.einsum("btd,edf->btef", h, m["w_up"]), m["w_down"])
      x = x + np.einsum("bted,bte->btd", y, weights)
    else:
      m = jax.tree.map(lambda a: a[n_dense], p["mlp"])
      n_dense += 1
      x = x + (silu(h @ m["w_gate"]) * (h @ m["w_up"])) @ m["w_down"]
  h = norm(x, p["final_norm"]["scale"])
  return h @ (p["embed"].T if opts["tie_embeddings"] else p["unembedding"])


def test_moe_layer_layout_follows_hf_rules():
  """HF: layer i is MoE iff (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers."""
  for name, layers in MOE_LAYERS.items():
    assert arch_config(name).moe_layers == layers
  cfg = arch_config("qwen3_moe", n_layers=6, moe_every=2, mlp_only_layers=(3,))
  assert cfg.moe_layers == (1, 5) and cfg.dense_layers == (0, 2, 3, 4)
  assert arch_config("qwen3_moe", n_layers=6, moe_every=3, mlp_only_layers=()).moe_layers == (2, 5)
  with pytest.raises(ValueError, match="model.mlp_only_layers"):
    arch_config("qwen3_moe", mlp_only_layers=(7,))


def test_arch_matches_float64_reference(arch):
  name, g, params = arch
  tokens, valid = left_padded(jax.random.key(12), [11, 4, 7, 1, 9, 2, 8, 5], L)
  out, _ = forward(g, params, tokens, positions_from_valid(valid), valid)
  ref = reference_logits(name, params, np.asarray(tokens), np.asarray(valid))
  v = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(out)[v], ref[v], rtol=1e-4, atol=1e-4 * np.abs(ref[v]).max())


def test_scanned_equals_unrolled(arch):
  name, g, params = arch
  cfg = dataclasses.replace(nnx.merge(g, params).cfg, scan_layers=False)
  with nnx.use_eager_sharding(False):
    g_unrolled = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  tokens, valid = left_padded(jax.random.key(13), [11, 6, 3, 9, 11, 1, 5, 7], L)
  pos = positions_from_valid(valid)
  a, ra = forward(g, params, tokens, pos, valid)
  b, rb = forward(g_unrolled, params, tokens, pos, valid)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  if ra is not None:
    assert ra.shape == (len(MOE_LAYERS[name]), B, L, cfg.experts_top_k)
    np.testing.assert_array_equal(ra, rb)


def test_param_tree_layout():
  """The stacked parameter tree that the HF loader and checkpoints rely on (paths, shapes, logical axes)."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transformer(arch_config("qwen3_moe"), rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  specs = nnx.get_partition_spec(state)
  flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
  names = {".".join(map(str, k)): tuple(v.get_value()) for k, v in nnx.to_flat_state(specs)}
  expected = {  # L=5, Ld=2 (layers 0, 3), Lm=3 (layers 1, 2, 4), D=32, H=4, K=2, Dh=8, F=64, Fm=24, E=4
      "embed": ((V, 32), ("vocab", "embed")),
      "layers.attn_norm.scale": ((5, 32), ("layers", "embed")),
      "layers.mlp_norm.scale": ((5, 32), ("layers", "embed")),
      "layers.attn.wq": ((5, 32, 4, 8), ("layers", "embed", "heads", "head_dim")),
      "layers.attn.wk": ((5, 32, 2, 8), ("layers", "embed", "kv_heads", "head_dim")),
      "layers.attn.wv": ((5, 32, 2, 8), ("layers", "embed", "kv_heads", "head_dim")),
      "layers.attn.wo": ((5, 4, 8, 32), ("layers", "heads", "head_dim", "embed")),
      "layers.attn.bq": ((5, 4, 8), ("layers", "heads", "head_dim")),
      "layers.attn.bk": ((5, 2, 8), ("layers", "kv_heads", "head_dim")),
      "layers.attn.bv": ((5, 2, 8), ("layers", "kv_heads", "head_dim")),
      "layers.attn.bo": ((5, 32), ("layers", "embed")),
      "layers.attn.q_norm.scale": ((5, 8), ("layers", "head_dim")),
      "layers.attn.k_norm.scale": ((5, 8), ("layers", "head_dim")),
      "mlp.w_gate": ((2, 32, 64), ("layers", "embed", "mlp")),
      "mlp.w_up": ((2, 32, 64), ("layers", "embed", "mlp")),
      "mlp.w_down": ((2, 64, 32), ("layers", "mlp", "embed")),
      "moe.router": ((3, 32, 4), ("layers", "embed", "experts")),
      "moe.w_gate": ((3, 4, 32, 24), ("layers", "experts", "embed", "mlp")),
      "moe.w_up": ((3, 4, 32, 24), ("layers", "experts", "embed", "mlp")),
      "moe.w_down": ((3, 4, 24, 32), ("layers", "experts", "mlp", "embed")),
      "final_norm.scale": ((32,), ("embed",)),
      "unembedding": ((32, V), ("embed", "vocab")),
  }
  assert set(flat) == set(expected)
  for path, (shape, axes) in expected.items():
    assert flat[path].get_value().shape == shape and names[path] == axes, path
  # Options off: no bias / q-k norm parameters, and a tied model has no unembedding.
  with nnx.use_eager_sharding(False):
    tied = nnx.eval_shape(lambda: Transformer(arch_config("qwen3"), rngs=nnx.Rngs(0)))
  keys = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(tied, nnx.Param))}
  assert "layers.attn.q_norm.scale" in keys and "unembedding" not in keys and "moe.router" not in keys
  assert not any(k.startswith("layers.attn.b") for k in keys)


@pytest.mark.parametrize("norm,gates", [(True, [4 / 7, 3 / 7]), (False, [0.4, 0.3])])
def test_moe_router_hand_computed(norm, gates):
  """Router = identity on x = log([1, 2, 3, 4]): p = softmax = [.1, .2, .3, .4]; top-2 = experts 3, 2."""
  cfg = dataclasses.replace(arch_config("moe_unnormalised", d_model=4, n_heads=2, n_kv_heads=1, head_dim=2),
                            experts_top_k=2, norm_topk_prob=norm)
  with nnx.use_eager_sharding(False):
    router = MoE(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0))  # one layer (unstacked)
  router.router.set_value(jnp.eye(4))
  x = jnp.log(jnp.arange(1.0, 5.0))[None, None]
  g, routes = router.route(x, LEARNER, layer=0, positions=jnp.zeros((1, 1), jnp.int32),
                           tokens=jnp.zeros((1, 1), jnp.int32))
  np.testing.assert_array_equal(routes[0, 0], [3, 2])
  np.testing.assert_allclose(g[0, 0], gates, rtol=1e-6)


def test_qk_norm_is_per_head(arch):
  """RMSNorm over head_dim of EACH head: scaling one query head's projection leaves the logits unchanged
  with qk_norm (a norm over all heads, or none, would not)."""
  name, g, params = arch
  scaled = jax.tree.map(lambda x: x, params)
  wq = scaled["layers"]["attn"]["wq"]
  wq.set_value(wq.get_value().at[:, :, 1].multiply(7.0))  # head 1 of every layer
  if "bq" in scaled["layers"]["attn"]:
    bq = scaled["layers"]["attn"]["bq"]
    bq.set_value(bq.get_value().at[:, 1].multiply(7.0))
  tokens, valid = left_padded(jax.random.key(14), [11, 4, 7, 1, 9, 2, 8, 5], L)
  pos = positions_from_valid(valid)
  a, _ = forward(g, params, tokens, pos, valid)
  b, _ = forward(g, scaled, tokens, pos, valid)
  diff = float(jnp.abs(a - b)[valid].max())
  if ARCH_CONFIGS[name].get("qk_norm"):
    assert diff < 1e-3, diff  # only eps separates the two
  else:
    assert diff > 1e-2, diff


@pytest.fixture(scope="module")
def irregular():
  return build(arch_config("qwen3_moe"))


def test_cached_decode_with_irregular_moe_layout(irregular):
  test_cached_decode_matches_full_forward(irregular)


def test_remat_policies_give_the_same_gradient(irregular):
  g, params = nnx.split(irregular)
  tokens, valid = left_padded(jax.random.key(15), [11, 4, 7, 1, 9, 2, 8, 5], L)
  pos = positions_from_valid(valid)
  w = jax.random.normal(jax.random.key(16), (B, L, V))

  def loss(params, remat):
    return jnp.sum(nnx.merge(g, params)(tokens, pos, valid, remat=remat) * w * valid[..., None])

  grads = {r: jax.jit(jax.grad(loss), static_argnums=1)(params, r) for r in ("none", "full")}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads["none"], grads["full"])
  for r in ("full", "dots_saveable"):
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, r))
  assert "remat" not in str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, "none"))
  with pytest.raises(ValueError, match="learner.remat"):
    loss(params, "sometimes")


def _jaxpr_size(n_layers, scan):
  cfg = arch_config("qwen3_moe", n_layers=n_layers, mlp_only_layers=(0,), scan_layers=scan)
  with nnx.use_eager_sharding(False):
    g, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((B, L), jnp.int32)
  fn = lambda p, t: nnx.merge(g, p)(t, t, t > 0)
  return len(jax.make_jaxpr(fn)(params, tokens).jaxpr.eqns)


def test_scanned_program_size_is_independent_of_depth():
  assert _jaxpr_size(3, True) == _jaxpr_size(12, True)
  assert _jaxpr_size(12, False) > 3 * _jaxpr_size(3, False)


# Model cards (huggingface.co/Qwen/*): total and non-embedding parameters in billions.
CARDS = {"qwen3-0.6b": (0.6, 0.44), "qwen3-1.7b": (1.7, 1.4), "qwen3-4b": (4.0, 3.6), "qwen3-8b": (8.2, 6.95),
         "qwen3-30b-a3b": (30.5, 29.9)}


@pytest.mark.parametrize("size", list(CARDS))
def test_qwen3_presets_match_model_cards(size):
  c = default_model_config()
  c.size = size
  cfg = model_config_from(c, 151669)  # the Qwen3 tokenizer's vocabulary; the embedding is padded to 151936
  assert cfg.vocab_size == 151936 and cfg.qk_norm and not cfg.qkv_bias and cfg.rope_theta == 1e6
  assert cfg.head_dim == 128 and cfg.rms_norm_eps == 1e-6
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(state))
  emb = math.prod(state["embed"].shape) * (1 if cfg.tie_embeddings else 2)
  card_total, card_non_emb = CARDS[size]
  assert abs(total / 1e9 - card_total) <= 0.05 + 0.01 * card_total, total
  assert abs((total - emb) / 1e9 - card_non_emb) <= 0.005 + 0.01 * card_non_emb, total - emb
  if size == "qwen3-30b-a3b":
    assert cfg.kind == "moe" and cfg.moe_layers == tuple(range(48)) and cfg.moe_d_ff == 768
    assert (cfg.n_experts, cfg.experts_top_k, cfg.norm_topk_prob) == (128, 8, True)


def test_preset_config_errors():
  c = default_model_config()
  c.size = "qwen3-8b"
  with pytest.raises(ValueError, match="model.vocab_size"):
    model_config_from(c, 200000)  # a tokenizer larger than the embedding
  c.tie_embeddings = True
  with pytest.raises(ValueError, match="model.tie_embeddings"):
    model_config_from(c, 1000)
  c = default_model_config()
  c.arch = "llama"
  with pytest.raises(ValueError, match="model.arch"):
    model_config_from(c, 40)
  c.update(arch="qwen2", kind="moe", mlp_only_layers=(0,), moe_every=1, moe_d_ff=16)
  cfg = model_config_from(c, 40)
  assert cfg.qkv_bias and not cfg.qk_norm and cfg.moe_layers == (1,) and cfg.moe_d_ff == 16


# ----------------------------------------------------------------------------- alt_order attention kernel
from trm_jax.models import layers as layers_lib  # noqa: E402


def _old_alt_order(q, k, v, mask, scale, blk=16):
  """The previous alt_order kernel (materialised per-key-block outputs [B,K,G,L,S/blk,Dh] f32), kept
  here only as the memory reference of test_alt_order_temp_memory_no_longer_scales_with_blocks."""
  half = q.shape[-1] // 2
  s = (jnp.einsum("blkgd,bskd->bkgls", q[..., half:], k[..., half:]).astype(jnp.float32)
       + jnp.einsum("blkgd,bskd->bkgls", q[..., :half], k[..., :half]).astype(jnp.float32)) * scale
  S = k.shape[1]
  nb = -(-S // blk)
  pad = nb * blk - S
  m = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))[:, None, None]
  s = jnp.pad(s, ((0, 0),) * 4 + ((0, pad),))
  v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  s = jnp.where(m, s, layers_lib.NEG_INF)
  B_, K, G, L_, _ = s.shape
  sb = s.reshape(B_, K, G, L_, nb, blk)
  mb = m.reshape(m.shape[:3] + (L_, nb, blk))
  blk_max = jnp.max(sb, axis=-1)
  pb = jnp.where(mb, jnp.exp(sb - blk_max[..., None]), 0.0)
  blk_sum = jnp.sum(pb, axis=-1)
  vb = v.reshape(B_, nb, blk, K, v.shape[-1])
  blk_out = jnp.einsum("bkglnc,bnckd->bkglnd", pb.astype(v.dtype), vb).astype(jnp.float32)
  gmax = jnp.max(blk_max, axis=-1, keepdims=True)
  w = jnp.exp(blk_max - gmax)[..., ::-1]
  denom = jnp.sum(blk_sum[..., ::-1] * w, axis=-1)
  out = jnp.sum(blk_out[..., ::-1, :] * w[..., None], axis=-2)
  out = out / jnp.maximum(denom, 1e-30)[..., None]
  return jnp.einsum("bkgld->blkgd", out).astype(v.dtype)


def _attn_inputs(seed, b, l, s, k_heads=2, g=2, dh=8, dtype=jnp.float32, lengths=None):
  """Random q/k/v and a causal mask (queries are the last l of s positions) with left padding."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, l, k_heads, g, dh)).astype(dtype)
  k = jax.random.normal(kk, (b, s, k_heads, dh)).astype(dtype)
  v = jax.random.normal(kv, (b, s, k_heads, dh)).astype(dtype)
  lengths = jnp.asarray(lengths if lengths is not None else [s] * b)
  valid = jnp.arange(s)[None] >= (s - lengths)[:, None]  # [b,s] left padding
  qi = jnp.arange(l)[:, None] + (s - l)
  mask = (jnp.arange(s)[None, :] <= qi)[None] & valid[:, None, :]
  return q, k, v, mask


def _attend_f64(q, k, v, mask, scale):
  """float64 numpy softmax attention; fully masked rows give 0."""
  q, k, v, mask = (np.asarray(x, np.float64) for x in (q, k, v, mask))
  s = np.einsum("blkgd,bskd->bkgls", q, k) * scale
  m = mask[:, None, None].astype(bool)
  s = np.where(m, s, -np.inf)
  mx = np.max(s, axis=-1, keepdims=True)
  p = np.where(m, np.exp(s - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bkgls,bskd->blkgd", p, v)


@pytest.mark.parametrize("s,block", [(11, 4), (12, 4), (11, 256), (9, 1)])
def test_alt_order_kernel_matches_float64_reference(s, block):
  # lengths: full, left padded, and one fully masked row set (length 0) -> zeros, not NaN.
  q, k, v, mask = _attn_inputs(7, 4, s, s, lengths=[s, 5, 1, 0])
  scale = 1 / math.sqrt(8)
  ref = _attend_f64(q, k, v, mask, scale)
  alt = layers_lib._attend_alt_order(q, k, v, mask, scale, block=block)
  std = layers_lib._attend_standard(q, k, v, mask, scale)
  assert alt.shape == q.shape and alt.dtype == jnp.float32
  np.testing.assert_allclose(alt, ref, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(alt, std, rtol=1e-5, atol=2e-6)
  assert float(jnp.abs(alt[3]).max()) == 0.0  # fully masked (padding) rows


def test_alt_order_kernel_differs_from_standard_in_bf16():
  q, k, v, mask = _attn_inputs(8, 4, 16, 40, dh=16, dtype=jnp.bfloat16, lengths=[40, 33, 20, 17])
  scale = 1 / math.sqrt(16)
  alt = layers_lib._attend_alt_order(q, k, v, mask, scale, block=8)
  std = layers_lib._attend_standard(q, k, v, mask, scale)
  assert alt.dtype == std.dtype == jnp.bfloat16
  ref = _attend_f64(q, k, v, mask, scale)
  diff = np.abs(np.asarray(alt, np.float64) - np.asarray(std, np.float64))
  assert diff.max() > 0, "alt_order must round differently from standard in bf16"
  assert diff.max() < 0.05  # bf16 rounding level, not a different function
  err = np.abs(np.asarray(alt, np.float64) - ref).max()
  assert err < 0.05, err


@pytest.mark.parametrize("block", [3, 256])
def test_alt_order_kernel_kv_cache_decode(block):
  """Decode shape: one query at cache slot `index` against a cache of S slots (slots > index are
  stale garbage and masked) == the same row of the full-length forward."""
  S, n = 13, 9  # cache slots, tokens written so far
  q, k, v, mask = _attn_inputs(9, 3, n, n, lengths=[9, 4, 2])
  scale = 1 / math.sqrt(8)
  full = layers_lib._attend_alt_order(q, k, v, mask, scale, block=block)
  garbage = 1e3 * jnp.ones((3, S - n, 2, 8))
  ck, cv = jnp.concatenate([k, garbage], 1), jnp.concatenate([v, garbage], 1)
  valid = jnp.concatenate([mask[:, -1, :], jnp.ones((3, S - n), bool)], 1)  # key_valid of the cache
  for index in (0, 4, n - 1):
    dmask = ((jnp.arange(S) <= index)[None] & valid)[:, None, :]  # [B,1,S]
    step = layers_lib._attend_alt_order(q[:, index:index + 1], ck, cv, dmask, scale, block=block)
    np.testing.assert_allclose(step[:, 0], full[:, index], rtol=1e-5, atol=2e-6)


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_alt_order_temp_memory_no_longer_scales_with_blocks():
  """The old kernel's per-block outputs [B,K,G,L,S/16,Dh] f32 made its temp memory ~Dh/16 times the
  [B,H,L,S] scores (34 GB/chip at the pod prefill); the online-softmax loop keeps O(B H L (Dh + block))."""
  b, l, s, kh, g, dh = 1, 256, 2048, 2, 2, 64
  q, k, v, mask = _attn_inputs(10, b, l, s, k_heads=kh, g=g, dh=dh)
  scale = 1 / math.sqrt(dh)
  new = _temp_bytes(lambda *a: layers_lib._attend_alt_order(*a, scale, block=128), q, k, v, mask)
  old = _temp_bytes(lambda *a: _old_alt_order(*a, scale), q, k, v, mask)
  blk_out = b * kh * g * l * (s // 16) * dh * 4  # the old kernel's per-block outputs: 32 MiB here
  assert old >= blk_out, (old, blk_out)  # the reference really materialises them
  scores = b * kh * g * l * s * 4  # one full f32 [B,H,L,S] score matrix: 8 MiB
  # a few f32 [B,H,L,Dh + block] loop buffers (+ at most one copy of the inputs): ~5.6 MiB
  bound = 4 * b * kh * g * l * (dh + 128) * 4 + k.nbytes + v.nbytes + mask.nbytes
  assert new <= bound < scores, (new, bound, scores, old)


# ----------------------------------------------------------------------------- layer-scan hidden-state sharding


def test_layer_scan_hidden_state_is_sharded_under_a_mesh(monkeypatch):
  """Under a mesh context (the learner step traces under one) the remat residuals [L,B,S,D] are split
  over batch (data, fsdp) AND D over tensor: per device /8 instead of /2 on fsdp=2 x tensor=4 (temp
  31 -> 16 MiB at a larger shape when measured); without a mesh the constraint is the identity; the
  gradient is unchanged."""
  from trm_jax import sharding as sharding_lib
  from trm_jax.models import layers
  from trm_jax.models.transformer import constrain_batch_axis
  # What is measured is the residuals' sharding; CPU's weight-gradient form (layers.dense_last: a transposed
  # copy of each projection's input, +1.2 MiB here under the mesh) is not, so the plain einsum form is used.
  monkeypatch.setattr(layers, "WEIGHT_GRAD", "autodiff")
  x = jnp.ones((4, 3, 8))
  assert constrain_batch_axis(x) is x  # no mesh: CPU tests and the sampler are untouched
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  cfg = ModelConfig(vocab_size=V, d_model=256, n_layers=8, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=256,
                    max_len=128, kind="dense")
  g, params = nnx.split(build(cfg))
  sharded = jax.device_put(params, sharding_lib.state_shardings(params, mesh))
  tokens, valid = left_padded(jax.random.key(11), [128, 100, 64, 128, 7, 128, 90, 1], 128)
  tokens, valid = sharding_lib.shard_batch((tokens, valid), mesh)
  proj = jax.random.normal(jax.random.key(12), (cfg.d_model,))

  def loss(p, tokens, valid):
    h, _, _ = nnx.merge(g, p).hidden(tokens, positions_from_valid(valid), valid, remat="full")
    return jnp.sum(jnp.where(valid, (h @ proj) ** 2, 0.0))  # (not sum h^2: constant after the final norm)

  def under_mesh(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jax.grad(loss)(*args)

  plain, constrained = jax.jit(jax.grad(loss)), jax.jit(under_mesh)
  temp = lambda f: f.lower(sharded, tokens, valid).compile().memory_analysis().temp_size_in_bytes
  t_plain, t_constrained = temp(plain), temp(constrained)
  # f32 [L,B,S,D] = 8 MiB over all devices: 4 MiB per device sharded /2 (before), 1 MiB /8 (now)
  residuals = cfg.n_layers * 8 * 128 * cfg.d_model * 4
  assert t_plain - t_constrained > residuals / 4, (t_plain, t_constrained, residuals)
  # equal up to float32 reduction order (other all-reduce splits): relative L2 error per leaf
  a, b = jax.device_get(plain(sharded, tokens, valid)), jax.device_get(constrained(sharded, tokens, valid))
  del a["unembedding"], b["unembedding"]  # unused by the loss: zero gradient
  errs = jax.tree.map(lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(a)), a, b)
  assert max(jax.tree.leaves(errs)) < 1e-4, errs


@pytest.mark.parametrize("attention", ["standard", "alt_order"])
def test_query_blocks_give_the_same_logits_and_gradients(dense, attention):
  """Numerics.query_block (learner.attention_block) changes the memory, not the numbers: L = 11 in blocks
  of 4 (a ragged last block), with left padding. Catches: a block's queries given another block's mask or
  positions, or the ragged block's padded rows kept."""
  r = np.random.default_rng(3)
  tok = jnp.asarray(r.integers(0, V, (B, L)), jnp.int32)
  valid = jnp.asarray(np.arange(L)[None] >= r.integers(0, 4, (B, 1)))
  pos = positions_from_valid(valid)
  graphdef, params = nnx.split(dense)

  def loss(params, numerics):
    logits = nnx.merge(graphdef, params)(tok, pos, valid, numerics=numerics)
    return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits), 0.0) ** 2), logits

  whole = Numerics(attention=attention)
  (l0, z0), g0 = jax.value_and_grad(loss, has_aux=True)(params, whole)
  (l1, z1), g1 = jax.value_and_grad(loss, has_aux=True)(params, dataclasses.replace(whole, query_block=4))
  np.testing.assert_allclose(np.asarray(z1), np.asarray(z0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  # The key / value gradients sum over the blocks in another order: float32 noise relative to the largest entry.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                       atol=1e-6 * float(np.abs(np.asarray(b)).max())), g1, g0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_last_has_the_einsum_value_and_gradients(dtype):
  # The reference is JAX's own autodiff of the plain einsum (dense_last replaces only the backward's form).
  from trm_jax.models.layers import dense_last
  x = jax.random.normal(jax.random.key(30), (3, 5, 16), jnp.float32).astype(dtype)
  w = jax.random.normal(jax.random.key(31), (16, 24), jnp.float32).astype(dtype)
  c = jax.random.normal(jax.random.key(32), (3, 5, 24), jnp.float32)
  ours = lambda x, w: jnp.sum(dense_last(x, w).astype(jnp.float32) * c)
  ref = lambda x, w: jnp.sum(jnp.einsum("...d,df->...f", x, w).astype(jnp.float32) * c)
  np.testing.assert_array_equal(np.asarray(dense_last(x, w), np.float32),
                                np.asarray(jnp.einsum("...d,df->...f", x, w), np.float32))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.jit(jax.grad(ref, (0, 1)))(x, w)):
    assert a.dtype == b.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_model_gradient_is_the_same_with_either_weight_gradient_form(irregular, monkeypatch):
  from trm_jax.models import layers
  g, params = nnx.split(irregular)
  tokens, valid = left_padded(jax.random.key(33), [11, 4, 7, 1, 9, 2, 8, 5], L)
  pos = positions_from_valid(valid)
  w = jax.random.normal(jax.random.key(34), (B, L, V))

  def loss(params):
    return jnp.sum(nnx.merge(g, params)(tokens, pos, valid, remat="full") * w * valid[..., None])

  grads = {}
  for form in ("autodiff", "transposed"):
    monkeypatch.setattr(layers, "WEIGHT_GRAD", form)
    grads[form] = jax.jit(jax.grad(loss))(params)  # a fresh jit per form: the flag is read at trace time
  leaves = jax.tree.leaves(grads["transposed"])
  assert any(float(jnp.abs(x).max()) > 1e-3 for x in leaves)
  # The two forms sum the same products in another order: float32 rounding is relative to the summands'
  # scale (the leaf's largest entry), not to each entry, which may cancel to ~0 (one entry of 4096 was off
  # 1.6e-6 at |g| 0.03 in a leaf of max 7 on an AVX-512 CPU). A wrong transpose is off O(1).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=2e-6 * max(1.0, float(np.abs(np.asarray(b)).max()))),
      grads["autodiff"], grads["transposed"])
