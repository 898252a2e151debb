"""MoE dispatch: sparse (dropless grouped matmul) == dense == a float64 loop, outputs and gradients; the
block layout's invariants under load imbalance; compiled FLOPs of one layer near the top-k-only count;
the `model.moe_dispatch` option."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trm_jax.models import ModelConfig, Numerics, default_model_config, model_config_from
from trm_jax.models import moe as moe_lib

D, F = 16, 24
N = 96  # tokens


def imbalanced_routes(rng, n, E, k):
  """[n,k] distinct experts per token: 90% of tokens pick expert 0 first and the rest of their k among
  experts 1..k+1; the other 10% pick k random distinct experts of the first E/2, so the upper half of
  the experts stays EMPTY."""
  out = []
  for t in range(n):
    if t % 10:
      out.append(np.concatenate([[0], 1 + rng.permutation(k + 1)[:k - 1]]))
    else:
      out.append(rng.permutation(E // 2)[:k])
  return np.stack(out).astype(np.int32)


def random_routes(rng, n, E, k):
  return np.stack([rng.permutation(E)[:k] for _ in range(n)]).astype(np.int32)


def problem(E, k, routing, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, D))
  gates = rng.random(size=(N, k))
  routes = (imbalanced_routes if routing == "imbalanced" else random_routes)(rng, N, E, k)
  ws = [rng.normal(size=s) / np.sqrt(s[1]) for s in ((E, D, F), (E, D, F), (E, F, D))]
  return x, gates, routes, ws


def reference64(x, gates, routes, w_gate, w_up, w_down):
  """Float64 loop over tokens and their k experts: y_t = sum_j g_tj * W_down^T (silu(W_gate^T x) * W_up^T x)."""
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j, e in enumerate(routes[t]):
      g, u = x[t] @ w_gate[e], x[t] @ w_up[e]
      y[t] += gates[t, j] * ((g / (1 + np.exp(-g)) * u) @ w_down[e])
  return y


CASES = [(8, 2, "random"), (8, 2, "imbalanced"), (32, 4, "random"), (32, 4, "imbalanced"),
         (16, 4, "imbalanced")]
IMPLS = ["blocked", "ragged", "auto"]


def f32(*a):
  return [jnp.asarray(v, jnp.float32) for v in a]


def rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("E,k,routing", CASES)
def test_layout_every_pair_once_blocks_single_expert(E, k, routing):
  """Catches: a pair dropped or duplicated, a block mixing two experts, a pair placed in another expert's block."""
  routes = problem(E, k, routing)[2]
  experts = jnp.asarray(routes.reshape(-1))
  block = moe_lib.block_rows(N * k, E)
  row_pair, pair_row, block_expert = map(np.asarray, moe_lib.expert_layout(experts, E, block))
  n = N * k
  assert sorted(row_pair[row_pair < n].tolist()) == list(range(n))  # each pair in exactly one row
  np.testing.assert_array_equal(row_pair[pair_row], np.arange(n))  # pair_row inverts row_pair
  row_expert = np.repeat(block_expert, block)
  np.testing.assert_array_equal(row_expert[pair_row], routes.reshape(-1))  # each pair in its expert's block
  if routing == "imbalanced":
    assert np.bincount(routes.reshape(-1), minlength=E).min() == 0  # the case really has empty experts


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("E,k,routing", CASES)
def test_sparse_equals_float64_loop_and_dense(E, k, routing, impl):
  """Catches: a wrong gate weighting, a pair's output scattered back to the wrong token, a dropped pair."""
  x, gates, routes, ws = problem(E, k, routing)
  ref = reference64(x, gates, routes, *ws)
  sparse = jax.jit(lambda *a: moe_lib.sparse_experts(*a, impl=impl))(*f32(x, gates), jnp.asarray(routes), *f32(*ws))
  dense = jax.jit(moe_lib.dense_experts)(*f32(x, gates), jnp.asarray(routes), *f32(*ws))
  assert rel(sparse, ref) < 1e-5 and rel(dense, ref) < 1e-5
  assert rel(sparse, dense) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("E,k,routing", CASES[1::2] + CASES[2:3])
