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


MAX_AVG_MINIBATCHES = {"trm.criterion": "max_avg", "trm.source": "sampled", "trm.divergence": "k2",
                       "trm.divergence_avg": "k3", "trm.delta": 0.004, "trm.delta_avg": 0.001,
                       "rl.loss": "is", "rl.minibatches": 2, "rl.epochs": 2}
MOE = {"model.kind": "moe", "model.n_experts": 4, "model.experts_top_k": 2}


@pytest.mark.parametrize("mesh_shape, overrides", [
    ((2, 2, 2), {}),  # TRM-Max, exact KL recomputed under the bf16 backend, PPO clip
    ((8, 1, 1), {}),
    ((1, 8, 1), {}),
    ((1, 4, 2), {"learner.microbatches": 2}),
    ((2, 2, 2), MAX_AVG_MINIBATCHES),
    ((2, 2, 2), {**MOE, "learner.microbatches": 2}),
    ((1, 4, 2), MOE),
])
def test_sharded_step_equals_single_device(meshes, mesh_shape, overrides):
  """8 devices, layer-scan hidden states batch-sharded and D over tensor (the default), equal one device.

  Catches: models.transformer.gather_fsdp removed -- on data=2 x fsdp=2 x tensor=2 XLA then swaps the outputs
  of rows 2-3 and 4-5 (see its docstring), and the loss differs by ~1e-2."""
  cfg = tiny_config(**overrides)
  batch = near_learner(cfg, make_batch())
  mesh = sharding_lib.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
  # SGD: the parameter change is -lr * grad, so equal parameters mean equal gradients (Adam's
  # 1/sqrt(v) would amplify float32 reduction-order noise on near-zero gradients).
  sgd = optax.sgd(1e-2)
  p1, m1 = run(cfg, meshes[0], batch, sgd)
  p8, m8 = run(cfg, mesh, batch, sgd)
  assert set(m1) == set(m8)
  for k in m1:
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p8)
  assert np.isfinite(m1["loss"]) and m1["grad_norm"] > 0
  assert 0.0 < m1["trm/accept_rate"] <= 1.0


def test_rejected_sequences_get_exactly_zero_gradient(meshes):
  """Rows the mask rejects cannot influence the update: change them arbitrarily, same parameters."""
  # rl.group_stats="accepted": the group statistics see accepted rows only. (Under the default "all" a rejected
  # row's reward enters its group's mean/std, as in verl, so it may move the accepted rows' advantages.)
  cfg = tiny_config(**{"trm.source": "sampled", "trm.divergence": "k2", "trm.delta": 0.5,
                       "rl.group_stats": "accepted"})
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


def test_all_rejected_batch_skips_the_step_with_a_warm_optimizer(meshes):
  """After real steps AdamW has momentum: a zero gradient would still move the parameters (the old code moved
  them ~0.19 in L2). An all-rejected batch must leave parameters AND optimizer state exactly unchanged."""
  accept = tiny_config(**{"trm.delta": 1e3})
  reject = tiny_config(**{"trm.delta": 1e-12})
  state, step_accept = build(accept, meshes[1])
  _, step_reject = build(reject, meshes[1])
  for seed in (1, 2):  # warm the optimizer: non-zero first and second moments
    state, m = step_accept(state, sharding_lib.shard_batch(make_batch(seed), meshes[1]))
    assert float(m["update/skipped_empty"]) == 0.0
  before = jax.device_get((state.params, state.opt_state))
  new_state, m = step_reject(state, sharding_lib.shard_batch(make_batch(3), meshes[1]))
  m = jax.device_get(m)
  assert m["trm/accept_rate"] == 0.0 and m["update/skipped_empty"] == 1.0 and m["update/skipped"] == 0.0
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get((new_state.params, new_state.opt_state)))


