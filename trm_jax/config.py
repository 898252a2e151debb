"""The config tree: one place for every default, and `validate(config)`.

Config files in `configs/` start from `default_config()` and change fields; the CLI overrides them
(`--config.trm.delta=0.05`). Every field is commented here, once. Unknown keys are errors because
the tree is locked: a typo such as `--config.trm.detla` fails instead of silently doing nothing
(a pitfall seen in verl's renames).
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from trm_jax import advantages, certificate, divergence, losses, masking
from trm_jax.data import tasks
from trm_jax.data.pipeline import default_data_config
from trm_jax.models import default_model_config
from trm_jax.rollout.backends import backend_from_config, default_backend_config
# The config-file helpers (configs/*.py call them as trm_jax.config.<name>).
from trm_jax.config_args import (BACKEND_PRESETS, COMMON_ARGS, apply_backend_preset,  # noqa: F401
                                 apply_common_args, parse_arg)

# Names accepted by the config come from the tables the learner dispatches on (one place each).
CRITERIA = tuple(masking.CRITERIA)
DIVERGENCES = tuple(divergence.DIVERGENCES)
SOURCES = certificate.SOURCES
BASELINES = tuple(masking.BASELINES)
ADVANTAGES = tuple(advantages.ESTIMATORS)
GROUP_STATS = advantages.GROUP_STATS
LOSSES = tuple(losses.SURROGATES)
AGGREGATIONS = tuple(losses.AGGREGATIONS)
RATIO_BASES = ("rollout", "learner")
SCHEDULES = ("constant", "cosine")


def default_config() -> ml_collections.ConfigDict:
  """Every field of the tree with its default; `configs/*.py` start from this."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed: init, data order, sampling; a run is a function of (config, seed)

  c.model = default_model_config()  # size/kind/dims/dtypes of the policy (trm_jax/models)
  c.data = default_data_config()  # task, horizon T, data_dir, split sizes (trm_jax/data)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.temperature = 1.0  # the paper samples at temperature 1
  c.rollout.top_p = 1.0  # < 1 truncates the rollout distribution (a mismatch source of its own)
  c.rollout.top_k = 0  # 0 = off
  c.rollout.microbatches = 1  # generate the batch in this many sequential slices of whole groups (less memory)
  # Continuous batching: decode slots per slice, refilled as rows stop (same samples as the static batch).
  # -1 = auto (a quarter of a slice's rows, rounded up to the mesh's data*fsdp); 0 = static batch.
  c.rollout.slots = -1
  c.rollout.backend = default_backend_config()  # precision / kernel / router / staleness / noise

  c.rl = ml_collections.ConfigDict()
  c.rl.steps = 40  # RL steps (one rollout batch and one learner update each)
  c.rl.prompts_per_step = 8  # prompts per rollout batch (paper: 32)
  c.rl.group_size = 4  # responses per prompt, G (paper: 16)
  c.rl.advantage = "grpo"  # grpo | rloo | dr_grpo
  c.rl.loss = "ppo_clip"  # ppo_clip | is (the plain IS surrogate of the paper's Algorithm 1)
  c.rl.clip_low = 0.2  # PPO ratio floor 1 - clip_low (paper: 0.8)
  c.rl.clip_high = 0.28  # PPO ratio ceiling 1 + clip_high (clip-higher; paper: 1.28)
  c.rl.dual_clip = 0.0  # dual-clip constant c > 1 for A < 0; 0 = off
  c.rl.group_stats = "all"  # all: group mean/std over all G, then rejected rows zeroed (verl, paper) | accepted
  c.rl.aggregation = "seq_total"  # seq_total (paper: / total N) | token_mean | seq_mean_token_sum | seq_mean_token_mean
  # Surrogate ratio. rollout: r = pi_theta/pi_roll (the paper's rho; IS baselines tis/seq_is refused: they would
  # apply pi/pi_roll twice). learner: decoupled PPO, r = pi_theta/pi_prox, pi_prox = stop_grad(pre-update learner
  # log-probs), times the IS weight pi_prox/pi_roll (truncated by baseline tis/seq_is, else untruncated).
  c.rl.ratio_base = "rollout"
  c.rl.epochs = 1  # passes over each rollout batch
  c.rl.minibatches = 1  # optimizer steps per pass; prompts_per_step * group_size must divide evenly

  c.trm = ml_collections.ConfigDict()
  c.trm.criterion = "max"  # none | max | avg | max_avg | tv (max_t TV <= eps) | ln | ser (paper section 3)
  c.trm.divergence = "exact"  # per-position divergence for the max criterion: exact | k1 | k2 | k3 | abs_log | tv_est
  c.trm.divergence_avg = "exact"  # ... and for the avg criterion (co-released code: k3)
  c.trm.source = "recompute"  # rollout side: sampled (estimators only) | stored logits | topk | recompute
  c.trm.topk = 8  # K kept per position when source = topk
  c.trm.delta = 0.05  # TRM-Max threshold on max_t KL (paper: 0.05; loose 0.1)
  c.trm.delta_avg = 0.001  # TRM-Avg threshold on mean_t KL (paper: 0.001; loose 0.002)
  c.trm.eps = 0.05  # TV radius: threshold on max_t TV (criterion=tv) and LN-TRM's eps
  c.trm.delta_w = 0.05  # LN-TRM threshold on W/Z
  c.trm.delta_ser = 0.05  # SER threshold (recommended 0.03..0.10)
  c.trm.length_buckets = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)  # accept rate by length

  c.baseline = ml_collections.ConfigDict()
  c.baseline.kind = "none"  # none | tis | token_mask | seq_is | geo_mask | dppo | cppo (composed with the TRM mask)
  c.baseline.tis_cap = 2.0  # token TIS cap on rho
  c.baseline.token_low = 0.5  # token ratio band (IcePop / MIS) lower edge
  c.baseline.token_high = 2.0  # ... upper edge
  c.baseline.seq_cap = 2.0  # sequence TIS cap on prod_t rho
  c.baseline.geo_low = 0.999  # geometric-mean sequence mask band
  c.baseline.geo_high = 1.001
  c.baseline.dppo_low = 0.2  # DPPO binary-TV: drop A<=0 tokens with pi_prox(y)-pi_roll(y) < -dppo_low (prime-rl)
  c.baseline.dppo_high = 0.2  # ... and A>0 tokens with pi_prox(y)-pi_roll(y) > dppo_high
  c.baseline.cppo_delta = 0.2  # CPPO sequence prefix budget on the position-weighted binary TV
  c.baseline.cppo_w_min = 0.8  # CPPO linear position weight at the last token (1 at the first)
  c.baseline.cppo_delta_b = 0.02  # CPPO per-token budget floor (the row quantile is clamped to [d_b, 2 d_b])
  c.baseline.cppo_quantile = 0.9  # CPPO quantile of the row's binary TV used as the per-token budget

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4  # peak learning rate of the RL stage (paper: 1e-6 at 8B)
  c.optim.schedule = "constant"  # constant | cosine
  c.optim.warmup_steps = 0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0  # global-norm clip; 0 = off

  c.warmstart = ml_collections.ConfigDict()
  c.warmstart.steps = 300  # supervised steps on correct solutions before RL; 0 = none
  c.warmstart.batch_size = 32
  c.warmstart.lr = 3e-3
  c.warmstart.init_from = ""  # "" = off; else a workdir whose newest checkpoint provides the warm-started
  #                             parameters, so the supervised warm start is skipped

  c.learner = ml_collections.ConfigDict()
  c.learner.chunk_size = 0  # time-chunk of the chunked log-prob/divergence pass; 0 = auto (logprobs.default_chunk)
  c.learner.attention_block = 0  # queries per attention block (0 = all): scores [B, H, block, S], not [B, H, L, S]
  c.learner.remat = "full"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable: what the backward
  # keeps of each layer (full: only its input; trm_jax/models REMAT_POLICIES)
  c.learner.logits_remat = "auto"  # auto | always | never: the backward recomputes each time chunk's logits
  # (memory: one chunk) instead of keeping them; auto = only when learner.remat != none and rows per device
  # x T x V > 2^25 logits (logprobs.logits_remat: below that, keeping them is 1.06-1.09x faster on CPU)
  c.learner.dtype = "float32"  # learner activations/weights: float32 | bfloat16 (master params stay float32)
  c.learner.fuse = True  # epochs = minibatches = 1: one learner forward for statistics AND gradient
  # Gradient accumulation: each optimizer step's gradient is computed in this many sequential slices of its
  # rows (the same single step and numbers, less activation memory); batch statistics stay whole-batch ones
  # (a no-grad pass fixes them, so > 1 takes the two-pass path). rl.minibatches = separate optimizer steps.
  c.learner.microbatches = 1
  # none | auto. auto: sequence packing (trm_jax/packing.py): the rows' real tokens are packed into fewer rows
  # (segment ids, per-segment RoPE positions), the per-token pass runs over their response slots, results go
  # back to [B, T]; planned per batch on the host, padded where it saves no rows. Fused update only.
  c.learner.packing = "none"

  c.bounds = ml_collections.ConfigDict()
  c.bounds.certify_update = False  # one post-update forward on the batch: bounds/certified_improvement = L'(theta') - B*

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 10  # RL steps between evaluations; 0 = never
  c.eval.num_prompts = 32  # problems per eval set (text sets: 0 = the whole set), sampled at eval.temperature
  c.eval.temperature = 1.0
  c.eval.at_start = True  # also evaluate the warm-started policy, logged as step 0
  c.eval.sets = ""  # comma-separated eval sets (e.g. "aime25", "aime24,aime25"); "" = data.task's validation split
  c.eval.k = 1  # samples per problem: eval/<set>/avg@k and pass@k (paper: AIME25 avg@32)
  c.eval.pass_k = ()  # extra j <= k logged as pass@j (unbiased estimator from the k samples)
  c.eval.top_p = 1.0  # eval nucleus (paper: 0.95), independent of rollout.top_p
  c.eval.max_new_tokens = 0  # eval response length; 0 = data.horizon
  c.eval.batch_prompts = 0  # problems per sampler call (x k rows); 0 = the whole set in one call
  c.eval.rollout_numerics = False  # sample with the rollout backend's numerics (an inference server) not the learner's

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # call jax.distributed.initialize() (multi-host pods)
  c.distributed.coordinator_address = ""  # "" = auto-detect (TPU / SLURM)
  c.distributed.num_processes = 0  # 0 = auto
  c.distributed.process_id = -1  # -1 = auto
  c.distributed.heartbeat_timeout_s = 100  # a process silent this long is dead: every other one exits with an error
  c.distributed.initialization_timeout_s = 300  # wait this long for all processes to join, then fail

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10  # RL steps between checkpoints (and at the end); 0 = only at the end
  c.checkpoint.keep = 2  # newest checkpoints kept
  c.checkpoint.resume = True  # resume from the newest checkpoint in --workdir
  c.checkpoint.max_consecutive_skips = 5  # stop after this many updates in a row skipped as non-finite

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True  # event files next to metrics.jsonl
  c.log.progress = True  # tqdm progress bar with ETA
  c.log.plot = True  # curves.png in the workdir at the end

  c.lock()
  return c


