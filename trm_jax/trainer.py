"""The loop: warm start -> [rollout -> reward -> learner update] x steps, with eval, metrics, checkpoints.

Each RL step:
  prompts (data/pipeline.py) -> repeat G times -> sample under the rollout backend with the rollout
  policy's parameters (k updates stale) (rollout/sampler.py) -> rewards (data/tasks.py) ->
  RolloutBatch -> the one compiled learner update (learner.py) -> metrics / checkpoint.

Determinism: every random draw is keyed by (seed, step), and the data iterators' states, the learner
and optimizer state and the stale rollout snapshots are all in the checkpoint, so a run stopped and
resumed continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import functools
import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trm_jax import checkpoint as ckpt_lib
from trm_jax import config as config_lib
from trm_jax import eval as eval_lib
from trm_jax import learner as learner_lib
from trm_jax import logprobs as lp
from trm_jax import metrics as metrics_lib
from trm_jax import policy as policy_lib
from trm_jax import sharding as sharding_lib
from trm_jax.data import pipeline
from trm_jax.models import Transformer
from trm_jax.rollout import sampler as sampler_lib
from trm_jax.rollout.backends import backend_from_config
from trm_jax.rollout.batch import RolloutBatch


def maybe_initialize_distributed(dist_cfg) -> None:
  """jax.distributed.initialize() for multi-host runs (TPU pods, SLURM) when configured."""
  if not dist_cfg.initialize:
    return
  kwargs = {}
  if dist_cfg.coordinator_address:
    kwargs["coordinator_address"] = dist_cfg.coordinator_address
  if dist_cfg.num_processes > 0:
    kwargs["num_processes"] = dist_cfg.num_processes
  if dist_cfg.process_id >= 0:
    kwargs["process_id"] = dist_cfg.process_id
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
  # A killed process is detected within heartbeat_timeout_s: the others then exit with an error, not hang.
  jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=int(dist_cfg.heartbeat_timeout_s),
                             initialization_timeout=int(dist_cfg.initialization_timeout_s))


class Setup:
  """Everything a run builds once: mesh, task, model definition, shardings, compiled functions."""

  def __init__(self, config, devices=None):
    self.config = config
    self.mesh = sharding_lib.make_mesh(config.mesh, devices)  # devices: a TPU topology's for trm_jax.plan
    # Task, tokenizer and network shape: synthetic, or text tasks / a Hugging Face checkpoint (policy.py).
    self.policy = policy_lib.build(config)
    self.task, self.tokenizer, self.model_cfg = self.policy.task, self.policy.tokenizer, self.policy.model_cfg
    need = self.task.prompt_len + self.task.response_len
    if self.model_cfg.max_len < need:
      raise ValueError(f"config.model.max_len ({self.model_cfg.max_len}) < prompt_len + horizon ({need}) "
                       f"of task {self.task.name!r}")
    self.backend = backend_from_config(config.rollout.backend)
    self.batch_size = config.rl.prompts_per_step * config.rl.group_size
    div = sharding_lib.batch_divisor(self.mesh)
    if self.batch_size % div:
      raise ValueError(f"config.rl.prompts_per_step * config.rl.group_size = {self.batch_size} must be a "
                       f"multiple of the mesh's data*fsdp = {div}")

    def init():
      with nnx.use_eager_sharding(False):
        return Transformer(self.model_cfg, rngs=nnx.Rngs(config.seed))

    # The graph and the parameters' shapes and logical axes, without allocating anything.
    self.model_def, abstract = learner_lib.split_model(nnx.eval_shape(init))
    self.param_shardings = sharding_lib.state_shardings(abstract, self.mesh)
    self.abstract_params = abstract  # ShapeDtypeStructs (trm_jax.plan compiles against them)
    # The state is created already sharded: each device materialises only its own shards.
    self._init_params = jax.jit(lambda: learner_lib.split_model(init())[1], out_shardings=self.param_shardings)
    if self.policy.hf_path:  # zero-RL: the checkpoint's weights, read straight into the shardings
      self._init_params = functools.partial(policy_lib.pretrained_params, self.policy, abstract, self.param_shardings)
    self.tx = learner_lib.make_optimizer(config.optim, config.rl.steps)
    self.sft_tx = optax.adam(config.warmstart.lr)

  def init_params(self):
    return self._init_params()


# ----------------------------------------------------------------------------- compiled pieces


def make_sampler(setup: Setup, *, numerics, kernel, temperature, top_p, top_k, return_logits=False, topk=0,
                 group_size=1):
  """group_size G: rows i*G..i*G+G-1 hold one prompt, prefilled once (sampler.sample)."""
  graphdef = setup.model_def.graphdef
  task = setup.task

  def run(params, prompt, prompt_mask, rng):
    return sampler_lib.sample(graphdef, params, prompt, prompt_mask, rng, max_new_tokens=task.response_len,
                              temperature=temperature, top_p=top_p, top_k=top_k,
                              eos_id=setup.policy.stop_ids, pad_id=setup.tokenizer.pad_id, numerics=numerics,
                              kernel=kernel, return_logits=return_logits, topk=topk, group_size=group_size)

  return run


def make_rollout_sampler(setup: Setup):
  """The jitted rollout sampler of an RL step: (params, prompt, prompt_mask, rng) -> SampleOutput."""
  cfg = setup.config
  run = make_sampler(
      setup, numerics=setup.backend.numerics, kernel=setup.backend.kernel, temperature=cfg.rollout.temperature,
      top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, return_logits=cfg.trm.source == "stored",
      topk=cfg.trm.topk if cfg.trm.source == "topk" else 0, group_size=cfg.rl.group_size)
  # Outputs stay sharded over the batch as the learner takes them (XLA alone returned them replicated).
  return jax.jit(lambda *args: sharding_lib.constrain_batch(run(*args), setup.mesh, setup.batch_size))


def make_sft_step(setup: Setup):
  """Warm start: maximise log pi(target | prompt) with the same chunked log-prob path as the learner."""
  model_def, tx, cfg = setup.model_def, setup.sft_tx, setup.config

  def loss_fn(params, batch):
    model = model_def.merge(params)
    h, _ = lp.response_hidden(model, batch["prompt"], batch["prompt_mask"], batch["target"],
                              batch["target_mask"], numerics=learner_lib.learner_numerics(cfg),
                              remat=cfg.learner.remat)
    chunk = lp.default_chunk(batch["target"].shape[1], cfg.learner.chunk_size)
    logp, _ = lp.token_logp(model, h, batch["target"], numerics=learner_lib.learner_numerics(cfg),
                            temperature=1.0, chunk=chunk, remat=cfg.learner.remat != "none")
    m = batch["target_mask"].astype(jnp.float32)
    return -(logp * m).sum() / jnp.maximum(m.sum(), 1.0)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    # A non-finite loss or gradient leaves params and optimizer state as they were (learner.guarded_update).
    (params, opt_state), guard = learner_lib.guarded_update(tx, params, opt_state, loss, grads)
    return params, opt_state, loss, guard["update/skipped"]

  return jax.jit(step, donate_argnums=(0, 1))


# ----------------------------------------------------------------------------- the run


@jax.jit
def _batch_summary(rewards, mask):
  """Scalars of a global (possibly multi-host) batch, reduced on device so every host can read them."""
  return {"reward_mean": rewards.mean(), "solved_frac": (rewards >= 1.0).mean(), "tokens": mask.sum(),
          "length_mean": mask.sum(-1).mean()}


def _scalars(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


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
  config_lib.validate(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ckpt_lib.RunError(f"workdir {workdir} is a file, not a directory: --workdir must be a directory "
                            "(it holds metrics.jsonl, checkpoints/ and curves.png)")
  maybe_initialize_distributed(config.distributed)
  os.makedirs(workdir, exist_ok=True)
  cfg = _with_data_dir(config)
  metrics_lib.quiet_dataset_logs()
  is_main = jax.process_index() == 0
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep)
  preempt.checkpointer = ckpt
  changes = _check_identity(cfg, ckpt, workdir, allow_config_change)
  finished = ckpt.latest_step() if cfg.checkpoint.resume else None
  if finished is not None and finished >= cfg.rl.steps:
    ckpt.close()
    return _already_complete(cfg, workdir, ckpt.directory, finished)
  if is_main:
    tb = f"; tensorboard --logdir {os.path.abspath(os.path.join(workdir, 'tb'))}" if cfg.log.tensorboard else ""
    print(f"[trm_jax] results go to {os.path.abspath(workdir)} (metrics.jsonl, checkpoints/, curves.png at the "
          f"end{tb})", flush=True)
  setup = Setup(cfg)
  task, mesh = setup.task, setup.mesh

  seed_key = jax.random.PRNGKey(cfg.seed)
  # Global batches, the same examples on any process count; each process reads only its rows.
  prompt_rows, expand = sharding_lib.host_group_rows(mesh, cfg.rl.prompts_per_step, cfg.rl.group_size)
  rl_iter = pipeline.make_iterator(cfg.data, "train", batch_size=cfg.rl.prompts_per_step, seed=cfg.seed,
                                   rows=prompt_rows)
  ws_iter = pipeline.make_iterator(cfg.data, "train", batch_size=cfg.warmstart.batch_size, seed=cfg.seed + 1,
                                   rows=sharding_lib.host_rows(mesh, cfg.warmstart.batch_size))

  k = setup.backend.staleness_k
  params = setup.init_params()
  opt_state = sharding_lib.init_sharded(setup.tx.init, params, mesh)
  state = learner_lib.TrainState(params=params, opt_state=opt_state, step=_zero_step(mesh))
  history = _snapshots(params, k)  # rollout snapshots, oldest first: the rollout uses history[0]

  start = 0
  found = None
  if cfg.checkpoint.resume:  # the newest step that restores and holds finite values (older ones as fallback)
    found = ckpt.restore_newest_good(ckpt_lib.abstract_like({"state": state, "history": tuple(history)}),
                                     check=_check_finite)
  latest = None if found is None else found[0]
  if found is not None:
    _, restored, meta = found
    state, history = restored["state"], list(restored["history"])
    rl_iter.set_state(meta["rl_iter"])
    ws_iter.set_state(meta["ws_iter"])
    start = int(latest)
    if is_main:
      print(f"[trm_jax] resumed from {ckpt.directory} at step {start}", flush=True)
  else:
    state, history = _warmstart(setup, state, history, ws_iter, workdir, preempt)
    if state is None:
      ckpt.close()
      return _stopped(workdir, ckpt.directory, preempt.received, None)
  if is_main:
    ckpt_lib.record_config(workdir, cfg.to_json_best_effort(indent=2), event="resume" if found else "start",
                           step=start, changes=changes)
  # Rows (and TensorBoard events) after the restored step are about to be redone: drop them first.
  writer = metrics_lib.MetricWriter(workdir, tensorboard=cfg.log.tensorboard,
                                    keep_through=start if found is not None else -1)

  def save(step):
    tree = {"state": state, "history": tuple(history)}
    _check_finite(tree, f"refusing to write checkpoint {step}")  # never rotate a good step out for a NaN one
    meta = {"rl_iter": rl_iter.get_state(), "ws_iter": ws_iter.get_state(), "config": cfg.to_dict()}
    ckpt.save(step, tree, json.loads(json.dumps(meta, default=str)))

  learner_step = learner_lib.make_learner_step(
      cfg, setup.model_def, setup.tx, setup.backend, mesh, setup.param_shardings,
      jax.tree.map(lambda x: x.sharding, state.opt_state), stale=k > 0)
  rollout_sample = make_rollout_sampler(setup)
  reward_fn = policy_lib.reward_fn(setup.policy, mesh)  # on device (synthetic) or decoded text on the host
  evaluate = _finite_or_nan(_make_evaluator(setup))

  if latest is None and evaluate is not None and cfg.eval.at_start:
    # Step 0: the warm-started policy, so every curve starts from a common measured point.
    writer.write(0, evaluate(state.params, jax.random.fold_in(seed_key, 10_000_000 - 1)))
  if latest is None:
    save(0)  # after the step-0 row: a run that has checkpoint 0 always has its warm-start evaluation
  skips, stopped = 0, None
  bar = metrics_lib.progress(cfg.rl.steps, start, cfg.log.progress, "RL")
  last = {}
  warned_all_rejected = False
  for step in range(start, cfg.rl.steps):
    t0 = time.perf_counter()
    prompts = {key: v[expand] for key, v in next(rl_iter).items()}  # each prompt x G (this process's rows)
    prompts = sharding_lib.shard_batch(prompts, mesh)
    rollout_params = history[0] if k > 0 else state.params
    out = rollout_sample(rollout_params, prompts["prompt"], prompts["prompt_mask"],
                         jax.random.fold_in(seed_key, step))
    rewards, reward_metrics = reward_fn(out, prompts)
    batch = RolloutBatch(prompt=prompts["prompt"], prompt_mask=prompts["prompt_mask"], response=out.tokens,
                         response_mask=out.mask, rollout_logp=out.logp, rewards=rewards,
                         rollout_logits=out.logits, rollout_topk_logp=out.topk_logp,
                         rollout_topk_ids=out.topk_ids, group_size=cfg.rl.group_size)
    jax.block_until_ready(batch)
    t1 = time.perf_counter()
    if k > 0:
      snapshot = jax.tree.map(jnp.copy, state.params)  # the learner's state is donated below
      state, m = learner_step(state, batch, rollout_params)
      history = history[1:] + [snapshot] if k > 1 else [snapshot]
    else:
      state, m = learner_step(state, batch)
    m = _scalars(m)
    t2 = time.perf_counter()
    s = _scalars(_batch_summary(rewards, out.mask))
    m.update({"reward/mean": s["reward_mean"], "response_length/mean": s["length_mean"],
              "tokens_per_sec": s["tokens"] / (t2 - t0), "time/rollout_s": t1 - t0, "time/learner_s": t2 - t1})
    m.update(reward_metrics, **{"response/clip_frac": float(sampler_lib.clip_frac(out))})
    done = step + 1  # steps are counted from 1 in metrics.jsonl, checkpoints and messages
    if m["trm/accept_rate"] == 0.0 and not warned_all_rejected:
      warnings.warn(f"step {done}: every sequence was rejected, so the update was zero (not fatal; "
                    f"trm/accept_rate is logged every step, and this warning is shown once)")
      warned_all_rejected = True
    if cfg.eval.every and (done % cfg.eval.every == 0 or done == cfg.rl.steps):
      m.update(evaluate(state.params, jax.random.fold_in(seed_key, 10_000_000 + step)))
    writer.write(done, m)
    last = m
    skips = skips + 1 if m.get("update/skipped", 0.0) > 0 else 0
    if skips >= cfg.checkpoint.max_consecutive_skips or m.get("update/nonfinite_policy", 0.0) > 0:
      writer.flush()
      ckpt.close()
      raise ckpt_lib.RunError(_nonfinite_message(done, skips, m, ckpt.latest_step(), ckpt.directory))
    bar.set_postfix({"reward": f"{m['reward/mean']:.3f}", "accept": f"{m['trm/accept_rate']:.2f}",
                     "kl_max": f"{m['mismatch/kl_max']:.2e}"})
    bar.update(1)
    saved = (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.rl.steps
    if saved:
      save(done)
    if preempt.should_stop(done):  # every host agrees on the step (checkpoint.Preemption)
      if not saved:
        save(done)
      stopped = done
      break
  bar.close()
  ckpt.close()
  writer.close()
  summary = {"workdir": os.path.abspath(workdir), "metrics": writer.path,
             "checkpoints": ckpt.directory, "final": last}
  if is_main and cfg.log.plot and os.path.exists(writer.path):
    summary["curves"] = metrics_lib.plot_curves(metrics_lib.read_jsonl(writer.path),
                                                os.path.join(workdir, "curves.png"), title=curve_title(cfg, task),
                                                thresholds={"delta": cfg.trm.delta, "delta_avg": cfg.trm.delta_avg})
  if stopped is not None:
    info = _stopped(workdir, ckpt.directory, preempt.received, stopped)
    summary.update(preempted=info["preempted"], stopped_at=info["stopped_at"])
  return summary


DATA_CACHE = os.path.join("~", ".cache", "trm_jax", "datasets")


def _with_data_dir(config):
  """data.data_dir = "" means the trm_jax dataset cache: $TRM_JAX_DATA_DIR, else ~/.cache/trm_jax/datasets
  (generated datasets, seconds to rebuild). The resolved path is what config.json records."""
  if config.data.data_dir:
    return config
  path = os.path.expanduser(os.environ.get("TRM_JAX_DATA_DIR") or DATA_CACHE)
  return config_lib.with_overrides(config, {"data.data_dir": path})


def curve_title(cfg, task) -> str:
  """The run's key settings, for the title of curves.png."""
  b = cfg.rollout.backend
  return (f"{task.name} T={task.response_len} | model={cfg.model.size} | trm={cfg.trm.criterion} "
          f"delta={cfg.trm.delta:g} delta_avg={cfg.trm.delta_avg:g} div={cfg.trm.divergence} src={cfg.trm.source} | "
          f"rollout={b.precision}/{b.attention} k={b.staleness_k} | {cfg.rl.advantage} G={cfg.rl.group_size} "
          f"prompts={cfg.rl.prompts_per_step} lr={cfg.optim.lr:g} | seed={cfg.seed}")


