"""The loop: resume or warm start -> [collect -> update -> log / eval / checkpoint] x steps.

Each RL step:
  prompts (data/pipeline.py) -> repeat G times -> sample under the rollout backend with the rollout
  policy's parameters (k updates stale) and score (rollout/engine.py) -> RolloutBatch -> the one
  compiled learner update (learner.py) -> metrics / eval / checkpoint.

What is built once lives in build.py, where RL starts from in resume.py and warmstart.py, the
non-finite guard in guard.py. Determinism: every random draw is keyed by (seed, step), and the data
iterators' states, the learner and optimizer state and the stale rollout snapshots are all in the
checkpoint, so a run stopped and resumed continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import time
import warnings

import jax
import jax.numpy as jnp

from trm_jax import build
from trm_jax import checkpoint as ckpt_lib
from trm_jax import config as config_lib
from trm_jax import eval as eval_lib
from trm_jax import guard
from trm_jax import learner as learner_lib
from trm_jax import metrics as metrics_lib
from trm_jax import resume

EVAL_KEY = 10_000_000  # eval draws: fold_in(seed, EVAL_KEY + step), apart from the rollouts' fold_in(seed, step)


def train(config, workdir: str, *, allow_config_change=()) -> dict:
  """Runs (or resumes) the experiment described by `config` in `workdir`; returns a summary dict.

  What a run guarantees on failures (README "Failures and resumes"): a non-finite loss or gradient skips
  the update (`update/skipped`) and checkpoint.max_consecutive_skips of them in a row stop the run; no
  checkpoint is written from non-finite state; a resume must have the checkpointed config except
  checkpoint.ALLOWED_CHANGES and the fields in `allow_config_change`; SIGTERM / SIGINT finish the step,
  save and return (summary["preempted"]); a damaged newest checkpoint falls back to an older one.
  """
  preempt = ckpt_lib.Preemption()
  try:
    return _train(config, workdir, tuple(allow_config_change), preempt)
  finally:
    preempt.close()


def _train(config, workdir: str, allow_config_change: tuple, preempt) -> dict:
  # ------------------------------------------------------------------ config, workdir, run identity
  cfg = _prepare(config, workdir)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep)
  preempt.checkpointer = ckpt
  changes = resume.check_identity(cfg, ckpt, workdir, allow_config_change)
  finished = ckpt.latest_step() if cfg.checkpoint.resume else None
  if finished is not None and finished >= cfg.rl.steps:
    ckpt.close()
    return resume.already_complete(cfg, workdir, ckpt.directory, finished)
  _announce(cfg, workdir)
  # ------------------------------------------------------------------ task, model, data (build.py)
  run = build.Run(cfg)
  rl_iter, ws_iter, expand = build.iterators(run)
  # ------------------------------------------------------------------ resume or initialise + warm start
  start = resume.resume_or_init(run, ckpt, (rl_iter, ws_iter), workdir, preempt)
  if start is None:
    ckpt.close()
    return resume.stopped(workdir, ckpt.directory, preempt.received, None)
  if jax.process_index() == 0:
    ckpt_lib.record_config(workdir, cfg.to_json_best_effort(indent=2), event="resume" if start.resumed else "start",
                           step=start.step, changes=changes)
  # ------------------------------------------------------------------ the loop
  loop = Loop(run, ckpt, rl_iter, ws_iter, expand, start, workdir)
  if not start.resumed:
    loop.step_zero()
  stopped = loop.steps(preempt)
  # ------------------------------------------------------------------ the summary
  loop.close()
  summary = {"workdir": os.path.abspath(workdir), "metrics": loop.writer.path, "checkpoints": ckpt.directory,
             "final": loop.last}
  if jax.process_index() == 0 and cfg.log.plot and os.path.exists(loop.writer.path):
    summary["curves"] = metrics_lib.plot_curves(metrics_lib.read_jsonl(loop.writer.path),
                                                os.path.join(workdir, "curves.png"), title=curve_title(cfg, run.task),
                                                thresholds={"delta": cfg.trm.delta, "delta_avg": cfg.trm.delta_avg})
  if stopped is not None:
    info = resume.stopped(workdir, ckpt.directory, preempt.received, stopped)
    summary.update(preempted=info["preempted"], stopped_at=info["stopped_at"])
  return summary


def _prepare(config, workdir: str):
  """Validates the config, starts jax.distributed if asked, creates `workdir`; returns the resolved config."""
  config_lib.validate(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ckpt_lib.RunError(f"workdir {workdir} is a file, not a directory: --workdir must be a directory "
                            "(it holds metrics.jsonl, checkpoints/ and curves.png)")
  build.maybe_initialize_distributed(config.distributed)
  os.makedirs(workdir, exist_ok=True)
  metrics_lib.quiet_dataset_logs()
  return build.with_data_dir(config)


def _announce(cfg, workdir: str) -> None:
  if jax.process_index() == 0:
    tb = f"; tensorboard --logdir {os.path.abspath(os.path.join(workdir, 'tb'))}" if cfg.log.tensorboard else ""
    print(f"[trm_jax] results go to {os.path.abspath(workdir)} (metrics.jsonl, checkpoints/, curves.png at the "
          f"end{tb})", flush=True)


class Loop:
  """The RL steps of one run: `collect` (rollout + reward), `update` (learner), then log / eval / save."""

  def __init__(self, run, ckpt, rl_iter, ws_iter, expand, start, workdir: str):
    cfg = self.cfg = run.config
    self.run, self.ckpt, self.rl_iter, self.ws_iter, self.expand = run, ckpt, rl_iter, ws_iter, expand
    self.state, self.history, self.start = start.state, start.history, start.step
    self.seed_key = jax.random.PRNGKey(cfg.seed)
    self.k = run.backend.staleness_k
    # Rows (and TensorBoard events) after the restored step are about to be redone: drop them first.
    self.writer = metrics_lib.MetricWriter(workdir, tensorboard=cfg.log.tensorboard,
                                           keep_through=start.step if start.resumed else -1)
    self.learner_step = learner_lib.make_learner_step(
        cfg, run.model_def, run.tx, run.backend, run.mesh, run.param_shardings,
        jax.tree.map(lambda x: x.sharding, self.state.opt_state), stale=self.k > 0,
        reward_range=run.task.reward_range)  # the certificate's bounds scale with the reward's range
    self.engine = build.rollout_engine(run)
    self.eval_sets = eval_lib.load_eval_sets(cfg, run.tokenizer, run.task) if _evaluates(cfg) else []
    self.evaluate = guard.finite_or_nan(_make_evaluator(run, self.eval_sets))
    self.skip_guard = guard.SkipGuard(cfg.checkpoint.max_consecutive_skips)
    self.last, self.warned_all_rejected = {}, False

  # ---------------------------------------------------------------- step 0: data counts, warm-start eval
  def step_zero(self) -> None:
    row = data_counts(self.run.task, self.eval_sets)
    if self.evaluate is not None and self.cfg.eval.at_start:
      # The warm-started policy, so every curve starts from a common measured point.
      row.update(self.evaluate(self.state.params, jax.random.fold_in(self.seed_key, EVAL_KEY - 1)))
    self.writer.write(0, row)
    self.save(0)  # after the step-0 row: a run that has checkpoint 0 always has its warm-start evaluation

  # ---------------------------------------------------------------- the steps
  def steps(self, preempt) -> int | None:
    """Steps start+1 .. rl.steps; returns the step a stop signal ended the run after, else None."""
    cfg = self.cfg
    bar = metrics_lib.progress(cfg.rl.steps, self.start, cfg.log.progress, "RL")
    try:
      for step in range(self.start, cfg.rl.steps):
        done = step + 1  # steps are counted from 1 in metrics.jsonl, checkpoints and messages
        t0 = time.perf_counter()
        batch, rollout_params, m = self.collect(step)  # COLLECT: prompts x G -> responses -> rewards
        t1 = time.perf_counter()
        m.update(self.update(batch, rollout_params))  # UPDATE: the one compiled learner step
        m.update(_timing(batch, t0, t1, time.perf_counter()))
        self.log(done, m)  # LOG / EVAL / CHECKPOINT
        bar.set_postfix({"reward": f"{m['reward/mean']:.3f}", "accept": f"{m['trm/accept_rate']:.2f}",
                         "kl_max": f"{m['mismatch/kl_max']:.2e}"})
        bar.update(1)
        saved = (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.rl.steps
        if saved:
          self.save(done)
        if preempt.should_stop(done):  # every host agrees on the step (checkpoint.Preemption)
          if not saved:
            self.save(done)
          return done
    finally:
      bar.close()
    return None

  def collect(self, step: int):
    """(RolloutBatch, rollout params, reward metrics) of RL step `step` (0-based)."""
    prompts = {key: v[self.expand] for key, v in next(self.rl_iter).items()}  # each prompt x G (this host's rows)
    rollout_params = self.history[0] if self.k > 0 else self.state.params
    batch, m = self.engine.rollout(rollout_params, prompts, jax.random.fold_in(self.seed_key, step),
                                   self.run.task.score)
    jax.block_until_ready(batch)
    return batch, rollout_params, m

  def update(self, batch, rollout_params) -> dict:
    """One learner update; the rollout snapshots move on by one (staleness k)."""
    if self.k > 0:
      snapshot = jax.tree.map(jnp.copy, self.state.params)  # the learner's state is donated below
      self.state, m = self.learner_step(self.state, batch, rollout_params)
      self.history = self.history[1:] + [snapshot] if self.k > 1 else [snapshot]
    else:
      self.state, m = self.learner_step(self.state, batch)
    return _scalars(m)

  def log(self, done: int, m: dict) -> None:
    """Eval on its cadence, the metrics row, and the guard's stop (RunError) on non-finite updates."""
    cfg = self.cfg
    if m["trm/accept_rate"] == 0.0 and not self.warned_all_rejected:
      warnings.warn(f"step {done}: every sequence was rejected, so the update was zero (not fatal; "
                    f"trm/accept_rate is logged every step, and this warning is shown once)")
      self.warned_all_rejected = True
    if self.evaluate is not None and cfg.eval.every and (done % cfg.eval.every == 0 or done == cfg.rl.steps):
      m.update(self.evaluate(self.state.params, jax.random.fold_in(self.seed_key, EVAL_KEY + done - 1)))
    self.writer.write(done, m)
    self.last = m
    message = self.skip_guard.check(done, m, self.ckpt.latest_step(), self.ckpt.directory)
    if message is not None:
      self.writer.flush()
      self.ckpt.close()
      raise ckpt_lib.RunError(message)

  def save(self, step: int) -> None:
    tree = {"state": self.state, "history": tuple(self.history)}
    guard.check_finite(tree, f"refusing to write checkpoint {step}")  # never rotate a good step out for a NaN one
    meta = {"rl_iter": self.rl_iter.get_state(), "ws_iter": self.ws_iter.get_state(), "config": self.cfg.to_dict()}
    self.ckpt.save(step, tree, json.loads(json.dumps(meta, default=str)))

  def close(self) -> None:
    self.ckpt.close()
    self.writer.close()


