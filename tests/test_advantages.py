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


def test_grpo_with_valid_mask():
  valid = jnp.array([1, 1, 0, 1, 1, 0, 0, 0])
  # group 1 valid rewards (1, 0, 1): mean 2/3, unbiased var (1/9 + 4/9 + 1/9) / 2 = 1/3.
  s = math.sqrt(1 / 3)
  got = jax.jit(lambda r, v: advantages.grpo(r, 4, v, eps=1e-12))(R, valid)
  np.testing.assert_allclose(got, [1 / 3 / s, -2 / 3 / s, 0, 1 / 3 / s, 0, 0, 0, 0], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(advantages.dr_grpo(R, 4, valid), [1 / 3, -2 / 3, 0, 1 / 3, 0, 0, 0, 0],
                             rtol=1e-6, atol=1e-7)
  # A single valid member has no spread: advantage 0, no NaN.
  got = advantages.grpo(jnp.array([0.3, 0.9]), 2, jnp.array([0, 1]))
  np.testing.assert_array_equal(got, [0.0, 0.0])


def test_rloo():
  np.testing.assert_allclose(advantages.rloo(R, 4), [1 / 3, -1, 1 / 3, 1 / 3, 0, 0, 0, 0], rtol=1e-6)
  valid = jnp.array([1, 1, 0, 1, 0, 0, 0, 1])
  # group 1 valid (1, 0, 1): 1 - 1/2, 0 - 1, masked 0, 1 - 1/2; group 2 has one valid member -> 0.
  np.testing.assert_allclose(advantages.rloo(jnp.array([1, 0, 1, 1, 0, 0, 0, 1.0]), 4, valid),
                             [0.5, -1.0, 0, 0.5, 0, 0, 0, 0], rtol=1e-6)


def test_bad_group_size():
  with pytest.raises(ValueError, match="multiple"):
    advantages.grpo(jnp.ones(6), 4)