def _check_identity(cfg, ckpt, workdir: str, allow: tuple) -> dict:
  """The checkpointed config is the run's identity: compare it with `cfg` before restoring anything.
  Returns the (allowed) changes; raises RunError naming each field that may not change."""
  if not cfg.checkpoint.resume:
    return {}
  for step in reversed(ckpt.all_steps()):
    try:
      old = ckpt.restore_meta(step).get("config")
    except Exception:  # noqa: BLE001 (a damaged step: restore_newest_good reports it)
      continue
    if old is not None:
      return ckpt_lib.check_resume_config(old, cfg.to_dict(), allow, config_lib.default_config().to_dict(),
                                          where=os.path.abspath(workdir))
  return {}


def _already_complete(cfg, workdir: str, ckpt_dir: str, step: int) -> dict:
  workdir = os.path.abspath(workdir)
  out = {"workdir": workdir, "metrics": os.path.join(workdir, "metrics.jsonl"), "checkpoints": ckpt_dir,
         "final": {}, "complete": step}
  if os.path.exists(os.path.join(workdir, "curves.png")):
    out["curves"] = os.path.join(workdir, "curves.png")
  if jax.process_index() == 0:
    print(f"[trm_jax] {workdir} is already complete: checkpoint at step {step} of rl.steps = {cfg.rl.steps}; "
          f"results: {out['metrics']}" + (f", {out['curves']}" if "curves" in out else "") +
          " (raise --config.rl.steps to continue it, or use a new --workdir)", flush=True)
  return out


