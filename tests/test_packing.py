"""learner.packing: the packed learner equals the padded one (per-token statistics, masks, update) on a
long-tailed batch; the host layout holds every real token once. Expected values come from the padded path."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from trm_jax import config as config_lib
from trm_jax import learner as learner_lib
from trm_jax import packing as pk_lib
from trm_jax import sharding as sharding_lib
from trm_jax.models import Transformer, model_config_from
from trm_jax.rollout.backends import backend_from_config
from trm_jax.rollout.batch import RolloutBatch

B, P, T, V, G = 16, 4, 32, 24, 2
# Long-tailed: one row at T, one near it, most very short, one empty response.
LENGTHS = np.array([32, 1, 2, 3, 27, 2, 5, 1, 4, 0, 3, 7, 2, 9, 1, 6])
RTOL = 1e-5
MOE = {"model.kind": "moe", "model.n_experts": 4, "model.experts_top_k": 2}


def tiny_config(**overrides):
  c = config_lib.with_overrides(config_lib.default_config(), {
      "model.size": "tiny", "model.max_len": 64, "rl.prompts_per_step": B // G, "rl.group_size": G,
      "rollout.backend.logit_noise_scale": 0.1, "trm.criterion": "max",
      "learner.chunk_size": 8, **overrides})
  return config_lib.validate(c)


def make_batch(seed=0, stored=False):
  r = np.random.default_rng(seed)
  prompt_mask = np.ones((B, P), np.float32)
  prompt_mask[::3, :2] = 0  # left padding on some rows
  response_mask = (np.arange(T)[None] < LENGTHS[:, None]).astype(np.float32)
  batch = RolloutBatch(
      prompt=jnp.asarray(r.integers(3, V, size=(B, P)), jnp.int32), prompt_mask=jnp.asarray(prompt_mask),
      response=jnp.asarray(r.integers(3, V, size=(B, T)) * response_mask, jnp.int32),
      response_mask=jnp.asarray(response_mask),
      rollout_logp=jnp.asarray(-r.uniform(2.5, 3.5, size=(B, T)) * response_mask, jnp.float32),
      rewards=jnp.asarray(r.uniform(size=B), jnp.float32), group_size=G)
  if stored:
    batch = batch.replace(rollout_logits=jnp.asarray(0.3 * r.standard_normal((B, T, V)), jnp.float32))
  return batch


def build_model(cfg):
  with nnx.use_eager_sharding(False):
    return learner_lib.split_model(Transformer(model_config_from(cfg.model, V), rngs=nnx.Rngs(0)))


def layout(batch, divisor=1, chunk=8):
  lengths = pk_lib.host_lengths(np.asarray(batch.prompt_mask), np.asarray(batch.response_mask))
  return pk_lib.plan_packing(*lengths, P, T, divisor=divisor, chunk=chunk)


def close(a, b, rtol=RTOL):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.max(np.abs(b)), 1e-3))


def test_layout_holds_every_real_token_once():
  batch = make_batch()
  out = layout(batch, divisor=4)
  R, L = out["valid"].shape
  assert R % 4 == 0 and R < B and L == P + T
  pm = np.asarray(batch.prompt_mask) > 0
  real = {(b, s) for b in range(B) for s in range(P + T)
          if (s < P and pm[b, s]) or (s >= P and s - P < LENGTHS[b])}
  placed = [(int(b), int(s)) for b, s in zip(out["src_row"][out["valid"]], out["src_pos"][out["valid"]])]
  assert len(placed) == len(set(placed)) and set(placed) == real
  used = out["resp_b"] < B
  slots = sorted(zip(out["resp_b"][used].tolist(), out["resp_t"][used].tolist()))
  assert slots == sorted((b, t) for b in range(B) for t in range(LENGTHS[b]))
  # the slot predicting (b, t) holds response token t - 1 of row b (or the last prompt token for t = 0)
  r, j = np.nonzero(used)
  src = out["src_pos"][r, out["resp_pos"][r, j]]
  assert np.array_equal(src, P - 1 + out["resp_t"][r, j]) and np.array_equal(out["src_row"][r, out["resp_pos"][r, j]],
                                                                            out["resp_b"][r, j])
  assert np.all(out["positions"][out["valid"]] < P + T)


def test_layout_falls_back_when_nothing_to_save():
  assert pk_lib.plan_packing(np.full(B, P), np.full(B, T), P, T) is None
  assert pk_lib.host_lengths(np.ones((2, P)), np.array([[1, 0, 1] + [0] * (T - 3)] * 2)) is None  # holes
  assert pk_lib.first_fit_decreasing([5, 4, 3, 3, 1], 8) == [[0, 2], [1, 3, 4]]


def stats_of(cfg, batch, packing):
  model_def, params = build_model(cfg)
  rollout_params = jax.tree.map(lambda x: x * 1.02, params)  # a rollout policy a little off the learner
  backend = backend_from_config(cfg.rollout.backend)
  side, aux = learner_lib.rollout_side(cfg, model_def, rollout_params, batch, backend, packing)
  stats, extra = learner_lib.learner_stats(cfg, model_def.merge(params), batch, side, aux, grad_logp=False,
                                           packing=packing)
  targets, metrics = learner_lib.analyse(cfg, stats, extra, batch)
  return jax.device_get((stats, targets, metrics))


@pytest.mark.parametrize("overrides, stored", [
    ({"trm.source": "stored", "trm.divergence": "exact", "trm.delta": 0.7}, True),
    ({"trm.source": "recompute", "trm.divergence": "exact", "trm.delta": 0.03, "trm.criterion": "max_avg",
      "trm.divergence_avg": "k3", "trm.delta_avg": 2.0}, False),
    ({"trm.source": "sampled", "trm.divergence": "k2", "trm.delta": 2.5}, False),
    ({**MOE, "trm.source": "recompute", "trm.divergence": "exact", "trm.delta": 0.03}, False),
], ids=["stored", "recompute", "sampled", "moe_recompute"])
def test_stats_and_masks_equal_padded(overrides, stored):
  cfg = tiny_config(**overrides)
  batch = make_batch(stored=stored)
  pk = pk_lib.Packing(**{k: jnp.asarray(v) for k, v in layout(batch).items()})
  s_pad, t_pad, m_pad = stats_of(cfg, batch, None)
  s_pk, t_pk, m_pk = stats_of(cfg, batch, pk)
  mask = np.asarray(batch.response_mask) > 0
  assert set(s_pk) == set(s_pad)
  for k in s_pad:
    close(s_pk[k][mask], s_pad[k][mask])
  for k in ("adv", "weights", "seq_mask", "behaviour"):
    close(t_pk[k], t_pad[k])
  assert 0 < t_pad["seq_mask"].sum() < B - 1  # the mask rejects some sequences, keeps some
  assert set(m_pk) == set(m_pad)
  for k in m_pad:
    close(m_pk[k], m_pad[k])


@pytest.fixture(scope="module")
def mesh8():
  # data x tensor (batch divisor 4). Not data=2 x fsdp=2 x tensor=2: there the PADDED update's gradient already
  # differs from one device's at this shape (grad norm 3.05 vs 3.14; the XLA partitioner issue of
  # models.transformer.gather_fsdp), so it cannot be the reference.
  return sharding_lib.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})


def run_step(cfg, mesh, batch):
  model_def, params = build_model(cfg)
  psh = sharding_lib.state_shardings(params, mesh)
  params = jax.device_put(params, psh)
  # SGD: the parameter change is -lr * grad, equal changes mean equal gradients (lr 1 keeps the change far
  # above the float32 spacing of the parameters, so new - old is not rounding)
  tx = optax.sgd(1.0)
  opt_state = sharding_lib.init_sharded(tx.init, params, mesh)
  state = learner_lib.TrainState(params=params, opt_state=opt_state,
                                 step=jax.device_put(jnp.zeros((), jnp.int32), sharding_lib.replicated(mesh)))
  step = learner_lib.make_learner_step(cfg, model_def, tx, backend_from_config(cfg.rollout.backend), mesh, psh,
                                       jax.tree.map(lambda x: x.sharding, opt_state), stale=False)
  p0 = jax.device_get(params)
  new_state, metrics = step(state, sharding_lib.shard_batch(batch, mesh))
  delta = jax.tree.map(lambda a, b: np.asarray(a) - b, jax.device_get(new_state.params), p0)
  return delta, jax.device_get(metrics), step


@pytest.mark.parametrize("overrides, stored", [
    ({"trm.source": "stored", "trm.divergence": "exact", "trm.delta": 0.7, "bounds.certify_update": True}, True),
    ({**MOE, "trm.source": "recompute", "trm.divergence": "exact", "trm.delta": 0.03}, False),
], ids=["stored_certify", "moe_recompute"])
def test_update_equals_padded_on_8_devices(mesh8, overrides, stored):
  batch = make_batch(stored=stored)
  d_pad, m_pad, _ = run_step(tiny_config(**overrides), mesh8, batch)
  d_pk, m_pk, step = run_step(tiny_config(**overrides, **{"learner.packing": "auto"}), mesh8, batch)
  assert isinstance(step, pk_lib.PackedStep) and step.last_rows is not None and step.last_rows < B
  assert step.last_rows % sharding_lib.batch_divisor(mesh8) == 0
  assert np.max(np.abs(np.concatenate([x.ravel() for x in jax.tree.leaves(d_pad)]))) > 0
  jax.tree.map(close, d_pk, d_pad)
  assert set(m_pk) == set(m_pad)
  for k in m_pad:
    close(m_pk[k], m_pad[k])


@pytest.mark.xfail(strict=True, reason="known XLA partitioner bug: with 4 time chunks on data=2 x fsdp=2 x "
                   "tensor=2 every gradient below the unembedding is wrong (grad_norm 3.05 vs 3.14, loss equal); "
                   "pinning the chunks' rows to the batch sharding fixes it but made XLA:CPU abort now and then "
                   "under load (test_accumulation's sharded test), so it is not applied. strict: a fix turns this red.")
@pytest.mark.parametrize("packing", ["none", "auto"])
def test_update_on_data2_fsdp2_tensor2_equals_one_device(packing):
  """The update on data=2 x fsdp=2 x tensor=2 with 4 time chunks equals the padded update on one device."""
  cfg = tiny_config(**{"trm.source": "stored", "trm.divergence": "exact", "trm.delta": 0.7})
  batch = make_batch(stored=True)
  one = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  d_one, m_one, _ = run_step(cfg, one, batch)
  cfg8 = tiny_config(**{"trm.source": "stored", "trm.divergence": "exact", "trm.delta": 0.7,
                        "learner.packing": packing})
  d8, m8, _ = run_step(cfg8, sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), batch)
  jax.tree.map(close, d8, d_one)
  for k in ("loss", "grad_norm"):
    close(m8[k], m_one[k])


def test_packing_rejected_outside_fused_update():
  with pytest.raises(config_lib.ConfigError, match="learner.packing"):
    tiny_config(**{"learner.packing": "auto", "learner.microbatches": 2})
