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

import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trm_jax import checkpoint as ckpt_lib
from trm_jax import config as config_lib
from trm_jax import learner as learner_lib
from trm_jax import logprobs as lp
from trm_jax import metrics as metrics_lib
from trm_jax import sharding as sharding_lib
from trm_jax.data import pipeline, tasks
from trm_jax.data.tokenizer import Tokenizer
from trm_jax.models import Transformer, model_config_from
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
  jax.distributed.initialize(**kwargs)


class Setup:
  """Everything a run builds once: mesh, task, model definition, shardings, compiled functions."""

  def __init__(self, config):
    self.config = config
    self.mesh = sharding_lib.make_mesh(config.mesh)
    self.task = tasks.get_task(config.data.task, config.data.horizon)
    self.tokenizer = Tokenizer()
    self.model_cfg = model_config_from(config.model, self.tokenizer.vocab_size)
    need = self.task.prompt_len + self.task.response_len
    if self.model_cfg.max_len < need:
      raise ValueError(f"config.model.max_len ({self.model_cfg.max_len}) < prompt_len + horizon ({need}) "
                       f"of task {self.task.name!r}")
    self.backend = backend_from_config(config.rollout.backend)
    self.batch_size = config.rl.prompts_per_step * config.rl.group_size
    div = sharding_lib.batch_divisor(self.mesh)
    if self.batch_size % div or config.rl.prompts_per_step % jax.process_count():
      raise ValueError(f"config.rl.prompts_per_step * config.rl.group_size = {self.batch_size} must be a "
                       f"multiple of the mesh's data*fsdp = {div} (and prompts of the process count)")

    def init():
      with nnx.use_eager_sharding(False):
        return Transformer(self.model_cfg, rngs=nnx.Rngs(config.seed))

    # The graph and the parameters' shapes and logical axes, without allocating anything.
    self.model_def, abstract = learner_lib.split_model(nnx.eval_shape(init))
    self.param_shardings = sharding_lib.state_shardings(abstract, self.mesh)
    # The state is created already sharded: each device materialises only its own shards.
    self._init_params = jax.jit(lambda: learner_lib.split_model(init())[1], out_shardings=self.param_shardings)
    self.tx = learner_lib.make_optimizer(config.optim, config.rl.steps)
    self.sft_tx = optax.adam(config.warmstart.lr)

  def init_params(self):
    return self._init_params()


# ----------------------------------------------------------------------------- compiled pieces


def make_sampler(setup: Setup, *, numerics, kernel, temperature, top_p, top_k, return_logits=False, topk=0):
  graphdef = setup.model_def.graphdef
  task = setup.task

  def run(params, prompt, prompt_mask, rng):
    return sampler_lib.sample(graphdef, params, prompt, prompt_mask, rng, max_new_tokens=task.response_len,
                              temperature=temperature, top_p=top_p, top_k=top_k,
                              eos_id=setup.tokenizer.eos_id, numerics=numerics, kernel=kernel,
                              return_logits=return_logits, topk=topk)

  return run


def make_sft_step(setup: Setup):
  """Warm start: maximise log pi(target | prompt) with the same chunked log-prob path as the learner."""
  model_def, tx, cfg = setup.model_def, setup.sft_tx, setup.config

  def loss_fn(params, batch):
    model = model_def.merge(params)
    h, _ = lp.response_hidden(model, batch["prompt"], batch["prompt_mask"], batch["target"],
                              batch["target_mask"], numerics=learner_lib.learner_numerics(cfg))
    chunk = lp.default_chunk(batch["target"].shape[1], cfg.learner.chunk_size)
    logp, _ = lp.token_logp(model, h, batch["target"], numerics=learner_lib.learner_numerics(cfg),
                            temperature=1.0, chunk=chunk, remat=cfg.learner.remat)
    m = batch["target_mask"].astype(jnp.float32)
    return -(logp * m).sum() / jnp.maximum(m.sum(), 1.0)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


