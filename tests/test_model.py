"""Transformer: configs, logical axis names, KV-cache decode == full forward, padding, numerics, sharding."""
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

V = 32
B, L = 8, 11  # every forward below uses this shape so each compiled function is reused
RULES = {"vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
         "experts": None, "head_dim": None, "batch": ("data", "fsdp")}
LOGICAL = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts"}


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
  assert int(cache.index) == P_ + T
  np.testing.assert_allclose(jnp.stack(step_logits, 1), full[:, P_:], atol=1e-5, rtol=1e-5)
  if model.cfg.kind == "moe":
    assert full_routes.shape == (2, B, P_ + T, 2)
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
