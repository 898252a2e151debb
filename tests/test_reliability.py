"""Failures and resumes: non-finite updates, changed resumes, damaged checkpoints, metrics
after a resume, preemption by SIGTERM, one-line CLI errors, scripts that must not destroy results."""
import glob
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from trm_jax import checkpoint as ckpt_lib
from trm_jax import config as config_lib
from trm_jax import guard
from trm_jax import metrics as metrics_lib
from trm_jax import trainer
from trm_jax import warmstart as warmstart_lib

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(data_dir, **overrides):
  c = config_lib.load_config("default", "smoke")
  return config_lib.with_overrides(c, {"data.data_dir": str(data_dir), "warmstart.steps": 2, "rl.steps": 2,
                                       "eval.every": 0, "checkpoint.every": 1, "checkpoint.keep": 3,
                                       "log.progress": False, "log.plot": False, "log.tensorboard": False,
                                       **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_dir):
  """A finished 2-step run with checkpoints 0, 1, 2 and TensorBoard events; tests copy it."""
  workdir = str(tmp_path_factory.mktemp("base") / "run")
  trainer.train(cfg(data_dir, **{"log.tensorboard": True}), workdir)
  return workdir


def copy_run(base, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(base, dst)
  return dst


def steps_of(workdir):
  return [r["step"] for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


# ----------------------------------------------------------------------------- 1. non-finite


def test_infinite_lr_skips_every_update_and_stops_without_a_nan_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  c = cfg(data_dir, **{"optim.lr": float("inf"), "rl.steps": 5, "checkpoint.max_consecutive_skips": 2})
  with pytest.raises(ckpt_lib.RunError, match=r"step 2: 2 consecutive updates skipped, non-finite parameter update"):
    trainer.train(c, workdir)
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["step"] > 0]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert r["update/skipped"] == 1.0 and r["update/nonfinite_update"] == 1.0
    # The policy never changed, so its statistics are real numbers, not a NaN policy's 0 / 1.
    assert r["entropy"] is not None and r["entropy"] > 0 and r["mismatch/kl_max"] is not None
  # Step 1 is checkpointed from the unchanged (finite) parameters, and is restorable.
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ck.all_steps() == [0, 1]
  ck.close()


def test_warm_start_with_infinite_lr_stops(data_dir, tmp_path):
  c = cfg(data_dir, **{"warmstart.lr": float("inf"), "warmstart.steps": 3, "checkpoint.max_consecutive_skips": 3})
  with pytest.raises(ckpt_lib.RunError, match=r"warm start step 3: 3 consecutive updates skipped"):
    trainer.train(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")


def test_guarded_update_keeps_params_and_opt_state():
  import jax.numpy as jnp
  import optax
  from trm_jax import learner
  tx = optax.adam(0.1)
  params = {"w": jnp.array([1.0, 2.0])}
  state = tx.init(params)
  (p, s), flags = learner.guarded_update(tx, params, state, jnp.float32(1.0), {"w": jnp.array([jnp.nan, 1.0])})
  np.testing.assert_array_equal(p["w"], [1.0, 2.0])
  assert int(s[0].count) == 0 and float(flags["update/skipped"]) == 1.0 and float(flags["update/nonfinite_grad"]) == 1
  (p, s), flags = learner.guarded_update(tx, params, state, jnp.float32(1.0), {"w": jnp.array([1.0, -1.0])})
  np.testing.assert_allclose(p["w"], [0.9, 2.1], rtol=1e-5)  # adam's first step: lr * sign(g)
  assert int(s[0].count) == 1 and float(flags["update/skipped"]) == 0.0


# ----------------------------------------------------------------------------- 2. resume identity


def test_resume_with_changed_fields_is_refused_naming_each(base_run, data_dir, tmp_path):
  workdir = copy_run(base_run, tmp_path)
  changed = cfg(data_dir, **{"trm.delta": 0.07, "model.size": "small", "rl.steps": 3})
  with pytest.raises(ckpt_lib.RunError) as e:
    trainer.train(changed, workdir)
  msg = str(e.value)
  assert "\n" not in msg and "trm.delta: 0.05 -> 0.07" in msg and "model.size: 'tiny' -> 'small'" in msg
  assert "rl.steps" not in msg  # allowed to change
  assert "--allow_config_change=" in msg


def test_allowed_change_continues_and_keeps_history(base_run, data_dir, tmp_path):
  workdir = copy_run(base_run, tmp_path)
  original = open(os.path.join(workdir, "config.json")).read()
  trainer.train(cfg(data_dir, **{"trm.delta": 0.07, "rl.steps": 3}), workdir, allow_config_change=("trm.delta",))
  assert open(os.path.join(workdir, "config.json")).read() == original  # the run's origin is kept
  history = metrics_lib.read_jsonl(os.path.join(workdir, "config_history.jsonl"))
  assert [h["event"] for h in history] == ["start", "resume"]
  assert history[1]["step"] == 2 and history[1]["changes"]["trm.delta"] == [0.05, 0.07]
  assert history[1]["changes"]["rl.steps"] == [2, 3]
  assert steps_of(workdir) == [0, 1, 2, 3]  # step 0: the data counts
  # The checkpoint now carries the new identity: a resume with the old delta is a change again.
  with pytest.raises(ckpt_lib.RunError, match=r"trm\.delta: 0\.07 -> 0\.05"):
    trainer.train(cfg(data_dir, **{"rl.steps": 4}), workdir)


def test_finished_run_says_complete(base_run, data_dir, capsys):
  before = steps_of(base_run)
  summary = trainer.train(cfg(data_dir, **{"log.tensorboard": True}), base_run)
  assert summary["complete"] == 2
  out = capsys.readouterr().out
  assert "already complete" in out and os.path.join(base_run, "metrics.jsonl") in out
  assert steps_of(base_run) == before


# ----------------------------------------------------------------------------- 4. damaged checkpoints


def _damage(step_dir):
  """Truncates every array file of the step (what a disk error or a partial copy leaves)."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and os.path.getsize(f) > 0]
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(1)


def test_damaged_newest_step_falls_back_and_is_kept(base_run, data_dir, tmp_path):
  workdir = copy_run(base_run, tmp_path)
  _damage(os.path.join(workdir, "checkpoints", "2"))
  with pytest.warns(UserWarning, match=r"checkpoint step 2 at .*checkpoints/2 cannot be restored: .*falling back "
                                       r"to step 1"):
    trainer.train(cfg(data_dir, **{"log.tensorboard": True, "rl.steps": 3}), workdir)
  damaged = glob.glob(os.path.join(workdir, "checkpoints_damaged", "2_*"))
  assert len(damaged) == 1 and os.listdir(damaged[0])  # moved aside, not deleted
  # 5. Metrics after a resume: step 2 was logged, then redone from checkpoint 1; it appears once
  # (the old row dropped by an atomic rewrite, TensorBoard told to purge it), not twice.
  assert steps_of(workdir) == [0, 1, 2, 3]  # step 0: the data counts
  assert no_duplicate_tensorboard_steps(os.path.join(workdir, "tb"))


def test_no_restorable_step_is_one_clear_error(base_run, data_dir, tmp_path):
  workdir = copy_run(base_run, tmp_path)
  for step in ("0", "1", "2"):
    _damage(os.path.join(workdir, "checkpoints", step))
  with pytest.warns(UserWarning), pytest.raises(ckpt_lib.RunError) as e:
    trainer.train(cfg(data_dir, **{"rl.steps": 3}), workdir)
  msg = str(e.value)
  assert "\n" not in msg and "no checkpoint under" in msg and "step 2 (" in msg and "step 0 (" in msg
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) >= ["0", "1", "2"]  # nothing deleted


# ----------------------------------------------------------------------------- 5. metrics after resume


def _records(path):
  """TFRecord framing: uint64 length, uint32 crc, payload, uint32 crc."""
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    yield data[i + 12:i + 12 + n]
    i += 12 + n + 4


def no_duplicate_tensorboard_steps(tb_dir) -> bool:
  """Replays the event files as TensorBoard does on a restart: a SessionLog START at step s discards the
  earlier events at steps >= s. True iff no (tag, step) is then present twice."""
  from tensorboardX.proto.event_pb2 import Event, SessionLog
  seen = []
  for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
    for rec in _records(path):
      ev = Event.FromString(rec)
      if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
        seen = [(t, s) for t, s in seen if s < ev.step]
      if ev.HasField("summary"):
        seen += [(v.tag, ev.step) for v in ev.summary.value]
  return len(seen) == len(set(seen)) and len(seen) > 0


def test_step0_eval_row_survives_a_crash_after_checkpoint_0(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  c = cfg(data_dir, **{"eval.every": 1, "eval.num_prompts": 8, "rl.steps": 1})
  original = ckpt_lib.Checkpointer.save

  def save_then_crash(self, step, tree, meta):
    original(self, step, tree, meta)
    self.wait()
    raise KeyboardInterrupt("simulated crash right after checkpoint 0")

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_then_crash)
  with pytest.raises(KeyboardInterrupt):
    trainer.train(c, workdir)
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", original)
  trainer.train(c, workdir)
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [0, 1]
  assert rows[0]["eval/reward_mean"] is not None


def test_truncate_rows_is_atomic_and_drops_torn_lines(tmp_path):
  path = str(tmp_path / "m.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n{"step": 2, "a": 3}\n{"step": 3, "a"')
  assert metrics_lib.truncate_rows(path, 1) == 2
  assert [r["step"] for r in metrics_lib.read_jsonl(path)] == [0, 1]
  assert not os.path.exists(path + ".tmp")


# ----------------------------------------------------------------------------- 3. preemption


def _cli(args, workdir, data_dir, timeout=300, **popen):
  cmd = [sys.executable, "-m", "trm_jax.main", "--config=configs/default.py:smoke", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", "--config.log.progress=False", "--config.log.plot=False", *args]
  import jax
  # The test session's devices and compilation cache (conftest): the child compiles what this process did.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  if popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_sigterm_finishes_the_step_saves_and_exits_0(data_dir, tmp_path):
  workdir = tmp_path / "run"
  proc = _cli(["--config.rl.steps=200", "--config.warmstart.steps=2", "--config.eval.every=0",
               "--config.checkpoint.every=0", "--config.log.tensorboard=False"], workdir, data_dir, popen=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any(r["step"] >= 1 for r in metrics_lib.read_jsonl(str(metrics))):
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[1][-2000:]
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  last = steps_of(str(workdir))[-1]
  assert 1 <= last < 200
  assert f"SIGTERM received: stopped after step {last}; checkpoint {last} saved" in out
  ck = ckpt_lib.Checkpointer(str(workdir / "checkpoints"))
  assert ck.latest_step() == last
  ck.close()


# ----------------------------------------------------------------------------- 6. one-line errors


@pytest.mark.parametrize("args,expect", [
    (["--config.trm.detla=0.1"], "unknown override --config.trm.detla: closest: trm.delta"),
    (["--config.data.group_size=4"], "unknown override --config.data.group_size: closest: rl.group_size"),
    (["--config.rl.group_size=1"], "config.rl.group_size must be >= 2"),
    (["--config.rl.group_size=1", "--config.rl.advantage=rloo"], "rl.group_size must be >= 2 with rl.advantage='rloo'"),
])
def test_cli_errors_are_one_line(args, expect, data_dir, tmp_path):
  out = _cli(args, tmp_path / "run", data_dir)
  assert out.returncode == 2
  lines = [line for line in out.stderr.splitlines() if line.startswith("[trm_jax]")]
  assert len(lines) == 1 and lines[0].startswith("[trm_jax] error: ") and expect in lines[0], out.stderr[-3000:]
  assert "Traceback" not in out.stderr


def test_workdir_that_is_a_file(data_dir, tmp_path):
  path = tmp_path / "afile"
  path.write_text("x")
  with pytest.raises(ckpt_lib.RunError, match=r"^workdir .*afile is a file, not a directory"):
    trainer.train(cfg(data_dir), str(path))


# ----------------------------------------------------------------------------- 7. scripts keep results


def test_bound_curves_on_a_clean_clone_keeps_committed_figures(tmp_path, monkeypatch):
  from experiments import bound_curves, common
  figures = tmp_path / "figures"
  shutil.copytree(os.path.join(REPO, "experiments", "figures"), figures)
  before = {p.name: p.read_bytes() for p in figures.iterdir()}
  monkeypatch.setattr(common, "DEFAULT_FIGURES", str(figures))
  monkeypatch.setattr(common, "DEFAULT_RUNS", str(tmp_path / "runs"))  # a fresh clone: no runs
  out = bound_curves.main(["--T", "64,128", "--T_fixed", "128"])
  assert {p.name: p.read_bytes() for p in figures.iterdir()} == before
  assert all(str(tmp_path / "runs") in p for p in out.values())
  # Pointed at the committed figures explicitly, it still keeps the measured acceptance rows.
  bound_curves.main(["--out", str(figures), "--T", "64,128", "--T_fixed", "128"])
  assert (figures / "acceptance_vs_length.csv").read_bytes() == before["acceptance_vs_length.csv"]


def test_a_nan_policy_is_reported_as_nan_and_stops(data_dir, tmp_path, monkeypatch):
  """NaN parameters (injected after the warm start): every statistic of that policy is NaN (null in
  metrics.jsonl), never a healthy-looking kl 0 / accept 1, and the run stops at step 1."""
  import jax
  import jax.numpy as jnp
  supervised = warmstart_lib.supervised

  def nan_warmstart(*args):
    return jax.tree.map(lambda x: x * jnp.nan, supervised(*args))

  monkeypatch.setattr(warmstart_lib, "supervised", nan_warmstart)
  monkeypatch.setattr(guard, "check_finite", lambda tree, what="": None)  # let it reach the learner
  workdir = str(tmp_path / "run")
  with pytest.raises(ckpt_lib.RunError, match=r"step 1: .*non-finite .*learner or rollout parameters"):
    trainer.train(cfg(data_dir, **{"eval.every": 1, "eval.num_prompts": 8, "checkpoint.every": 0}), workdir)
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert rows[0]["step"] == 0 and rows[0]["eval/reward_mean"] is None
  r = rows[1]
  for k in ("mismatch/kl_max", "entropy", "trm/accept_rate", "loss", "bounds/unified"):
    assert r[k] is None, (k, r[k])
  assert r["update/skipped"] == 1.0 and r["update/nonfinite_policy"] == 1.0


def test_no_checkpoint_from_nonfinite_state():
  import jax.numpy as jnp
  tree = {"state": {"w": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])}}
  with pytest.raises(ckpt_lib.RunError, match=r"refusing to write checkpoint 3: non-finite values in 1 arrays, "
                                              r"e\.g\. \['state'\]\['b'\]"):
    guard.check_finite(tree, "refusing to write checkpoint 3")
  guard.check_finite({"w": jnp.ones(3)})