# ----------------------------------------------------------------------------- the run


@jax.jit
def _batch_summary(rewards, mask):
  """Scalars of a global (possibly multi-host) batch, reduced on device so every host can read them."""
  return {"reward_mean": rewards.mean(), "solved_frac": (rewards >= 1.0).mean(), "tokens": mask.sum(),
          "length_mean": mask.sum(-1).mean()}


def _scalars(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def _repeat(batch: dict, g: int) -> dict:
  return {k: np.repeat(v, g, axis=0) for k, v in batch.items()}


def train(config, workdir: str) -> dict:
  """Runs (or resumes) the experiment described by `config` in `workdir`; returns a summary dict."""
  config_lib.validate(config)
  maybe_initialize_distributed(config.distributed)
  os.makedirs(workdir, exist_ok=True)
  setup = Setup(config)
  cfg, task, mesh = config, setup.task, setup.mesh
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))

  seed_key = jax.random.PRNGKey(cfg.seed)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=cfg.log.tensorboard)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep)
  per_host = cfg.rl.prompts_per_step // jax.process_count()
  rl_iter = pipeline.make_iterator(cfg.data, "train", batch_size=per_host, seed=cfg.seed)
  ws_iter = pipeline.make_iterator(cfg.data, "train", batch_size=cfg.warmstart.batch_size // jax.process_count(),
                                   seed=cfg.seed + 1)

  k = setup.backend.staleness_k
  params = setup.init_params()
  opt_state = sharding_lib.init_sharded(setup.tx.init, params, mesh)
  state = learner_lib.TrainState(params=params, opt_state=opt_state, step=_zero_step(mesh))
  history = _snapshots(params, k)  # rollout snapshots, oldest first: the rollout uses history[0]

  start = 0
  latest = ckpt.latest_step() if cfg.checkpoint.resume else None
  if latest is not None:
    tree = {"state": state, "history": tuple(history)}
    restored, meta = ckpt.restore(latest, ckpt_lib.abstract_like(tree))
    state, history = restored["state"], list(restored["history"])
    rl_iter.set_state(meta["rl_iter"])
    ws_iter.set_state(meta["ws_iter"])
    start = int(latest)
    print(f"[trm_jax] resumed from {ckpt.directory} at step {start}", flush=True)
  else:
    state, history = _warmstart(setup, state, history, ws_iter, workdir)

  def save(step):
    meta = {"rl_iter": rl_iter.get_state(), "ws_iter": ws_iter.get_state(), "config": cfg.to_dict()}
    ckpt.save(step, {"state": state, "history": tuple(history)}, json.loads(json.dumps(meta, default=str)))

  if latest is None:
    save(0)

  learner_step = learner_lib.make_learner_step(
      cfg, setup.model_def, setup.tx, setup.backend, mesh, setup.param_shardings,
      jax.tree.map(lambda x: x.sharding, state.opt_state), stale=k > 0)
  rollout_sample = jax.jit(make_sampler(
      setup, numerics=setup.backend.numerics, kernel=setup.backend.kernel, temperature=cfg.rollout.temperature,
      top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, return_logits=cfg.trm.source == "stored",
      topk=cfg.trm.topk if cfg.trm.source == "topk" else 0))
  reward_fn = jax.jit(task.reward)
  evaluate = _make_evaluator(setup)

  if latest is None and evaluate is not None and cfg.eval.at_start:
    # Step 0: the warm-started policy, so every curve starts from a common measured point.
    writer.write(0, evaluate(state.params, jax.random.fold_in(seed_key, 10_000_000 - 1)))
  bar = metrics_lib.progress(cfg.rl.steps, start, cfg.log.progress, "RL")
  last = {}
  warned_all_rejected = False
  for step in range(start, cfg.rl.steps):
    t0 = time.perf_counter()
    prompts = _repeat(next(rl_iter), cfg.rl.group_size)
    prompts = sharding_lib.shard_batch(prompts, mesh)
    rollout_params = history[0] if k > 0 else state.params
    out = rollout_sample(rollout_params, prompts["prompt"], prompts["prompt_mask"],
                         jax.random.fold_in(seed_key, step))
    rewards = reward_fn(out.tokens, out.mask, prompts["answer"], prompts["answer_mask"])
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
    done = step + 1  # steps are counted from 1 in metrics.jsonl, checkpoints and messages
    if m["trm/accept_rate"] == 0.0 and not warned_all_rejected:
      warnings.warn(f"step {done}: every sequence was rejected, so the update was zero (not fatal; "
                    f"trm/accept_rate is logged every step, and this warning is shown once)")
      warned_all_rejected = True
    if cfg.eval.every and (done % cfg.eval.every == 0 or done == cfg.rl.steps):
      m.update(evaluate(state.params, jax.random.fold_in(seed_key, 10_000_000 + step)))
    writer.write(done, m)
    last = m
    bar.set_postfix({"reward": f"{m['reward/mean']:.3f}", "accept": f"{m['trm/accept_rate']:.2f}",
                     "kl_max": f"{m['mismatch/kl_max']:.2e}"})
    bar.update(1)
    if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.rl.steps:
      save(done)
  bar.close()
  ckpt.close()
  writer.close()
  summary = {"workdir": os.path.abspath(workdir), "metrics": writer.path,
             "checkpoints": ckpt.directory, "final": last}
  if is_main and cfg.log.plot and os.path.exists(writer.path):
    summary["curves"] = metrics_lib.plot_curves(metrics_lib.read_jsonl(writer.path),
                                                os.path.join(workdir, "curves.png"),
                                                title=f"{task.name} T={task.response_len} trm={cfg.trm.criterion}")
  return summary


