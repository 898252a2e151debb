"""What a run builds once, for the trainer, the evaluator and the TPU plan alike.

`Run(config)`: the mesh, the task (built once from `data`, honouring data.size / data.min_size), its
tokenizer, the network's shape (a `model` preset, or `model.hf_path`'s config.json), the model
definition with its parameter shardings, the rollout backend and the optimizers. `rollout_engine(run)`
is the training rollout (rollout/engine.py), `iterators(run)` the prompt and warm-start streams.

- Synthetic tasks: the character tokenizer, random init (then the supervised warm start).
- Text tasks (DAPO-Math, AIME): the checkpoint's tokenizer (`data.text.tokenizer_path`), prompts from
  local files, rewards on the decoded responses (host side).
- `model.hf_path`: the checkpoint's weights replace the random init, read directly into the run's
  shardings (each process reads only its slices): zero-RL from a base model, as the paper does.
"""
from __future__ import annotations

import functools
import os

import jax
import optax
from flax import nnx

from trm_jax import config as config_lib
from trm_jax import learner as learner_lib
from trm_jax import sharding as sharding_lib
from trm_jax.data import pipeline, tasks
from trm_jax.models import Transformer, hf, model_config_from
from trm_jax.rollout import engine as engine_lib
from trm_jax.rollout.backends import backend_from_config

DATA_CACHE = os.path.join("~", ".cache", "trm_jax", "datasets")


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


def with_data_dir(config):
  """data.data_dir = "" means the trm_jax dataset cache: $TRM_JAX_DATA_DIR, else ~/.cache/trm_jax/datasets
  (generated datasets, seconds to rebuild). The resolved path is what config.json records."""
  if config.data.data_dir:
    return config
  path = os.path.expanduser(os.environ.get("TRM_JAX_DATA_DIR") or DATA_CACHE)
  return config_lib.with_overrides(config, {"data.data_dir": path})


def model_config(config, tokenizer):
  """The network's shape: `model.hf_path`'s config.json, else the `model` preset for this vocabulary."""
  hf_path = config.model.hf_path
  if not hf_path:
    return model_config_from(config.model, tokenizer.vocab_size)
  model_cfg = hf.model_config_from_hf(hf_path, dtype=config.model.param_dtype, max_len=config.model.max_len or None,
                                      scan_layers=config.model.scan_layers)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) exceeds the vocab_size "
                     f"({model_cfg.vocab_size}) of model.hf_path={hf_path!r}")
  return model_cfg


class Run:
  """Everything a run builds once: mesh, task, tokenizer, model definition, shardings, optimizers."""

  def __init__(self, config, devices=None):
    self.config = config
    self.mesh = sharding_lib.make_mesh(config.mesh, devices)  # devices: a TPU topology's for trm_jax.plan
    self.task = tasks.task_from_config(config.data)  # built once; scores itself
    self.tokenizer = self.task.tokenizer
    self.stop_ids = engine_lib.stop_ids(self.tokenizer)
    self.model_cfg = model_config(config, self.tokenizer)
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
    self.model_def, self.abstract_params = learner_lib.split_model(nnx.eval_shape(init))
    self.param_shardings = sharding_lib.state_shardings(self.abstract_params, self.mesh)
    # The state is created already sharded: each device materialises only its own shards.
    self._init_params = jax.jit(lambda: learner_lib.split_model(init())[1], out_shardings=self.param_shardings)
    if config.model.hf_path:  # zero-RL: the checkpoint's weights, read straight into the shardings
      self._init_params = functools.partial(hf.load_params, config.model.hf_path, self.model_cfg,
                                            self.abstract_params, self.param_shardings)
    self.tx = learner_lib.make_optimizer(config.optim, config.rl.steps)
    self.sft_tx = optax.adam(config.warmstart.lr)

  def init_params(self):
    return self._init_params()


def rollout_engine(run: Run) -> engine_lib.RolloutEngine:
  """The RL step's rollout: the rollout backend's numerics and kernel, the `rollout` sampling settings."""
  cfg = run.config
  settings = engine_lib.SamplingSettings(
      max_new_tokens=run.task.response_len, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
      top_k=cfg.rollout.top_k, numerics=run.backend.numerics, kernel=run.backend.kernel,
      group_size=cfg.rl.group_size, return_logits=cfg.trm.source == "stored",
      topk=cfg.trm.topk if cfg.trm.source == "topk" else 0, microbatches=cfg.rollout.microbatches,
      slots=engine_lib.resolve_slots(cfg.rollout.slots, run.batch_size // cfg.rollout.microbatches,
                                     sharding_lib.batch_divisor(run.mesh)))
  return engine_lib.RolloutEngine(run.model_def.graphdef, settings, stop_ids=run.stop_ids,
                                  pad_id=run.tokenizer.pad_id, mesh=run.mesh, batch_size=run.batch_size)


def iterators(run: Run):
  """(rl_iter, ws_iter, expand): global prompt batches (this process's rows; `expand` repeats each prompt
  G times) and warm-start batches, the same examples on any process count."""
  cfg = run.config
  prompt_rows, expand = sharding_lib.host_group_rows(run.mesh, cfg.rl.prompts_per_step, cfg.rl.group_size)
  rl_iter = pipeline.make_iterator(cfg.data, "train", batch_size=cfg.rl.prompts_per_step, seed=cfg.seed,
                                   rows=prompt_rows)
  ws_iter = pipeline.warmstart_iterator(cfg.data, "train", batch_size=cfg.warmstart.batch_size, seed=cfg.seed + 1,
                                        rows=sharding_lib.host_rows(run.mesh, cfg.warmstart.batch_size))
  return rl_iter, ws_iter, expand
