"""Fast tests of the experiments.paper package and configs/pod_*.py (no training; seconds)."""
import csv
import json
import math
import os

import numpy as np
import pytest

from experiments.paper import bound_curves, results, sweep
from experiments.paper import figures as paper_figures
from trm_jax import bounds
from trm_jax import config as config_lib


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _write_run(run_dir, rows, criterion="max"):
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump({"trm": {"criterion": criterion}}, f)


# ----------------------------------------------------------------------------- bound_curves


def test_bound_curves_writes_png_and_csv_equal_to_library(tmp_path):
  runs = tmp_path / "runs"
  # One synthetic TRM run with accept rates by length bucket (-1 = empty bucket, ignored), one baseline run.
  _write_run(str(runs / "fig" / "trm_max_s0"), [
      {"step": 1, "trm/accept_rate/len_32_64": 0.5, "trm/accept_rate/len_64_128": -1.0},
      {"step": 2, "trm/accept_rate/len_32_64": 1.0, "trm/accept_rate/len_64_128": 0.25}])
  _write_run(str(runs / "fig" / "ppo_clip_s0"), [{"step": 1, "trm/accept_rate/len_32_64": 1.0}], criterion="none")
  out = tmp_path / "fig"
  files = bound_curves.main(["--out", str(out), "--runs_dir", str(runs), "--T", "64,128,256", "--T_fixed", "256"])
  for name in ("bounds_vs_T", "bounds_vs_delta", "acceptance_vs_length"):
    assert os.path.getsize(out / f"{name}.png") > 1000
    assert os.path.getsize(out / f"{name}.csv") > 0
  assert set(files) >= {"bounds_vs_T.png", "bounds_vs_T.csv"}

  rows = _read_csv(out / "bounds_vs_T.csv")
  assert {r["T"] for r in rows} == {"64", "128", "256"}
  get = lambda reg, T: next(r for r in rows if r["regime"] == reg and int(r["T"]) == T)
  d, kls = 1e-4, 0.01
  e, tvs = math.sqrt(d / 2), math.sqrt(kls / 2)
  r = get("kl_only", 128)
  f = lambda x: float(np.asarray(x))
  assert float(r["classical_kl"]) == pytest.approx(f(bounds.classical_kl(128, d)), rel=1e-5)
  assert float(r["pinsker_marginal_kl"]) == pytest.approx(f(bounds.pinsker_marginal_kl(128, d)), rel=1e-5)
  assert float(r["mixed_tv"]) == pytest.approx(f(bounds.mixed_tv(128, e, tvs)), rel=1e-5)
  assert float(r["coupling"]) == pytest.approx(f(bounds.coupling(128, e)), rel=1e-5)
  assert float(r["unified"]) == pytest.approx(f(bounds.unified(128, d, e, kls, tvs)), rel=1e-5)
  r = get("kl_tv", 256)
  assert float(r["eps"]) == pytest.approx(5e-3) and float(r["tv_seq"]) == pytest.approx(0.05)
  assert float(r["classical_tv"]) == pytest.approx(f(bounds.classical_tv(256, 5e-3)), rel=1e-5)
  assert float(r["pinsker_marginal_tv"]) == pytest.approx(f(bounds.pinsker_marginal_tv(256, d, 5e-3)), rel=1e-5)
  dbar = np.full((256,), min(5e-3, math.sqrt(d / 2)), np.float32)
  assert float(r["adaptive"]) == pytest.approx(f(bounds.adaptive(d, 5e-3, dbar, T=256)), rel=1e-5)
  assert float(r["unified"]) == pytest.approx(f(bounds.unified(256, d, 5e-3, kls, 0.05)), rel=1e-5)

  rows = _read_csv(out / "bounds_vs_delta.csv")
  r = min((x for x in rows if x["regime"] == "kl_only"), key=lambda x: abs(float(x["delta"]) - 1e-2))
  dd = float(r["delta"])
  assert int(r["T"]) == 256
  assert float(r["pinsker_marginal_kl"]) == pytest.approx(f(bounds.pinsker_marginal_kl(256, dd)), rel=1e-5)
  assert float(r["mixed_kl"]) == pytest.approx(f(bounds.mixed_kl(256, dd, kls)), rel=1e-5)

  rows = _read_csv(out / "acceptance_vs_length.csv")
  theory = {(float(r["p"]), int(r["T"])): float(r["accept"]) for r in rows if r["kind"] == "theory"}
  assert theory[(1e-3, 1024)] == pytest.approx(0.359, abs=5e-4)  # paper Sec. 2
  assert theory[(1e-4, 4096)] == pytest.approx(0.664, abs=5e-4)
  measured = [r for r in rows if r["kind"] == "measured"]
  assert {r["group"] for r in measured} == {os.path.join("fig", "trm_max")}  # baseline skipped, seed stripped
  by_bucket = {(r["bucket_lo"], r["bucket_hi"]): float(r["accept"]) for r in measured}
  assert by_bucket == {("32", "64"): pytest.approx(0.75), ("64", "128"): pytest.approx(0.25)}


