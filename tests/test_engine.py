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


def _engine(model, mesh, *, microbatches, top_k=0, topk=0, return_logits=False, slots=0):
  settings = engine_lib.SamplingSettings(max_new_tokens=T, temperature=1.0, top_p=1.0, top_k=top_k, numerics=LEARNER,
                                         kernel="cached", group_size=G, return_logits=return_logits, topk=topk,
                                         microbatches=microbatches, slots=slots)
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


@pytest.mark.parametrize("microbatches,slots", [(2, 0), (1, 8), (2, 8)])
def test_slices_and_slots_give_the_same_stochastic_batch(model, mesh, microbatches, slots):
  """Stochastic sampling: every response is keyed by its row of the whole batch, so microbatches = 2 and / or
  continuous slots (8 slots on the 8 devices for 16 rows) give the unsliced static batch (catches a slice keyed by its local rows, which
  would make both slices' draws the same, or slots that change the draws)."""
  prompts = _prompts()
  rng = jax.random.key(5)
  batch = sharding_lib.shard_batch([prompts["prompt"], prompts["prompt_mask"]], mesh)
  one = _engine(model, mesh, microbatches=1).generate(model[1], *batch, rng)
  two = _engine(model, mesh, microbatches=microbatches, slots=slots).generate(model[1], *batch, rng)
  half = PROMPTS * G // 2
  assert not np.array_equal(np.asarray(one.tokens)[:half], np.asarray(one.tokens)[half:])
  np.testing.assert_array_equal(np.asarray(two.tokens), np.asarray(one.tokens))
  np.testing.assert_array_equal(np.asarray(two.mask), np.asarray(one.mask))
  np.testing.assert_allclose(np.asarray(two.logp), np.asarray(one.logp), rtol=1e-6, atol=1e-6)


def test_slots_must_shard_like_the_batch(model, mesh):
  with pytest.raises(ValueError, match=r"rollout.slots=4 must be 0 \(static batch\) or a positive multiple"):
    _engine(model, mesh, microbatches=1, slots=4)  # the 8 fake devices shard the batch 8 ways


@pytest.mark.parametrize("m", [3, 4])
def test_microbatches_that_split_groups_or_shards_are_rejected(model, mesh, m):
  """16 rows: m = 3 does not divide them; m = 4 gives slices of 4 rows, not a multiple of the 8 devices."""
  with pytest.raises(ValueError, match=rf"rollout.microbatches={m} must split the batch of 16 rows"):
    _engine(model, mesh, microbatches=m)
