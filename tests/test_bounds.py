"""Bounds: the paper's worked numbers (Sec. 2), identities, traced / per-sequence T, the certificate."""
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import bounds, masking

T = 4096


def _close(value, expected, decimals):
  """value rounds to the printed number at its printed precision."""
  assert round(float(value), decimals) == pytest.approx(expected, abs=1e-9), (float(value), expected)


def test_kl_only_column():
  d, kls = 1e-4, 0.01
  e, tvs = math.sqrt(d / 2), math.sqrt(kls / 2)
  _close(bounds.classical_kl(T, d), 1677.3, 1)
  _close(bounds.coupling(T, e), 113.8, 1)
  _close(bounds.pinsker_marginal_kl(T, d), 34.946, 3)
  _close(bounds.pinsker_marginal_tv(T, d, e), 34.946, 3)
  _close(bounds.mixed_kl(T, d, kls), 8.192, 3)
  _close(bounds.mixed_tv(T, e, tvs), 8.192, 3)
  uniform = jnp.full((T,), e)
  # Adaptive (uniform Dbar = eps = sqrt(delta/2)) "<= 35.0": its exact value, float64 by hand, is PM-KL's
  # 34.946 (factor min(1, n eps, sqrt(n delta/2)) = min(1, sqrt(n delta/2)) since sqrt(n) <= n), so an
  # undersized bound (e.g. 0) fails here.
  n = np.arange(T, dtype=np.float64)
  hand = 4 * e * np.sum(np.minimum(np.minimum(1.0, n * e), np.sqrt(n * d / 2)))
  np.testing.assert_allclose(float(bounds.adaptive(d, e, uniform)), hand, rtol=1e-5)
  _close(bounds.adaptive(d, e, uniform), 34.946, 3)
  _close(bounds.unified(T, d, e, kls, tvs), 8.192, 3)


def test_kl_tv_column():
  d, kls, e, tvs = 1e-4, 0.01, 5e-3, 0.05
  _close(bounds.classical_tv(T, e), 839, 0)
  _close(bounds.coupling(T, e), 79.9, 1)
  _close(bounds.pinsker_marginal_tv(T, d, e), 24.711, 3)
  _close(bounds.mixed_tv(T, e, tvs), 4.096, 3)
  uni = bounds.unified(T, d, e, kls, tvs)
  _close(uni, 4.096, 3)
  assert int(bounds.classical_kl(T, d) / uni) == 409  # "409x tighter"


def test_large_regime_and_adaptive():
  e = math.sqrt(0.5)
  assert f"{float(bounds.classical_kl(T, 1.0)):.2e}" == "1.68e+07"
  _close(bounds.linear(T, e), 11585, 0)
  _close(bounds.pinsker_marginal_kl(T, 1.0), 11582, 0)
  _close(bounds.mixed_kl(T, 1.0, 1.0), 8192, 0)
  # Uncapped PM: the sum form is just below the closed form (4/3) T^1.5 delta = 349525.
  unc = float(bounds.pinsker_marginal_kl(T, 1.0, capped=False))
  assert 3.49e5 <= unc <= 4 / 3 * T ** 1.5
  d = 0.01
  dbar = jnp.full((T,), math.sqrt(d / 2))
  ada = float(bounds.adaptive(d, math.sqrt(d / 2), dbar))
  assert int(ada) == 1139
  np.testing.assert_allclose(ada, bounds.pinsker_marginal_kl(T, d), rtol=1e-5)
  assert round(float(bounds.pinsker_marginal_kl(T, d, capped=False))) == 3495


@pytest.mark.parametrize("p,table", [
    (1e-3, {256: 0.774, 1024: 0.359}),
    (1e-4, {4096: 0.664, 8192: 0.440})])
def test_length_bias_of_trm_max(p, table):
  """The paper's length-bias table (Sec. 2: i.i.d. per-token violations with probability p are accepted
  with probability (1 - p)^T) reproduced by the project's TRM-Max and its per-length acceptance: 3000
  sequences per length, a violating token has KL 1 > delta, the rest 0. Catches a criterion on the mean
  instead of the max (acceptance ~ 1), or per-length rates mixing buckets. Tolerance: 4 binomial sigmas."""
  rng = np.random.default_rng(int(1 / p))
  n, lengths = 3000, sorted(table)
  horizon = lengths[-1]
  rows = np.repeat(lengths, n)
  mask = (np.arange(horizon)[None, :] < rows[:, None]).astype(np.float32)
  kl = (rng.uniform(size=mask.shape) < p).astype(np.float32)
  edges = tuple(lengths) + (horizon + 1,)
  c = masking.trm_max(jnp.asarray(kl), jnp.asarray(mask), 0.5, length_edges=edges)
  for lo, hi in zip(edges[:-1], edges[1:]):
    printed = table[lo]
    sigma = math.sqrt(printed * (1 - printed) / n)
    assert abs(float(c.stats[f"accept_rate/len_{lo}_{hi}"]) - printed) < 4 * sigma + 1e-3, (lo, printed)


