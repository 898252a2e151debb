"""Losses: hand-computed values and gradients, the four PPO-clip cases of the paper's Table 2, aggregation
modes, masked sequences contribute exactly zero gradient, all-masked batches are 0 without NaN."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import losses

_ppo = jax.jit(jax.value_and_grad(
    lambda lp, bp, a, w, dual: losses.ppo_clip_loss(lp, bp, a, w, eps_low=0.2, eps_high=0.2,
                                                    dual_clip=dual)[0]),
    static_argnums=4)


def _one_token(ratio, adv, dual=None):
  lp = jnp.array([[math.log(ratio)]])
  loss, grad = _ppo(lp, jnp.zeros((1, 1)), jnp.array([adv]), jnp.ones((1, 1)), dual)
  return float(loss), float(grad[0, 0])


@pytest.mark.parametrize("ratio,adv,loss,grad,clipped", [
    (1.5, 1.0, -1.2, 0.0, True),    # r > 1+eps, A > 0: clipped, no gradient
    (1.5, -1.0, 1.5, 1.5, False),   # r > 1+eps, A < 0: NOT clipped (paper Table 2)
    (0.5, -1.0, 0.8, 0.0, True),    # r < 1-eps, A < 0: clipped
    (0.5, 1.0, -0.5, -0.5, False),  # r < 1-eps, A > 0: NOT clipped
    (1.1, 2.0, -2.2, -2.2, False),  # inside the range: d(-A r)/d log pi = -A r
])
def test_ppo_table2_cases(ratio, adv, loss, grad, clipped):
  got_loss, got_grad = _one_token(ratio, adv)
  np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(got_grad, grad, rtol=1e-5, atol=1e-7)
  _, aux = losses.ppo_clip_loss(jnp.array([[math.log(ratio)]]), jnp.zeros((1, 1)), jnp.array([adv]),
                                jnp.ones((1, 1)), eps_low=0.2, eps_high=0.2)
  assert float(aux["clip_frac"]) == float(clipped)
  np.testing.assert_allclose(aux["ratio_mean"], ratio, rtol=1e-5)


def test_clip_higher_and_dual_clip():
  loss, aux = losses.ppo_clip_loss(jnp.array([[math.log(1.25)]]), jnp.zeros((1, 1)), jnp.array([1.0]),
                                   jnp.ones((1, 1)), eps_low=0.2, eps_high=0.28)
  np.testing.assert_allclose(loss, -1.25, rtol=1e-6)  # 1.25 < 1 + 0.28: unclipped
  assert float(aux["clip_frac"]) == 0.0
  # Dual clip c = 3 caps the unclipped A < 0 case at -c A = 3 (and kills its gradient).
  np.testing.assert_allclose(_one_token(5.0, -1.0, 3.0), (3.0, 0.0), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_one_token(2.0, -1.0, 3.0), (2.0, 2.0), rtol=1e-6)
  np.testing.assert_allclose(_one_token(0.5, 1.0, 3.0), (-0.5, -0.5), rtol=1e-6)  # A > 0 untouched
  with pytest.raises(ValueError):
    losses.ppo_clip_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones(1), jnp.ones((1, 1)),
                         eps_low=0.2, eps_high=0.2, dual_clip=0.5)


def test_is_loss_value_and_gradient():
  # Two accepted sequences and one rejected (M = 0): N = 3 in the denominator.
  lp = jnp.log(jnp.array([[0.3, 0.5], [0.2, 0.4], [0.9, 0.9]]))
  rp = jnp.log(jnp.array([[0.2, 0.5], [0.4, 0.4], [0.1, 0.1]]))
  adv = jnp.array([1.0, -2.0, 5.0])
  w = jnp.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
  (loss, _), g = jax.value_and_grad(losses.is_loss, has_aux=True)(lp, rp, adv, w)
  # -(1/3) [1 * (1.5 + 1.0) + (-2) * 0.5] = -0.5
  np.testing.assert_allclose(loss, -0.5, rtol=1e-6)
  # d/d log pi_t = -(1/N) M A rho_t
  np.testing.assert_allclose(g, [[-1.5 / 3, -1.0 / 3], [2 * 0.5 / 3, 0.0], [0.0, 0.0]], rtol=1e-6)
  assert np.all(np.asarray(jax.grad(lambda r: losses.is_loss(lp, r, adv, w)[0])(rp)) == 0.0)


def test_aggregation_modes():
  x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
  w = jnp.array([[1.0, 1.0, 1.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  # weighted terms: (1, 2, 3), (2, 0, 0), (0, 0, 0); total 8
  expected = {"seq_total": 8 / 3, "token_mean": 8 / 4, "seq_mean_token_sum": 8 / 2,
              "seq_mean_token_mean": (6 / 3 + 2 / 1) / 2}
  with_mask = {"seq_total": 8 / 3, "token_mean": 8 / 6, "seq_mean_token_sum": 8 / 3,
               "seq_mean_token_mean": (6 / 3 + 2 / 2 + 0 / 1) / 3}
  for mode in losses.AGGREGATIONS:
    np.testing.assert_allclose(losses.aggregate(x, w, mode), expected[mode], rtol=1e-6, err_msg=mode)
    np.testing.assert_allclose(losses.aggregate(x, w, mode, mask), with_mask[mode], rtol=1e-6,
                               err_msg=mode)
  with pytest.raises(ValueError, match="unknown aggregation"):
    losses.aggregate(x, w, "mean")


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_masked_sequences_give_exactly_zero_gradient(mode):
  # Row 1 is rejected and holds extreme log-probs (exp overflows if it were not sanitised).
  lp = jnp.array([[-1.0, -0.5], [100.0, -jnp.inf]])
  bp = jnp.array([[-1.2, -0.4], [-100.0, -jnp.inf]])
  adv = jnp.array([1.0, -3.0])
  w = jnp.array([[1.0, 1.0], [0.0, 0.0]])
  for f in (lambda l: losses.ppo_clip_loss(l, bp, adv, w, eps_low=0.2, eps_high=0.28,
                                           dual_clip=3.0, aggregation=mode)[0],
            lambda l: losses.is_loss(l, bp, adv, w, aggregation=mode)[0]):
    loss, g = jax.value_and_grad(f)(lp)
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[1] == 0.0)
    assert np.any(np.asarray(g)[0] != 0.0)


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_all_masked_batch_is_zero_without_nan(mode):
  lp = jnp.array([[jnp.nan, 3.0], [-jnp.inf, 0.0]])
  bp = jnp.zeros((2, 2))
  w = jnp.zeros((2, 2))
  adv = jnp.array([1.0, -1.0])
  (loss, aux), g = jax.value_and_grad(
      lambda l: losses.ppo_clip_loss(l, bp, adv, w, eps_low=0.2, eps_high=0.2, aggregation=mode),
      has_aux=True)(lp)
  assert float(loss) == 0.0 and np.all(np.asarray(g) == 0.0)
  assert all(np.isfinite(float(v)) for v in aux.values())
  (loss, _), g = jax.value_and_grad(lambda l: losses.is_loss(l, bp, adv, w, mode), has_aux=True)(lp)
  assert float(loss) == 0.0 and np.all(np.asarray(g) == 0.0)


# ----------------------------------------------------------------------------- IS x PPO composition -----------
# The gradient weight of one token, N * d loss / d log pi_theta(y_t), through the learner's own composition
# (learner.analyse -> policy_loss) as the fused update computes it: pi_theta = pi_prox at the step, rho =
# pi_prox / pi_roll. RLOO on groups of 2 with rewards (1, 0) gives A = +1 and -1 exactly.

RHOS = (0.5, 1.2, 3.0)


def _composition_grad(cfg_name, arg, n_tokens=1, **overrides):
  from trm_jax import config as config_lib
  from trm_jax import learner
  from trm_jax.rollout.batch import RolloutBatch
  cfg = config_lib.load_config(cfg_name, arg)
  cfg = config_lib.validate(config_lib.with_overrides(cfg, {
      "rl.advantage": "rloo", "rl.group_size": 2, "rl.prompts_per_step": len(RHOS), "trm.criterion": "none",
      "trm.source": "sampled", "trm.divergence": "k2", "trm.divergence_avg": "k3", **overrides}))
  B = 2 * len(RHOS)
  rho = np.repeat(RHOS, 2)  # rows (rho, A=+1), (rho, A=-1) per group
  lp = np.full((B, n_tokens), math.log(0.3), np.float32)
  roll = lp.copy()
  roll[:, 0] -= np.log(rho)  # token 0 has rho; later tokens rho = 1
  ones = jnp.ones((B, n_tokens), jnp.float32)
  batch = RolloutBatch(prompt=jnp.ones((B, 1), jnp.int32), prompt_mask=jnp.ones((B, 1)),
                       response=jnp.ones((B, n_tokens), jnp.int32), response_mask=ones,
                       rollout_logp=jnp.asarray(roll), rewards=jnp.asarray(np.tile([1.0, 0.0], len(RHOS))),
                       group_size=2)

  def loss(learner_logp):
    targets, _ = learner.analyse(cfg, {"learner_logp": learner_logp, "entropy": ones * 0}, {}, batch)
    return learner.policy_loss(cfg, learner_logp, dict(targets, response_mask=ones))[0]

  return np.asarray(jax.grad(loss)(jnp.asarray(lp))) * B, np.tile([1.0, -1.0], len(RHOS))


@pytest.mark.parametrize("name,expect", [
    # token TIS (decoupled PPO): weight A * min(rho, 2), ratio pi_theta/pi_prox = 1 never clipped.
    ("tis", lambda rho, a: a * min(rho, 2.0)),
    # plain PPO clip [0.8, 1.28] against pi_roll: A * rho unless clipped (rho 0.5, A<0 and rho 3, A>0).
    ("ppo_clip", lambda rho, a: 0.0 if (rho < 0.8 and a < 0) or (rho > 1.28 and a > 0) else a * rho),
])
def test_gradient_weight_tis_and_ppo_hand_values(name, expect):
  g, adv = _composition_grad("baselines", f"name={name}")
  want = [-expect(r, a) for r, a in zip(np.repeat(RHOS, 2), adv)]
  np.testing.assert_allclose(g[:, 0], want, rtol=1e-5, atol=1e-7)
  # Hand values written out: rho = 0.5 -> -0.5 (not -0.25 = -min(rho, 2) rho), rho = 3 -> -2 (not -6).
  if name == "tis":
    np.testing.assert_allclose(g[:, 0], [-0.5, 0.5, -1.2, 1.2, -2.0, 2.0], rtol=1e-5)
  else:
    np.testing.assert_allclose(g[:, 0], [-0.5, 0.0, -1.2, 1.2, 0.0, 3.0], rtol=1e-5)


def test_gradient_weight_seq_is_hand_values():
  """seq_is: every token of a row gets A * min(prod_t rho_t, 2) once (token 0 carries rho, token 1 rho=1)."""
  g, adv = _composition_grad("baselines", "name=seq_is", n_tokens=2)
  want = np.array([-a * min(r, 2.0) for r, a in zip(np.repeat(RHOS, 2), adv)])
  np.testing.assert_allclose(g, np.stack([want, want], 1), rtol=1e-5, atol=1e-7)


def test_decoupled_ppo_without_is_baseline_carries_untruncated_weight():
  """ratio_base=learner, no IS baseline: the weight is the untruncated pi_prox/pi_roll (A rho), no clip."""
  g, adv = _composition_grad("baselines", "name=ppo_clip", **{"rl.ratio_base": "learner"})
  np.testing.assert_allclose(g[:, 0], [-0.5, 0.5, -1.2, 1.2, -3.0, 3.0], rtol=1e-5)


def test_is_baseline_with_rollout_ratio_is_refused():
  from trm_jax import config as config_lib
  cfg = config_lib.load_config("baselines", "name=tis")
  with pytest.raises(ValueError, match="rl.ratio_base"):
    config_lib.validate(config_lib.with_overrides(cfg, {"rl.ratio_base": "rollout"}))


def test_decoupled_ppo_clips_against_proximal_with_is_weight():
  """After an update (epochs > 1) r = pi_theta/pi_prox moves; PPO clips r, the IS weight w multiplies:
  d loss / d log pi = -A w r unclipped, 0 clipped (hand values, w = 0.5)."""
  prox = jnp.zeros((4, 1))
  lp = jnp.log(jnp.array([[1.5], [1.5], [1.1], [0.5]]))
  adv = jnp.array([1.0, -1.0, 1.0, -1.0])
  w = jnp.full((4, 1), 0.5)
  f = lambda x: losses.ppo_clip_loss(x, prox, adv, w, eps_low=0.2, eps_high=0.28)[0]
  g = np.asarray(jax.grad(f)(lp))[:, 0] * 4
  np.testing.assert_allclose(g, [0.0, 0.5 * 1.5, -0.5 * 1.1, 0.0], rtol=1e-6)
  _, aux = losses.ppo_clip_loss(lp, prox, adv, w, eps_low=0.2, eps_high=0.28)
  assert float(aux["clip_frac"]) == 0.5


@pytest.mark.parametrize("mode,expected", [("seq_total", 3.0), ("token_mean", 5.0), ("seq_mean_token_sum", 2.0),
                                           ("seq_mean_token_mean", 2.0)])
def test_denominator_counts_rejected_rows_with_the_mask(mode, expected):
  mask = jnp.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], jnp.float32)
  weights = mask.at[1].set(0.0)  # row 1 rejected: weight 0, but its tokens are in the mask
  assert float(losses.denominator(weights, mode, mask)) == expected
  x = jnp.ones_like(mask)
  np.testing.assert_allclose(losses.aggregate(x, weights, mode, mask) * expected,
                             {"seq_mean_token_mean": 1.0}.get(mode, 3.0), rtol=1e-6)
