"""Reward-model losses and reward combination vs NumPy / brute-force references.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/losses/test_reward.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.reward import (
    pairwise_loss as pairwise_loss_eager,
)
from rlhf_jax.losses.reward import (
    ranking_loss as ranking_loss_eager,
)
from tests.helpers.reward_losses import RTOL, _random_rankings, pairwise_loss, ranking_loss


def test_eager_equals_jit():
  """The rest of the file calls the jitted losses; op-by-op eager gives the same result."""
  scores, ranks, valid = (jnp.asarray(a) for a in _random_rankings(12, b=5, k=5))
  np.testing.assert_allclose(
      ranking_loss_eager(scores, ranks, valid, center_coef=0.1)[0],
      ranking_loss(scores, ranks, valid, center_coef=0.1)[0],
      rtol=RTOL,
  )
  r_c, r_r = scores[:, 0], scores[:, 1]
  np.testing.assert_allclose(
      pairwise_loss_eager(r_c, r_r, center_coef=0.1)[0],
      pairwise_loss(r_c, r_r, center_coef=0.1)[0],
      rtol=RTOL,
  )
