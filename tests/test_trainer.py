"""End to end: the smoke run writes every metric, a checkpoint and curves; resume is exact."""
import math
import os

import jax
import numpy as np
import pytest

from trm_jax import config as config_lib
from trm_jax import eval as eval_lib
from trm_jax import metrics as metrics_lib
from trm_jax import trainer

pytestmark = pytest.mark.slow

REQUIRED = [
    "step", "reward/mean", "trm/accept_rate", "mismatch/ppl_gap", "mismatch/kl_max", "mismatch/kl_mean",
    "mismatch/k3_mean", "mismatch/k2_max", "mismatch/tv_max", "bounds/unified", "bounds/certified_improvement",
    "bounds/classical_kl", "bounds/classical_tv", "bounds/pinsker_marginal_kl", "bounds/pinsker_marginal_tv",
    "bounds/mixed_kl", "bounds/mixed_tv", "bounds/coupling", "bounds/linear", "bounds/adaptive_kl",
    "bounds/adaptive_tv", "bounds/adaptive", "bounds/delta", "bounds/eps", "bounds/kl_seq", "bounds/tv_seq",
    "loss", "grad_norm", "entropy", "clip_frac", "tokens_per_sec", "response_length/mean",
]


def smoke_config(data_dir, **overrides):
  c = config_lib.load_config("default", "smoke")
  return config_lib.with_overrides(c, {"data.data_dir": str(data_dir), "rl.steps": 4, "bounds.certify_update": True,
                                       "eval.every": 2, "checkpoint.every": 2, "log.progress": False,
                                       "log.tensorboard": True, **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("run_a"))
  summary = trainer.train(smoke_config(data_dir), workdir)
  return workdir, summary


def test_smoke_run_writes_every_metric(uninterrupted):
  workdir, summary = uninterrupted
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert rows[0]["step"] == 0 and "eval/reward_mean" in rows[0] and "loss" not in rows[0]  # eval at start
  rows = rows[1:]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for row in rows:
    missing = [k for k in REQUIRED if k not in row]
    assert not missing, missing
    assert any(k.startswith("trm/accept_rate/len_") for k in row)
    for k in REQUIRED:
      assert row[k] is not None and math.isfinite(row[k]), (k, row[k])
  assert rows[1]["eval/reward_mean"] is not None
  # The smoke run learns something: non-zero rewards, real updates, parameters that move.
  assert max(r["reward/mean"] for r in rows) > 0
  assert sum(r["grad_norm"] > 0 for r in rows) >= 2 and all(r["update/skipped"] == 0 for r in rows)
  import orbax.checkpoint as ocp
  ckpt_dir = os.path.join(workdir, "checkpoints")
  p2, p4 = (ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, s, "state"))["state"]["params"]
            for s in ("2", "4"))
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p4))]
  assert np.mean(np.array(moved) > 0) > 0.5, moved  # the parameters moved between checkpoints 2 and 4
  assert os.path.exists(summary["curves"]) and os.path.getsize(summary["curves"]) > 10_000
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "4"
  assert os.listdir(os.path.join(workdir, "tb"))
  # The logged certificate is the paper's closed forms (float64 here) of its own logged inputs, and those
  # inputs are the mismatch the run measured. Catches: the certificate fed another divergence than the one
  # logged as mismatch (e.g. TV where KL belongs: bounds/delta != mismatch/kl_max), a bound formula off
  # (e.g. T**2 for T(T-1) in classical_kl), or a horizon T outside 1..data.horizon.
  horizon = smoke_config(".").data.horizon
  for r in rows:
    T, delta, eps = r["bounds/T"], r["bounds/delta"], r["bounds/eps"]
    assert 1 <= T <= horizon and T == int(T)
    assert r["bounds/classical_kl"] == pytest.approx(T * (T - 1) * delta, rel=1e-5)
    assert r["bounds/classical_tv"] == pytest.approx(2 * T * (T - 1) * eps**2, rel=1e-5)
    assert r["bounds/linear"] == pytest.approx(4 * T * eps, rel=1e-5)
    assert delta == pytest.approx(r["mismatch/kl_max"], rel=1e-6) and eps == pytest.approx(r["mismatch/tv_max"], rel=1e-6)


def test_step_zero_logs_the_data_counts(uninterrupted):
  """data/train/prompts and data/eval/<set>/prompts are the split sizes the config asks for; none dropped."""
  workdir, _ = uninterrupted
  row = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[0]
  c = smoke_config(".")
  assert row["step"] == 0
  assert row["data/train/prompts"] == c.data.num_train and row["data/train/prompts_dropped_long"] == 0
  assert row[f"data/eval/{c.data.task}/prompts"] == c.data.num_eval
  assert row[f"data/eval/{c.data.task}/prompts_dropped_long"] == 0