@pytest.mark.parametrize("source", ["recompute", "sampled", "recompute_top_p"])
def test_fused_update_equals_two_pass(meshes, source):
  """The fused single-forward update (the default) is the two-pass update, computed once. With top-p both
  renormalise the learner over the rollout's kept set (the two-pass minibatch loss must get the rollout side)."""
  over = {"trm.source": "recompute"} if source.startswith("recompute") else {
      "trm.source": "sampled", "trm.divergence": "k2", "trm.delta": 0.004}
  if source == "recompute_top_p":
    over.update({"rollout.top_p": 0.7, "trm.delta": 0.5})
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
  cfg32, cfg16 = tiny_config(), tiny_config(**{"learner.dtype": "bfloat16"})
  # The compiled update really computes in bf16 (the f32 config's program has no bf16 at all: its rollout
  # backend is f32 + logit noise), not just a config flag that nothing reads.
  hlo = {}
  for name, cfg in (("f32", cfg32), ("bf16", cfg16)):
    state, step = build(cfg, meshes[0], sgd)
    hlo[name] = step.lower(state, sharding_lib.shard_batch(batch, meshes[0])).as_text()
  assert "bf16" not in hlo["f32"] and "bf16" in hlo["bf16"]
  _, m32 = run(cfg32, meshes[1], batch, sgd)
  _, m16 = run(cfg16, meshes[1], batch, sgd)
  assert np.isfinite(m16["loss"]) and m16["grad_norm"] > 0
  np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=0.05)
  # bf16 is a different learner policy, by about bf16's resolution (2^-8) on the log-probs: the mismatch it
  # adds is visible in the per-token KL but small.
  assert abs(m16["mismatch/kl_mean"] - m32["mismatch/kl_mean"]) > 1e-6
  assert abs(m16["mismatch/kl_mean"] - m32["mismatch/kl_mean"]) < 0.5 * m32["mismatch/kl_mean"] + 1e-3


# ----------------------------------------------------------------------------- semantics


# Two updates of one batch, seq_total and token_mean, both with the post-update certificate. Acceptance is by
# the k2 estimator (reproducible by hand); the certificate uses the exact KL / TV of the recomputed rollout.
CERT = {"trm.divergence": "k2", "trm.delta": 0.003, "bounds.certify_update": True}


@pytest.fixture(scope="module")
def cert_runs(meshes):
  cfg = tiny_config(**CERT)
  batch = near_learner(cfg, make_batch(5))
  out = {"batch": batch}
  for agg in ("seq_total", "token_mean"):
    state, step = build(tiny_config(**CERT, **{"rl.aggregation": agg}), meshes[0], optax.sgd(0.3))
    params0 = jax.device_get(state.params)
    new_state, m = step(state, sharding_lib.shard_batch(batch, meshes[0]))
    out[agg] = (params0, jax.device_get(new_state.params), jax.device_get(m))
  return out


def test_token_mean_aggregation_keeps_rejected_rows_in_the_denominator(cert_runs):
  """aggregation != seq_total inside the learner: the response mask reaches the aggregation, so rejected
  rows stay in the token count (rejection sampling), and rl/loss_denominator is that count."""
  batch, m_st, m_tm = cert_runs["batch"], cert_runs["seq_total"][2], cert_runs["token_mean"][2]
  assert 1 <= m_tm["trm/num_rejected"] < B
  n_tokens = float(np.asarray(batch.response_mask).sum())
  assert m_st["rl/loss_denominator"] == B and m_tm["rl/loss_denominator"] == n_tokens
  # Same per-token terms, different denominators: loss_tm * n_tokens = loss_st * B.
  np.testing.assert_allclose(m_tm["loss"] * n_tokens, m_st["loss"] * B, rtol=1e-5)


def _topk_batch(cfg, batch, k=4):
  """rollout_topk_* from the initial learner's full distribution (a top-k engine at zero mismatch)."""
  from trm_jax import logprobs as lp
  from trm_jax.models import LEARNER
  with nnx.use_eager_sharding(False):
    model = Transformer(model_config_from(cfg.model, V), rngs=nnx.Rngs(0))
  h, _ = lp.response_hidden(model, batch.prompt, batch.prompt_mask, batch.response, batch.response_mask,
                            numerics=LEARNER)
  logp_v = jax.nn.log_softmax(model.unembed(h, numerics=LEARNER) + 0.3 * np.random.default_rng(3).normal(
      size=(B, T, V)), axis=-1)
  top_logp, top_ids = jax.lax.top_k(logp_v, k)
  return batch.replace(rollout_topk_logp=top_logp, rollout_topk_ids=top_ids)


