"""learner.microbatches = k: the same single optimizer step, its gradient summed over k slices of the rows.

Every batch statistic (the aggregation's denominator, advantages, the TRM mask, bounds, metrics) stays a
whole-batch one, so k = 1, 2 and B give the same update; a per-slice mean would not (checked by hand here).
SGD throughout: the parameter change is -lr * grad, so equal parameters mean equal gradients (Adam's
1/sqrt(v) would amplify float32 summation-order noise on near-zero gradients).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from test_learner import B, T, V, build, make_batch, near_learner, run, tiny_config
from trm_jax import config as config_lib
from trm_jax import learner as learner_lib
from trm_jax import logprobs as lp
from trm_jax import losses
from trm_jax import sharding as sharding_lib
from trm_jax.models import LEARNER, Transformer, model_config_from
from trm_jax.rollout.backends import backend_from_config
from trm_jax.rollout.batch import RolloutBatch

LR = 1e-2
# Tight clip range so PPO clips some tokens (clip_frac is re-weighted across slices); thresholds that reject
# some rows but not all (asserted below), so the mask really is a whole-batch quantity the slices must share.
BASE = {"rl.clip_low": 0.02, "rl.clip_high": 0.02}
CRITERIA = {"max": {"trm.criterion": "max", "trm.delta": 0.03},
            "avg": {"trm.criterion": "avg", "trm.delta_avg": 0.015}}


@pytest.fixture(scope="module")
def mesh():
  return sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def batch():
  return near_learner(tiny_config(), make_batch(5))


def assert_same(ref, got, what):
  (p_ref, m_ref), (p_got, m_got) = ref, got
  assert set(m_ref) == set(m_got), what
  for k in m_ref:  # loss and grad_norm included
    np.testing.assert_allclose(m_got[k], m_ref[k], rtol=1e-5, atol=1e-7, err_msg=f"{what}: {k}")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=what), p_ref, p_got)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_microbatches_give_the_same_update(mesh, batch, criterion, aggregation):
  over = {**BASE, **CRITERIA[criterion], "rl.aggregation": aggregation}
  ref = run(tiny_config(**over), mesh, batch, optax.sgd(LR))
  m = ref[1]
  assert 0 < m["trm/accept_rate"] < 1 and m["grad_norm"] > 0 and m["clip_frac"] > 0
  for k in (2, B):
    assert_same(ref, run(tiny_config(**over, **{"learner.microbatches": k}), mesh, batch, optax.sgd(LR)),
                f"{criterion}/{aggregation}/k={k}")


def test_microbatches_inside_rl_minibatches_on_a_sharded_mesh(batch):
  """rl.minibatches = 2 (two optimizer steps) with k = 2 slices each, parameters sharded over fsdp x tensor
  (the float32 gradient sum keeps their sharding): the same two steps as k = 1."""
  eight = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": -1})
  over = {**BASE, **CRITERIA["max"], "rl.aggregation": "token_mean", "rl.minibatches": 2, "rl.epochs": 2}
  ref = run(tiny_config(**over), eight, batch, optax.sgd(LR))
  assert_same(ref, run(tiny_config(**over, **{"learner.microbatches": 2}), eight, batch, optax.sgd(LR)),
              "minibatches=2/k=2")


def _hand_gradients(cfg, batch, slices):
  """The surrogate's gradient at the initial parameters, by hand from the public pieces: the whole batch's
  targets (learner.analyse), then (whole-batch gradient, mean over `slices` of each slice's own-mean gradient)."""
  with nnx.use_eager_sharding(False):
    model_def, params = learner_lib.split_model(Transformer(model_config_from(cfg.model, V), rngs=nnx.Rngs(0)))

  @jax.jit
  def targets(params, batch):
    side, aux = learner_lib.rollout_side(cfg, model_def, params, batch, backend_from_config(cfg.rollout.backend))
    stats, extra = learner_lib.learner_stats(cfg, model_def.merge(params), batch, side, aux, grad_logp=False)
    return learner_lib.analyse(cfg, stats, extra, batch)[0]

  mb = dict(targets(params, batch), response_mask=batch.response_mask.astype(jnp.float32))

  def loss(p, rows):
    model = model_def.merge(p)
    h, _ = lp.response_hidden(model, batch.prompt[rows], batch.prompt_mask[rows], batch.response[rows],
                              batch.response_mask[rows], numerics=LEARNER)
    logp, _ = lp.token_logp(model, h, batch.response[rows], numerics=LEARNER, temperature=1.0, chunk=T)
    return learner_lib.policy_loss(cfg, logp, {k: v[rows] for k, v in mb.items()})[0]

  grad = jax.jit(jax.grad(loss))
  whole = grad(params, np.arange(B))
  per_slice = [grad(params, rows) for rows in slices]
  return params, whole, jax.tree.map(lambda *g: sum(g) / len(g), *per_slice)


def test_the_slices_share_the_whole_batch_denominator(mesh, batch):
  """k = 2 is the whole-batch gradient computed by hand, and measurably not the mean of the two slices'
  own token means (the naive accumulation): the slices hold different token counts."""
  over = {**BASE, **CRITERIA["max"], "rl.aggregation": "token_mean", "learner.microbatches": 2}
  cfg = tiny_config(**over)
  halves = [np.arange(B // 2), np.arange(B // 2, B)]
  counts = [float(np.asarray(batch.response_mask)[rows].sum()) for rows in halves]
  assert counts[0] != counts[1]
  params0, whole, naive = _hand_gradients(cfg, batch, halves)
  # lr = 1: the step is the gradient itself, with float32 parameter resolution far below it.
  p2, m2 = run(cfg, mesh, batch, optax.sgd(1.0))
  step = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), jax.device_get(params0), p2)
  jax.tree.map(lambda s, g: np.testing.assert_allclose(s, g, rtol=1e-4, atol=1e-6), step, whole)
  np.testing.assert_allclose(m2["grad_norm"], optax.tree_utils.tree_norm(whole), rtol=1e-5)
  gap = optax.tree_utils.tree_norm(jax.tree.map(jnp.subtract, whole, naive))
  assert gap > 1e-2 * optax.tree_utils.tree_norm(whole)
  assert m2["rl/loss_denominator"] == sum(counts)


def _memory_batch(b, p, t, seed=0):
  r = np.random.default_rng(seed)
  mask = (np.arange(t)[None] < r.integers(t // 2, t + 1, size=b)[:, None]).astype(np.float32)
  return RolloutBatch(prompt=jnp.asarray(r.integers(3, V, size=(b, p)), jnp.int32),
                      prompt_mask=jnp.ones((b, p), jnp.float32),
                      response=jnp.asarray(r.integers(3, V, size=(b, t)) * mask, jnp.int32),
                      response_mask=jnp.asarray(mask),
                      rollout_logp=jnp.asarray(-r.uniform(0.5, 4.0, size=(b, t)) * mask, jnp.float32),
                      rewards=jnp.asarray(r.uniform(size=b), jnp.float32), group_size=2)


def test_compiled_temp_memory_falls_with_microbatches(mesh):
  """No remat, 32 rows of 40 positions: the backward's saved activations dominate the compiled update's
  temporaries, and k = 4 keeps one quarter of them (plus the whole batch's no-grad statistics pass)."""
  batch = _memory_batch(32, 8, 32)
  temp = {}
  for k in (1, 4):
    cfg = tiny_config(**{"rl.prompts_per_step": 16, "model.max_len": 40, "learner.remat": "none",
                         "learner.chunk_size": 32, "learner.microbatches": k})
    state, step = build(cfg, mesh, optax.sgd(LR))
    compiled = step.lower(state, sharding_lib.shard_batch(batch, mesh)).compile()
    temp[k] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[4] < 0.75 * temp[1], temp


@pytest.mark.parametrize("over, match", [
    ({"learner.microbatches": 0}, "learner.microbatches must be >= 1"),
    ({"learner.microbatches": 3}, "learner.microbatches must be >= 1 and divide"),
    ({"rl.minibatches": 4, "learner.microbatches": 4}, "rl.minibatches slices of 2 rows"),
])
def test_bad_microbatches_are_rejected_naming_the_field(over, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    tiny_config(**over)
