"""The non-finite guard, the whole story in one place.

1. In the compiled update (`guarded_update`, here; the learner calls it): a non-finite loss, gradient or
   update leaves the parameters and optimizer state as they were, and `update/skipped` (+ which one) is logged.
2. Here, on the host: `SkipGuard` stops the run after checkpoint.max_consecutive_skips skipped updates in
   a row, or at once when the policy's own parameters are non-finite (`update/nonfinite_policy`), with a
   message naming what was non-finite and where the last checkpoint is.
3. No checkpoint is ever written from, or restored into, non-finite state (`check_finite`).
4. The evaluator of a non-finite policy reports NaN (`finite_or_nan`): a broken policy's empty responses
   would otherwise score like a real one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from trm_jax.checkpoint import RunError

GUARD_KEYS = ("update/skipped", "update/skipped_empty", "update/nonfinite_loss", "update/nonfinite_grad",
              "update/nonfinite_update")


def all_finite(tree) -> jax.Array:
  """True iff every element of every leaf of `tree` is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def guarded_update(tx, params, opt_state, loss, grads, nonempty=True):
  """One optax step that is SKIPPED (params and optimizer state returned unchanged) when the loss, a
  gradient or the updated parameters are not finite, so one bad batch never turns the parameters NaN.

  Returns ((params, opt_state), flags): update/skipped, update/nonfinite_loss, update/nonfinite_grad,
  update/nonfinite_update as 0/1 float32. The trainer counts consecutive skips and stops after
  checkpoint.max_consecutive_skips. `nonempty` False (the mask removed every row or token) also skips the
  step, logged as update/skipped_empty: a zero gradient would still move AdamW through its momentum."""
  loss_ok, grad_ok = jnp.all(jnp.isfinite(loss)), all_finite(grads)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  update_ok = all_finite(new_params)  # e.g. an infinite learning rate: finite grads, non-finite step
  finite = loss_ok & grad_ok & update_ok
  ok = finite & nonempty
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  bad = lambda b: (~b).astype(jnp.float32)
  flags = {"update/skipped": bad(finite), "update/skipped_empty": bad(jnp.asarray(nonempty)),
           "update/nonfinite_loss": bad(loss_ok), "update/nonfinite_grad": bad(grad_ok),
           "update/nonfinite_update": bad(update_ok)}
  return (keep(new_params, params), keep(new_opt_state, opt_state)), flags


_all_finite = jax.jit(all_finite)  # the host-side check


def check_finite(tree, what: str = "restored state") -> None:
  """Raises RunError naming the non-finite arrays of `tree` (a checkpoint never holds NaN / inf)."""
  if bool(_all_finite(tree)):
    return
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  bad = [jax.tree_util.keystr(p) for p, x in flat if not bool(jnp.all(jnp.isfinite(x)))]
  raise RunError(f"{what}: non-finite values in {len(bad)} arrays, e.g. {', '.join(bad[:3])}")


def finite_or_nan(evaluate):
  """An evaluator whose numbers are NaN when the policy's parameters are not finite."""
  if evaluate is None:
    return None

  def run(params, rng):
    out = evaluate(params, rng)
    return out if bool(_all_finite(params)) else {k: float("nan") for k in out}

  return run


def nonfinite_message(step: int, skips: int, m: dict, last_ckpt, ckpt_dir: str) -> str:
  what = [name for key, name in (("update/nonfinite_loss", f"loss = {m.get('loss')}"),
                                 ("update/nonfinite_grad", f"gradient (grad_norm = {m.get('grad_norm')})"),
                                 ("update/nonfinite_update", "parameter update (check optim.lr)"),
                                 ("update/nonfinite_policy", "learner or rollout parameters")) if m.get(key, 0.0) > 0]
  return (f"step {step}: {skips} consecutive updates skipped, non-finite {' and '.join(what) or 'values'}; stopping "
          f"(parameters are unchanged since the last good update; last checkpoint: step {last_ckpt} in {ckpt_dir}). "
          f"Lower optim.lr / warmstart.lr or raise checkpoint.max_consecutive_skips")


class SkipGuard:
  """Counts consecutive skipped RL updates; `check(step, metrics)` returns the stop message or None."""

  def __init__(self, max_consecutive: int):
    self.max_consecutive, self.skips = max_consecutive, 0

  def check(self, step: int, m: dict, last_ckpt, ckpt_dir: str) -> str | None:
    self.skips = self.skips + 1 if m.get("update/skipped", 0.0) > 0 else 0
    if self.skips >= self.max_consecutive or m.get("update/nonfinite_policy", 0.0) > 0:
      return nonfinite_message(step, self.skips, m, last_ckpt, ckpt_dir)
    return None
