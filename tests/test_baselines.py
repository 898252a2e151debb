"""Baselines: hand-computed IS weights, token / geometric masks, and the Binary-TV trust regions of DPPO
(prime-rl's default loss) and CPPO (UniRL's cppo.py), including CPPO's clamp and direction gate."""
import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import baselines, masking

# Three sequences: lengths 3, 2 and an empty (padding) row.
MASK = jnp.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], jnp.float32)
# Row 0 has rho = (1.5, 0.8, 3.0); row 1 rho = (1, 1.1); row 2 garbage (-inf) that must be ignored.
ROLL = jnp.log(jnp.array([[0.2, 0.5, 0.1], [0.3, 0.5, 0.5], [0.1, 0.1, 0.1]]))
LEARN = jnp.log(jnp.array([[0.3, 0.4, 0.3], [0.3, 0.55, 0.9], [0.0, 0.0, 0.0]]))


def _np(x):
  return np.asarray(x)


def test_baselines_hand_values():
  c = baselines.token_tis(LEARN, ROLL, MASK, 2.0)
  np.testing.assert_allclose(c.token_weight, [[1.5, 0.8, 2.0], [1.0, 1.1, 0], [0, 0, 0]], rtol=1e-5)
  np.testing.assert_array_equal(c.seq_mask, [1, 1, 1])
  c = baselines.token_mask(LEARN, ROLL, MASK, 0.9, 2.0)
  np.testing.assert_array_equal(c.token_weight, [[1, 0, 0], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_allclose(c.stats["token_accept_rate"], 3 / 5)
  c = baselines.seq_tis(LEARN, ROLL, MASK, 2.0)  # prod rho = 3.6 -> capped 2; row 1: 1.1
  np.testing.assert_allclose(c.token_weight, [[2, 2, 2], [1.1, 1.1, 0], [0, 0, 0]], rtol=1e-5)
  c = baselines.seq_tis(LEARN, ROLL, MASK, 5.0)
  np.testing.assert_allclose(c.token_weight[0], [3.6] * 3, rtol=1e-5)
  # geometric mean: 3.6^(1/3) = 1.5326, sqrt(1.1) = 1.0488.
  np.testing.assert_array_equal(baselines.geo_mask(LEARN, ROLL, MASK, 0.5, 1.5).seq_mask, [0, 1, 1])
  np.testing.assert_array_equal(baselines.geo_mask(LEARN, ROLL, MASK, 0.5, 1.6).seq_mask, [1, 1, 1])
  # (the empty row has geometric mean exp(0) = 1; it carries no tokens either way)
  c = baselines.geo_mask(LEARN, ROLL, MASK, 1.05, 1.6)
  np.testing.assert_array_equal(c.seq_mask, [1, 0, 0])
  np.testing.assert_allclose(c.stats["accept_rate"], 0.5)
  c = masking.none(MASK)
  np.testing.assert_array_equal(c.token_weight, MASK)
  np.testing.assert_allclose(c.stats["accept_rate"], 1.0)
  for c in (baselines.token_tis(LEARN, ROLL, MASK, 2.0), baselines.seq_tis(LEARN, ROLL, MASK, 2.0)):
    assert np.all(np.isfinite(_np(c.token_weight)))


def test_proximal_weight_hand_values():
  """Decoupled PPO's untruncated rollout -> proximal IS weight pi_prox/pi_roll, 0 off the mask, finite on
  garbage (-inf) padding, stop-gradient."""
  w = baselines.proximal_weight(LEARN, ROLL, MASK)
  np.testing.assert_allclose(w, [[1.5, 0.8, 3.0], [1.0, 1.1, 0], [0, 0, 0]], rtol=1e-5)
  g = jax.grad(lambda lp: baselines.proximal_weight(lp, ROLL, MASK).sum())(LEARN)
  assert np.all(_np(g) == 0)


def _logs(*rows):
  return jnp.log(jnp.array(rows, jnp.float32))


def test_dppo_hand_masks():
  """keep = 1[pi_prox - pi_roll <= high] for A > 0, 1[... >= -low] otherwise (A = 0 included). low != high,
  so swapping them (a break) changes rows 0 and 1."""
  roll = _logs([0.5, 0.1, 0.6], [0.5, 0.3, 0.6], [0.5, 0.5, 0.5])
  prox = _logs([0.72, 0.25, 0.3], [0.8, 0.08, 0.3], [0.5, 0.2, 0.9])
  # differences: (0.22, 0.15, -0.3), (0.3, -0.22, -0.3), (0, -0.3, 0.4)
  adv = jnp.array([1.0, -1.0, 0.0])
  mask = jnp.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]], jnp.float32)
  c = baselines.dppo(prox, roll, mask, adv, 0.25, 0.2)
  np.testing.assert_array_equal(c.token_weight, [[0, 1, 1], [1, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(c.seq_mask, [1, 1, 1])  # tokens only, never sequences
  np.testing.assert_allclose(c.stats["token_accept_rate"], 5 / 8)
  np.testing.assert_allclose(baselines.binary_tv(prox, roll, mask)[1], [0.3, 0.22, 0.3], rtol=1e-5)


# CPPO rows (w_min 0.8, T = 4: w = 1, 0.9333, 0.8667, 0.8; delta 0.2, delta_b 0.02, quantile 0.9).
R1 = ([0.5, 0.5, 0.3, 0.5], [0.55, 0.51, 0.6, 0.52])   # D = 0.05, 0.01, 0.30, 0.02; every r > 1
R2 = ([0.5, 0.5, 0.6, 0.5], [0.55, 0.51, 0.3, 0.52])   # the same D, but token 3 has r = 0.5 < 1
R5 = ([0.5, 0.5, 0.3, 0.5], [0.55, 0.51, 0.52, 0.52])  # D = 0.05, 0.01, 0.22, 0.02


def _cppo(rows, adv, w_min=0.8, mask=None):
  roll, prox = _logs(*[r[0] for r in rows]), _logs(*[r[1] for r in rows])
  mask = jnp.ones(roll.shape, jnp.float32) if mask is None else mask
  return baselines.cppo(prox, roll, mask, jnp.asarray(adv, jnp.float32), 0.2, w_min, 0.02, 0.9)


def test_cppo_prefix_budget_clamp_and_direction_gate():
  """R1 by hand: Z = w D = (0.05, 0.00933, 0.26, 0.016); q90(D) = 0.05 + 0.7 (0.30 - 0.05) = 0.225, clamped
  to 2 delta_b = 0.04; c_t = min(0.2, 0.2 + 0.04 W_{t-1} - S_{t-1}) = (0.2, 0.19, 0.2, -0.00733): keep
  (1, 1, 0, 0). Without the clamp (b = 0.225) c_4 = 0.51 and token 4 would be kept.
  R2: token 3 moves toward the rollout (A (r - 1) < 0): the gate keeps it, its Z still uses the budget.
  R1 with A < 0: every token moves toward the rollout: all kept."""
  c = _cppo([R1, R2, R1], [1.0, 1.0, -1.0])
  np.testing.assert_array_equal(c.token_weight, [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(c.seq_mask, [1, 1, 1])
  np.testing.assert_allclose(c.stats["budget_mean"], 0.04, rtol=1e-6)
  np.testing.assert_allclose(c.stats["gate_kept_frac"], (1 / 4 + 2 / 4) / 3, rtol=1e-6)


def test_cppo_position_weight():
  """R5: Z_3 = 0.8667 * 0.22 = 0.1907 <= 0.2 is feasible with w_min = 0.8 (and c_4 = 0.062 >= Z_4 = 0.016:
  all kept); with w_min = 1 (no position weight) Z_3 = 0.22 > 0.2 is dropped and c_4 = 0.04 >= 0.02."""
  np.testing.assert_array_equal(_cppo([R5], [1.0]).token_weight, [[1, 1, 1, 1]])
  np.testing.assert_array_equal(_cppo([R5], [1.0], w_min=1.0).token_weight, [[1, 1, 0, 1]])


def test_cppo_budget_quantile_over_valid_tokens():
  """Per-row budget b = clip(q90 of the row's valid D, delta_b, 2 delta_b): D = (0.01 .. 0.04) gives
  0.03 + 0.7 * 0.01 = 0.037 (inside, linear interpolation); a length-2 row with D = (0.001, 0.002) gives
  0.0019 -> 0.02 (lower clamp). Its padding positions hold garbage that must not enter the quantile."""
  rc = ([0.5, 0.5, 0.5, 0.5], [0.51, 0.52, 0.53, 0.54])
  np.testing.assert_allclose(_cppo([rc], [1.0]).stats["budget_mean"], 0.037, rtol=1e-4)
  short = ([0.5, 0.5, 1e-30, 0.9], [0.501, 0.502, 0.9, 1e-30])
  c = _cppo([short], [1.0], mask=jnp.array([[1, 1, 0, 0]], jnp.float32))
  np.testing.assert_allclose(c.stats["budget_mean"], 0.02, rtol=1e-6)
  np.testing.assert_array_equal(c.token_weight, [[1, 1, 0, 0]])
  # Jit and eager agree.
  roll, prox = _logs(*[r[0] for r in (R1, R2)]), _logs(*[r[1] for r in (R1, R2)])
  f = jax.jit(lambda p, r: baselines.cppo(p, r, jnp.ones_like(p), jnp.ones(2), 0.2, 0.8, 0.02, 0.9).token_weight)
  np.testing.assert_array_equal(f(prox, roll), [[1, 1, 0, 0], [1, 1, 1, 0]])


def test_dppo_cppo_compose_with_a_trm_criterion():
  """baseline.kind = dppo / cppo composes with any trm.criterion: the sequence mask comes from the criterion,
  the token mask from the baseline."""
  roll, prox = _logs(*[r[0] for r in (R1, R2)]), _logs(*[r[1] for r in (R1, R2)])
  x = masking.CorrectionInputs(mask=jnp.ones_like(roll), learner_logp=prox, rollout_logp=roll,
                               div=jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.3, 0.0, 0.0]]),
                               advantages=jnp.ones(2))
  c = masking.compose("max", "cppo", x, criterion_params=dict(delta=0.1),
                      baseline_params=dict(delta=0.2, w_min=0.8, delta_b=0.02, quantile=0.9))
  np.testing.assert_array_equal(c.token_weight, [[1, 1, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(c.seq_mask, [1, 0])