def test_data_counts_name_every_split():
  """The step-0 counts come from each task's stats of the split the run reads (train; each eval set's own)."""

  class Stub:
    def __init__(self, kept, dropped):
      self.counts, self.splits = {"prompts": kept, "prompts_dropped_long": dropped}, []

    def stats(self, split):
      self.splits.append(split)
      return self.counts

  train = Stub(100, 3)
  sets = [eval_lib.EvalSet("aime24", Stub(8, 22), {}, {"prompts": 8, "prompts_dropped_long": 22})]
  row = trainer.data_counts(train, sets)
  assert row == {"data/train/prompts": 100.0, "data/train/prompts_dropped_long": 3.0,
                 "data/eval/aime24/prompts": 8.0, "data/eval/aime24/prompts_dropped_long": 22.0}
  assert train.splits == ["train"]


def test_cli_runs_and_overrides(data_dir, tmp_path):
  """`python -m trm_jax.main` parses a config argument and overrides, runs, and says where things are."""
  import subprocess
  import sys
  workdir = tmp_path / "cli"
  cmd = [sys.executable, "-m", "trm_jax.main", "--config=configs/default.py:smoke", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", "--config.rl.steps=1", "--config.warmstart.steps=2",
         "--config.eval.every=0", "--config.trm.delta=0.07"]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user's laptop
  out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "metrics:" in out.stdout and "curves:" in out.stdout
  assert [r["step"] for r in metrics_lib.read_jsonl(str(workdir / "metrics.jsonl"))] == [0, 1]  # 0: data counts
  import json
  assert json.load(open(workdir / "config.json"))["trm"]["delta"] == 0.07
  again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)  # a finished run
  assert again.returncode == 0 and "is already complete" in again.stdout
  assert str(workdir / "metrics.jsonl") in again.stdout
  bad = subprocess.run(cmd[:3] + ["--config.trm.detla=0.1"], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode != 0 and "detla" in bad.stderr


def test_init_from_continues_as_the_uninterrupted_run(uninterrupted, data_dir, tmp_path):
  """warmstart.init_from: a warm-start-only run (rl.steps = 0) and a run started from its parameters reproduce
  the uninterrupted run's RL steps, without a warm start of their own (catches restoring the wrong tree,
  e.g. the source's optimizer state as parameters, or a warm start run on top of the restored parameters)."""
  workdir_a, _ = uninterrupted
  warm, run = str(tmp_path / "warm"), str(tmp_path / "run")
  trainer.train(smoke_config(data_dir, **{"rl.steps": 0}), warm)
  trainer.train(smoke_config(data_dir, **{"warmstart.init_from": warm}), run)
  assert not os.path.exists(os.path.join(run, "warmstart"))  # no supervised step was taken
  a = {r["step"]: r for r in metrics_lib.read_jsonl(os.path.join(workdir_a, "metrics.jsonl"))}
  b = {r["step"]: r for r in metrics_lib.read_jsonl(os.path.join(run, "metrics.jsonl"))}
  assert sorted(b) == [0, 1, 2, 3, 4]
  for step in (0, 1, 4):
    for k in ("eval/reward_mean", "reward/mean", "loss", "grad_norm", "mismatch/kl_max", "trm/accept_rate"):
      if k in a[step]:
        np.testing.assert_allclose(b[step][k], a[step][k], rtol=1e-6, atol=1e-9, err_msg=f"step {step} {k}")


def test_staleness_k2_rollout_uses_params_two_updates_old(data_dir, tmp_path):
  """f32 backend, staleness_k=2: step 1 and 2 sample with older snapshots; the mismatch is staleness alone."""
  cfg = smoke_config(data_dir, **{"rollout.backend.precision": "float32", "rollout.backend.attention": "standard",
                                  "rollout.backend.staleness_k": 2, "optim.lr": 3e-3, "eval.every": 0,
                                  "warmstart.steps": 120, "rl.group_size": 4,  # varied rewards -> non-zero updates
                                  "checkpoint.every": 0, "log.plot": False, "log.tensorboard": False,
                                  # No masking: a step whose mask rejects every row skips the optimizer, and then
                                  # the learner would not be the number of updates ahead this test counts.
                                  "trm.criterion": "none"})
  trainer.train(cfg, str(tmp_path))
  rows = metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
  rows = [r for r in rows if r["step"] > 0]
  assert all(r["update/skipped_empty"] == 0 for r in rows)
  kl = [r["mismatch/kl_max"] for r in rows]
  assert any(r["grad_norm"] > 0 for r in rows[:2]), "no update happened: the test would prove nothing"
  # Step 1: rollout params = warm-start params = learner params -> exact agreement (same f32 program).
  assert kl[0] < 1e-6, kl
  # Step 2: rollout still the warm-start params, learner one update ahead; step 3+: two updates ahead.
  assert all(k > 1e-6 for k in kl[1:]), kl