def _stopped(workdir: str, ckpt_dir: str, signal_name, step) -> dict:
  if jax.process_index() == 0:
    where = (f"after step {step}; checkpoint {step} saved in {ckpt_dir}" if step is not None
             else "during the warm start; nothing saved (a restart redoes the warm start)")
    print(f"[trm_jax] {signal_name} received: stopped {where}. Run the same command to resume.", flush=True)
  return {"workdir": os.path.abspath(workdir), "checkpoints": ckpt_dir, "preempted": signal_name,
          "stopped_at": step, "metrics": os.path.join(os.path.abspath(workdir), "metrics.jsonl"),
          "final": {}}


def _finite_or_nan(evaluate):
  """An evaluator whose numbers are NaN when the policy's parameters are not finite: a broken policy's
  empty responses would otherwise score like a real one."""
  if evaluate is None:
    return None

  def run(params, rng):
    out = evaluate(params, rng)
    return out if bool(_all_finite(params)) else {k: float("nan") for k in out}

  return run


@jax.jit
def _all_finite(tree):
  return learner_lib.all_finite(tree)


def _check_finite(tree, what: str = "restored state") -> None:
  """Raises RunError naming the non-finite arrays of `tree` (a checkpoint never holds NaN / inf)."""
  if bool(_all_finite(tree)):
    return
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  bad = [jax.tree_util.keystr(p) for p, x in flat if not bool(jnp.all(jnp.isfinite(x)))]
  raise ckpt_lib.RunError(f"{what}: non-finite values in {len(bad)} arrays, e.g. {', '.join(bad[:3])}")


