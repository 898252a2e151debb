"""The learner: ONE jitted, sharded update per rollout batch.

    learner forward (pre-update params, no grad)     -> learner log-probs, entropy          logprobs.py
    rollout side: sampled | stored | topk | recompute -> exact divergences per position     divergence.py
    sampled-token estimators k1 k2 k3 |log rho| tv    (always, next to the exact values)   divergence.py
    certificate: delta, eps, kl_seq, tv_seq, dbar     -> every bound, B*, L' - B*           bounds.py
    mask / weights (TRM criterion x baseline)                                               masking.py
    advantages over ACCEPTED sequences only                                                 advantages.py
    epochs x minibatches: surrogate -> grads -> optax                                       losses.py

Everything above is traced into one XLA program (`jax.jit` with explicit shardings, the train state
donated), so the mask, the bounds and the update cost one dispatch and fuse with the forward.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trm_jax import advantages as advantages_lib
from trm_jax import bounds, divergence, losses, masking
from trm_jax import logprobs as lp
from trm_jax import sharding as sharding_lib
from trm_jax.models import LEARNER
from trm_jax.rollout.backends import RolloutBackend, routing_flip_frac
from trm_jax.rollout.batch import RolloutBatch

# trm.divergence names -> keys of divergence.sampled_estimators.
ESTIMATOR_KEYS = {"k1": "k1", "k2": "k2", "k3": "k3", "abs_log": "abs_log_ratio", "tv_est": "tv_est"}


@flax.struct.dataclass
class TrainState:
  params: Any  # nnx.State of the model's nnx.Param leaves
  opt_state: Any
  step: jax.Array  # optimizer updates so far (RL stage)


@flax.struct.dataclass
class ModelDef:
  """The static half of an NNX model (graph + non-parameter state) so jit sees pure pytrees."""
  graphdef: Any = flax.struct.field(pytree_node=False)
  rest: Any = None  # nnx.State of non-Param variables (usually empty)

  def merge(self, params):
    return nnx.merge(self.graphdef, params, self.rest) if self.rest is not None else nnx.merge(self.graphdef, params)


def split_model(model) -> tuple[ModelDef, Any]:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return ModelDef(graphdef, rest), params


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and a constant or cosine schedule (warmup first)."""
  if optim_cfg.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, optim_cfg.lr, max(optim_cfg.warmup_steps, 0),
                                            max(total_steps, optim_cfg.warmup_steps + 1))
  elif optim_cfg.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, optim_cfg.lr, optim_cfg.warmup_steps)
  else:
    lr = optim_cfg.lr
  chain = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip > 0 else []
  chain.append(optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=optim_cfg.weight_decay))
  return optax.chain(*chain)


def _divergence_for(name, exact, est):
  if name == "exact":  # None when the rollout side has no full distribution (validate() guards use)
    return exact["kl"] if exact is not None else None
  return est[ESTIMATOR_KEYS[name]]


def length_edges(edges, horizon: int) -> tuple:
  """The configured bucket edges cut to the horizon: buckets no response can reach are not logged."""
  edges = sorted(int(e) for e in edges)
  keep = [e for e in edges if e <= horizon]
  beyond = [e for e in edges if e > horizon][:1]
  return tuple(keep + (beyond if keep and keep[-1] < horizon + 1 else []))


def correction(cfg, mask, learner_logp, rollout_logp, exact, est) -> masking.Correction:
  """The configured TRM criterion composed with the configured baseline (their weights multiply)."""
  t, b = cfg.trm, cfg.baseline
  div = _divergence_for(t.divergence, exact, est)
  div_avg = _divergence_for(t.divergence_avg, exact, est)
  if t.criterion == "tv":  # exact TV, or its unbiased estimator 1/2|rho - 1|
    div = exact["tv"] if t.divergence == "exact" and exact is not None else est["tv_est"]
  thresholds = {"none": {}, "max": dict(delta=t.delta), "avg": dict(delta_avg=t.delta_avg),
                "max_avg": dict(delta=t.delta, delta_avg=t.delta_avg), "tv": dict(eps=t.eps),
                "ln": dict(delta=t.delta, eps=t.eps, delta_w=t.delta_w), "ser": dict(delta_ser=t.delta_ser),
                "tis": dict(cap=b.tis_cap), "token_mask": dict(low=b.token_low, high=b.token_high),
                "seq_is": dict(cap=b.seq_cap), "geo_mask": dict(low=b.geo_low, high=b.geo_high)}
  common = dict(mask=mask, learner_logp=learner_logp, rollout_logp=rollout_logp,
                length_edges=length_edges(t.length_buckets, mask.shape[-1]))
  trm = masking.apply_correction(t.criterion, div=div, div_avg=div_avg, **thresholds[t.criterion], **common)
  if b.kind == "none":
    return trm
  base = masking.apply_correction(b.kind, **thresholds[b.kind], **common)
  # TRM's statistics stay the headline (trm/accept_rate); the baseline's are logged beside them.
  stats = dict(trm.stats, **{f"baseline/{k}": v for k, v in base.stats.items() if "/" not in k})
  return masking.Correction(token_weight=trm.token_weight * base.token_weight,
                            seq_mask=trm.seq_mask * base.seq_mask, stats=stats)


