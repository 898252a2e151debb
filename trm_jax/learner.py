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
from trm_jax.models import LEARNER, Numerics
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
  """The static half of an NNX model (its graph), so jit sees the parameters as a pure pytree."""
  graphdef: Any = flax.struct.field(pytree_node=False)

  def merge(self, params):
    return nnx.merge(self.graphdef, params)


def split_model(model) -> tuple[ModelDef, Any]:
  """(ModelDef, params). The model must hold no state besides its parameters: a ModelDef made from an
  abstract (eval_shape) model would otherwise carry shapes where values belong."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"the model holds non-parameter state {list(rest.flat_state())[:3]}...; "
                     "trm_jax's models are pure parameter pytrees")
  return ModelDef(graphdef), params


def learner_numerics(cfg) -> Numerics:
  """The learner's numerics: float32 (default) or bfloat16 activations and weights (master params stay
  float32 in the optimizer), e.g. for MFU on GPUs and TPUs."""
  if cfg.learner.dtype == "float32":
    return LEARNER
  return Numerics(dtype=cfg.learner.dtype, weight_dtype=cfg.learner.dtype)


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


def rollout_side(cfg, model_def, rollout_params, batch: RolloutBatch, backend: RolloutBackend):
  """How token_stats gets the rollout distribution (trm.source), plus the rollout forward's aux."""
  source = cfg.trm.source
  if source == "recompute":  # one extra forward under the backend's numerics; no [B,T,V] stored
    roll_model = model_def.merge(rollout_params)
    h_roll, aux_roll = lp.response_hidden(roll_model, batch.prompt, batch.prompt_mask, batch.response,
                                          batch.response_mask, numerics=backend.numerics)
    return ("recompute", roll_model, jax.lax.stop_gradient(h_roll), backend.numerics), aux_roll
  if source == "stored":
    return ("stored", batch.rollout_logits), {}
  if source == "topk":
    return ("topk", batch.rollout_topk_logp, batch.rollout_topk_ids), {}
  return None, {}


def learner_stats(cfg, learner, batch: RolloutBatch, side, aux_roll, *, grad_logp: bool):
  """One chunked pass of the learner: per-token log-probs (differentiable if grad_logp), entropy and
  the exact divergences against the rollout side; plus the MoE routing-flip fraction."""
  h, aux = lp.response_hidden(learner, batch.prompt, batch.prompt_mask, batch.response, batch.response_mask,
                              numerics=learner_numerics(cfg))
  stats = lp.token_stats(learner, h if grad_logp else jax.lax.stop_gradient(h), batch.response,
                         learner_numerics=learner_numerics(cfg),
                         sampling=(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k),
                         chunk=lp.default_chunk(batch.response.shape[1], cfg.learner.chunk_size),
                         rollout_side=side, grad_logp=grad_logp, remat=cfg.learner.remat)
  extra = {}
  if "routes" in aux and "routes" in aux_roll:
    valid = jnp.concatenate([batch.prompt_mask, batch.response_mask], axis=1) > 0
    extra["moe/routing_flip_frac"] = routing_flip_frac(aux["routes"], aux_roll["routes"], valid)
  return stats, extra