def _warmstart(setup: Setup, state, history, ws_iter, workdir):
  """Supervised warm start on correct solutions so RL starts from a non-zero, improvable reward."""
  cfg = setup.config
  if cfg.warmstart.steps == 0:
    return state, history
  sft_step = make_sft_step(setup)
  params = state.params
  opt_state = sharding_lib.init_sharded(setup.sft_tx.init, params, setup.mesh)
  bar = metrics_lib.progress(cfg.warmstart.steps, 0, cfg.log.progress, "warm start")
  log = metrics_lib.MetricWriter(os.path.join(workdir, "warmstart"), tensorboard=False)
  for i in range(cfg.warmstart.steps):
    b = sharding_lib.shard_batch(next(ws_iter), setup.mesh)
    params, opt_state, loss = sft_step(params, opt_state, b)
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
  """Reward of the current learner on a fixed held-out batch (validation split)."""
  cfg = setup.config
  if not cfg.eval.every:
    return None
  n = max(cfg.eval.num_prompts // jax.process_count(), 1)
  n -= n % max(sharding_lib.batch_divisor(setup.mesh) // jax.process_count(), 1) or 0
  n = max(n, sharding_lib.batch_divisor(setup.mesh))
  it = pipeline.make_iterator(cfg.data, "validation", batch_size=n, seed=cfg.seed, shuffle=False)
  batch = sharding_lib.shard_batch(next(it), setup.mesh)
  sample = jax.jit(make_sampler(setup, numerics=learner_lib.learner_numerics(cfg), kernel="cached",
                                temperature=cfg.eval.temperature, top_p=1.0, top_k=0))
  reward_fn = jax.jit(setup.task.reward)

  def evaluate(params, rng):
    out = sample(params, batch["prompt"], batch["prompt_mask"], rng)
    r = reward_fn(out.tokens, out.mask, batch["answer"], batch["answer_mask"])
    s = _scalars(_batch_summary(r, out.mask))
    return {"eval/reward_mean": s["reward_mean"], "eval/solved_frac": s["solved_frac"],
            "eval/response_length_mean": s["length_mean"]}

  return evaluate