# ----------------------------------------------------------------------------- helpers of the loop


def data_counts(task, eval_sets) -> dict:
  """Step-0 row: how many train / eval prompts the run uses and how many were dropped as too long:
  `data/train/prompts`, `data/train/prompts_dropped_long`, `data/eval/<set>/...` (the console line that says
  so is printed where the prompts are dropped, data/text_tasks.py)."""
  row = {}
  for prefix, stats in [("data/train", task.stats("train"))] + [(f"data/eval/{es.name}", es.stats)
                                                                 for es in eval_sets]:
    for key in ("prompts", "prompts_dropped_long"):
      row[f"{prefix}/{key}"] = float(stats.get(key, 0.0))
  return row


def _evaluates(cfg) -> bool:
  return bool(cfg.eval.every)  # eval.at_start alone evaluates nothing: it adds step 0 to a cadence


def _make_evaluator(run, sets):
  """avg@k / pass@k on the eval sets with the eval's own sampling settings (trm_jax/eval.py)."""
  cfg = run.config
  if not cfg.eval.every:
    return None
  numerics = run.backend.numerics if cfg.eval.rollout_numerics else learner_lib.learner_numerics(cfg)
  return eval_lib.make_evaluator(cfg, mesh=run.mesh, graphdef=run.model_def.graphdef, tokenizer=run.tokenizer,
                                 numerics=numerics, sets=sets)


