"""Where RL starts from: the supervised warm start, or the parameters of another run (`warmstart.init_from`).

The warm start maximises log pi(target | prompt) on correct solutions (synthetic tasks) so RL starts from
a non-zero, improvable reward; it uses the learner's chunked log-prob path and the guarded update.
`warmstart.init_from` = a workdir: its newest checkpoint's learner parameters are the starting point
instead, so runs that share a warm start (same seed, model, data, warmstart, optim) pay for it once.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from trm_jax import learner as learner_lib
from trm_jax import logprobs as lp
from trm_jax import metrics as metrics_lib
from trm_jax import sharding as sharding_lib
from trm_jax.checkpoint import RunError


def make_sft_step(run):
  """(params, opt_state, batch) -> (params, opt_state, loss, skipped): one supervised step, jitted."""
  model_def, tx, cfg = run.model_def, run.sft_tx, run.config
  numerics = learner_lib.learner_numerics(cfg)

  def loss_fn(params, batch):
    model = model_def.merge(params)
    h, _ = lp.response_hidden(model, batch["prompt"], batch["prompt_mask"], batch["target"],
                              batch["target_mask"], numerics=numerics, remat=cfg.learner.remat)
    T, V = batch["target"].shape[1], model.cfg.vocab_size
    chunk = lp.default_chunk(T, cfg.learner.chunk_size, rows=h.shape[0], vocab=V)
    logp, _ = lp.token_logp(model, h, batch["target"], numerics=numerics, temperature=1.0, chunk=chunk,
                            remat=learner_lib.chunk_remat(cfg, h.shape[0], T, V))
    m = batch["target_mask"].astype(jnp.float32)
    return -(logp * m).sum() / jnp.maximum(m.sum(), 1.0)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    # A non-finite loss or gradient leaves params and optimizer state as they were (learner.guarded_update).
    (params, opt_state), guard = learner_lib.guarded_update(tx, params, opt_state, loss, grads)
    return params, opt_state, loss, guard["update/skipped"]

  return jax.jit(step, donate_argnums=(0, 1))


def supervised(run, params, ws_iter, workdir: str, preempt=None):
  """`warmstart.steps` supervised steps from `params`; returns the new params, or None when a stop signal
  arrived (nothing is saved mid warm start). checkpoint.max_consecutive_skips non-finite steps in a row
  stop the run (RunError)."""
  cfg = run.config
  steps, max_skips = cfg.warmstart.steps, cfg.checkpoint.max_consecutive_skips
  sft_step = make_sft_step(run)
  opt_state = sharding_lib.init_sharded(run.sft_tx.init, params, run.mesh)
  bar = metrics_lib.progress(steps, 0, cfg.log.progress, "warm start")
  log = metrics_lib.MetricWriter(os.path.join(workdir, "warmstart"), tensorboard=False, keep_through=-1)
  skips = jnp.zeros((), jnp.int32)  # consecutive skipped steps, on device (read on the logging cadence)
  try:
    for i in range(1, steps + 1):
      params, opt_state, loss, skipped = sft_step(params, opt_state, sharding_lib.shard_batch(next(ws_iter), run.mesh))
      skips = jnp.where(skipped > 0, skips + 1, 0)
      logged = i % 10 == 0 or i == steps
      if (logged or i == max_skips) and int(skips) >= max_skips:
        raise RunError(f"warm start step {i}: {int(skips)} consecutive updates skipped, non-finite "
                       f"loss ({float(loss)}) or gradient; stopping (lower warmstart.lr)")
      if preempt is not None and preempt.should_stop(i):
        return None
      if logged:
        log.write(i, {"warmstart/loss": float(loss)})
        bar.set_postfix({"loss": f"{float(loss):.3f}"})
      bar.update(1)
  finally:
    bar.close()
    log.close()
  return params


def params_from(run, workdir: str):
  """The learner parameters of `workdir`'s newest checkpoint, in the run's shardings (a partial restore:
  the source run's optimizer state and rollout snapshots are not read)."""
  root = os.path.abspath(os.path.join(workdir, "checkpoints"))
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
  if not steps:
    raise RunError(f"warmstart.init_from={workdir!r}: no checkpoint under {root} (run it first, e.g. with "
                   f"rl.steps=0, which saves checkpoint 0 right after the warm start)")
  sds = lambda v, s: v.replace(value=jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s))
  abstract = jax.tree.map(sds, run.abstract_params, run.param_shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  target = {"state": {"params": abstract}}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  path = os.path.join(root, str(steps[-1]), "state")
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      return ckptr.restore(path, args=args)["state"]["params"]
  except Exception as e:  # noqa: BLE001 (any failure: say which checkpoint and why, in one line)
    raise RunError(f"warmstart.init_from: cannot read the parameters of {path}: "
                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