def test_identities_random():
  rng = np.random.default_rng(0)
  for T_ in (1, 2, 7, 50, 300):
    delta = rng.uniform(1e-5, 3.0, size=8).astype(np.float32)
    eps = rng.uniform(1e-4, 1.0, size=8).astype(np.float32)
    uni = np.minimum(1.0, np.sqrt(delta / 2))[:, None] * np.ones(T_, np.float32)
    np.testing.assert_allclose(bounds.adaptive_kl(delta, uni), bounds.pinsker_marginal_kl(T_, delta),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bounds.adaptive_tv(eps, eps[:, None] * np.ones(T_, np.float32)),
                               bounds.coupling(T_, eps), rtol=1e-5, atol=1e-6)
    # Coupling equals classical TV when T eps <= 1.
    small = np.float32(0.9 / T_)
    np.testing.assert_allclose(bounds.coupling(T_, small), bounds.classical_tv(T_, small), rtol=1e-5)


def test_hand_values_small_T():
  # T = 3, delta = 0.5: sqrt((t-1) delta/2) = 0, 0.5, 0.7071; g = 0.5.
  np.testing.assert_allclose(bounds.pinsker_marginal_kl(3, 0.5), 4 * 0.5 * (0.5 + math.sqrt(0.5)),
                             rtol=1e-6)
  # T = 3, eps = 0.4: (t-1) eps capped = 0, 0.4, 0.8 -> 4 * 0.4 * 1.2.
  np.testing.assert_allclose(bounds.coupling(3, 0.4), 4 * 0.4 * 1.2, rtol=1e-6)
  # adaptive hybrid, T = 3, dbar = (0.1, 0.2, 0.3), delta = 0.02, eps = 0.3:
  # T-t = 2, 1, 0 -> factors min(1, 0.6, 0.1414) = 0.1414, min(1, 0.3, 0.1) = 0.1, 0.
  np.testing.assert_allclose(bounds.adaptive(0.02, 0.3, jnp.array([0.1, 0.2, 0.3])),
                             4 * (0.1 * math.sqrt(0.02) + 0.2 * 0.1), rtol=1e-6)
  w = bounds.ln_trm_weights(3, 0.02, 0.3)
  np.testing.assert_allclose(w, [math.sqrt(0.02), 0.1, 0.0], rtol=1e-6)
  np.testing.assert_allclose(bounds.ln_trm_normaliser(3, 0.02, 0.3), math.sqrt(0.02) + 0.1, rtol=1e-6)


def test_per_sequence_and_traced_T():
  lengths = np.array([1, 5, 40], np.int32)
  per = [float(bounds.pinsker_marginal_kl(int(n), 0.01)) for n in lengths]
  np.testing.assert_allclose(bounds.pinsker_marginal_kl(lengths, 0.01), per, rtol=1e-6)
  f = jax.jit(lambda n, d, e: bounds.unified(n, d, e, 0.1, 0.2, t_max=40))
  direct = [float(bounds.unified(int(n), 0.01, 0.05, 0.1, 0.2)) for n in lengths]
  np.testing.assert_allclose(f(jnp.asarray(lengths), 0.01, 0.05), direct, rtol=1e-6)
  w = jax.jit(lambda n: bounds.ln_trm_weights(n, 0.01, 0.05, t_max=40))(jnp.asarray(lengths))
  assert w.shape == (3, 40)
  np.testing.assert_allclose(w[1, :5], bounds.ln_trm_weights(5, 0.01, 0.05), rtol=1e-6)
  assert np.all(np.asarray(w[1, 5:]) == 0)
  # Adaptive with a traced horizon T < len(dbar) equals the bound on the truncated dbar.
  dbar = jnp.linspace(0.01, 0.1, 10)
  g = jax.jit(lambda n: bounds.adaptive(0.02, 0.05, dbar, T=n))
  np.testing.assert_allclose(g(6), bounds.adaptive(0.02, 0.05, dbar[:6]), rtol=1e-6)
  with pytest.raises(ValueError, match="t_max"):
    jax.jit(lambda n: bounds.coupling(n, 0.1))(5)


