"""Masks and weights: hand-computed acceptance for every criterion, statistics, dispatch, stop-gradient."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import divergence, masking

# Three sequences: lengths 3, 2 and an empty (padding) row.
MASK = jnp.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], jnp.float32)
# Row 0 has rho = (1.5, 0.8, 3.0); row 1 rho = (1, 1.1); row 2 garbage (-inf) that must be ignored.
ROLL = jnp.log(jnp.array([[0.2, 0.5, 0.1], [0.3, 0.5, 0.5], [0.1, 0.1, 0.1]]))
LEARN = jnp.log(jnp.array([[0.3, 0.4, 0.3], [0.3, 0.55, 0.9], [0.0, 0.0, 0.0]]))


def _np(x):
  return np.asarray(x)


def test_trm_max_avg_and_combined():
  div = jnp.array([[0.01, 0.2, 0.03], [0.01, 0.02, 0.5], [9.0, 9.0, 9.0]])
  c = masking.trm_max(div, MASK, 0.05)
  np.testing.assert_array_equal(c.seq_mask, [0, 1, 1])  # 0.5 on row 1 is masked out
  np.testing.assert_array_equal(c.token_weight, [[0, 0, 0], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_allclose(c.stats["accept_rate"], 0.5)  # empty row not counted
  np.testing.assert_allclose(c.stats["token_accept_rate"], 2 / 5)
  c = masking.trm_avg(div, MASK, 0.05)  # means 0.08, 0.015
  np.testing.assert_array_equal(c.seq_mask, [0, 1, 1])
  c = masking.trm_avg(div, MASK, 0.1)
  np.testing.assert_array_equal(c.seq_mask, [1, 1, 1])
  # Combined: row 0 passes max (0.04 <= 0.05) but fails avg (0.03 > 0.02); row 1 fails max, passes
  # avg; row 2 passes both.
  d_max = jnp.array([[0.04, 0.0, 0.0], [0.1, 0.0, 0.0], [0.01, 0.0, 0.0]])
  d_avg = jnp.array([[0.03, 0.03, 0.03], [0.01, 0.01, 0.0], [0.01, 0.01, 0.01]])
  full = jnp.ones_like(MASK)
  np.testing.assert_array_equal(masking.trm_max(d_max, full, 0.05).seq_mask, [1, 0, 1])
  np.testing.assert_array_equal(masking.trm_avg(d_avg, full, 0.02).seq_mask, [0, 1, 1])
  np.testing.assert_array_equal(masking.trm_max_avg(d_max, d_avg, full, 0.05, 0.02).seq_mask, [0, 0, 1])


def test_ln_trm_and_ser_hand_values():
  # Row 0, T = 3, delta = 0.02, eps = 0.3: w = (min(1, .6, .1414), min(1, .3, .1), 0), Z = .2414;
  # |rho - 1| = (.5, .2, 2): W = .5 * .1414 + .2 * .1 = .0907; W / Z = .3757 (the last token is free).
  wz = (0.5 * math.sqrt(0.02) + 0.2 * 0.1) / (math.sqrt(0.02) + 0.1)
  # Row 1, T = 2: w = (min(1, .3, .1), 0): W / Z = |1 - 1| = 0.
  c = masking.ln_trm(LEARN, ROLL, MASK, 0.02, 0.3, wz + 1e-3)
  np.testing.assert_array_equal(c.seq_mask, [1, 1, 1])
  # Mean over the two rows with tokens (row 1 scores 0; the padding row is not a sequence).
  np.testing.assert_allclose(c.stats["ln_score_mean"], wz / 2, rtol=1e-5)
  c = masking.ln_trm(LEARN, ROLL, MASK, 0.02, 0.3, wz - 1e-3)
  np.testing.assert_array_equal(c.seq_mask, [0, 1, 1])
  # SER: (1/T) sum |rho - 1| = 0.9 for row 0, 0.05 for row 1.
  np.testing.assert_array_equal(masking.ser(LEARN, ROLL, MASK, 0.06).seq_mask, [0, 1, 1])
  np.testing.assert_array_equal(masking.ser(LEARN, ROLL, MASK, 0.04).seq_mask, [0, 0, 1])
  np.testing.assert_array_equal(masking.ser(LEARN, ROLL, MASK, 0.91).seq_mask, [1, 1, 1])


def test_accept_rate_by_length():
  out = masking.accept_rate_by_length(jnp.array([1.0, 0.0, 1.0, 1.0]), jnp.array([1, 3, 3, 0]),
                                      (1, 2, 4, 8))
  assert set(out) == {"len_1_2", "len_2_4", "len_4_8"}
  np.testing.assert_allclose([out["len_1_2"], out["len_2_4"], out["len_4_8"]], [1.0, 0.5, -1.0])
  c = masking.trm_max(jnp.zeros_like(MASK), MASK, 0.1, length_edges=(1, 3, 4))
  np.testing.assert_allclose(c.stats["accept_rate/len_1_3"], 1.0)
  np.testing.assert_allclose(c.stats["accept_rate/len_3_4"], 1.0)


def test_apply_correction_dispatch_matches_direct_calls():
  est = divergence.sampled_estimators(LEARN, ROLL, MASK)
  inputs = masking.CorrectionInputs(mask=MASK, learner_logp=LEARN, rollout_logp=ROLL)
  adv_inputs = inputs.replace(advantages=jnp.array([1.0, -1.0, 0.5]))
  cases = [
      ("none", {}, masking.none(MASK)),
      ("max", dict(delta=0.05), masking.trm_max(est["k2"], MASK, 0.05)),
      ("avg", dict(delta_avg=0.01), masking.trm_avg(est["k3"], MASK, 0.01)),
      ("max_avg", dict(delta=0.5, delta_avg=0.01),
       masking.trm_max_avg(est["k2"], est["k3"], MASK, 0.5, 0.01)),
      ("tv", dict(eps=0.2), masking.trm_max(est["tv_est"], MASK, 0.2)),
      ("ln", dict(delta=0.02, eps=0.3, delta_w=0.3), masking.ln_trm(LEARN, ROLL, MASK, 0.02, 0.3, 0.3)),
      ("ser", dict(delta_ser=0.06), masking.ser(LEARN, ROLL, MASK, 0.06)),
      ("tis", dict(cap=2.0), masking.token_tis(LEARN, ROLL, MASK, 2.0)),
      ("token_mask", dict(low=0.9, high=2.0), masking.token_mask(LEARN, ROLL, MASK, 0.9, 2.0)),
      ("seq_is", dict(cap=2.0), masking.seq_tis(LEARN, ROLL, MASK, 2.0)),
      ("geo_mask", dict(low=0.5, high=1.5), masking.geo_mask(LEARN, ROLL, MASK, 0.5, 1.5)),
      ("dppo", dict(low=0.05, high=0.05),
       masking.dppo(LEARN, ROLL, MASK, adv_inputs.advantages, 0.05, 0.05)),
      ("cppo", dict(delta=0.2, w_min=0.8, delta_b=0.02, quantile=0.9),
       masking.cppo(LEARN, ROLL, MASK, adv_inputs.advantages, 0.2, 0.8, 0.02, 0.9)),
  ]
  assert {c[0] for c in cases} == set(masking.CRITERIA) | set(masking.BASELINES)
  for name, th, direct in cases:
    # Every rule takes exactly the keywords its table entry maps to config fields.
    assert set(th) == set(masking._rule(name).params), name
    x = adv_inputs if name in ("dppo", "cppo") else inputs
    got = jax.jit(lambda x: masking.apply_correction(name, x, **th))(x)
    np.testing.assert_allclose(got.token_weight, direct.token_weight, rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(got.seq_mask, direct.seq_mask, err_msg=name)
  # Exact divergences take precedence over the sampled fallback (max: div; avg: div_avg, then div; tv: tv).
  div = jnp.array([[0.0, 0.0, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
  got = masking.apply_correction("max", inputs.replace(div=div), delta=0.1)
  np.testing.assert_array_equal(got.seq_mask, [1, 0, 1])
  got = masking.apply_correction("avg", inputs.replace(div=div), delta_avg=0.05)  # row 1 mean 0.1
  np.testing.assert_array_equal(got.seq_mask, [1, 0, 1])
  got = masking.apply_correction("avg", inputs.replace(div=div, div_avg=jnp.zeros_like(div)), delta_avg=0.05)
  np.testing.assert_array_equal(got.seq_mask, [1, 1, 1])
  got = masking.apply_correction("tv", inputs.replace(tv=div), eps=0.1)
  np.testing.assert_array_equal(got.seq_mask, [1, 0, 1])
  with pytest.raises(ValueError, match="unknown correction"):
    masking.apply_correction("clip", inputs)
  with pytest.raises(ValueError, match="missing"):
    masking.apply_correction("max_avg", inputs, delta=0.1)
  with pytest.raises(ValueError, match="unexpected"):
    masking.apply_correction("max", inputs, delta=0.1, cap=2.0)
  with pytest.raises(ValueError, match="advantages"):
    masking.apply_correction("dppo", inputs, low=0.2, high=0.2)


def test_tables_name_config_fields_and_is_weights():
  """The tables are what config validation reads: IS_BASELINES is derived from Rule.is_weight, and every
  parameter maps to a config field name (catches a table entry that forgets its config mapping)."""
  assert set(masking.CRITERIA) == {"none", "max", "avg", "max_avg", "tv", "ln", "ser"}
  assert {"dppo", "cppo"} <= set(masking.BASELINES)
  assert masking.BASELINES["cppo"].params == {"delta": "cppo_delta", "w_min": "cppo_w_min",
                                              "delta_b": "cppo_delta_b", "quantile": "cppo_quantile"}
  assert masking.CRITERIA["ln"].params == {"delta": "delta", "eps": "eps", "delta_w": "delta_w"}
  assert {k for k, r in masking.BASELINES.items() if r.needs_advantages} == {"dppo", "cppo"}


def test_compose_multiplies_and_adds_proximal_weight_once():
  inputs = masking.CorrectionInputs(mask=MASK, learner_logp=LEARN, rollout_logp=ROLL)
  div = jnp.array([[0.0, 0.0, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
  x = inputs.replace(div=div)
  c = masking.compose("max", "token_mask", x, criterion_params=dict(delta=0.1),
                      baseline_params=dict(low=0.9, high=2.0))
  # row 0 accepted, token_mask keeps rho in [0.9, 2]: (1.5 yes, 0.8 no, 3 no); row 1 rejected by max.
  np.testing.assert_array_equal(c.token_weight, [[1, 0, 0], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(c.seq_mask, [1, 0, 1])
  assert "baseline/token_accept_rate" in c.stats and "accept_rate" in c.stats
  # ratio_base="learner": a non-IS baseline gets the untruncated rho once; tis carries its own (capped) weight.
  c = masking.compose("max", "none", x, criterion_params=dict(delta=0.1), baseline_params={}, ratio_base="learner")
  np.testing.assert_allclose(c.token_weight, [[1.5, 0.8, 3.0], [0, 0, 0], [0, 0, 0]], rtol=1e-5)
  c = masking.compose("max", "tis", x, criterion_params=dict(delta=0.1), baseline_params=dict(cap=2.0),
                      ratio_base="learner")
  np.testing.assert_allclose(c.token_weight, [[1.5, 0.8, 2.0], [0, 0, 0], [0, 0, 0]], rtol=1e-5)


def test_stats_exclude_padding_rows():
  """Padding rows (no response token) are not sequences: appending some must not move any rate or mean.
  Catches a statistic averaged over all B rows (jnp.mean of a per-row value), as div_max_mean was."""
  div = jnp.array([[0.01, 0.2, 0.03], [0.01, 0.02, 0.5]])
  mask = MASK[:2]
  padded_div = jnp.concatenate([div, jnp.full((3, 3), 7.0)])
  padded_mask = jnp.concatenate([mask, jnp.zeros((3, 3))])
  lp, rp = LEARN[:2], ROLL[:2]
  pad_lp = jnp.concatenate([lp, jnp.zeros((3, 3))])
  pad_rp = jnp.concatenate([rp, jnp.full((3, 3), -5.0)])
  pairs = [
      (masking.trm_max(div, mask, 0.05), masking.trm_max(padded_div, padded_mask, 0.05)),
      (masking.trm_avg(div, mask, 0.05), masking.trm_avg(padded_div, padded_mask, 0.05)),
      (masking.ser(lp, rp, mask, 0.06), masking.ser(pad_lp, pad_rp, padded_mask, 0.06)),
      (masking.ln_trm(lp, rp, mask, 0.02, 0.3, 0.3), masking.ln_trm(pad_lp, pad_rp, padded_mask, 0.02, 0.3, 0.3)),
      (masking.token_tis(lp, rp, mask, 2.0), masking.token_tis(pad_lp, pad_rp, padded_mask, 2.0)),
      (masking.seq_tis(lp, rp, mask, 2.0), masking.seq_tis(pad_lp, pad_rp, padded_mask, 2.0)),
      (masking.geo_mask(lp, rp, mask, 1.05, 1.6), masking.geo_mask(pad_lp, pad_rp, padded_mask, 1.05, 1.6)),
  ]
  for plain, padded in pairs:
    assert set(plain.stats) == set(padded.stats)
    for k in plain.stats:
      np.testing.assert_allclose(padded.stats[k], plain.stats[k], rtol=1e-6, err_msg=k)
  # geo_mask rejects the padding rows' exp(0) = 1 < 1.05, yet num_rejected counts only real rows.
  np.testing.assert_allclose(pairs[-1][1].stats["num_rejected"], 1.0)
  np.testing.assert_allclose(pairs[0][0].stats["div_max_mean"], (0.2 + 0.02) / 2, rtol=1e-6)


def test_weights_are_stop_gradient():
  def total(lp):
    x = masking.CorrectionInputs(mask=MASK, learner_logp=lp, rollout_logp=ROLL, advantages=jnp.ones(3))
    out = 0.0
    for name, th in (("tis", dict(cap=2.0)), ("dppo", dict(low=0.1, high=0.1)),
                     ("cppo", dict(delta=0.2, w_min=0.8, delta_b=0.02, quantile=0.9))):
      c = masking.apply_correction(name, x, **th)
      out = out + jnp.sum(c.token_weight) + jnp.sum(c.seq_mask)
    return out
  g = jax.grad(total)(LEARN)
  assert np.all(_np(g) == 0.0)
