"""experiments.benchmarks runs end to end on tiny shapes and writes the public JSON keys.

No timing assertions: the speed targets live in the bench (and docs/PERFORMANCE.md), not in unit tests.
"""
import json

import pytest

from experiments.benchmarks import bench
from experiments.benchmarks import learner as bench_learner
from experiments.benchmarks import timing


@pytest.mark.slow
def test_tiny_bench_writes_public_keys_and_memory_wins(tmp_path):
  path = tmp_path / "bench.json"
  # The cheapest part (memory is compile-only). The learner and sampler parts compile full train steps
  # and decode loops (~10 s each on 2 loaded cores) and are exercised by
  # `python -m experiments.benchmarks.bench --tiny`.
  res = bench.main(["--tiny", "--only", "memory", "--json", str(path)])
  data = json.loads(path.read_text())
  for key in bench.PUBLIC_KEYS:
    assert key in data, key
  assert set(bench.PUBLIC_KEYS) <= set(res)
  # chunked log-probs + exact divergences need less temp memory than [B,T,V] logits, even tiny
  assert data["memory_naive_over_ours"] > 1.0
  for row in data["memory"]["rows"]:
    assert row["naive"] > row["ours"] and row["naive_grad"] > row["ours_grad"]
  assert data["memory"]["summary"]["worst_vt_growth_in_chunks"] <= 1.0
  assert data["sampler_speedup_vs_recompute"] is None  # parts not run stay null, keys still present
  assert data["table"] and all(len(r) == 4 for r in data["table"])


def test_map_chunks_equals_unchunked():
  import jax.numpy as jnp
  import numpy as np

  from trm_jax import logprobs as lp
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 37, 5)), jnp.float32)
  y = jnp.arange(74).reshape(2, 37)
  f = lambda a, b: {"s": a.sum(-1) * b, "m": a * 2}
  for chunk in (1, 8, 37, 64):  # ragged, exact and larger-than-T chunks
    a, ref = lp.map_chunks(f, chunk, x, y), f(x, y)
    for k in a:
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(ref[k]))


def test_analytic_flops_counts_the_formula():
  dims = dict(d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16)
  fl = bench_learner.analytic_flops(dims, V=10, B=3, P=2, T=5, fused=False)
  n_layers = 2 * (8 * 2 * 4 * 2 + 8 * 1 * 4 * 2 + 3 * 8 * 16)
  S = 7
  model = 6 * n_layers * 3 * S + 6 * 80 * 3 * 5 + 12 * 2 * 3 * S * S * 2 * 4
  assert fl["model"] == model
  assert fl["executed"] == model + 2 * n_layers * 3 * S + 2 * 80 * 3 * 5 + 4 * 2 * 3 * S * S * 2 * 4 + 2 * 80 * 3 * 5
  fused = bench_learner.analytic_flops(dims, V=10, B=3, P=2, T=5, fused=True)
  assert fused["executed"] == model + 2 * 80 * 3 * 5  # one forward: only the remat recompute on top
  kept = bench_learner.analytic_flops(dims, V=10, B=3, P=2, T=5, fused=True, logits_remat=False)
  assert kept["executed"] == model  # logits kept for the backward: nothing recomputed


def test_interleave_rotates_the_order_each_round():
  calls = []
  fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
  times = timing.interleave(fns, 3, "t", log=lambda msg: None)
  # Breaks if every round ran a, b, c in the same order (load drift would then bias the first name).
  assert calls == list("abc" "bca" "cab")
  assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_paired_ratio_is_the_median_of_per_round_ratios():
  times = {"a": [2.0, 9.0, 10.0], "b": [1.0, 3.0, 2.0]}
  # per-round ratios 2, 3, 5 -> median 3; a ratio of medians (9 / 2 = 4.5) is the break this catches.
  assert timing.paired_ratio(times, "a", "b") == pytest.approx(3.0)
  assert timing.medians(times) == {"a": 9.0, "b": 2.0}


def test_optional_part_module_runs_and_fills_its_key(monkeypatch):
  """A part in its own module (like benchmarks/moe.py) runs in --tiny / --quick with quick=True."""
  import sys
  import types
  fake = types.ModuleType("fake_part")
  fake.run = lambda quick: {"fake_speedup": 2.5, "quick": quick}
  monkeypatch.setitem(sys.modules, "fake_part", fake)
  monkeypatch.setattr(bench, "OPTIONAL_PARTS", {"fake": ("fake_part", "fake_speedup")})
  monkeypatch.setattr(bench, "PRESENT", ("fake",))
  res = bench.run("tiny", parts=("fake",))
  # Breaks if the part is not run, its headline key not copied up, or quick passed as False outside --full.
  assert res["fake_speedup"] == 2.5 and res["fake"] == {"fake_speedup": 2.5, "quick": True}
  assert all(res[k] is None for k in bench.PUBLIC_KEYS)
