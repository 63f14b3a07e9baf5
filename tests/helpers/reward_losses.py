"""The reward-loss tests' jitted losses, tolerance and random rankings
(tests/{unit,integration}/losses/test_reward.py)."""

from __future__ import annotations

import jax
import numpy as np

from rlhf_jax.losses.reward import (
    pairwise_loss as pairwise_loss_eager,
)
from rlhf_jax.losses.reward import (
    ranking_loss as ranking_loss_eager,
)

RTOL = 1e-6

# Jitted once per shape: op-by-op eager dispatch would compile every primitive separately and make
# this file several times slower. `center_coef` is traced, `margin=None` / `weight=None` are static.
pairwise_loss = jax.jit(pairwise_loss_eager)
ranking_loss = jax.jit(ranking_loss_eager)


def _random_rankings(seed, b=12, k=9):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(b, k)).astype(np.float32) * 2
  ranks = np.zeros((b, k), np.int32)
  valid = np.zeros((b, k), bool)
  for row in range(b):
    n = int(rng.integers(2, k + 1))
    slots = rng.permutation(k)[:n]  # valid slots anywhere, not a prefix
    valid[row, slots] = True
    ranks[row, slots] = rng.permutation(n)  # shuffled rank order
    ranks[row, ~valid[row]] = rng.integers(-5, 5, size=k - n)  # junk in padding
  # A row with a single valid response: no pairs.
  valid[0] = False
  valid[0, 4] = True
  # Ties in ranks: no pair between tied responses.
  valid[1] = True
  ranks[1] = np.arange(k)[::-1] // 2  # (.., 1, 1, 0, 0) for k = 5 or 9: pairs of ties
  # A fully tied row: no pairs at all.
  valid[2, :3] = True
  valid[2, 3:] = False
  ranks[2] = 7
  # Tied scores count 0.5 in accuracy.
  scores[3, :] = 0.25
  scores[~valid] = np.float32(1e4)  # garbage that must not leak in
  return scores, ranks, valid