def test_topk_is_flagged_and_certified_by_tv_bounds_only(meshes):
  cfg = tiny_config(**{"trm.source": "topk", "trm.topk": 4, "trm.criterion": "tv", "trm.eps": 0.9})
  batch = _topk_batch(cfg, near_learner(cfg, make_batch()))
  _, m = run(cfg, meshes[0], batch, optax.sgd(1e-2))
  assert m["mismatch/source"] == 2 and m["mismatch/exact"] == 0 and m["bounds/exact"] == 0
  assert m["bounds/plugin_valid"] == 1  # B* below comes from TV upper bounds only
  assert not {"bounds/pinsker_marginal_kl", "bounds/mixed_kl", "bounds/adaptive", "bounds/delta"} & set(m)
  np.testing.assert_allclose(m["bounds/unified"], min(m["bounds/coupling"], m["bounds/mixed_tv"],
                                                      m["bounds/adaptive_tv"]), rtol=1e-6)
  assert m["bounds/tv_seq"] <= 1.0 and m["bounds/unified"] > 0


def test_analyse_inf_at_padded_position_is_not_nan():
  """kl_reverse = inf at a padded position (top_p < 1) must not turn the metrics into NaN (inf * 0)."""
  cfg = tiny_config()
  batch = make_batch(4)
  mask = np.asarray(batch.response_mask)
  pad = np.argwhere(mask == 0)[0]
  stats = {k: jnp.full((B, T), 0.01, jnp.float32) for k in ("kl", "kl_reverse", "tv", "entropy")}
  stats = {k: v.at[tuple(pad)].set(jnp.inf) for k, v in stats.items()}
  stats["learner_logp"] = batch.rollout_logp
  _, m = learner_lib.analyse(cfg, stats, {}, batch)
  bad = [k for k, v in m.items() if not np.all(np.isfinite(np.asarray(v)))]
  assert not bad, bad
  np.testing.assert_allclose(m["mismatch/kl_reverse_mean"], 0.01, rtol=1e-6)
  np.testing.assert_allclose(m["mismatch/kl_mean"], 0.01, rtol=1e-6)