def _advantages(cfg, rewards, group_size, valid):
  fn = {"grpo": advantages_lib.grpo, "rloo": advantages_lib.rloo, "dr_grpo": advantages_lib.dr_grpo}[cfg.rl.advantage]
  return fn(rewards, group_size, valid=valid)


def pre_update_pass(cfg, model_def, params, rollout_params, batch: RolloutBatch, backend: RolloutBackend):
  """Learner log-probs at the pre-update parameters and the rollout side, chunk by chunk (no grad)."""
  learner = model_def.merge(params)
  h, aux = lp.response_hidden(learner, batch.prompt, batch.prompt_mask, batch.response, batch.response_mask,
                              numerics=LEARNER)
  sampling = (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
  chunk = lp.default_chunk(batch.response.shape[1], cfg.learner.chunk_size)
  source = cfg.trm.source
  extra = {}
  if source == "recompute":
    roll_model = model_def.merge(rollout_params)
    h_roll, aux_roll = lp.response_hidden(roll_model, batch.prompt, batch.prompt_mask, batch.response,
                                          batch.response_mask, numerics=backend.numerics)
    side = ("recompute", roll_model, h_roll, backend.numerics)
    if "routes" in aux and "routes" in aux_roll:
      p = batch.prompt.shape[1]
      valid = jnp.concatenate([batch.prompt_mask, batch.response_mask], axis=1) > 0
      extra["moe/routing_flip_frac"] = routing_flip_frac(aux["routes"], aux_roll["routes"], valid)
      del p
  elif source == "stored":
    side = ("stored", batch.rollout_logits)
  elif source == "topk":
    side = ("topk", batch.rollout_topk_logp, batch.rollout_topk_ids)
  else:
    side = None
  stats = lp.token_stats(learner, jax.lax.stop_gradient(h), batch.response, learner_numerics=LEARNER,
                         sampling=sampling, chunk=chunk, rollout_side=side)
  return stats, extra


def learner_update(cfg, model_def: ModelDef, tx, backend: RolloutBackend, state: TrainState,
                   batch: RolloutBatch, rollout_params) -> tuple[TrainState, dict]:
  """The whole update (see module docstring). Pure; `make_learner_step` jits it with shardings."""
  mask = batch.response_mask.astype(jnp.float32)
  pre, extra = pre_update_pass(cfg, model_def, state.params, rollout_params, batch, backend)
  learner_logp, rollout_logp = pre["learner_logp"], batch.rollout_logp.astype(jnp.float32)
  est = divergence.sampled_estimators(learner_logp, rollout_logp, mask)
  has_exact = "kl" in pre
  exact = {k: pre[k] * mask for k in ("kl", "kl_reverse", "tv")} if has_exact else None

  corr = correction(cfg, mask, learner_logp, rollout_logp, exact, est)
  lengths = mask.sum(-1)
  seq_valid = corr.seq_mask * (lengths > 0)
  adv = _advantages(cfg, batch.rewards.astype(jnp.float32), batch.group_size, seq_valid)
  weights = corr.token_weight * corr.seq_mask[:, None] * mask
  behaviour = rollout_logp if cfg.rl.ratio_base == "rollout" else learner_logp

  # The certificate (paper section 2): exact divergences when the rollout side gives them, else the
  # estimators k3 (for KL) and 1/2|rho-1| (for TV) as stand-ins, flagged by bounds/exact = 0.
  kl_c, tv_c = (exact["kl"], exact["tv"]) if has_exact else (est["k3"], est["tv_est"])
  rho_minus_1 = jnp.expm1(jnp.clip(learner_logp - rollout_logp, -20.0, 20.0)) * mask
  surrogate = jnp.mean(corr.seq_mask * batch.rewards * rho_minus_1.sum(-1))  # L'(theta) on accepted rows
  cert = bounds.certificate(kl_c, tv_c, mask, surrogate=surrogate)

  update = _make_minibatch_update(cfg, model_def, tx)
  n_mb, b = cfg.rl.minibatches, batch.response.shape[0]
  data = dict(prompt=batch.prompt, prompt_mask=batch.prompt_mask, response=batch.response,
              response_mask=mask, rollout_logp=rollout_logp, behaviour=behaviour, adv=adv, weights=weights)
  data = jax.tree.map(lambda x: x.reshape(n_mb, b // n_mb, *x.shape[1:]), data)
  mbs = jax.tree.map(lambda x: jnp.tile(x, (cfg.rl.epochs,) + (1,) * (x.ndim - 1)), data)
  (params, opt_state), aux = jax.lax.scan(update, (state.params, state.opt_state), mbs)
  new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1)

  denom = jnp.maximum(mask.sum(), 1.0)
  metrics = {
      "loss": aux["loss"].mean(), "grad_norm": aux["grad_norm"].mean(), "clip_frac": aux["clip_frac"].mean(),
      "entropy": (pre["entropy"] * mask).sum() / denom,
      "trm/accept_rate": corr.stats["accept_rate"],
      "trm/token_accept_rate": corr.stats.get("token_accept_rate", jnp.float32(1.0)),
      "trm/num_rejected": (1.0 - corr.seq_mask).sum() * 1.0,
      "rl/advantage_abs_mean": jnp.abs(adv).sum() / jnp.maximum(seq_valid.sum(), 1.0),
      "rl/loss_denominator": jnp.float32(b // n_mb),  # seq_total normalises by the total minibatch N
      "mismatch/ppl_gap": divergence.log_ppl_gap(learner_logp, rollout_logp, mask),
      "mismatch/exact": jnp.float32(has_exact),
      "bounds/exact": jnp.float32(has_exact),
  }
  for k, v in corr.stats.items():
    if k.startswith("accept_rate/"):
      metrics[f"trm/{k}"] = v
    elif k.startswith("baseline/"):
      metrics[k] = v
  for name in ("k1", "k3", "tv_est"):
    metrics[f"mismatch/{name}_mean"] = (est[name]).sum() / denom
  for name in ("k2", "k3", "abs_log_ratio"):
    metrics[f"mismatch/{name}_max"] = est[name].max()
  if has_exact:
    metrics.update({"mismatch/kl_max": exact["kl"].max(), "mismatch/kl_mean": exact["kl"].sum() / denom,
                    "mismatch/kl_reverse_mean": exact["kl_reverse"].sum() / denom,
                    "mismatch/tv_max": exact["tv"].max(), "mismatch/tv_mean": exact["tv"].sum() / denom})
    if "rollout_logp_recomputed" in pre:  # how far the recompute is from what the sampler reported
      metrics["mismatch/recompute_logp_abs_err"] = (
          jnp.abs(pre["rollout_logp_recomputed"] - rollout_logp) * mask).sum() / denom
  else:  # estimates under the same names so curves stay comparable; mismatch/exact says which
    metrics.update({"mismatch/kl_max": est["k3"].max(), "mismatch/kl_mean": est["k3"].sum() / denom})
  for k, v in cert.items():
    if jnp.ndim(v) == 0:  # dbar_t is a curve [T]; the scalars are the statistics and the bounds
      metrics[f"bounds/{k}"] = v
  metrics.update(extra)
  return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


def _make_minibatch_update(cfg, model_def, tx):
  sampling_t = cfg.rollout.temperature

  def loss_fn(params, mb):
    model = model_def.merge(params)
    h, _ = lp.response_hidden(model, mb["prompt"], mb["prompt_mask"], mb["response"],
                              mb["response_mask"], numerics=LEARNER)
    chunk = lp.default_chunk(mb["response"].shape[1], cfg.learner.chunk_size)
    logp, _ = lp.token_logp(model, h, mb["response"], numerics=LEARNER, temperature=sampling_t,
                            chunk=chunk, remat=cfg.learner.remat)
    if cfg.rl.loss == "ppo_clip":
      return losses.ppo_clip_loss(logp, mb["behaviour"], mb["adv"], mb["weights"], eps_low=cfg.rl.clip_low,
                                  eps_high=cfg.rl.clip_high, dual_clip=cfg.rl.dual_clip or None,
                                  aggregation=cfg.rl.aggregation)
    return losses.is_loss(logp, mb["rollout_logp"], mb["adv"], mb["weights"], aggregation=cfg.rl.aggregation)

  def update(carry, mb):
    params, opt_state = carry
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), {"loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads),
                                 "clip_frac": aux.get("clip_frac", jnp.float32(0.0))}

  return update


def make_learner_step(cfg, model_def, tx, backend, mesh, param_shardings, opt_shardings, *, stale: bool):
  """jit(learner_update) with explicit in/out shardings; the train state is donated.

  stale=True: `step(state, batch, rollout_params)`, the rollout policy k updates old (its snapshot
  is a separate argument). stale=False: `step(state, batch)`, the rollout policy has the learner's
  parameters (the mismatch is the backend's numerics alone), and no second copy is passed.
  """
  state_sh = TrainState(params=param_shardings, opt_state=opt_shardings, step=sharding_lib.replicated(mesh))
  out_sh = (state_sh, sharding_lib.replicated(mesh))
  # The batch arrives already sharded on its batch axis (sharding.shard_batch); None keeps that.
  if stale:
    fn = functools.partial(learner_update, cfg, model_def, tx, backend)
    return jax.jit(fn, in_shardings=(state_sh, None, param_shardings), out_shardings=out_sh, donate_argnums=(0,))

  def fresh(state, batch):
    return learner_update(cfg, model_def, tx, backend, state, batch, state.params)

  return jax.jit(fresh, in_shardings=(state_sh, None), out_shardings=out_sh, donate_argnums=(0,))