@jax.jit
def _batch_summary(rewards, mask):
  """Scalars of a global (possibly multi-host) batch, reduced on device so every host can read them."""
  return {"reward_mean": rewards.mean(), "tokens": mask.sum(), "length_mean": mask.sum(-1).mean()}


def _timing(batch, t0: float, t1: float, t2: float) -> dict:
  s = _scalars(_batch_summary(batch.rewards, batch.response_mask))
  return {"reward/mean": s["reward_mean"], "response_length/mean": s["length_mean"],
          "tokens_per_sec": s["tokens"] / (t2 - t0), "time/rollout_s": t1 - t0, "time/learner_s": t2 - t1}


def _scalars(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def curve_title(cfg, task) -> str:
  """The run's key settings, for the title of curves.png."""
  b = cfg.rollout.backend
  return (f"{task.name} T={task.response_len} | model={cfg.model.size} | trm={cfg.trm.criterion} "
          f"delta={cfg.trm.delta:g} delta_avg={cfg.trm.delta_avg:g} div={cfg.trm.divergence} src={cfg.trm.source} | "
          f"rollout={b.precision}/{b.attention} k={b.staleness_k} | {cfg.rl.advantage} G={cfg.rl.group_size} "
          f"prompts={cfg.rl.prompts_per_step} lr={cfg.optim.lr:g} | seed={cfg.seed}")
