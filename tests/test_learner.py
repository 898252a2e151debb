"""The one compiled learner update: sharding invariance, masked rows, all-rejected batches."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from trm_jax import config as config_lib
from trm_jax import learner as learner_lib
from trm_jax import sharding as sharding_lib
from trm_jax.models import Transformer, model_config_from
from trm_jax.rollout.backends import backend_from_config
from trm_jax.rollout.batch import RolloutBatch

B, P, T, V, G = 8, 4, 8, 24, 2


def tiny_config(**overrides):
  c = config_lib.default_config()
  c = config_lib.with_overrides(c, {"model.size": "tiny", "model.max_len": 32, "rl.prompts_per_step": B // G,
                                    "rl.group_size": G,
                                    # f32 + deterministic logit noise: a mismatch whose value does not depend on
                                    # the sharding (bf16 rounding does: its reduction order changes with it).
                                    "rollout.backend.logit_noise_scale": 0.1, "trm.delta": 0.03,
                                    "learner.chunk_size": 3, "optim.lr": 1e-2, **overrides})
  return config_lib.validate(c)


def make_batch(seed=0):
  r = np.random.default_rng(seed)
  prompt_mask = np.ones((B, P), np.float32)
  prompt_mask[::3, :2] = 0  # left padding on some rows
  lengths = r.integers(1, T + 1, size=B)
  response_mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  return RolloutBatch(
      prompt=jnp.asarray(r.integers(3, V, size=(B, P)), jnp.int32), prompt_mask=jnp.asarray(prompt_mask),
      response=jnp.asarray(r.integers(3, V, size=(B, T)) * response_mask, jnp.int32),
      response_mask=jnp.asarray(response_mask),
      rollout_logp=jnp.asarray(-r.uniform(0.5, 4.0, size=(B, T)) * response_mask, jnp.float32),
      rewards=jnp.asarray(r.uniform(size=B), jnp.float32), group_size=G)


def near_learner(cfg, batch, scale=0.05, seed=1):
  """rollout_logp = the initial learner's log-probs + N(0, scale): what a slightly-off engine reports."""
  from trm_jax import logprobs as lp
  from trm_jax.models import LEARNER
  with nnx.use_eager_sharding(False):
    model = Transformer(model_config_from(cfg.model, V), rngs=nnx.Rngs(0))
  h, _ = lp.response_hidden(model, batch.prompt, batch.prompt_mask, batch.response, batch.response_mask,
                            numerics=LEARNER)
  logp, _ = lp.token_logp(model, h, batch.response, numerics=LEARNER, temperature=1.0, chunk=T)
  noise = np.random.default_rng(seed).normal(size=logp.shape) * scale
  return batch.replace(rollout_logp=(logp + noise) * batch.response_mask)


def build(cfg, mesh, tx=None):
  mcfg = model_config_from(cfg.model, V)
  with nnx.use_eager_sharding(False):
    model_def, params = learner_lib.split_model(Transformer(mcfg, rngs=nnx.Rngs(0)))
  psh = sharding_lib.state_shardings(params, mesh)
  params = jax.device_put(params, psh)
  tx = tx or learner_lib.make_optimizer(cfg.optim, 10)
  opt_state = sharding_lib.init_sharded(tx.init, params, mesh)
  state = learner_lib.TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32))
  step = learner_lib.make_learner_step(cfg, model_def, tx, backend_from_config(cfg.rollout.backend), mesh, psh,
                                       jax.tree.map(lambda x: x.sharding, opt_state), stale=False)
  return state, step


