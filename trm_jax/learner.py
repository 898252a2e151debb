"""The learner: ONE jitted, sharded update per rollout batch.

    learner forward (pre-update params, no grad)     -> learner log-probs, entropy          logprobs.py
    rollout side: sampled | stored | topk | recompute -> exact divergences per position     divergence.py
    sampled-token estimators k1 k2 k3 |log rho| tv    (always, next to the exact values)   divergence.py
    pre-update statistics: delta, eps, kl_seq, tv_seq, dbar -> every bound, B*            bounds.py
    mask / weights (TRM criterion x baseline x IS weight, composed once)                     masking.py
    advantages (group statistics over all G rows, or the accepted ones: rl.group_stats)    advantages.py
    epochs x minibatches: surrogate -> grads (summed over learner.microbatches slices) -> optax  losses.py
    bounds.certify_update: post-update forward -> L'(theta') - B*(theta' vs pi_roll)         bounds.py

Everything above is traced into one XLA program (`jax.jit` with explicit shardings, the train state
donated), so the mask, the bounds and the update cost one dispatch and fuse with the forward.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trm_jax import advantages as advantages_lib
from trm_jax import certificate, divergence, losses, masking
from trm_jax import logprobs as lp
from trm_jax import packing as pk_lib
from trm_jax.guard import GUARD_KEYS, all_finite, guarded_update  # noqa: F401 (learner.guarded_update)
from trm_jax import sharding as sharding_lib
from trm_jax.rollout.backends import RolloutBackend
from trm_jax.rollout.batch import RolloutBatch
from trm_jax.stats_pass import (chunk_remat, learner_numerics, learner_stats, rollout_side,  # noqa: F401
                               sliced_stats, split_side, truncated)

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


def length_edges(edges, horizon: int) -> tuple:
  """The configured bucket edges cut to the horizon: buckets no response can reach are not logged."""
  edges = sorted(int(e) for e in edges)
  keep = [e for e in edges if e <= horizon]
  beyond = [e for e in edges if e > horizon][:1]
  return tuple(keep + (beyond if keep and keep[-1] < horizon + 1 else []))


def correction(cfg, inputs: masking.CorrectionInputs) -> masking.Correction:
  """The configured TRM criterion composed with the configured baseline (masking.compose: their weights
  multiply; under rl.ratio_base="learner" the token weight carries pi_prox/pi_roll once). Thresholds are
  read through the tables' Rule.params (masking.CRITERIA / BASELINES), so a new method is one table entry."""
  t, b = cfg.trm, cfg.baseline
  crit = {kw: t[field] for kw, field in masking.CRITERIA[t.criterion].params.items()}
  base = {kw: b[field] for kw, field in masking.BASELINES[b.kind].params.items()}
  return masking.compose(t.criterion, b.kind, inputs, criterion_params=crit, baseline_params=base,
                         ratio_base=cfg.rl.ratio_base)


def _correction_inputs(cfg, mask, learner_logp, rollout_logp, exact, est, advantages):
  """masking.CorrectionInputs for the configured divergences; `advantages` are the pre-mask ones (only their
  sign is read, by the DPPO / CPPO direction gates)."""
  t = cfg.trm
  return masking.CorrectionInputs(
      mask=mask, learner_logp=learner_logp, rollout_logp=rollout_logp,
      div=divergence.select(t.divergence, exact, est), div_avg=divergence.select(t.divergence_avg, exact, est),
      tv=exact["tv"] if t.divergence == "exact" and exact is not None else None, advantages=advantages,
      length_edges=length_edges(t.length_buckets, mask.shape[-1]))


def _advantages(cfg, rewards, group_size, valid):
  return advantages_lib.ESTIMATORS[cfg.rl.advantage](rewards, group_size, valid=valid,
                                                     group_stats=cfg.rl.group_stats)