def test_certificate_hand_batch():
  # Two sequences of lengths 3 and 2, one padding row.
  kl = jnp.array([[0.02, 0.08, 0.01, 9.0], [0.04, 0.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
  tv = jnp.array([[0.1, 0.2, 0.05, 9.0], [0.1, 0.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], jnp.float32)
  cert = jax.jit(bounds.certificate)(kl, tv, mask, surrogate=jnp.float32(5.0))
  np.testing.assert_allclose(cert["delta"], 0.08, rtol=1e-6)
  np.testing.assert_allclose(cert["eps"], 0.2, rtol=1e-6)
  np.testing.assert_allclose(cert["kl_seq"], (0.11 + 0.04) / 2, rtol=1e-6)
  np.testing.assert_allclose(cert["dbar"], [0.1, 0.1, 0.025, 0.0], rtol=1e-6)
  np.testing.assert_allclose(cert["tv_seq"], min(1.0, 0.225, math.sqrt(0.075 / 2)), rtol=1e-6)
  assert float(cert["T"]) == 3
  np.testing.assert_allclose(cert["mixed_kl"], bounds.mixed_kl(3, 0.08, 0.075), rtol=1e-6)
  np.testing.assert_allclose(cert["coupling"], 4 * 0.2 * (0 + 0.2 + 0.4), rtol=1e-6)
  # adaptive hybrid with T = 3: factors min(1, 2*0.2, sqrt(2*0.04)), min(1, 0.2, sqrt(0.04)), 0.
  np.testing.assert_allclose(cert["adaptive"], 4 * (0.1 * min(0.4, math.sqrt(0.08)) + 0.1 * 0.2),
                             rtol=1e-6)
  expected_unified = min(float(cert[k]) for k in ("pinsker_marginal_kl", "pinsker_marginal_tv",
                                                   "mixed_kl", "mixed_tv", "coupling", "adaptive"))
  np.testing.assert_allclose(cert["unified"], expected_unified, rtol=1e-6)
  np.testing.assert_allclose(cert["certified_improvement"], 5.0 - expected_unified, rtol=1e-6)
  # An all-masked batch certifies nothing but stays finite.
  empty = bounds.certificate(kl, tv, jnp.zeros_like(mask))
  assert all(np.all(np.isfinite(np.asarray(v))) for v in empty.values())
  assert float(empty["unified"]) == 0.0


def test_bound_tables_script_main():
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "bound_tables.py")
  spec = importlib.util.spec_from_file_location("bound_tables", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.main([]) == 0
  # The match rule rejects a real disagreement.
  assert not mod.matches(35.2, "35.0") and mod.matches(34.946, "35.0")
  assert not mod.matches(8.4, "8.2", "<=") and mod.matches(1139.52, "1139")


def test_certificate_tv_only_uses_tv_supported_bounds():
  """Top-k rollouts: the KL is a lower bound, so B* = min(Coupling, Mixed-TV with TV_seq =
  min(1, sum_t Dbar_t), Adaptive-TV) and no KL-based bound is returned; inf at padding stays out."""
  tv = jnp.array([[0.1, 0.2, 0.05, jnp.inf], [0.1, 0.0, jnp.inf, jnp.inf]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
  cert = bounds.certificate(None, tv, mask, surrogate=jnp.float32(1.0), tv_only=True)
  assert not {"delta", "kl_seq", "pinsker_marginal_kl", "pinsker_marginal_tv", "mixed_kl", "adaptive"} & set(cert)
  dbar = np.array([0.1, 0.1, 0.025, 0.0])
  tv_seq = min(1.0, dbar.sum())  # no sqrt(kl_seq / 2) term: kl_seq is unknown
  np.testing.assert_allclose(cert["tv_seq"], tv_seq, rtol=1e-6)
  coupling = 4 * 0.2 * (0 + 0.2 + 0.4)
  mixed_tv = 4 * 3 * 0.2 * tv_seq
  # Adaptive-TV, T = 3: factors min(1, 2*0.2), min(1, 0.2), 0.
  adaptive_tv = 4 * (0.1 * 0.4 + 0.1 * 0.2)
  np.testing.assert_allclose(cert["unified"], min(coupling, mixed_tv, adaptive_tv), rtol=1e-6)
  np.testing.assert_allclose(cert["certified_improvement"], 1.0 - min(coupling, mixed_tv, adaptive_tv), rtol=1e-6)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in cert.values())


def test_certificate_where_not_product_for_inf_at_padding():
  kl = jnp.array([[0.02, jnp.inf], [0.04, jnp.nan]])
  tv = jnp.array([[0.1, jnp.inf], [0.1, jnp.nan]])
  mask = jnp.array([[1, 0], [1, 0]], jnp.float32)
  cert = bounds.certificate(kl, tv, mask)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in cert.values())
  np.testing.assert_allclose(cert["kl_seq"], 0.03, rtol=1e-6)


def test_reward_range_scales_every_bound():
  """R in [lo, hi]: every bound and B* times hi - lo, the statistics unchanged (bounds module docstring);
  certified_improvement uses the scaled B*. Hand values: width 5 for [-2, 3]."""
  kl = jnp.array([[0.02, 0.08, 0.01], [0.04, 0.0, 0.0]])
  tv = jnp.array([[0.1, 0.2, 0.05], [0.1, 0.0, 0.0]])
  mask = jnp.ones_like(kl)
  base = bounds.certificate(kl, tv, mask, surrogate=jnp.float32(1.0))
  wide = bounds.certificate(kl, tv, mask, surrogate=jnp.float32(1.0), reward_range=(-2.0, 3.0))
  for k in bounds.BOUND_NAMES:
    np.testing.assert_allclose(wide[k], 5.0 * base[k], rtol=1e-6, err_msg=k)
  for k in ("delta", "eps", "kl_seq", "tv_seq", "T"):
    np.testing.assert_allclose(wide[k], base[k], rtol=0, err_msg=k)
  np.testing.assert_allclose(wide["certified_improvement"], 1.0 - 5.0 * float(base["unified"]), rtol=1e-6)
  assert bounds.reward_scale((-1.0, 1.0)) == 2.0 and bounds.reward_scale() == 1.0
  with pytest.raises(ValueError, match="reward_range"):
    bounds.reward_scale((1.0, 0.0))