def run(cfg, mesh, batch, tx=None):
  state, step = build(cfg, mesh, tx)
  new_state, metrics = step(state, sharding_lib.shard_batch(batch, mesh))
  return jax.device_get(new_state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def meshes():
  one = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  eight = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": -1})
  return one, eight


@pytest.mark.parametrize("overrides", [
    {},  # TRM-Max, exact KL recomputed under the bf16 backend, PPO clip
    {"trm.criterion": "max_avg", "trm.source": "sampled", "trm.divergence": "k2", "trm.divergence_avg": "k3",
     "trm.delta": 0.004, "trm.delta_avg": 0.001,
     "rl.loss": "is", "rl.minibatches": 2, "rl.epochs": 2},
])
def test_sharded_step_equals_single_device(meshes, overrides):
  cfg = tiny_config(**overrides)
  batch = near_learner(cfg, make_batch())
  # SGD: the parameter change is -lr * grad, so equal parameters mean equal gradients (Adam's
  # 1/sqrt(v) would amplify float32 reduction-order noise on near-zero gradients).
  sgd = optax.sgd(1e-2)
  p1, m1 = run(cfg, meshes[0], batch, sgd)
  p8, m8 = run(cfg, meshes[1], batch, sgd)
  assert set(m1) == set(m8)
  for k in m1:
    np.testing.assert_allclose(m1[k], m8[k], rtol=2e-4, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p8)
  assert np.isfinite(m1["loss"]) and m1["grad_norm"] > 0
  assert 0.0 < m1["trm/accept_rate"] <= 1.0


def test_rejected_sequences_get_exactly_zero_gradient(meshes):
  """Rows the mask rejects cannot influence the update: change them arbitrarily, same parameters."""
  cfg = tiny_config(**{"trm.source": "sampled", "trm.divergence": "k2", "trm.delta": 0.5})
  batch = near_learner(cfg, make_batch())
  # Row 0: a huge log-ratio at one token -> k2 = 0.5 * 30^2 >> delta: rejected.
  bad = batch.replace(rollout_logp=batch.rollout_logp.at[0, 0].set(-40.0))
  p_a, m_a = run(cfg, meshes[1], bad)
  r = np.random.default_rng(7)
  other = bad.replace(response=bad.response.at[0].set(jnp.asarray(r.integers(3, V, size=T) * bad.response_mask[0],
                                                                    jnp.int32)),
                      rewards=bad.rewards.at[0].set(1.0 - bad.rewards[0]),
                      rollout_logp=bad.rollout_logp.at[0, 1:].add(-3.0))
  p_b, m_b = run(cfg, meshes[1], other)
  assert m_a["trm/num_rejected"] >= 1
  assert m_a["trm/num_rejected"] == m_b["trm/num_rejected"]
  jax.tree.map(np.testing.assert_array_equal, p_a, p_b)
  # ... while changing an ACCEPTED row changes the update (the test can fail).
  moved = bad.replace(rewards=bad.rewards.at[1].set(1.0 - bad.rewards[1]).at[2].set(0.0).at[3].set(1.0))
  p_c, _ = run(cfg, meshes[1], moved)
  assert any(not np.array_equal(a, c) for a, c in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_c)))


def test_all_rejected_batch_is_a_zero_update(meshes):
  cfg = tiny_config(**{"trm.delta": 1e-12, "optim.weight_decay": 0.0})
  batch = make_batch(3)
  state, step = build(cfg, meshes[1])
  before = jax.device_get(state.params)
  new_state, m = step(state, sharding_lib.shard_batch(batch, meshes[1]))
  m = jax.device_get(m)
  assert m["trm/accept_rate"] == 0.0 and m["loss"] == 0.0 and m["grad_norm"] == 0.0
  assert all(np.isfinite(v) for v in m.values())
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(new_state.params))


@pytest.mark.parametrize("source", ["recompute", "sampled"])
def test_fused_update_equals_two_pass(meshes, source):
  """The fused single-forward update (the default) is the two-pass update, computed once."""
  over = {"trm.source": source} if source == "recompute" else {
      "trm.source": "sampled", "trm.divergence": "k2", "trm.delta": 0.004}
  batch = near_learner(tiny_config(), make_batch(5))
  sgd = optax.sgd(1e-2)
  p_f, m_f = run(tiny_config(**over, **{"learner.fuse": True}), meshes[0], batch, sgd)
  p_t, m_t = run(tiny_config(**over, **{"learner.fuse": False}), meshes[0], batch, sgd)
  assert set(m_f) == set(m_t)
  for k in m_f:
    np.testing.assert_allclose(m_f[k], m_t[k], rtol=1e-5, atol=1e-7, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p_f, p_t)
  assert m_f["grad_norm"] > 0 and 0 < m_f["trm/accept_rate"] <= 1


def test_bf16_learner_runs_close_to_f32(meshes):
  batch = near_learner(tiny_config(), make_batch(2))
  sgd = optax.sgd(1e-2)
  _, m32 = run(tiny_config(), meshes[1], batch, sgd)
  _, m16 = run(tiny_config(**{"learner.dtype": "bfloat16"}), meshes[1], batch, sgd)
  assert np.isfinite(m16["loss"]) and m16["grad_norm"] > 0
  np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=0.05)
  assert m16["mismatch/kl_max"] != m32["mismatch/kl_max"]  # bf16 is a different learner policy
