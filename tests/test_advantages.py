"""Advantages: hand-computed GRPO / Dr.GRPO / RLOO values, validity masks, degenerate groups."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import advantages

R = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])


def test_grpo_hand_values():
  # group 1: mean 0.75, unbiased std sqrt(0.75 / 3) = 0.5; group 2 constant -> 0.
  np.testing.assert_allclose(advantages.grpo(R, 4, eps=1e-12),
                             [0.5, -1.5, 0.5, 0.5, 0, 0, 0, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(advantages.dr_grpo(R, 4), [0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0], rtol=1e-6)


def test_grpo_with_valid_mask_accepted_stats():
  """group_stats="accepted": rejected rows leave the group statistics."""
  valid = jnp.array([1, 1, 0, 1, 1, 0, 0, 0])
  # group 1 valid rewards (1, 0, 1): mean 2/3, unbiased var (1/9 + 4/9 + 1/9) / 2 = 1/3.
  s = math.sqrt(1 / 3)
  got = jax.jit(lambda r, v: advantages.grpo(r, 4, v, eps=1e-12, group_stats="accepted"))(R, valid)
  np.testing.assert_allclose(got, [1 / 3 / s, -2 / 3 / s, 0, 1 / 3 / s, 0, 0, 0, 0], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(advantages.dr_grpo(R, 4, valid, group_stats="accepted"), [1 / 3, -2 / 3, 0, 1 / 3, 0, 0, 0, 0],
                             rtol=1e-6, atol=1e-7)
  # A single valid member has no spread: advantage 0, no NaN.
  got = advantages.grpo(jnp.array([0.3, 0.9]), 2, jnp.array([0, 1]), group_stats="accepted")
  np.testing.assert_array_equal(got, [0.0, 0.0])


def test_grpo_all_stats_is_the_default():
  """group_stats="all" (default, verl / the paper): statistics over all G responses, then rejected rows
  zeroed. Group 1 (1, 0, 1, 1): mean 0.75, unbiased std 0.5, so row 0 keeps (1 - 0.75) / 0.5 = 0.5 even
  though row 2 is rejected (with "accepted" it would be 1/3 / sqrt(1/3) = 0.577)."""
  valid = jnp.array([1, 1, 0, 1, 1, 0, 0, 0])
  np.testing.assert_allclose(advantages.grpo(R, 4, valid, eps=1e-12), [0.5, -1.5, 0, 0.5, 0, 0, 0, 0],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(advantages.grpo(R, 4, valid, eps=1e-12, group_stats="all"),
                             advantages.grpo(R, 4, valid, eps=1e-12), rtol=0)
  np.testing.assert_allclose(advantages.dr_grpo(R, 4, valid), [0.25, -0.75, 0, 0.25, 0, 0, 0, 0], rtol=1e-6)
  # A single accepted member still has the group's spread: (0.9 - 0.6) / std(0.3, 0.9) = 0.3 / 0.4243.
  got = advantages.grpo(jnp.array([0.3, 0.9]), 2, jnp.array([0, 1]), eps=1e-12)
  np.testing.assert_allclose(got, [0.0, 0.3 / math.sqrt(0.18)], rtol=1e-5)
  with pytest.raises(ValueError, match="group_stats"):
    advantages.grpo(R, 4, group_stats="valid")


def test_rloo():
  np.testing.assert_allclose(advantages.rloo(R, 4), [1 / 3, -1, 1 / 3, 1 / 3, 0, 0, 0, 0], rtol=1e-6)
  valid = jnp.array([1, 1, 0, 1, 0, 0, 0, 1])
  # group 1 valid (1, 0, 1): 1 - 1/2, 0 - 1, masked 0, 1 - 1/2; group 2 has one valid member -> 0.
  rewards = jnp.array([1, 0, 1, 1, 0, 0, 0, 1.0])
  np.testing.assert_allclose(advantages.rloo(rewards, 4, valid, group_stats="accepted"),
                             [0.5, -1.0, 0, 0.5, 0, 0, 0, 0], rtol=1e-6)
  # "all": leave-one-out over the other 3 of the group, then rejected rows zeroed.
  # group 1 (1, 0, 1, 1): 1 - 2/3, 0 - 1, masked, 1 - 2/3; group 2 (0, 0, 0, 1): row 7 gets 1 - 0.
  np.testing.assert_allclose(advantages.rloo(rewards, 4, valid), [1 / 3, -1.0, 0, 1 / 3, 0, 0, 0, 1.0], rtol=1e-6)


def test_estimators_table():
  assert advantages.ESTIMATORS == {"grpo": advantages.grpo, "rloo": advantages.rloo,
                                   "dr_grpo": advantages.dr_grpo}


def test_bad_group_size():
  with pytest.raises(ValueError, match="multiple"):
    advantages.grpo(jnp.ones(6), 4)