def test_post_update_certificate_rows_and_parameters(cert_runs):
  """bounds.certify_update: L'(theta') and B* of the UPDATED parameters vs pi_roll on the whole batch and on
  the accepted rows, recomputed here from theta' (float64 surrogate by hand)."""
  from trm_jax import bounds, logprobs as lp
  from trm_jax.models import LEARNER
  cfg, batch = tiny_config(**CERT), cert_runs["batch"]
  params0, params1, m = cert_runs["seq_total"]
  mask = np.asarray(batch.response_mask, np.float64)
  roll = np.asarray(batch.rollout_logp, np.float64)
  with nnx.use_eager_sharding(False):
    model_def, _ = learner_lib.split_model(Transformer(model_config_from(cfg.model, V), rngs=nnx.Rngs(0)))

  def logp_of(params):
    model = model_def.merge(params)
    h, _ = lp.response_hidden(model, batch.prompt, batch.prompt_mask, batch.response, batch.response_mask,
                              numerics=LEARNER)
    return np.asarray(lp.token_logp(model, h, batch.response, numerics=LEARNER, temperature=1.0, chunk=T)[0],
                      np.float64)

  lp0, lp1 = logp_of(params0), logp_of(params1)
  accepted = np.max(0.5 * (lp0 - roll) ** 2 * mask, axis=1) <= 0.003
  assert 0 < accepted.sum() < B  # both populations are non-trivial
  per_row = np.asarray(batch.rewards, np.float64) * ((np.exp(lp1 - roll) - 1) * mask).sum(1)
  np.testing.assert_allclose(m["bounds/post/surrogate"], per_row.mean(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m["bounds/accepted/surrogate"], per_row[accepted].mean(), rtol=1e-4, atol=1e-6)
  assert m["bounds/accepted/num_sequences"] == accepted.sum() and m["bounds/post/num_sequences"] == B
  # The post-update surrogate is not the pre-update one (the parameters moved).
  pre = (np.asarray(batch.rewards) * ((np.exp(lp0 - roll) - 1) * mask).sum(1)).mean()
  assert abs(pre - m["bounds/post/surrogate"]) > 1e-4
  # B*(theta') from the exact divergences of theta' vs the rollout side (recompute at the pre-update params).
  backend = backend_from_config(cfg.rollout.backend)
  side, aux = learner_lib.rollout_side(cfg, model_def, params0, batch, backend)
  stats, _ = learner_lib.learner_stats(cfg, model_def.merge(params1), batch, side, aux, grad_logp=False)
  kl64, tv64 = np.asarray(stats["kl"], np.float64) * mask, np.asarray(stats["tv"], np.float64) * mask
  for name, rows in (("post", np.ones(B, bool)), ("accepted", accepted)):
    # The plug-in statistics by hand in float64 (catches a mask, row set or reduction wired wrongly) ...
    hand = {"delta": kl64[rows].max(), "eps": tv64[rows].max(), "kl_seq": kl64[rows].sum(1).mean()}
    for k, v in hand.items():
      np.testing.assert_allclose(m[f"bounds/{name}/{k}"], v, rtol=1e-4, atol=1e-7, err_msg=f"{name}/{k}")
    # ... and B* from them through the bound formulas (bounds.py: tested against the paper's numbers there).
    cert = bounds.certificate(stats["kl"], stats["tv"], jnp.asarray(mask * rows[:, None], jnp.float32))
    for k in ("tv_seq", "unified"):
      np.testing.assert_allclose(m[f"bounds/{name}/{k}"], cert[k], rtol=1e-4, atol=1e-7, err_msg=f"{name}/{k}")
  np.testing.assert_allclose(m["bounds/certified_improvement"],
                             m["bounds/post/surrogate"] - m["bounds/post/unified"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m["bounds/accepted/selected_margin"],
                             m["bounds/accepted/surrogate"] - m["bounds/accepted/unified"], rtol=1e-5, atol=1e-7)
  # Pre-update statistics are still logged, and differ from the post-update ones.
  assert m["bounds/kl_seq"] != m["bounds/post/kl_seq"]


@pytest.mark.parametrize("kind", ["dppo", "cppo"])
def test_dppo_cppo_run_inside_the_compiled_update(meshes, kind):
  """The rival baselines compose with TRM-Max in the one compiled update (their masks are hand-tested in
  tests/test_baselines.py): finite metrics, their statistics logged, and a token whose rollout probability is 1
  while the learner's is far from it (binary TV ~ 1 >> 0.2) loses weight in at least one direction."""
  cfg = tiny_config(**{"baseline.kind": kind, "rl.loss": "is", "trm.delta": 1e3})
  batch = near_learner(cfg, make_batch())
  far = batch.replace(rollout_logp=batch.rollout_logp.at[:, 0].set(0.0))
  _, m_near = run(cfg, meshes[0], batch)
  _, m_far = run(cfg, meshes[0], far)
  assert all(np.isfinite(v) for v in m_far.values())
  assert "baseline/token_accept_rate" in m_far
  assert m_far["baseline/token_accept_rate"] < m_near["baseline/token_accept_rate"]


def test_attention_blocks_leave_the_update_unchanged(meshes):
  """learner.attention_block (query blocks in the learner's and the recomputed rollout's attention) changes
  memory, not the numbers: same metrics and parameters as attending all queries at once (P + T = 12 in blocks
  of 5). Catches: a block given another block's causal mask."""
  batch = near_learner(tiny_config(), make_batch())
  sgd = optax.sgd(1e-2)
  p0, m0 = run(tiny_config(), meshes[0], batch, sgd)
  p1, m1 = run(tiny_config(**{"learner.attention_block": 5}), meshes[0], batch, sgd)
  for k in m0:
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-4, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p0)
