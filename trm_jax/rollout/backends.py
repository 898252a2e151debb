"""Rollout backends: configurable training/inference mismatch sources (paper App. A, spec section 1).

A backend says how the rollout engine differs from the learner: precision (bf16 weights and
activations), attention kernel reduction order, MoE router precision / jitter (top-k routing flips),
heavy-tailed logit noise, and staleness (rollout parameters k updates old; the trainer keeps the
snapshots, the backend only carries k).
"""
from __future__ import annotations

import dataclasses

import ml_collections

from trm_jax.models import LEARNER, Numerics

PRECISIONS = ("float32", "bfloat16")
KERNELS = ("cached", "full")
ATTENTIONS = ("standard", "alt_order")
MOE_ROUTERS = ("same", "bfloat16", "jitter")


@dataclasses.dataclass(frozen=True)
class RolloutBackend:
  """How rollouts are produced: `numerics` of the engine, decode `kernel`, parameter `staleness_k`."""

  name: str
  numerics: Numerics = LEARNER
  kernel: str = "cached"
  staleness_k: int = 0


def default_backend_config() -> ml_collections.ConfigDict:
  """The `rollout.backend` config subtree (defaults: no mismatch beyond the cached kernel)."""
  c = ml_collections.ConfigDict()
  c.precision = "float32"  # float32 | bfloat16: weights and activations of the rollout engine
  c.kernel = "cached"  # cached (KV-cache decode) | full (recompute the prefix every step)
  c.attention = "standard"  # standard | alt_order (same maths, another reduction order)
  c.moe_router = "same"  # same (router in `precision`) | bfloat16 | jitter (Gaussian router noise)
  c.router_jitter = 0.0  # stddev of the router-logit noise; used only (and required > 0) with jitter
  c.staleness_k = 0  # rollout parameters are this many optimizer updates old
  c.logit_noise_scale = 0.0  # scale of heavy-tailed logit noise scale * h @ W_noise (0 = off)
  c.logit_noise_df = 3.0  # student-t degrees of freedom of W_noise (smaller = heavier tails)
  return c


def _choice(cfg, field, allowed, prefix):
  v = cfg[field]
  if v not in allowed:
    raise ValueError(f"{prefix}.{field} must be one of {allowed}, got {v!r}")
  return v


def backend_from_config(cfg, prefix: str = "rollout.backend") -> RolloutBackend:
  """Validates the `rollout.backend` config and builds the `RolloutBackend`; errors name the field."""
  precision = _choice(cfg, "precision", PRECISIONS, prefix)
  kernel = _choice(cfg, "kernel", KERNELS, prefix)
  attention = _choice(cfg, "attention", ATTENTIONS, prefix)
  router = _choice(cfg, "moe_router", MOE_ROUTERS, prefix)
  jitter = float(cfg.router_jitter)
  if router == "jitter" and not jitter > 0:
    raise ValueError(f"{prefix}.router_jitter must be > 0 when {prefix}.moe_router='jitter', got {jitter}")
  if router != "jitter" and jitter != 0:
    raise ValueError(f"{prefix}.router_jitter is only used with {prefix}.moe_router='jitter'; "
                     f"got {jitter} with moe_router={router!r}")
  k = cfg.staleness_k
  if not isinstance(k, int) or k < 0:
    raise ValueError(f"{prefix}.staleness_k must be an integer >= 0, got {k!r}")
  scale, df = float(cfg.logit_noise_scale), float(cfg.logit_noise_df)
  if scale < 0:
    raise ValueError(f"{prefix}.logit_noise_scale must be >= 0, got {scale}")
  if not df > 0:
    raise ValueError(f"{prefix}.logit_noise_df must be > 0, got {df}")
  numerics = Numerics(
      dtype=precision, weight_dtype=precision, attention=attention,
      router_dtype="bfloat16" if router == "bfloat16" else precision,
      router_jitter=jitter if router == "jitter" else 0.0,
      logit_noise_scale=scale, logit_noise_df=df)
  parts = [p for p in (
      "bf16" if precision == "bfloat16" else "",
      "full" if kernel == "full" else "",
      "alt_order" if attention == "alt_order" else "",
      "router_bf16" if router == "bfloat16" else "",
      f"router_jitter{jitter:g}" if router == "jitter" else "",
      f"logit_noise{scale:g}" if scale > 0 else "",
      f"stale{k}" if k else "") if p]
  return RolloutBackend(name="+".join(parts) or "exact", numerics=numerics, kernel=kernel, staleness_k=k)