def _nonfinite_message(step, skips, m, last_ckpt, ckpt_dir) -> str:
  what = [name for key, name in (("update/nonfinite_loss", f"loss = {m.get('loss')}"),
                                 ("update/nonfinite_grad", f"gradient (grad_norm = {m.get('grad_norm')})"),
                                 ("update/nonfinite_update", "parameter update (check optim.lr)"),
                                 ("update/nonfinite_policy", "learner or rollout parameters")) if m.get(key, 0.0) > 0]
  return (f"step {step}: {skips} consecutive updates skipped, non-finite {' and '.join(what) or 'values'}; stopping "
          f"(parameters are unchanged since the last good update; last checkpoint: step {last_ckpt} in {ckpt_dir}). "
          f"Lower optim.lr / warmstart.lr or raise checkpoint.max_consecutive_skips")


def _warmstart(setup: Setup, state, history, ws_iter, workdir, preempt=None):
  """Supervised warm start on correct solutions so RL starts from a non-zero, improvable reward.

  Non-finite steps are skipped (the guarded update) and counted; max_consecutive_skips of them stop the
  run. Returns (None, None) when a stop signal arrived (nothing is saved mid warm start)."""
  cfg = setup.config
  if cfg.warmstart.steps == 0:
    return state, history
  sft_step = make_sft_step(setup)
  params = state.params
  opt_state = sharding_lib.init_sharded(setup.sft_tx.init, params, setup.mesh)
  bar = metrics_lib.progress(cfg.warmstart.steps, 0, cfg.log.progress, "warm start")
  log = metrics_lib.MetricWriter(os.path.join(workdir, "warmstart"), tensorboard=False, keep_through=-1)
  skips = jnp.zeros((), jnp.int32)  # consecutive skipped steps, on device (read on the logging cadence)
  for i in range(cfg.warmstart.steps):
    b = sharding_lib.shard_batch(next(ws_iter), setup.mesh)
    params, opt_state, loss, skipped = sft_step(params, opt_state, b)
    skips = jnp.where(skipped > 0, skips + 1, 0)
    if (i + 1) % 10 == 0 or i + 1 == cfg.warmstart.steps or i + 1 == cfg.checkpoint.max_consecutive_skips:
      if int(skips) >= cfg.checkpoint.max_consecutive_skips:
        log.close()
        raise ckpt_lib.RunError(f"warm start step {i + 1}: {int(skips)} consecutive updates skipped, non-finite "
                                f"loss ({float(loss)}) or gradient; stopping (lower warmstart.lr)")
    if preempt is not None and preempt.should_stop(i + 1):
      bar.close()
      log.close()
      return None, None
    if (i + 1) % 10 == 0 or i + 1 == cfg.warmstart.steps:
      loss = float(loss)
      log.write(i + 1, {"warmstart/loss": loss})
      bar.set_postfix({"loss": f"{loss:.3f}"})
    bar.update(1)
  bar.close()
  log.close()
  # The RL optimizer starts fresh on the warm-started parameters.
  state = learner_lib.TrainState(params=params, opt_state=sharding_lib.init_sharded(setup.tx.init, params, setup.mesh),
                                 step=_zero_step(setup.mesh))
  return state, _snapshots(params, len(history))


def _zero_step(mesh):
  """The step counter placed as the jitted update returns it (replicated), so call 2 hits call 1's program."""
  return jax.device_put(jnp.zeros((), jnp.int32), sharding_lib.replicated(mesh))


def _snapshots(params, k: int) -> list:
  """k rollout snapshots of `params`: ONE copy shared by all k (they are never donated), never the
  learner's own buffers, which the learner step donates."""
  if k == 0:
    return []
  copy = jax.tree.map(jnp.copy, params)
  return [copy] * k


def _make_evaluator(setup: Setup):
  """avg@k / pass@k on the eval sets with the eval's own sampling settings (trm_jax/eval.py)."""
  cfg = setup.config
  if not cfg.eval.every:
    return None
  numerics = setup.backend.numerics if cfg.eval.rollout_numerics else learner_lib.learner_numerics(cfg)
  return eval_lib.make_evaluator(cfg, mesh=setup.mesh, graphdef=setup.model_def.graphdef,
                                 tokenizer=setup.tokenizer, numerics=numerics)