def analyse(cfg, stats, extra, batch: RolloutBatch, reward_range=(0.0, 1.0)):
  """From per-token statistics (no grad) to the update's targets and every logged number.

  Returns (targets, metrics): targets = advantages [B] over accepted sequences, loss weights [B,T]
  (mask x TRM x baseline) and the PPO behaviour log-probs; metrics = mismatch, mask, certificate.
  """
  stats = jax.tree.map(jax.lax.stop_gradient, stats)
  mask = batch.response_mask.astype(jnp.float32)
  learner_logp, rollout_logp = stats["learner_logp"], batch.rollout_logp.astype(jnp.float32)
  est = divergence.sampled_estimators(learner_logp, rollout_logp, mask)
  has_exact = "kl" in stats
  # where, not a product: a padded position may hold inf (kl_reverse with top_p < 1) and inf * 0 = NaN.
  exact = ({k: jnp.where(mask > 0, stats[k], 0.0) for k in ("kl", "kl_reverse", "tv") if k in stats}
           if has_exact else None)

  t = cfg.trm
  rows = (mask.sum(-1) > 0).astype(jnp.float32)  # padding rows (no response token) are no sequences
  rewards = batch.rewards.astype(jnp.float32)
  corr = correction(cfg, _correction_inputs(cfg, mask, learner_logp, rollout_logp, exact, est,
                                            _advantages(cfg, rewards, batch.group_size, rows)))
  seq_valid = corr.seq_mask * rows
  # rl.group_stats: "all" = group statistics over all G responses, then rejected rows zeroed (verl, the
  # paper's GRPO); "accepted" = statistics over the accepted rows only.
  adv = _advantages(cfg, rewards, batch.group_size, seq_valid)
  # behaviour: the surrogate's ratio denominator (rl.ratio_base): pi_roll, or pi_prox for decoupled PPO.
  targets = dict(adv=adv, weights=corr.token_weight * corr.seq_mask[:, None] * mask,
                 behaviour=rollout_logp if cfg.rl.ratio_base == "rollout" else learner_logp,
                 seq_mask=seq_valid)

  # The pre-update mismatch statistics and bounds (paper section 2): pi_prox vs pi_roll on the batch.
  # bounds/certified_improvement needs the UPDATED policy: post_update_certificate (bounds.certify_update).
  cert = certificate.certificate_metrics(learner_logp, rollout_logp, mask, source=t.source,
                                        kl=exact["kl"] if has_exact else None,
                                        tv=exact["tv"] if has_exact else None, reward_range=reward_range)

  denom = jnp.maximum(mask.sum(), 1.0)
  metrics = {
      "entropy": jnp.where(mask > 0, stats["entropy"], 0.0).sum() / denom,
      "trm/accept_rate": corr.stats["accept_rate"],
      "trm/token_accept_rate": corr.stats.get("token_accept_rate", jnp.float32(1.0)),
      "trm/num_rejected": corr.stats["num_rejected"],  # rows with a token that were rejected (no padding)
      "rl/advantage_abs_mean": jnp.abs(adv).sum() / jnp.maximum(seq_valid.sum(), 1.0),
      "mismatch/ppl_gap": divergence.log_ppl_gap(learner_logp, rollout_logp, mask),
  }
  metrics.update({(f"trm/{k}" if k.startswith("accept_rate/") else k): v for k, v in corr.stats.items()
                  if k.startswith(("accept_rate/", "baseline/"))})
  metrics.update(_mismatch_metrics(stats, est, exact, rollout_logp, mask, denom))
  metrics.update(cert)  # mismatch/source, bounds/exact, bounds/plugin_valid and every plug-in bound
  metrics.update(extra)
  return targets, metrics


def _mismatch_metrics(stats, est, exact, rollout_logp, mask, denom) -> dict:
  """mismatch/*: the sampled-token estimators and, where the rollout side gives them, the exact divergences."""
  metrics = {f"mismatch/{name}_mean": est[name].sum() / denom for name in ("k1", "k3", "tv_est")}
  metrics.update({f"mismatch/{name}_max": est[name].max() for name in ("k2", "k3", "abs_log_ratio")})
  if exact is not None:
    metrics.update({"mismatch/kl_max": exact["kl"].max(), "mismatch/kl_mean": exact["kl"].sum() / denom,
                    "mismatch/tv_max": exact["tv"].max(), "mismatch/tv_mean": exact["tv"].sum() / denom})
    if "kl_reverse" in exact:  # absent for top-k rollouts: the unseen tail leaves it unknown
      metrics["mismatch/kl_reverse_mean"] = exact["kl_reverse"].sum() / denom
    if "rollout_logp_recomputed" in stats:  # how far the recompute is from what the sampler reported
      metrics["mismatch/recompute_logp_abs_err"] = (
          jnp.abs(stats["rollout_logp_recomputed"] - rollout_logp) * mask).sum() / denom
  else:  # estimates under the same names so curves stay comparable; mismatch/exact says which
    metrics.update({"mismatch/kl_max": est["k3"].max(), "mismatch/kl_mean": est["k3"].sum() / denom})
  return metrics


