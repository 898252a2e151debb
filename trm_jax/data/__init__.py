"""Data layer: tokenizers, synthetic and text tasks, TFDS builders, grain pipeline, math rewards.

  tokenizer.py    char Tokenizer | HFTokenizer (tokenizer.json + jinja2 chat template)
  rewards.py      RewardOutput; DAPO rule checker, math-verify in worker processes, overlong penalty
  synthetic.py    synthetic tasks (running_sum, copy_reverse, addition, sort) and their jnp reward
  quiet_build.py  the TFDS builder mixin for datasets that download nothing
  builders.py     TFDS builder of the synthetic tasks
  math_data.py    TFDS builders of DAPO-Math / AIME from local files, cached by the files' content
  text_tasks.py   TextTask (dapo_math, aime24, aime25): tokenized prompts, host-side score
  tasks.py        task_from_config: either kind, one interface (score, reward_range, stats, ...)
  pipeline.py     the `data` config and the grain iterators (RL prompts, warm-start targets)

Submodules are imported on demand (`from trm_jax.data import pipeline`): importing the tokenizer, the
rewards or the synthetic tasks does not pull in TFDS / grain.
"""
