"""Divergences: exact KL/TV against float64 numpy, chunking, top-k bounds, estimator expectations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import divergence

B, T, V = 2, 7, 5


def _np_divs(r_logits, t_logits):
  lp = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
      -1, keepdims=True)
  lr, lt = lp(r_logits.astype(np.float64)), lp(t_logits.astype(np.float64))
  pr, pt = np.exp(lr), np.exp(lt)
  return dict(kl=(pr * (lr - lt)).sum(-1), kl_reverse=(pt * (lt - lr)).sum(-1),
              tv=0.5 * np.abs(pt - pr).sum(-1))


@pytest.fixture(scope="module")
def logits():
  rng = np.random.default_rng(0)
  r = rng.normal(0, 2, (B, T, V)).astype(np.float32)
  t = (r + rng.normal(0, 0.7, (B, T, V))).astype(np.float32)
  mask = np.ones((B, T), np.float32)
  mask[1, 4:] = 0
  return r, t, mask


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 3, 7])
def test_exact_divergences_match_numpy(logits, jit, chunk_size):
  r, t, mask = logits
  fn = lambda a, b, m: divergence.exact_divergences(a, b, m, chunk_size=chunk_size)
  out = (jax.jit(fn) if jit else fn)(r, t, mask)
  ref = _np_divs(r, t)
  for k in ("kl", "kl_reverse", "tv"):
    assert out[k].shape == (B, T) and out[k].dtype == jnp.float32
    np.testing.assert_allclose(out[k], ref[k] * mask, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(out[k])[1, 4:] == 0)


def test_chunked_equals_unchunked_with_padding_and_batch_axes(logits):
  r, t, mask = logits
  r3, t3 = np.stack([r, t]), np.stack([t, r])  # two leading axes [2, B, T, V]
  full = divergence.exact_divergences(r3, t3)
  for c in (1, 5):  # 7 = 7 x 1 and 2 x 5 - 3 (padded)
    chunked = jax.jit(lambda a, b: divergence.exact_divergences(a, b, chunk_size=c))(r3, t3)
    for k in full:
      np.testing.assert_allclose(chunked[k], full[k], rtol=1e-6, atol=1e-7)


def test_bf16_logits_use_float32_softmax(logits):
  r, t, _ = logits
  rb, tb = jnp.asarray(r, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  out = divergence.exact_divergences(rb, tb)
  ref = _np_divs(np.asarray(rb, np.float32), np.asarray(tb, np.float32))  # same rounded logits
  assert out["kl"].dtype == jnp.float32
  np.testing.assert_allclose(out["kl"], ref["kl"], rtol=1e-4, atol=1e-6)


def test_identical_policies_and_minus_inf():
  x = jnp.array([[0.0, 1.0, -jnp.inf], [2.0, 2.0, 2.0]])
  out = divergence.divergences_from_logprobs(jax.nn.log_softmax(x), jax.nn.log_softmax(x))
  for v in out.values():
    assert np.all(np.asarray(v) == 0.0)  # rounding negatives clamped, 0 log 0 = 0
  # theta puts 0 mass where roll has mass: KL(roll||theta) = inf, reverse finite.
  lr = jnp.log(jnp.array([0.5, 0.5]))
  lt = jnp.log(jnp.array([1.0, 0.0]))
  out = divergence.divergences_from_logprobs(lr, lt)
  assert np.isinf(out["kl"]) and math.isclose(float(out["kl_reverse"]), math.log(2), rel_tol=1e-6)
  assert math.isclose(float(out["tv"]), 0.5, rel_tol=1e-6)


def test_entropy():
  np.testing.assert_allclose(divergence.entropy(jnp.log(jnp.array([0.25] * 4))), math.log(4), rtol=1e-6)
  assert float(divergence.entropy(jnp.array([0.0, -jnp.inf]))) == 0.0


def test_topk_with_k_equal_V_is_exact(logits):
  r, t, mask = logits
  lr = jax.nn.log_softmax(r)
  ids = jnp.argsort(-lr, axis=-1)  # all V tokens, sorted like a server's top-k
  out = divergence.topk_divergences(jnp.take_along_axis(lr, ids, -1), ids, t, mask)
  ref = divergence.exact_divergences(r, t, mask)
  for k in ("kl", "kl_lower"):
    np.testing.assert_allclose(out[k], ref["kl"], rtol=1e-4, atol=1e-6)
  for k in ("tv", "tv_lower"):
    np.testing.assert_allclose(out[k], ref["tv"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_bounds_bracket_exact(logits, k):
  r, t, mask = logits
  lr = jax.nn.log_softmax(r)
  ids = jnp.argsort(-lr, axis=-1)[..., :k]
  out = divergence.topk_divergences(jnp.take_along_axis(lr, ids, -1), ids, t, mask)
  ref = divergence.exact_divergences(r, t, mask)
  tol = 1e-6
  assert np.all(np.asarray(out["tv_lower"]) <= np.asarray(ref["tv"]) + tol)
  assert np.all(np.asarray(ref["tv"]) <= np.asarray(out["tv"]) + tol)
  assert np.all(np.asarray(out["kl_lower"]) <= np.asarray(ref["kl"]) * (1 + 1e-5) + tol)
  # The lower bound is strict somewhere (the tail is really hidden), so this test can fail.
  assert np.any(np.asarray(out["tv"]) > np.asarray(ref["tv"]) + 1e-3)


def test_topk_hand_values():
  # V = 3, k = 1: roll (0.5, 0.3, 0.2), theta (0.4, 0.1, 0.5).
  lr = jnp.log(jnp.array([[[0.5]]]))
  ids = jnp.array([[[0]]])
  out = divergence.topk_divergences(lr, ids, jnp.log(jnp.array([[[0.4, 0.1, 0.5]]])))
  np.testing.assert_allclose(out["tv"], 0.5 * 0.1 + 0.5 * (0.5 + 0.6), rtol=1e-5)
  np.testing.assert_allclose(out["tv_lower"], 0.5 * 0.1 + 0.5 * 0.1, rtol=1e-5)
  # Grouped KL with the tail as one outcome, r = tail_roll taken at the end of its +-2e-6 rounding interval
  # that minimises the tail term (here 0.5 + 2e-6, since r < tail_theta = 0.6).
  r = 0.5 + 2e-6
  grouped = 0.5 * math.log(0.5 / 0.4) + (0.4 - 0.5) + (0.6 - r) + r * math.log(r / 0.6)
  np.testing.assert_allclose(out["kl_lower"], grouped, rtol=1e-5)
  assert float(out["kl_lower"][0, 0]) <= 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)
  exact = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(3.0) + 0.2 * math.log(0.4)
  assert float(out["kl_lower"][0, 0]) <= exact


def test_estimators_by_exact_expectation():
  """Sum over the vocabulary with p_roll weights: E_roll[k1] = E_roll[k3] = KL, E_roll[tv_est] = TV."""
  rng = np.random.default_rng(1)
  for scale in (0.01, 0.3, 2.0):
    r = rng.normal(0, 1.5, (4, 6))
    t = r + rng.normal(0, scale, r.shape)
    lr, lt = jax.nn.log_softmax(jnp.asarray(r, jnp.float32)), jax.nn.log_softmax(jnp.asarray(t, jnp.float32))
    est = divergence.sampled_estimators(lt, lr)  # each vocabulary entry as a "sampled token"
    pr = np.exp(np.asarray(lr, np.float64))
    ref = _np_divs(r, t)
    for name, target in (("k1", "kl"), ("k3", "kl"), ("tv_est", "tv")):
      np.testing.assert_allclose((pr * np.asarray(est[name])).sum(-1), ref[target], rtol=2e-3, atol=2e-6)
    np.testing.assert_allclose(est["k2"], 0.5 * (np.asarray(lt) - np.asarray(lr)) ** 2, rtol=1e-5)
  # k2 and |log rho| are symmetric in rho <-> 1/rho; k3 and tv_est are not.
  a, b = jnp.log(jnp.array([0.2, 0.7])), jnp.log(jnp.array([0.5, 0.05]))
  e1, e2 = divergence.sampled_estimators(a, b), divergence.sampled_estimators(b, a)
  np.testing.assert_allclose(e1["k2"], e2["k2"], rtol=1e-6)
  np.testing.assert_allclose(e1["abs_log_ratio"], e2["abs_log_ratio"], rtol=1e-6)
  assert not np.allclose(e1["k3"], e2["k3"])
  # Hand values at rho = 2: k1 = -ln 2, k2 = (ln 2)^2 / 2, k3 = 1 - ln 2, tv_est = 0.5.
  e = divergence.sampled_estimators(jnp.log(jnp.array([0.4])), jnp.log(jnp.array([0.2])))
  np.testing.assert_allclose([e["k1"][0], e["k2"][0], e["k3"][0], e["tv_est"][0]],
                             [-math.log(2), math.log(2) ** 2 / 2, 1 - math.log(2), 0.5], rtol=1e-5)


def test_estimators_masked_and_extreme():
  lp = jnp.array([[-1.0, -jnp.inf, 0.0, -200.0]])
  rp = jnp.array([[-1.0, -jnp.inf, -200.0, 0.0]])
  mask = jnp.array([[1.0, 0.0, 1.0, 1.0]])
  e = divergence.sampled_estimators(lp, rp, mask)
  for v in e.values():
    assert np.all(np.isfinite(np.asarray(v)))
    assert float(v[0, 1]) == 0.0
  assert float(e["k3"][0, 2]) > 1e8 and float(e["k3"][0, 3]) > 0  # clipped rho, still huge / >= 0
  np.testing.assert_allclose(e["abs_log_ratio"][0, 2:], [200.0, 200.0])


def test_seq_reductions_and_ppl_gap():
  x = jnp.array([[1.0, -3.0, 2.0], [5.0, 5.0, 5.0], [-1.0, -2.0, 7.0]])
  mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]], jnp.float32)
  np.testing.assert_allclose(divergence.seq_sum(x, mask), [-2.0, 0.0, 4.0])
  np.testing.assert_allclose(divergence.seq_mean(x, mask), [-1.0, 0.0, 4.0 / 3])
  np.testing.assert_allclose(divergence.seq_max(x, mask), [1.0, 0.0, 7.0])
  learner = jnp.array([[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
  rollout = jnp.array([[-1.5, -1.0, 9.0], [9.0, 9.0, 9.0], [-1.2, -1.2, -1.2]])
  # per sequence |mean(learner - rollout)|: |(0.5 - 1) / 2| = 0.25, empty -> 0, 0.2
  np.testing.assert_allclose(divergence.per_seq_log_ppl_gap(learner, rollout, mask), [0.25, 0.0, 0.2],
                             rtol=1e-6)
  np.testing.assert_allclose(divergence.log_ppl_gap(learner, rollout, mask), (0.25 + 0.2) / 2, rtol=1e-6)
  assert float(divergence.log_ppl_gap(learner, rollout, jnp.zeros_like(mask))) == 0.0


# ----------------------------------------------------------------------------------------- accuracy -----------

def _np_lm_like(n, V, scales, seed=0):
  """Peaked LM-like float32 logits: a Zipf-like base (+ Gumbel jitter), learner = base + t(3) noise * scale."""
  rng = np.random.default_rng(seed)
  base = -3.3 * np.log(np.arange(1, V + 1))
  a = np.stack([base[rng.permutation(V)] + 0.5 * rng.gumbel(size=V) + 20.0 for _ in range(n)])
  b = a + rng.standard_t(3, size=(n, V)) * np.asarray(scales)[:, None]
  return a.astype(np.float32), b.astype(np.float32)


def test_exact_divergences_float32_match_float64_at_qwen_vocab():
  """Per-token KL from 1e-9 to 1e-3 at V = 151936: float32 within 1e-3 relative + 1e-9 of float64.

  The old sum p (log_softmax(a) - log_softmax(b)) was off by 7x at KL ~ 1e-6.
  """
  scales = np.logspace(-4.5, -1, 8)
  a, b = _np_lm_like(8, 151936, scales)
  ref = _np_divs(a[:, None], b[:, None])  # float64 from the same float32 logits
  out = jax.jit(lambda x, y: divergence.exact_divergences(x, y))(a[:, None], b[:, None])
  assert ref["kl"].min() < 1e-7 < 1e-4 < ref["kl"].max()  # the range the tolerance is stated for
  for k in ("kl", "kl_reverse", "tv"):
    np.testing.assert_allclose(np.asarray(out[k]), ref[k], rtol=1e-3, atol=1e-9, err_msg=k)


def test_exact_tv_float32_matches_float64_on_peaked_logits_at_qwen_vocab():
  """TV ~ 1e-7..1e-6 on peaked logits (top token p ~ 0.96 / 0.6) at V = 151936: float32 within 1e-4 relative
  of float64. Catches splitting the TV sum at the plain KL estimate lse(b) - lse(a) - E_p[d] (a difference
  of two log-sum-exps): that form returned 6e-12 for the first row (100% off) and was 2e-3 off on the second."""
  V = 151936
  rng = np.random.default_rng(1)
  rows = []
  for top, scale in ((15.0, 1e-6), (8.0, 1e-5)):
    a = rng.normal(0.0, 1.0, V) + 25.0
    a[rng.integers(V)] += top
    b = a + scale * rng.normal(size=V) * (1.0 + 0.1 * rng.standard_t(3, size=V))
    rows.append((a.astype(np.float32), b.astype(np.float32)))
  a, b = (np.stack(x) for x in zip(*rows))
  ref = _np_divs(a, b)  # float64 from the same float32 logits
  assert 1e-7 < ref["tv"].min() and ref["tv"].max() < 1e-5
  out = divergence.divergences_from_logits(jnp.asarray(a), jnp.asarray(b))
  np.testing.assert_allclose(np.asarray(out["tv"]), ref["tv"], rtol=1e-4, atol=0)


def test_divergences_from_logits_identical_truncated_supports_are_exactly_zero():
  x = jnp.array([[3.0, 1.0, -jnp.inf, 0.5, -jnp.inf], [0.0, 0.0, 0.0, -jnp.inf, 7.0]])
  out = divergence.divergences_from_logits(x, x)
  for k in ("kl", "kl_reverse", "tv"):
    assert np.all(np.asarray(out[k]) == 0.0), k
  np.testing.assert_allclose(out["entropy"], _np_entropy(np.asarray(x)), rtol=1e-5)
  # Different supports: the side with mass where the other has none gets inf KL; TV stays exact.
  a, b = jnp.array([0.0, 0.0, -jnp.inf]), jnp.array([0.0, 0.0, 0.0])
  out = divergence.divergences_from_logits(a, b)
  assert float(out["kl"]) == pytest.approx(math.log(1.5), rel=1e-6) and np.isinf(out["kl_reverse"])
  assert float(out["tv"]) == pytest.approx(1 / 3, rel=1e-6)  # 1/2 (1/6 + 1/6 + 1/3)


def _np_entropy(x):
  x = x.astype(np.float64)
  lp = x - x.max(-1, keepdims=True)
  lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
  p = np.exp(lp)
  return -np.where(p > 0, p * np.where(p > 0, lp, 0), 0).sum(-1)


# ----------------------------------------------------------------------------------------- top-k -----------

def test_topk_kl_lower_bound_finite_on_tiny_tails():
  """tail_roll 2e-6, tail_learner 5e-7: the old code returned +inf while the exact KL is ~1.3e-6."""
  p = np.array([0.6, 0.4 - 2e-6, 1e-6, 1e-6])
  q = np.array([0.6 + 1e-7, 0.4 - 6e-7, 2.5e-7, 2.5e-7])
  exact = float((p * np.log(p / q)).sum())
  ids = jnp.array([[[0, 1]]])
  out = divergence.topk_divergences(jnp.log(jnp.asarray(p[:2], jnp.float32))[None, None], ids,
                                    jnp.log(jnp.asarray(q, jnp.float32))[None, None])
  assert np.isfinite(out["kl_lower"]).all()
  assert 0.0 <= float(out["kl_lower"][0, 0]) <= exact
  assert float(out["tv"][0, 0]) >= 0.5 * np.abs(p - q).sum() - 1e-7


def test_topk_kl_lower_never_exceeds_float64_exact(seed=0):
  """Random peaked cases, k in {1, 2, 5, 12}, tails from ~1 down to ~1e-9: kl_lower <= KL_exact (float64)."""
  rng = np.random.default_rng(seed)
  n, V = 400, 16
  a = rng.normal(0, 1, (n, V)) * rng.choice([1.0, 4.0, 12.0], (n, 1))
  # make the last tokens a tiny tail on some rows: masses ~1e-6 .. 1e-9 for the rollout
  a[: n // 2, -8:] -= rng.uniform(12, 22, (n // 2, 1))
  b = a + rng.normal(0, 1, (n, V)) * rng.choice([1e-3, 1e-2, 0.3, 2.0], (n, 1))
  b[n // 4: n // 2, -8:] -= rng.uniform(0, 3, (n // 4, 1))  # learner tail smaller than the rollout's
  a, b = a.astype(np.float32), b.astype(np.float32)
  ref = _np_divs(a, b)["kl"]
  lr = jax.nn.log_softmax(jnp.asarray(a))
  order = jnp.argsort(-lr, axis=-1)
  for k in (1, 5, 12):
    ids = order[:, :k]
    out = divergence.topk_divergences(jnp.take_along_axis(lr, ids, -1), ids, jnp.asarray(b))
    lower = np.asarray(out["kl_lower"], np.float64)
    assert np.all(np.isfinite(lower)), k
    # never above the exact value (float32 rounding of the seen terms: 1e-6 relative)
    assert np.all(lower <= ref * (1 + 1e-5) + 1e-9), (k, np.max(lower - ref))
    assert np.all(np.asarray(out["tv"]) >= _np_divs(a, b)["tv"] - 1e-6), k