def analyse(cfg, stats, extra, batch: RolloutBatch):
  """From per-token statistics (no grad) to the update's targets and every logged number.

  Returns (targets, metrics): targets = advantages [B] over accepted sequences, loss weights [B,T]
  (mask x TRM x baseline) and the PPO behaviour log-probs; metrics = mismatch, mask, certificate.
  """
  stats = jax.tree.map(jax.lax.stop_gradient, stats)
  mask = batch.response_mask.astype(jnp.float32)
  learner_logp, rollout_logp = stats["learner_logp"], batch.rollout_logp.astype(jnp.float32)
  est = divergence.sampled_estimators(learner_logp, rollout_logp, mask)
  has_exact = "kl" in stats
  exact = {k: stats[k] * mask for k in ("kl", "kl_reverse", "tv") if k in stats} if has_exact else None

  corr = correction(cfg, mask, learner_logp, rollout_logp, exact, est)
  seq_valid = corr.seq_mask * (mask.sum(-1) > 0)
  # The mask reaches the advantages too: rejected rows leave the group statistics (peers.md).
  adv = _advantages(cfg, batch.rewards.astype(jnp.float32), batch.group_size, seq_valid)
  targets = dict(adv=adv, weights=corr.token_weight * corr.seq_mask[:, None] * mask,
                 behaviour=rollout_logp if cfg.rl.ratio_base == "rollout" else learner_logp)

  # The certificate (paper section 2): exact divergences when the rollout side gives them, else the
  # estimators k3 (for KL) and 1/2|rho-1| (for TV) as stand-ins, flagged by bounds/exact = 0.
  kl_c, tv_c = (exact["kl"], exact["tv"]) if has_exact else (est["k3"], est["tv_est"])
  rho_minus_1 = jnp.expm1(jnp.clip(learner_logp - rollout_logp, -20.0, 20.0)) * mask
  surrogate = jnp.mean(corr.seq_mask * batch.rewards * rho_minus_1.sum(-1))  # L'(theta) on accepted rows
  cert = bounds.certificate(kl_c, tv_c, mask, surrogate=surrogate)

  denom = jnp.maximum(mask.sum(), 1.0)
  metrics = {
      "entropy": (stats["entropy"] * mask).sum() / denom,
      "trm/accept_rate": corr.stats["accept_rate"],
      "trm/token_accept_rate": corr.stats.get("token_accept_rate", jnp.float32(1.0)),
      "trm/num_rejected": (1.0 - corr.seq_mask).sum() * 1.0,
      "rl/advantage_abs_mean": jnp.abs(adv).sum() / jnp.maximum(seq_valid.sum(), 1.0),
      "rl/loss_denominator": jnp.float32(mask.shape[0] // cfg.rl.minibatches),  # seq_total: total N
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
    metrics[f"mismatch/{name}_mean"] = est[name].sum() / denom
  for name in ("k2", "k3", "abs_log_ratio"):
    metrics[f"mismatch/{name}_max"] = est[name].max()
  if has_exact:
    metrics.update({"mismatch/kl_max": exact["kl"].max(), "mismatch/kl_mean": exact["kl"].sum() / denom,
                    "mismatch/tv_max": exact["tv"].max(), "mismatch/tv_mean": exact["tv"].sum() / denom})
    if "kl_reverse" in exact:  # absent for top-k rollouts: the unseen tail leaves it unknown
      metrics["mismatch/kl_reverse_mean"] = exact["kl_reverse"].sum() / denom
    if "rollout_logp_recomputed" in stats:  # how far the recompute is from what the sampler reported
      metrics["mismatch/recompute_logp_abs_err"] = (
          jnp.abs(stats["rollout_logp_recomputed"] - rollout_logp) * mask).sum() / denom
  else:  # estimates under the same names so curves stay comparable; mismatch/exact says which
    metrics.update({"mismatch/kl_max": est["k3"].max(), "mismatch/kl_mean": est["k3"].sum() / denom})
  for k, v in cert.items():
    if jnp.ndim(v) == 0:  # dbar_t is a curve [T]; the scalars are the statistics and the bounds
      metrics[f"bounds/{k}"] = v
  metrics.update(extra)
  return targets, metrics


def policy_loss(cfg, logp, mb):
  """The surrogate on one minibatch: PPO clip (ratio vs mb["behaviour"]) or the paper's IS surrogate."""
  if cfg.rl.loss == "ppo_clip":
    return losses.ppo_clip_loss(logp, mb["behaviour"], mb["adv"], mb["weights"], eps_low=cfg.rl.clip_low,
                                eps_high=cfg.rl.clip_high, dual_clip=cfg.rl.dual_clip or None,
                                aggregation=cfg.rl.aggregation)
  return losses.is_loss(logp, mb["rollout_logp"], mb["adv"], mb["weights"], aggregation=cfg.rl.aggregation)


def learner_update(cfg, model_def: ModelDef, tx, backend: RolloutBackend, state: TrainState,
                   batch: RolloutBatch, rollout_params) -> tuple[TrainState, dict]:
  """The whole update (see module docstring). Pure; `make_learner_step` jits it with shardings.

  One epoch and one minibatch (the default): FUSED, a single learner forward gives the per-token
  statistics and the differentiable log-probs; the mask and advantages are computed inside the loss
  from stop-gradient values. Otherwise: a no-grad pass at the pre-update parameters fixes mask,
  advantages and behaviour log-probs, then epochs x minibatches optimizer steps (lax.scan).
  """
  side, aux_roll = rollout_side(cfg, model_def, rollout_params, batch, backend)
  if cfg.learner.fuse and cfg.rl.epochs * cfg.rl.minibatches == 1:
    def loss_fn(params):
      stats, extra = learner_stats(cfg, model_def.merge(params), batch, side, aux_roll, grad_logp=True)
      targets, metrics = analyse(cfg, stats, extra, batch)
      mb = dict(targets, rollout_logp=batch.rollout_logp.astype(jnp.float32))
      loss, aux = policy_loss(cfg, stats["learner_logp"], mb)
      return loss, (metrics, aux)

    (loss, (metrics, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(loss=loss, grad_norm=optax.tree_utils.tree_norm(grads),
                   clip_frac=aux.get("clip_frac", jnp.float32(0.0)))
  else:
    stats, extra = learner_stats(cfg, model_def.merge(state.params), batch, side, aux_roll, grad_logp=False)
    targets, metrics = analyse(cfg, stats, extra, batch)
    n_mb, b = cfg.rl.minibatches, batch.response.shape[0]
    data = dict(prompt=batch.prompt, prompt_mask=batch.prompt_mask, response=batch.response,
                response_mask=batch.response_mask, rollout_logp=batch.rollout_logp.astype(jnp.float32), **targets)
    data = jax.tree.map(lambda x: x.reshape(n_mb, b // n_mb, *x.shape[1:]), data)
    mbs = jax.tree.map(lambda x: jnp.tile(x, (cfg.rl.epochs,) + (1,) * (x.ndim - 1)), data)
    (params, opt_state), aux = jax.lax.scan(_make_minibatch_update(cfg, model_def, tx),
                                            (state.params, state.opt_state), mbs)
    metrics.update(loss=aux["loss"].mean(), grad_norm=aux["grad_norm"].mean(), clip_frac=aux["clip_frac"].mean())
  new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1)
  return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


def _make_minibatch_update(cfg, model_def, tx):
  def loss_fn(params, mb):
    model = model_def.merge(params)
    h, _ = lp.response_hidden(model, mb["prompt"], mb["prompt_mask"], mb["response"], mb["response_mask"],
                              numerics=learner_numerics(cfg))
    logp, _ = lp.token_logp(model, h, mb["response"], numerics=learner_numerics(cfg),
                            temperature=cfg.rollout.temperature,
                            chunk=lp.default_chunk(mb["response"].shape[1], cfg.learner.chunk_size),
                            remat=cfg.learner.remat)
    return policy_loss(cfg, logp, mb)

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
