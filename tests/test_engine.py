"""The rollout engine (trm_jax/rollout/engine.py): one path from prompts to a scored RolloutBatch, sliced or not."""
import jax
import numpy as np
import pytest

import tiny_models
from trm_jax import config as config_lib
from trm_jax import sharding as sharding_lib
from trm_jax.data.rewards import RewardOutput
from trm_jax.models import LEARNER
from trm_jax.rollout import engine as engine_lib

V, P, T, G, PROMPTS = 16, 3, 6, 2, 8  # B = 16 rows: two slices of 8 on the 8 fake devices
EOS = 1


@pytest.fixture(scope="module")
def model():
  return tiny_models.build("dense", vocab=V, max_len=P + T)


@pytest.fixture(scope="module")
def mesh():
  return sharding_lib.make_mesh(config_lib.default_config().mesh)


def _prompts():
  rng = np.random.default_rng(0)
  prompt = np.repeat(rng.integers(2, V, (PROMPTS, P)).astype(np.int32), G, axis=0)
  answer = np.repeat(rng.integers(2, V, (PROMPTS, 1)).astype(np.int32), G, axis=0)
  return {"prompt": prompt, "prompt_mask": np.ones_like(prompt), "answer": answer, "answer_mask": np.ones_like(answer)}


def score(tokens, mask, answer, answer_mask):
  """Reward = how often the response contains the answer id (hand-checkable, host numpy)."""
  hits = ((np.asarray(tokens) == np.asarray(answer)[:, :1]) & (np.asarray(mask) > 0)).sum(-1)
  return RewardOutput(hits.astype(np.float32), hits > 0, {"reward/hits": float(hits.sum())})


def _engine(model, mesh, *, microbatches, top_k=0, topk=0, return_logits=False):
  settings = engine_lib.SamplingSettings(max_new_tokens=T, temperature=1.0, top_p=1.0, top_k=top_k, numerics=LEARNER,
                                         kernel="cached", group_size=G, return_logits=return_logits, topk=topk,
                                         microbatches=microbatches)
  return engine_lib.RolloutEngine(model[0], settings, stop_ids=(EOS,), pad_id=0, mesh=mesh, batch_size=PROMPTS * G)


def _fields(batch):
  return {k: np.asarray(v) for k, v in vars(batch).items() if isinstance(v, jax.Array)}


def test_slices_of_a_deterministic_sampler_give_the_same_batch(model, mesh):
  """top_k = 1 samples the argmax: the only difference slicing may make is the key, so microbatches 1 and 2
  must give the same RolloutBatch (catches slices stitched out of order, or rows of one slice scored against
  another slice's answers)."""
  prompts = _prompts()
  rng = jax.random.key(3)
  one, m1 = _engine(model, mesh, microbatches=1, top_k=1, return_logits=True).rollout(model[1], prompts, rng, score)
  two, m2 = _engine(model, mesh, microbatches=2, top_k=1, return_logits=True).rollout(model[1], prompts, rng, score)
  a, b = _fields(one), _fields(two)
  assert sorted(a) == sorted(b) and "rollout_logits" in a
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-6, err_msg=k)
  assert m1 == m2 and two.group_size == G
  # The rewards are the hand-checkable score of the sampled tokens against each row's own answer.
  want = ((a["response"] == prompts["answer"][:, :1]) & (a["response_mask"] > 0)).sum(-1)
  np.testing.assert_array_equal(a["rewards"], want)
  assert two.rewards.sharding.is_equivalent_to(sharding_lib.batch_sharding(mesh, 1), 1)


def test_slice_i_is_the_unsliced_batch_of_its_prompts_with_key_i(model, mesh):
  """Stochastic sampling, microbatches = 2: slice i equals one unsliced call on its own prompts with the key
  fold_in(rng, i) (the equality the module docstring states; catches a slice sampled with the step's key
  itself, which would make both slices' draws the same)."""
  prompts = _prompts()
  rng = jax.random.key(5)
  two = _engine(model, mesh, microbatches=2).generate(
      model[1], *sharding_lib.shard_batch([prompts["prompt"], prompts["prompt_mask"]], mesh), rng)
  half = PROMPTS * G // 2
  small = engine_lib.RolloutEngine(model[0], _engine(model, mesh, microbatches=1).settings, stop_ids=(EOS,), pad_id=0,
                                   mesh=mesh, batch_size=half)
  for i in range(2):
    rows = slice(i * half, (i + 1) * half)
    ref = small.generate(model[1], *sharding_lib.shard_batch([prompts["prompt"][rows], prompts["prompt_mask"][rows]],
                                                             mesh), jax.random.fold_in(rng, i))
    np.testing.assert_array_equal(np.asarray(two.tokens)[rows], np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(two.logp)[rows], np.asarray(ref.logp), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [3, 4])
def test_microbatches_that_split_groups_or_shards_are_rejected(model, mesh, m):
  """16 rows: m = 3 does not divide them; m = 4 gives slices of 4 rows, not a multiple of the 8 devices."""
  with pytest.raises(ValueError, match=rf"rollout.microbatches={m} must split the batch of 16 rows"):
    _engine(model, mesh, microbatches=m)