def test_sparse_gradients_equal_dense(E, k, routing, impl):
  """Gradients w.r.t. x, gates and the three expert weights (empty experts: zero in both).
  Catches: a backward through the layout that misroutes cotangents (e.g. weight grads summed into the
  wrong expert), a stop_gradient on the gates."""
  x, gates, routes, ws = problem(E, k, routing, seed=1)
  routes = jnp.asarray(routes)
  loss = lambda mix: (lambda *a: jnp.sum(jnp.sin(mix(a[0], a[1], routes, *a[2:]))))
  sparse = lambda *a: moe_lib.sparse_experts(*a, impl=impl)
  gs = jax.jit(jax.grad(loss(sparse), argnums=range(5)))(*f32(x, gates, *ws))
  gd = jax.jit(jax.grad(loss(moe_lib.dense_experts), argnums=range(5)))(*f32(x, gates, *ws))
  for a, b in zip(gs, gd):
    assert rel(a, b) < 1e-5
  empty = np.bincount(np.asarray(routes).reshape(-1), minlength=E) == 0
  assert np.all(np.asarray(gs[2])[empty] == 0)


def moe_layer(E, k, dispatch, d=D, f=F, norm=True, seed=0):
  cfg = ModelConfig(vocab_size=8, d_model=d, n_layers=2, n_heads=1, n_kv_heads=1, head_dim=2, d_ff=f,
                    kind="moe", n_experts=E, experts_top_k=k, norm_topk_prob=norm, moe_dispatch=dispatch)
  with nnx.use_eager_sharding(False):
    return nnx.split(moe_lib.MoE(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(seed)))


@pytest.mark.parametrize("E,k,norm", [(8, 2, True), (32, 4, False)])
def test_module_sparse_equals_dense_with_router_gradients(E, k, norm):
  """The MoE block under both dispatches (same init): outputs, routes, and gradients of every parameter
  (router included: the gates are differentiable) and of x. Catches: the option ignored, gates left in
  float32 in one path only, the router gradient lost in the sparse path."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, N // 2, D)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(N // 2), (2, N // 2))

  def run(dispatch):
    g, p = moe_layer(E, k, dispatch)
    assert nnx.merge(g, p).dispatch == dispatch

    def loss(p, x):
      y, routes = nnx.merge(g, p)(x, Numerics(), layer=0, positions=pos, tokens=pos)
      return jnp.sum(jnp.sin(y)), (y, routes)

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(p, x)

  (gp_s, gx_s), (y_s, r_s) = run("sparse")
  (gp_d, gx_d), (y_d, r_d) = run("dense")
  np.testing.assert_array_equal(r_s, r_d)
  assert rel(y_s, y_d) < 1e-5 and rel(gx_s, gx_d) < 1e-5
  for name in ("router", "w_gate", "w_up", "w_down"):
    assert rel(gp_s[name][...], gp_d[name][...]) < 1e-5, name


def layer_flops(E, k, dispatch, n_tokens, d, f):
  g, p = moe_layer(E, k, dispatch, d=d, f=f)
  x = jax.ShapeDtypeStruct((1, n_tokens, d), jnp.float32)
  pos = jax.ShapeDtypeStruct((1, n_tokens), jnp.int32)
  fwd = lambda p, x, pos: nnx.merge(g, p)(x, Numerics(), layer=0, positions=pos, tokens=pos)[0]
  return float(jax.jit(fwd).lower(p, x, pos).compile().cost_analysis()["flops"])


@pytest.mark.parametrize("E,k,n_tokens,d,f", [(32, 4, 2048, 64, 128), (128, 8, 2048, 64, 24)])
def test_compiled_flops_near_top_k_only(E, k, n_tokens, d, f):
  """Top-k-only FLOPs of one MoE layer's forward: router 2*N*D*E + the k chosen experts' three SwiGLU
  matmuls 3 * 2*N*k*D*F (elementwise ops not counted). The sparse layer compiles within 1.3x of it;
  the dense one near E/k times it, which is what this test catches (a regression to dense dispatch,
  or padding that grows with E*N)."""
  top_k_only = 2 * n_tokens * d * E + 6 * n_tokens * k * d * f
  sparse = layer_flops(E, k, "sparse", n_tokens, d, f)
  dense = layer_flops(E, k, "dense", n_tokens, d, f)
  assert sparse <= 1.3 * top_k_only, sparse / top_k_only
  assert dense >= 0.5 * (E / k) * top_k_only, dense / top_k_only  # the measure can tell the two apart


def test_dispatch_option_reaches_model_config():
  """model.moe_dispatch: default sparse, dense carried through, anything else rejected."""
  c = default_model_config()
  assert c.moe_dispatch == "sparse"
  c.kind = "moe"
  assert model_config_from(c, 40).moe_dispatch == "sparse"
  c.moe_dispatch = "dense"
  cfg = model_config_from(c, 40)
  assert cfg.moe_dispatch == "dense"
  with pytest.raises(ValueError, match="moe_dispatch"):
    dataclasses.replace(cfg, moe_dispatch="capacity")