def post_update_certificate(cfg, learner, batch: RolloutBatch, side, aux_roll, seq_mask, reward_range,
                            packing=None) -> dict:
  """The certificate of the UPDATED policy theta' on the same batch (paper section 2), one no-grad forward:
  bounds/certified_improvement = L'(theta') - B*(theta' vs pi_roll) over every row with a token, with its
  standard error; bounds/accepted/* the same restricted to the rows the mask kept (selection-biased, no
  guarantee: bounds/accepted/selected_margin). The math is certificate.post_update_metrics."""
  stats, _ = learner_stats(cfg, learner, batch, side, aux_roll, grad_logp=False, packing=packing)
  stats = jax.tree.map(jax.lax.stop_gradient, stats)
  mask = batch.response_mask.astype(jnp.float32)
  exact = {k: jnp.where(mask > 0, stats[k], 0.0) for k in ("kl", "tv") if k in stats}
  return certificate.post_update_metrics(
      stats["learner_logp"], batch.rollout_logp.astype(jnp.float32), batch.rewards.astype(jnp.float32), mask,
      seq_mask, kl=exact.get("kl"), tv=exact.get("tv"), source=cfg.trm.source, reward_range=reward_range)


def policy_loss(cfg, logp, mb, denom=None):
  """The surrogate on one minibatch: PPO clip or the paper's IS surrogate, both with the ratio against
  mb["behaviour"] (rl.ratio_base). The aggregation gets the response mask, so rejected rows stay in every
  denominator (rejection sampling, losses.aggregate); aux["loss_denominator"] is the one used. `denom`: the
  whole minibatch's denominator when `mb` is one micro-batch of it (losses.aggregate)."""
  clip = (dict(eps_low=cfg.rl.clip_low, eps_high=cfg.rl.clip_high, dual_clip=cfg.rl.dual_clip or None)
          if cfg.rl.loss == "ppo_clip" else {})
  return losses.SURROGATES[cfg.rl.loss](logp, mb["behaviour"], mb["adv"], mb["weights"], aggregation=cfg.rl.aggregation,
                                        mask=mb["response_mask"], denom=denom, **clip)


def accumulated_value_and_grad(loss_fn, params, mb, k: int, aggregation: str, grad_shardings=None):
  """((loss, aux), grads) of `loss_fn(params, mb, denom)` over the rows of `mb`, computed as k sequential
  micro-batches of B / k rows (a lax.scan: one micro-batch's activations live at a time).

  D = losses.denominator of the WHOLE mb, computed once here; micro-batch j contributes numerator_j / D, so
  sum_j loss_j and sum_j grad_j are the unsliced loss and gradient (not a mean of per-slice means). The
  gradients are summed in float32 with the parameters' sharding; clip_frac is re-weighted to the whole mb."""
  denom = losses.denominator(mb["weights"], aggregation, mask=mb["response_mask"])
  n_valid = lambda w: jnp.maximum(jnp.sum((w != 0).astype(jnp.float32)), 1.0)  # clip_frac's denominator
  slices = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), mb)

  def body(acc, sl):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, sl, denom)
    step = (jax.tree.map(lambda g: g.astype(jnp.float32), grads), loss,
            aux.get("clip_frac", jnp.float32(0.0)) * n_valid(sl["weights"]))
    return jax.tree.map(jnp.add, acc, step), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  if grad_shardings is not None:
    zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
  (grads, loss, clipped), _ = jax.lax.scan(body, (zeros, jnp.float32(0.0), jnp.float32(0.0)), slices)
  return (loss, {"clip_frac": clipped / n_valid(mb["weights"]), "loss_denominator": denom}), grads


