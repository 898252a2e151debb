"""Evaluation: avg@k and pass@k of the current policy on held-out sets, with the eval's own sampling settings.

Each problem of an eval set is sampled k = `eval.k` times (temperature `eval.temperature`, top-p
`eval.top_p`, up to `eval.max_new_tokens` tokens; the k samples share one prefill). With c_i of the k
samples of problem i correct (N problems):

  avg@k  = (1/N) sum_i c_i / k                         (the paper's AIME25 avg@32, Sec. 4)
  pass@j = (1/N) sum_i [1 - C(k - c_i, j) / C(k, j)]   for j <= k

pass@j is the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374, eq. 1) of the probability that
at least one of j samples is correct; for j = k it is the fraction of problems with any correct sample.

Metrics per set (`eval.sets`, "" = the training task's validation split): `eval/<set>/avg@<k>`,
`eval/<set>/pass@<j>` (j = k and every j of `eval.pass_k`), `eval/<set>/reward_mean`,
`eval/<set>/response_length_mean`, `eval/<set>/clip_frac`; the first set is also logged under the older
names `eval/reward_mean`, `eval/solved_frac` (= avg@k) and `eval/response_length_mean`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from trm_jax import config as config_lib
from trm_jax import sharding as sharding_lib
from trm_jax.data import pipeline, tasks
from trm_jax.rollout import engine as engine_lib

# ----------------------------------------------------------------------------- the estimators


def avg_at_k(correct) -> float:
  """avg@k = mean over problems and samples of `correct` [N, k] (bool / 0-1)."""
  correct = np.asarray(correct, np.float64)
  if correct.ndim != 2 or not correct.size:
    raise ValueError(f"correct must be [N problems, k samples], got shape {correct.shape}")
  return float(correct.mean())


def pass_at_k(correct, k: int) -> float:
  """pass@k from n >= k samples per problem (`correct` [N, n]): mean_i 1 - C(n - c_i, k) / C(n, k).

  Unbiased (Chen et al. 2021); computed as 1 - prod_{m = n-c+1}^{n} (1 - k / m), which never forms the
  large binomials. n = k reduces to "any sample correct".
  """
  correct = np.asarray(correct, bool)
  if correct.ndim != 2 or not correct.size:
    raise ValueError(f"correct must be [N problems, n samples], got shape {correct.shape}")
  n = correct.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"pass@k needs 1 <= k <= n samples per problem, got k={k}, n={n}")
  out = []
  for c in correct.sum(1):
    out.append(1.0 if n - c < k else 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1))))
  return float(np.mean(out))


# ----------------------------------------------------------------------------- eval sets


@dataclasses.dataclass
class EvalSet:
  """One eval set: its task (scores responses) and every problem as numpy arrays [N, ...]."""

  name: str
  task: Any
  data: dict  # prompt [N,P], prompt_mask [N,P], answer [N,A], answer_mask [N,A]
  stats: dict = dataclasses.field(default_factory=dict)  # task.stats of the split read: prompts, ...

  @property
  def size(self) -> int:
    return len(self.data["prompt"])


def set_names(config) -> list[str]:
  """The eval sets `eval.sets` names ("" = the training task itself, on its validation split)."""
  names = [s.strip() for s in config.eval.sets.split(",") if s.strip()]
  return names or [config.data.task]


def load_eval_sets(config, tokenizer=None, train_task=None) -> list[EvalSet]:
  """Reads every eval set whole on every process (eval sets are small: AIME has 30 problems); the set
  named like the training task reuses `train_task` (the task is built once)."""
  out = []
  for name in set_names(config):
    data_cfg = config_lib.with_overrides(config, {"data.task": name}).data
    same = train_task is not None and name == config.data.task
    task = train_task if same else tasks.task_from_config(data_cfg, tokenizer)
    split = task.eval_split
    stats = task.stats(split)
    total = int(stats["prompts"])
    n = min(config.eval.num_prompts, total) if config.eval.num_prompts else total
    it = pipeline.make_iterator(data_cfg, split, batch_size=n, seed=config.seed, shuffle=False, num_epochs=1,
                                rows=np.arange(n))
    batch = next(it)
    out.append(EvalSet(name, task, {k: np.asarray(batch[k]) for k in
                                    ("prompt", "prompt_mask", "answer", "answer_mask")}, stats))
  return out


def prompts_per_call(config, n_problems: int, divisor: int) -> int:
  """Problems per sampler call: eval.batch_prompts (0 = all), rounded up so that x k rows shard evenly."""
  k = config.eval.k
  m = min(config.eval.batch_prompts or n_problems, n_problems)
  step = divisor // math.gcd(divisor, k)  # m * k % divisor == 0 iff m % step == 0
  return -(-m // step) * step


# ----------------------------------------------------------------------------- the evaluator


def eval_engine(config, *, mesh, graphdef, tokenizer, numerics, max_new_tokens: int, rows: int):
  """The eval's rollout: the eval's own sampling settings, k samples per problem sharing one prefill."""
  ec = config.eval
  settings = engine_lib.SamplingSettings(max_new_tokens=max_new_tokens, temperature=ec.temperature, top_p=ec.top_p,
                                         top_k=0, numerics=numerics, kernel="cached", group_size=ec.k,
                                         slots=engine_lib.resolve_slots(config.rollout.slots, rows,
                                                                        sharding_lib.batch_divisor(mesh)))
  return engine_lib.RolloutEngine(graphdef, settings, stop_ids=engine_lib.stop_ids(tokenizer),
                                  pad_id=tokenizer.pad_id, mesh=mesh, batch_size=rows)


def make_evaluator(config, *, mesh, graphdef, tokenizer, numerics, sets: list[EvalSet] | None = None,
                   train_task=None):
  """evaluate(params, rng) -> {metric: float} over every eval set (module docstring), or None if eval is off.

  Args:
    config: the run config (`eval.*` sampling settings, `data.*` for the sets).
    mesh: the run's mesh; each sampler call holds prompts x k rows sharded on the batch axes.
    graphdef: the policy's NNX graph (params come with each call).
    tokenizer: stop ids (`stop_ids`, else `eos_id`) and `pad_id`; text sets also read prompts with it.
    numerics: how the eval samples (the learner's, or the rollout backend's with eval.rollout_numerics).
    sets: the eval sets (default: `load_eval_sets(config, tokenizer, train_task)`).
    train_task: the run's task, reused for the eval set of the same name.
  """
  ec = config.eval
  if not ec.every and not ec.at_start:
    return None
  sets = load_eval_sets(config, tokenizer, train_task) if sets is None else sets
  div = sharding_lib.batch_divisor(mesh)
  engines = []
  for es in sets:
    m = prompts_per_call(config, es.size, div)
    engines.append((m, eval_engine(config, mesh=mesh, graphdef=graphdef, tokenizer=tokenizer, numerics=numerics,
                                   max_new_tokens=ec.max_new_tokens or es.task.response_len, rows=m * ec.k)))

  def evaluate(params, rng) -> dict:
    metrics = {}
    for s, (es, (m, engine)) in enumerate(zip(sets, engines)):
      metrics.update(_evaluate_set(config, es, engine, m, params, jax.random.fold_in(rng, s)))
      if s == 0:
        p = f"eval/{es.name}/"
        metrics.update({"eval/reward_mean": metrics[f"{p}reward_mean"], "eval/solved_frac": metrics[f"{p}avg@{ec.k}"],
                        "eval/response_length_mean": metrics[f"{p}response_length_mean"]})
    return metrics

  return evaluate


def _evaluate_set(config, es: EvalSet, engine, m: int, params, rng) -> dict:
  """Every problem of `es` k times, in calls of m problems; the metrics of the module docstring."""
  k = config.eval.k
  n_calls = -(-es.size // m)
  cols = {key: np.zeros((n_calls * m, k)) for key in ("correct", "reward", "length", "clipped")}
  extra: dict[str, float] = {}
  for c in range(n_calls):
    # Problems c*m .. c*m+m-1; past the end the last problem is repeated and dropped from the metrics.
    rows = np.repeat(np.minimum(np.arange(c * m, (c + 1) * m), es.size - 1), k)
    out, r = engine.sample_scored(params, {key: v[rows] for key, v in es.data.items()}, jax.random.fold_in(rng, c),
                                  es.task.score)
    sl = slice(c * m, (c + 1) * m)
    for key, v in (("correct", r.correct), ("reward", r.reward), ("length", out["mask"].sum(-1)),
                   ("clipped", out["clipped"])):
      cols[key][sl] = np.asarray(v, np.float64).reshape(m, k)
    for key, v in r.metrics.items():  # counts add up over calls; fractions and means are averaged
      extra[key] = extra.get(key, 0.0) + float(v) / (1 if key.endswith(("timeouts", "errors")) else n_calls)
  cols = {key: v[:es.size] for key, v in cols.items()}
  p = f"eval/{es.name}/"
  metrics = {f"{p}avg@{k}": avg_at_k(cols["correct"] > 0)}
  for j in sorted({k, *(int(j) for j in config.eval.pass_k if int(j) <= k)}):
    metrics[f"{p}pass@{j}"] = pass_at_k(cols["correct"] > 0, j)
  metrics[f"{p}reward_mean"] = float(cols["reward"].mean())
  metrics[f"{p}response_length_mean"] = float(cols["length"].mean())
  metrics[f"{p}clip_frac"] = float(cols["clipped"].mean())
  metrics.update({f"{p}{key.replace('reward/', 'reward_')}": v for key, v in extra.items()})
  return metrics