class ConfigError(ValueError):
  """A bad config value or key; the CLI prints it as one line (no traceback)."""


def closest_keys(config, dotted: str, n: int = 3) -> list[str]:
  """The existing dotted keys of `config` nearest to `dotted` (difflib), for "did you mean" messages.

  Compares both the full path and its last component, so `data.group_size` finds `rl.group_size`.
  """
  import difflib
  paths = [p for p in _flat_keys(config)]
  by_path = difflib.get_close_matches(dotted, paths, n=n, cutoff=0.6)
  leaf = dotted.rsplit(".", 1)[-1]
  by_leaf = [p for p in paths if p.rsplit(".", 1)[-1] in difflib.get_close_matches(leaf, [q.rsplit(".", 1)[-1]
                                                                                          for q in paths], cutoff=0.75)]
  out = []
  for p in by_path + sorted(by_leaf, key=lambda q: -difflib.SequenceMatcher(None, dotted, q).ratio()):
    if p not in out:
      out.append(p)
  return out[:n]


def _flat_keys(config, prefix: str = "") -> list[str]:
  out = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      out += _flat_keys(value, f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


def unknown_key_message(config, dotted: str) -> str:
  """`config.<dotted> is not a known field; closest: a.b, c.d` (one line)."""
  near = closest_keys(config, dotted)
  return f"config.{dotted} is not a known field; closest: {', '.join(near) if near else '(none)'}"


def _one_of(config, path, allowed):
  value = config
  for key in path.split("."):
    value = value[key]
  if value not in allowed:
    raise ConfigError(f"config.{path} must be one of {allowed}, got {value!r}")


def _check(cond: bool, path: str, msg: str):
  if not cond:
    raise ConfigError(f"config.{path} {msg}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Rejects bad values with a message naming the field; returns the config for chaining.

  Unknown keys: the reference tree is `default_config()`; any key not in it (at any depth) is an
  error, so a config file cannot silently add a field nobody reads.
  """
  _check_known_keys(config, default_config(), "")
  for path, allowed in [("trm.criterion", CRITERIA), ("trm.divergence", DIVERGENCES),
                        ("trm.divergence_avg", DIVERGENCES), ("trm.source", SOURCES),
                        ("baseline.kind", BASELINES), ("rl.advantage", ADVANTAGES),
                        ("rl.loss", LOSSES), ("rl.aggregation", AGGREGATIONS),
                        ("rl.ratio_base", RATIO_BASES), ("rl.group_stats", GROUP_STATS), ("optim.schedule", SCHEDULES)]:
    _one_of(config, path, allowed)
  _validate_trm(config)
  _validate_rl(config)
  _validate_learner_rollout_optim(config)
  _validate_eval_and_checkpoint(config)
  # The sub-trees own their own checks (they know their fields best).
  backend_from_config(config.rollout.backend)
  # text tasks (dapo_math, aime24, aime25): the data.text fields
  if tasks.is_text_task(config.data.task):
    try:
      tasks.check_text_config(config.data)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from e
    _check(config.warmstart.steps == 0, "warmstart.steps",
           f"must be 0 for the text task {config.data.task!r} (zero-RL: it has no supervised targets)")
  return config


def _validate_trm(config):
  """trm.*: positive thresholds, and an exact divergence only where full distributions exist."""
  _check(config.trm.delta > 0, "trm.delta", f"must be > 0, got {config.trm.delta}")
  _check(config.trm.delta_avg > 0, "trm.delta_avg", f"must be > 0, got {config.trm.delta_avg}")
  _check(config.trm.eps > 0, "trm.eps", f"must be > 0, got {config.trm.eps}")
  _check(config.trm.delta_w > 0, "trm.delta_w", f"must be > 0, got {config.trm.delta_w}")
  _check(config.trm.delta_ser > 0, "trm.delta_ser", f"must be > 0, got {config.trm.delta_ser}")
  _check(config.trm.topk >= 1, "trm.topk", f"must be >= 1, got {config.trm.topk}")
  used = {"max": ("divergence",), "tv": ("divergence",), "avg": ("divergence_avg",),
          "max_avg": ("divergence", "divergence_avg")}.get(config.trm.criterion, ())
  exact_needed = any(config.trm[f] == "exact" for f in used)
  _check(not (exact_needed and config.trm.source == "sampled"), "trm.source",
         "is 'sampled' (sampled-token log-probs only) but trm.divergence / trm.divergence_avg asks for "
         "'exact'; use source=stored|topk|recompute or an estimator (k1|k2|k3|abs_log|tv_est)")
  _check(list(config.trm.length_buckets) == sorted(config.trm.length_buckets), "trm.length_buckets",
         "must be increasing")


def _validate_rl(config):
  """rl.*: steps, group size (GRPO needs >= 2), clip ranges, and batch divisibility."""
  _check(config.rl.steps >= 0, "rl.steps", f"must be >= 0, got {config.rl.steps}")
  _check(config.rl.prompts_per_step >= 1, "rl.prompts_per_step", "must be >= 1")
  _check(config.rl.group_size >= 2, "rl.group_size",
         f"must be >= 2 with rl.advantage={config.rl.advantage!r} (group-relative: with one response per "
         f"prompt every advantage is 0 and nothing is learned), got {config.rl.group_size}")
  _check(0 <= config.rl.clip_low < 1, "rl.clip_low", f"must be in [0, 1), got {config.rl.clip_low}")
  _check(config.rl.clip_high >= 0, "rl.clip_high", f"must be >= 0, got {config.rl.clip_high}")
  _check(config.rl.dual_clip == 0 or config.rl.dual_clip > 1, "rl.dual_clip",
         f"must be 0 (off) or > 1, got {config.rl.dual_clip}")
  _check(config.rl.epochs >= 1, "rl.epochs", "must be >= 1")
  batch = config.rl.prompts_per_step * config.rl.group_size
  _check(config.rl.minibatches >= 1 and batch % config.rl.minibatches == 0, "rl.minibatches",
         f"must divide rl.prompts_per_step * rl.group_size = {batch}, got {config.rl.minibatches}")
  rows = batch // config.rl.minibatches if config.rl.minibatches >= 1 and batch % config.rl.minibatches == 0 else 0
  k = config.learner.microbatches
  _check(k >= 1 and batch % k == 0 and (rows == 0 or rows % k == 0), "learner.microbatches",
         f"must be >= 1 and divide rl.prompts_per_step * rl.group_size = {batch}"
         + (f" and its rl.minibatches slices of {rows} rows" if config.rl.minibatches > 1 else "") + f", got {k}")


def _validate_learner_rollout_optim(config):
  """rollout.*, optim.*, warmstart.*, learner.* and the mesh axes."""
  _check(config.rollout.temperature > 0, "rollout.temperature", "must be > 0")
  _check(0 < config.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
  _check(config.rollout.top_k >= 0, "rollout.top_k", "must be >= 0")
  _check(config.rollout.microbatches >= 1, "rollout.microbatches", "must be >= 1")
  _check(config.rollout.slots >= -1, "rollout.slots", "must be -1 (auto), 0 (static batch) or a number of slots")
  _check(config.optim.lr >= 0, "optim.lr", "must be >= 0")
  _check(config.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
  _check(config.warmstart.steps >= 0, "warmstart.steps", "must be >= 0")
  _one_of(config, "learner.dtype", ("float32", "bfloat16"))
  _one_of(config, "learner.remat", ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"))
  _one_of(config, "learner.logits_remat", ("auto", "always", "never"))
  _check(config.rl.ratio_base == "learner" or config.baseline.kind not in masking.IS_BASELINES, "rl.ratio_base",
         f"is 'rollout' but baseline.kind={config.baseline.kind!r} is an IS weight pi/pi_roll: the ratio would be "
         "applied twice; use rl.ratio_base='learner' (decoupled PPO: the IS weight corrects rollout -> proximal)")
  _check(config.learner.chunk_size >= 0, "learner.chunk_size", "must be >= 0")
  _check(config.learner.attention_block >= 0, "learner.attention_block", "must be >= 0 (0 = all queries at once)")
  _one_of(config, "learner.packing", ("none", "auto"))
  _check(config.learner.packing == "none" or (config.learner.fuse and config.learner.microbatches == 1
                                               and config.rl.epochs * config.rl.minibatches == 1),
         "learner.packing", "applies to the fused update only (learner.fuse, 1 epoch x 1 minibatch, "
         "learner.microbatches = 1); use 'none' otherwise")
  for axis in ("data", "fsdp", "tensor"):
    size = config.mesh[axis]
    _check(size == -1 or size >= 1, f"mesh.{axis}", f"must be -1 (auto) or >= 1, got {size}")
  _check([config.mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) <= 1, "mesh",
         "may auto-fill (-1) at most one axis")


def _validate_eval_and_checkpoint(config):
  """eval.* (k, pass@k, sampling) and checkpoint.*."""
  _check(config.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
  _check(config.eval.k >= 1, "eval.k", f"must be >= 1, got {config.eval.k}")
  _check(all(1 <= int(j) <= config.eval.k for j in config.eval.pass_k), "eval.pass_k",
         f"entries must be in [1, eval.k={config.eval.k}], got {tuple(config.eval.pass_k)}")
  _check(config.eval.temperature > 0, "eval.temperature", "must be > 0")
  _check(0 < config.eval.top_p <= 1, "eval.top_p", "must be in (0, 1]")
  _check(config.eval.max_new_tokens >= 0, "eval.max_new_tokens", "must be >= 0 (0 = data.horizon)")
  _check(config.eval.batch_prompts >= 0, "eval.batch_prompts", "must be >= 0 (0 = whole set)")
  _check(config.eval.num_prompts >= 0, "eval.num_prompts", "must be >= 0")
  _check(config.checkpoint.max_consecutive_skips >= 1, "checkpoint.max_consecutive_skips", "must be >= 1")


def _check_known_keys(config, reference, prefix, root=None):
  root = reference if root is None else root
  for key in config.keys():
    path = f"{prefix}{key}"
    if key not in reference:
      raise ConfigError(unknown_key_message(root, path))
    if isinstance(config[key], ml_collections.ConfigDict):
      if not isinstance(reference[key], ml_collections.ConfigDict):
        raise ConfigError(f"config.{path} must be a value, not a sub-tree")
      _check_known_keys(config[key], reference[key], path + ".", root)


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Sets dotted keys ({"trm.delta": 0.02}) on a copy; unknown keys raise naming the key."""
  config = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    node, path = config, dotted.split(".")
    for key in path[:-1]:
      if key not in node:
        raise ConfigError(unknown_key_message(config, dotted))
      node = node[key]
    if path[-1] not in node:
      raise ConfigError(unknown_key_message(config, dotted))
    node[path[-1]] = value
  config.lock()
  return config


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(name: str, arg: str = "") -> ml_collections.ConfigDict:
  """Loads `configs/<name>.py` (or a path to any config file) and calls its get_config(arg)."""
  path = name if name.endswith(".py") else os.path.join(CONFIG_DIR, f"{name}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found")
  spec = importlib.util.spec_from_file_location(f"trm_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