def learner_update(cfg, model_def: ModelDef, tx, backend: RolloutBackend, state: TrainState, batch: RolloutBatch,
                   rollout_params, reward_range=(0.0, 1.0), grad_shardings=None,
                   packing=None) -> tuple[TrainState, dict]:
  """The whole update (see module docstring). Pure; `make_learner_step` jits it with shardings.

  One epoch and one minibatch (the default): FUSED, a single learner forward gives the per-token
  statistics and the differentiable log-probs; the mask and advantages are computed inside the loss
  from stop-gradient values. Otherwise: a no-grad pass at the pre-update parameters fixes mask,
  advantages and behaviour log-probs, then epochs x minibatches optimizer steps (lax.scan), each one's
  gradient summed over learner.microbatches slices (> 1 therefore takes this path: the statistics of the
  whole batch must be fixed before any slice's gradient).
  `packing` (a packing.Packing, learner.packing; fused path only): the learner and recompute forwards run on
  packed rows, the statistics come back as [B, T].
  """
  k = cfg.learner.microbatches
  fused = cfg.learner.fuse and cfg.rl.epochs * cfg.rl.minibatches == 1 and k == 1
  # With k > 1 the statistics pass also runs in k row slices, unless a full-batch rollout side is needed later.
  sliced = not fused and k > 1 and not truncated(cfg) and not cfg.bounds.certify_update
  packing = packing if fused else None
  side, aux_roll = (None, {}) if sliced else rollout_side(cfg, model_def, rollout_params, batch, backend, packing)
  if fused:
    def loss_fn(params):
      stats, extra = learner_stats(cfg, model_def.merge(params), batch, side, aux_roll, grad_logp=True,
                                   packing=packing)
      targets, metrics = analyse(cfg, stats, extra, batch, reward_range)
      mb = dict(targets, response_mask=batch.response_mask.astype(jnp.float32))
      loss, aux = policy_loss(cfg, stats["learner_logp"], mb)
      return loss, (metrics, dict(aux, seq_mask=targets["seq_mask"], nonempty=jnp.any(mb["weights"] > 0)))

    (loss, (metrics, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    (params, opt_state), guard = guarded_update(tx, state.params, state.opt_state, loss, grads,
                                                nonempty=aux["nonempty"])
    metrics.update(loss=loss, grad_norm=optax.tree_utils.tree_norm(grads),
                   clip_frac=aux.get("clip_frac", jnp.float32(0.0)), **guard)
    metrics["rl/loss_denominator"] = aux["loss_denominator"]
    seq_mask_fused = aux["seq_mask"]
  else:
    if sliced:
      stats, extra = sliced_stats(cfg, model_def, state.params, rollout_params, batch, backend, k)
    else:
      stats, extra = learner_stats(cfg, model_def.merge(state.params), batch, side, aux_roll, grad_logp=False)
    targets, metrics = analyse(cfg, stats, extra, batch, reward_range)
    n_mb, b = cfg.rl.minibatches, batch.response.shape[0]
    data = dict(prompt=batch.prompt, prompt_mask=batch.prompt_mask, response=batch.response,
                response_mask=batch.response_mask.astype(jnp.float32), **targets)
    rebuild_side = None
    if truncated(cfg):  # the same kept set as the fused path and the rollout (see split_side)
      side_rows, rebuild_side = split_side(side, model_def, rollout_params)
      data.update(side_rows)
    data = jax.tree.map(lambda x: x.reshape(n_mb, b // n_mb, *x.shape[1:]), data)
    mbs = jax.tree.map(lambda x: jnp.tile(x, (cfg.rl.epochs,) + (1,) * (x.ndim - 1)), data)
    (params, opt_state), aux = jax.lax.scan(_make_minibatch_update(cfg, model_def, tx, rebuild_side, grad_shardings),
                                            (state.params, state.opt_state), mbs)
    metrics.update(loss=aux["loss"].mean(), grad_norm=aux["grad_norm"].mean(), clip_frac=aux["clip_frac"].mean(),
                   **{k: aux[k].sum() for k in GUARD_KEYS})
    metrics["rl/loss_denominator"] = aux["loss_denominator"].mean()  # per minibatch
    targets_seq_mask = targets["seq_mask"]
  if cfg.bounds.certify_update:  # the certificate of the updated policy, in the same compiled program
    seq_mask = targets_seq_mask if not fused else seq_mask_fused
    metrics.update(post_update_certificate(cfg, model_def.merge(params), batch, side, aux_roll, seq_mask,
                                           reward_range, packing))
  new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1)
  # A non-finite policy can yield empty responses whose statistics look perfect (kl 0, accept 1): report
  # every number as NaN instead, so a curve never shows a broken policy as a healthy one.
  policy_ok = all_finite(state.params) & all_finite(rollout_params)
  metrics = {k: v if k in GUARD_KEYS else jnp.where(policy_ok, v, jnp.nan) for k, v in metrics.items()}
  metrics["update/nonfinite_policy"] = (~policy_ok).astype(jnp.float32)
  return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


def _make_minibatch_update(cfg, model_def, tx, rebuild_side=None, grad_shardings=None):
  def loss_fn(params, mb, denom=None):
    model = model_def.merge(params)
    h, _ = lp.response_hidden(model, mb["prompt"], mb["prompt_mask"], mb["response"], mb["response_mask"],
                              numerics=learner_numerics(cfg), remat=cfg.learner.remat)
    T, V = mb["response"].shape[1], model.cfg.vocab_size
    logp, _ = lp.token_logp(model, h, mb["response"], numerics=learner_numerics(cfg),
                            temperature=cfg.rollout.temperature,
                            chunk=lp.default_chunk(T, cfg.learner.chunk_size, rows=h.shape[0], vocab=V),
                            remat=chunk_remat(cfg, h.shape[0], T, V), top_p=cfg.rollout.top_p,
                            top_k=cfg.rollout.top_k,
                            rollout_side=rebuild_side(mb) if rebuild_side is not None else None)
    return policy_loss(cfg, logp, mb, denom)

  def update(carry, mb):
    params, opt_state = carry
    k = cfg.learner.microbatches
    if k == 1:
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
    else:
      (loss, aux), grads = accumulated_value_and_grad(loss_fn, params, mb, k, cfg.rl.aggregation, grad_shardings)
    (params, opt_state), guard = guarded_update(tx, params, opt_state, loss, grads,
                                                nonempty=jnp.any(mb["weights"] > 0))
    return (params, opt_state), {"loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads),
                                 "clip_frac": aux.get("clip_frac", jnp.float32(0.0)),
                                 "loss_denominator": aux["loss_denominator"], **guard}

  return update


def make_learner_step(cfg, model_def, tx, backend, mesh, param_shardings, opt_shardings, *, stale: bool,
                      reward_range=(0.0, 1.0)):
  """jit(learner_update) with explicit in/out shardings; the train state is donated.

  stale=True: `step(state, batch, rollout_params)`, the rollout policy k updates old (its snapshot
  is a separate argument). stale=False: `step(state, batch)`, the rollout policy has the learner's
  parameters (the mismatch is the backend's numerics alone), and no second copy is passed.
  reward_range: (lo, hi) of the task's reward (task.reward_range); every bound is scaled by hi - lo.
  """
  state_sh = TrainState(params=param_shardings, opt_state=opt_shardings, step=sharding_lib.replicated(mesh))
  out_sh = (state_sh, sharding_lib.replicated(mesh))
  # The batch arrives already sharded on its batch axis (sharding.shard_batch); None keeps that.
  def fn(*args, packing=None):
    # Traced under the mesh, so the layer scan's hidden state and remat residuals are batch-sharded over
    # data x fsdp and D over tensor (models.transformer.constrain_batch_axis), each layer's weights gathered
    # over fsdp before use (models.transformer.gather_fsdp: the workaround for an XLA partitioner bug).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return learner_update(cfg, model_def, tx, backend, *args, reward_range=tuple(reward_range),
                            grad_shardings=param_shardings, packing=packing)

  rest_sh = (param_shardings,) if stale else ()
  jit = lambda f, extra=(): jax.jit(f, in_shardings=(state_sh, None) + extra + rest_sh, out_shardings=out_sh,
                                    donate_argnums=(0,))
  padded = jit(fn if stale else (lambda state, batch: fn(state, batch, state.params)))
  if cfg.learner.packing == "none":
    return padded
  # learner.packing: the layout is planned per batch on the host (pk_lib.PackedStep), a traced argument.
  packed = jit((lambda state, batch, pk, *rest: fn(state, batch, *(rest or (state.params,)), packing=pk)), (None,))
  return pk_lib.PackedStep(padded, packed, mesh, cfg.learner.chunk_size)