def test_bound_curves_without_runs_skips_measured_panel(tmp_path):
  assert bound_curves.measured_acceptance(str(tmp_path / "missing")) == []
  path = bound_curves._plot_acceptance(bound_curves.acceptance_curves(), [], str(tmp_path / "acc.png"),
                                       str(tmp_path / "missing"))
  assert os.path.getsize(path) > 1000


# ----------------------------------------------------------------------------- pod config


def test_pod_config_validates_and_mirrors_the_paper():
  c = config_lib.validate(config_lib.load_config("pod_qwen3_8b"))
  assert (c.rl.group_size, c.rl.prompts_per_step, c.rl.advantage) == (16, 32, "grpo")
  assert c.optim.lr == 1e-6
  assert (c.trm.criterion, c.trm.delta, c.trm.delta_avg) == ("max_avg", 0.05, 0.001)
  assert (c.rl.loss, c.rl.clip_low, c.rl.clip_high) == ("ppo_clip", 0.2, 0.28)
  assert (c.mesh.fsdp, c.model.size, c.rollout.backend.precision) == (-1, "qwen3-8b", "bfloat16")
  assert (c.data.task, c.eval.sets, c.eval.k, c.eval.top_p, c.warmstart.steps) == ("dapo_math", "aime25", 32, 0.95, 0)
  assert c.distributed.initialize and c.data.horizon >= 4096
  import importlib.util
  spec = importlib.util.spec_from_file_location("pod", os.path.join(config_lib.CONFIG_DIR, "pod_qwen3_8b.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for point in mod.sweep():
    arg = ",".join(f"{k}={v}" for k, v in point.items())
    config_lib.validate(config_lib.load_config("pod_qwen3_8b", arg))


def test_moe_pod_config_is_the_8b_recipe_on_qwen3_30b_a3b():
  moe = config_lib.validate(config_lib.load_config("pod_qwen3_30b_a3b"))
  dense = config_lib.validate(config_lib.load_config("pod_qwen3_8b"))
  assert (moe.model.size, moe.model.moe_dispatch, moe.mesh.fsdp) == ("qwen3-30b-a3b", "sparse", -1)
  for key in ("rl", "trm", "optim", "eval", "data", "rollout"):  # everything but the model is the 8B run's
    assert moe[key].to_dict() == dense[key].to_dict(), key
  with pytest.raises(ValueError, match="size"):
    config_lib.load_config("pod_qwen3_30b_a3b", "size=8b")


# ----------------------------------------------------------------------------- sweep


def test_sweep_print_commands_prints_nine(tmp_path, capsys):
  sweep.main(["--print_commands", "--runs_dir", str(tmp_path)])
  lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
  assert len(lines) == 9
  assert all(l.startswith("python -m trm_jax.main --config=configs/trm.py:T=") for l in lines)
  pairs = {(l.split("T=")[1].split(",")[0], l.split("delta=")[1].split(",")[0]) for l in lines}
  assert pairs == {(str(t), str(d)) for t in (32, 64, 128) for d in (0.01, 0.05, 0.2)}
  assert len({l.split("--workdir=")[1] for l in lines}) == 9


def test_sweep_specs_load_the_grid_configs():
  args = sweep.parse_args([])
  for p in sweep.grid():
    c = sweep.point_spec(p, 0, args).load()
    assert c.data.horizon == p["T"] and c.trm.delta == p["delta"] and c.trm.criterion == "max"


def test_sweep_summary_fraction_certified(tmp_path):
  args = sweep.parse_args(["--runs_dir", str(tmp_path), "--steps", "4"])
  p = sweep.grid()[0]
  rows = [{"step": i + 1, "trm/accept_rate": a, "bounds/certified_improvement": ci, "reward/mean": 0.1 * i}
          for i, (a, ci) in enumerate([(1.0, -1.0), (0.5, 0.2), (0.0, -0.1), (0.5, 0.3)])]
  rows[-1]["eval/reward_mean"] = 0.7
  _write_run(sweep.point_spec(p, 0, args).workdir(str(tmp_path)), rows)
  (s,) = sweep.summarize([p], 1, args)
  assert s["accept_mean"] == pytest.approx(0.5)
  assert s["certified_frac"] == pytest.approx(0.5)
  assert s["final_eval"] == pytest.approx(0.7)


# ----------------------------------------------------------------------------- figures


def test_aggregate_mean_and_spread():
  runs = [[{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}, {"step": 3, "x": None}],
          [{"step": 1, "x": 3.0}, {"step": 2, "x": 6.0}, {"step": 3, "x": 1.0}],
          [{"step": 1, "x": 5.0}, {"step": 2, "x": 4.0}]]
  a = results.aggregate(runs, "x")
  assert a["step"].tolist() == [1, 2]  # step 3 is not in every run
  np.testing.assert_allclose(a["mean"], [3.0, 4.0])
  np.testing.assert_allclose(a["min"], [1.0, 2.0])
  np.testing.assert_allclose(a["max"], [5.0, 6.0])
  np.testing.assert_allclose(a["std"], [np.std([1, 3, 5]), np.std([2, 6, 4])])
  assert a["n"] == 3


def test_paper_figure_plots_mean_and_spread_from_synthetic_runs(tmp_path):
  runs_dir, out = tmp_path / "runs", tmp_path / "fig"
  args = paper_figures.parse_args(["--figure", "a", "--seeds", "3", "--steps", "4", "--runs_dir", str(runs_dir),
                                   "--out", str(out)])
  values = {}
  for m_i, m in enumerate(paper_figures.FIGURES["a"][1]):
    for s in range(3):
      rows = []
      for step in range(1, 5):
        gap = 0.01 * (m_i + 1) * (s + 1) * step
        r = {"step": step, "mismatch/ppl_gap": gap, "reward/mean": 0.1 * s + 0.01 * step, "trm/accept_rate": 1.0}
        if step % 2 == 0:
          r["eval/reward_mean"] = 0.2 * s + m_i
        rows.append(r)
        values.setdefault((m, step), []).append(gap)
      _write_run(paper_figures.method_spec(m, s, args).workdir(str(runs_dir)), rows, criterion="none")
  res = paper_figures.make_figure("a", args, run=False)
  assert os.path.getsize(res["png"]) > 1000
  rows = _read_csv(res["csv"])
  for m in paper_figures.FIGURES["a"][1]:
    for step in (1, 4):
      (r,) = [r for r in rows if r["method"] == m and r["metric"] == "mismatch/ppl_gap" and int(r["step"]) == step]
      v = values[(m, step)]
      assert float(r["mean"]) == pytest.approx(np.mean(v), rel=1e-4)
      assert float(r["min"]) == pytest.approx(min(v), rel=1e-4)
      assert float(r["max"]) == pytest.approx(max(v), rel=1e-4)
      assert float(r["std"]) == pytest.approx(np.std(v), rel=1e-4)
      assert r["n_seeds"] == "3"
    evals = [r for r in rows if r["method"] == m and r["metric"] == "eval/reward_mean"]
    assert [int(r["step"]) for r in evals] == [2, 4]
  summary = {r["method"]: r for r in _read_csv(res["summary_csv"])}
  # final eval of method i, seed s is 0.2 s + i -> mean 0.2 + i over seeds 0, 1, 2.
  assert float(summary["tis"]["final_eval_mean"]) == pytest.approx(0.2)
  assert float(summary["ppo_clip"]["final_eval_mean"]) == pytest.approx(1.2)
  assert float(summary["ppo_clip"]["final_eval_min"]) == pytest.approx(1.0)
  assert float(summary["ppo_clip"]["final_eval_max"]) == pytest.approx(1.4)


def test_paper_figures_print_commands_dedupes_shared_runs(capsys):
  paper_figures.main(["--figure", "all", "--seeds", "3", "--print_commands", "--runs_dir", "experiments/runs"])
  lines = capsys.readouterr().out.splitlines()
  # a: tis, ppo_clip; b adds trm_max, trm_avg (ppo_clip shared); c: three more -> 7 methods x 3 seeds.
  assert len(lines) == 21 and len(set(lines)) == 21


def test_experiments_set_up_no_import_paths():
  """The experiments are packages: no script edits sys.path (it would hide an uninstalled package)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  offenders = []
  for d, _, files in os.walk(os.path.join(root, "experiments")):
    for f in files:
      if f.endswith(".py") and "sys.path" in open(os.path.join(d, f)).read():
        offenders.append(os.path.relpath(os.path.join(d, f), root))
  assert offenders == []


def test_rivals_figure_print_commands_same_budget(capsys):
  """Figure r (dry run): 6 methods x 3 seeds, every run the same steps and eval; CPPO / DPPO by baseline.kind."""
  paper_figures.main(["--figure", "r", "--seeds", "3", "--steps", "30", "--print_commands",
                      "--runs_dir", "experiments/runs"])
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 18 and len(set(lines)) == 18
  assert all(",steps=30" in l and "--config.eval.every=5" in l for l in lines)
  assert sum("--config.baseline.kind=cppo" in l for l in lines) == 3
  assert sum("--config.baseline.kind=dppo" in l for l in lines) == 3
  assert sum("configs/trm.py:criterion=max," in l for l in lines) == 3
  assert sum("configs/baselines.py:name=tis," in l for l in lines) == 3


def _kind_is_known(kind):
  try:
    config_lib.validate(config_lib.with_overrides(config_lib.default_config(), {"baseline.kind": kind}))
  except ValueError as e:  # trm_jax.config.ConfigError
    return "baseline.kind" not in str(e)
  return True


def test_rivals_figure_runs_validate():
  if not (_kind_is_known("cppo") and _kind_is_known("dppo")):
    pytest.skip("baseline.kind cppo / dppo are not in this trm_jax.config yet")
  args = paper_figures.parse_args(["--figure", "r", "--steps", "4"])
  for m in paper_figures.FIGURES["r"][1]:
    c = paper_figures.method_spec(m, 0, args).load()
    assert c.rl.steps == 4 and c.rollout.backend.logit_noise_scale == args.noise_scale
    if m in ("cppo", "dppo"):
      assert (c.baseline.kind, c.trm.criterion) == (m, "none")


def test_run_all_warm_starts_once_per_key_and_starts_runs_from_it(tmp_path, monkeypatch):
  """Two seeds x two methods: 2 warm-start runs (rl.steps=0), 4 runs with warmstart.init_from = their seed's."""
  from experiments.paper import launch
  calls = []

  def fake_run(cmd, log_path):
    calls.append(cmd)
    if "--config.rl.steps=0" in cmd:  # what a real warm-start run leaves behind
      os.makedirs(os.path.join(cmd[-1].split("=", 1)[1], "checkpoints", "0"))
    return 0

  monkeypatch.setattr(launch, "_run_logged", fake_run)
  args = paper_figures.parse_args(["--steps", "3", "--runs_dir", str(tmp_path)])
  specs = [paper_figures.method_spec(m, s, args) for m in ("trm_max", "ppo_clip") for s in (0, 1)]
  launch.run_all(specs, str(tmp_path), parallel=1, verbose=False)
  warm = [c for c in calls if "--config.rl.steps=0" in c]
  runs = [c for c in calls if "--config.rl.steps=0" not in c]
  assert len(warm) == 2 and len(runs) == 4  # breaks if every run warm-starts itself or keys ignore the seed
  assert not any("init_from" in " ".join(c) for c in warm)
  by_seed = {}
  for c in runs:
    (init,) = [a for a in c if a.startswith("--config.warmstart.init_from=")]
    by_seed.setdefault(c[3].split("seed=")[1].split(",")[0], set()).add(init.split("=", 1)[1])
  assert {k: len(v) for k, v in by_seed.items()} == {"0": 1, "1": 1} and by_seed["0"] != by_seed["1"]
  assert {os.path.dirname(next(iter(v))) for v in by_seed.values()} == {str(tmp_path / "_warm")}
  assert not any(os.path.isdir(os.path.join(s.workdir(str(tmp_path)), "checkpoints")) for s in specs)  # no copies
