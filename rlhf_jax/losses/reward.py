"""Reward-model losses and reward combination (see docs/algorithms.md, "Reward model").

- `pairwise_loss`: Bradley-Terry on (chosen, rejected) pairs, with the optional Llama 2 margin
  `m(level)` and the optional centring regulariser `eta * (r_c + r_r)^2`.
- `ranking_loss`: InstructGPT K-choose-2 loss; all pairs of one prompt live in one batch element.
- `whiten`, `llama2_combined_reward`, `linear_combined_reward`, `combined_reward`: turn the raw
  scores of a helpfulness and a safety reward model into the scalar reward used by PPO.

Every loss returns `(loss, metrics)` with `metrics["loss_weight"]` the number of examples that
count, so the train step can weight micro-batches and the accumulated loss equals the loss of
the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import masked_mean

Array = jax.Array

# Llama 2 (Touvron et al. 2023, Table 27): margin m(level) indexed by preference level,
# 0 = negligibly better / unsure, 1 = slightly better, 2 = better, 3 = significantly better.
LLAMA2_MARGINS: dict[str, tuple[float, ...]] = {
    "small": (0.0, 1 / 3, 2 / 3, 1.0),
    "large": (0.0, 1.0, 2.0, 3.0),
}
NUM_PREFERENCE_LEVELS = 4


def margin_table(spec: str | Sequence[float]) -> tuple[float, ...]:
  """Margin per preference level 0..3 (length 4).

  spec: "none" (all zeros: plain Bradley-Terry), "small" or "large" (Llama 2 tables, see
  `LLAMA2_MARGINS`), or a sequence of 4 non-negative floats (a custom table, index = level).
  Raises ValueError for anything else.
  """
  accepted = (
      '"none", "small", "large", or a sequence of '
      f"{NUM_PREFERENCE_LEVELS} non-negative floats (one per preference level 0..3)"
  )
  if isinstance(spec, str):
    if spec == "none":
      return (0.0,) * NUM_PREFERENCE_LEVELS
    if spec in LLAMA2_MARGINS:
      return LLAMA2_MARGINS[spec]
    raise ValueError(f"unknown margin table {spec!r}; expected {accepted}")
  try:
    values = tuple(float(v) for v in spec)
  except (TypeError, ValueError) as e:
    raise ValueError(f"bad margin table {spec!r}; expected {accepted}") from e
  if len(values) != NUM_PREFERENCE_LEVELS:
    raise ValueError(f"margin table {spec!r} has {len(values)} entries; expected {accepted}")
  if any(not math.isfinite(v) or v < 0.0 for v in values):
    raise ValueError(
        f"margin table {spec!r} has a negative or non-finite entry; expected {accepted}"
    )
  return values


def _weighted_mean(x: Array, w: Array, total: Array) -> Array:
  return jnp.sum(x * w) / total


def pairwise_loss(
    chosen_rewards: Array,
    rejected_rewards: Array,
    margin: Array | None = None,
    *,
    weight: Array | None = None,
    soft_label: Array | None = None,
    center_coef: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
  """Bradley-Terry loss `-log sigmoid(r_c - r_r - m)` plus `center_coef * (r_c + r_r)^2`.

  chosen_rewards, rejected_rewards: [B] scalar rewards of the preferred / dispreferred response.
  margin: [B] float or None (zeros): the Llama 2 margin of each pair, already looked up from a
    `margin_table` with the pair's preference level.
  weight: [B] float or bool or None (ones): per-example weight; 0 marks a padding example (its
    rewards are ignored, even if not finite).
  soft_label: [B] float in [0, 1] or None (ones): p = P(chosen better), e.g. an AI judge's
    position-swapped preference (RLAIF, Lee et al. 2023). The per-pair loss is then the
    cross-entropy `-p log sigmoid(d) - (1 - p) log sigmoid(-d)`, d = r_c - r_r - m; p = 1 is the
    hard loss, p = 1/2 pulls the two rewards together.
  center_coef: eta of the centring regulariser (TRL's center_rewards_coefficient, ~1e-2).

  The loss is the weighted mean over examples of `-log sigmoid(r_c - r_r - m)` (computed as
  `-jax.nn.log_sigmoid`, stable for large differences) plus `center_coef` times the weighted mean
  of `(r_c + r_r)^2`. Returns (loss, metrics) with metrics "loss" (total), "bt_loss",
  "accuracy" (r_c > r_r, ties count 0.5; ignores the margin), "reward_margin" (r_c - r_r),
  "chosen_reward", "rejected_reward" (all weighted means) and "loss_weight" (sum of weights,
  f32) for combining micro-batches.
  """
  chex.assert_rank([chosen_rewards, rejected_rewards], 1)
  chex.assert_equal_shape([chosen_rewards, rejected_rewards])
  if margin is not None:
    chex.assert_equal_shape([chosen_rewards, margin])
  if weight is not None:
    chex.assert_equal_shape([chosen_rewards, weight])
  if soft_label is not None:
    chex.assert_equal_shape([chosen_rewards, soft_label])

  w = jnp.ones(chosen_rewards.shape, jnp.float32) if weight is None else weight.astype(jnp.float32)
  keep = w != 0
  r_c = jnp.where(keep, chosen_rewards.astype(jnp.float32), 0.0)
  r_r = jnp.where(keep, rejected_rewards.astype(jnp.float32), 0.0)
  m = 0.0 if margin is None else jnp.where(keep, margin.astype(jnp.float32), 0.0)

  total = jnp.sum(w)
  denom = jnp.where(total != 0, total, 1.0)
  diff = r_c - r_r
  if soft_label is None:
    pair_loss = -jax.nn.log_sigmoid(diff - m)
  else:
    p = jnp.where(keep, soft_label.astype(jnp.float32), 1.0)
    pair_loss = -p * jax.nn.log_sigmoid(diff - m) - (1.0 - p) * jax.nn.log_sigmoid(m - diff)
  bt_loss = _weighted_mean(pair_loss, w, denom)
  center = _weighted_mean(jnp.square(r_c + r_r), w, denom)
  loss = bt_loss + center_coef * center
  correct = (diff > 0).astype(jnp.float32) + 0.5 * (diff == 0).astype(jnp.float32)
  metrics = {
      "loss": loss,
      "bt_loss": bt_loss,
      "accuracy": _weighted_mean(correct, w, denom),
      "reward_margin": _weighted_mean(diff, w, denom),
      "chosen_reward": _weighted_mean(r_c, w, denom),
      "rejected_reward": _weighted_mean(r_r, w, denom),
      "loss_weight": total,
  }
  return loss, metrics


def ranking_loss(
    scores: Array,
    ranks: Array,
    valid: Array,
    *,
    center_coef: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
  """InstructGPT K-choose-2 ranking loss; one batch element = one prompt with K responses.

  scores: [B, K] rewards of each response (each response scored once).
  ranks: [B, K] int, lower = better; equal ranks form no pair.
  valid: [B, K] bool, False on padding slots (prompts may have different numbers of responses;
    scores at invalid slots are ignored, even if not finite).
  center_coef: eta of the centring regulariser.

  Every pair (i, j) of valid responses with ranks[b, i] < ranks[b, j] contributes
  `-log sigmoid(s_i - s_j)`; a prompt's loss is the mean over its pairs (C(K, 2) of them without
  ties) and the batch loss is the mean over prompts with at least one pair. The centring term is
  `center_coef` times the mean, over those same prompts, of `(2 * mean_k valid s_bk)^2`; for K = 2
  this is `(r_c + r_r)^2`, so with ranks (0, 1) the loss equals `pairwise_loss(s[:, 0], s[:, 1])`.
  Vectorised through [B, K, K] pair masks.

  Returns (loss, metrics) with metrics "loss", "bt_loss", "pair_accuracy" (s_i > s_j over the
  pairs, ties 0.5, averaged per prompt then over prompts like the loss), "num_pairs" (total
  pairs, f32) and "loss_weight" (number of prompts with >= 1 pair, f32).
  """
  chex.assert_rank([scores, ranks, valid], 2)
  chex.assert_equal_shape([scores, ranks, valid])
  chex.assert_type(ranks, int)

  valid = valid.astype(bool)
  s = jnp.where(valid, scores.astype(jnp.float32), 0.0)
  pair_mask = (
      valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
  )  # [B, K, K]: i better than j
  pair_f = pair_mask.astype(jnp.float32)
  diff = s[:, :, None] - s[:, None, :]  # [B, K, K]: s_i - s_j
  pair_loss = jnp.where(pair_mask, -jax.nn.log_sigmoid(diff), 0.0)
  correct = (diff > 0).astype(jnp.float32) + 0.5 * (diff == 0).astype(jnp.float32)

  pairs_per_prompt = jnp.sum(pair_f, axis=(1, 2))  # [B]
  has_pair = (pairs_per_prompt > 0).astype(jnp.float32)  # [B]
  pair_denom = jnp.maximum(pairs_per_prompt, 1.0)
  prompt_loss = jnp.sum(pair_loss, axis=(1, 2)) / pair_denom  # [B]
  prompt_acc = jnp.sum(correct * pair_f, axis=(1, 2)) / pair_denom  # [B]
  prompt_center = jnp.square(2.0 * masked_mean(s, valid, axis=1))  # [B]

  num_prompts = jnp.sum(has_pair)
  denom = jnp.maximum(num_prompts, 1.0)
  bt_loss = _weighted_mean(prompt_loss, has_pair, denom)
  center = _weighted_mean(prompt_center, has_pair, denom)
  loss = bt_loss + center_coef * center
  metrics = {
      "loss": loss,
      "bt_loss": bt_loss,
      "pair_accuracy": _weighted_mean(prompt_acc, has_pair, denom),
      "num_pairs": jnp.sum(pairs_per_prompt),
      "loss_weight": num_prompts,
  }
  return loss, metrics


def whiten(
    x: Array,
    mask: Array | None = None,
    *,
    mean: Array | float | None = None,
    std: Array | float | None = None,
    eps: float = 1e-8,
) -> Array:
  """(x - mean) / (std + eps), same shape as x.

  x: any shape; mask: same shape (bool) or None (all entries). When `mean` / `std` are None
  they are the mean / population standard deviation of the masked entries of x (std about the
  data's own masked mean, whether or not `mean` is given). Every entry of x is transformed,
  masked-out ones included; the caller ignores them.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  if mask is None:
    mask = jnp.ones(x.shape, bool)
  else:
    chex.assert_equal_shape([x, mask])
  if mean is None or std is None:
    data_mean = masked_mean(x, mask)
    if mean is None:
      mean = data_mean
    if std is None:
      std = jnp.sqrt(masked_mean(jnp.square(x - data_mean), mask))
  return ((x - mean) / (std + eps)).astype(x.dtype)


def llama2_combined_reward(
    helpful: Array,
    safety: Array,
    unsafe_prompt: Array,
    *,
    safety_threshold: float = 0.15,
) -> Array:
  """Llama 2 reward: the safety score where it matters, else the helpfulness score. All [B].

  helpful, safety: [B] raw scores (logits) of the helpfulness and safety reward models.
  unsafe_prompt: [B] bool, True where the prompt is flagged as a safety prompt.

  The paper writes R_c = R_s if is_safety(p) or R_s(g|p) < 0.15 else R_h, with scores as
  probabilities, then whitens logit(R_c). Since a score is the sigmoid of the logit, logit(R_c)
  is the chosen raw score: this returns `safety` where `unsafe_prompt` or
  `sigmoid(safety) < safety_threshold`, else `helpful`, un-whitened ([B] f32; the caller
  applies `whiten`).
  """
  chex.assert_rank([helpful, safety, unsafe_prompt], 1)
  chex.assert_equal_shape([helpful, safety, unsafe_prompt])
  if not 0.0 <= safety_threshold <= 1.0:
    raise ValueError(f"safety_threshold is a probability in [0, 1], got {safety_threshold}")
  safety = safety.astype(jnp.float32)
  use_safety = unsafe_prompt.astype(bool) | (jax.nn.sigmoid(safety) < safety_threshold)
  return jnp.where(use_safety, safety, helpful.astype(jnp.float32))


def linear_combined_reward(
    helpful: Array,
    safety: Array,
    *,
    helpful_weight: float = 1.0,
    safety_weight: float = 1.0,
) -> Array:
  """`helpful_weight * helpful + safety_weight * safety`; [B] raw scores in, [B] f32 out."""
  chex.assert_rank([helpful, safety], 1)
  chex.assert_equal_shape([helpful, safety])
  return helpful_weight * helpful.astype(jnp.float32) + safety_weight * safety.astype(jnp.float32)


COMBINED_REWARD_KINDS = ("llama2", "linear")


def combined_reward(
    helpful: Array,
    safety: Array,
    unsafe_prompt: Array,
    *,
    kind: str = "llama2",
    safety_threshold: float = 0.15,
    helpful_weight: float = 1.0,
    safety_weight: float = 1.0,
) -> Array:
  """Combined [B] reward of kind "llama2" (`llama2_combined_reward`) or "linear"
  (`linear_combined_reward`, which ignores `unsafe_prompt`). Raises ValueError otherwise."""
  if kind == "llama2":
    return llama2_combined_reward(helpful, safety, unsafe_prompt, safety_threshold=safety_threshold)
  if kind == "linear":
    return linear_combined_reward(
        helpful, safety, helpful_weight=helpful_weight, safety_weight=safety_weight
    )
  raise ValueError(
      f"unknown combined reward kind {kind!r}; expected one of {COMBINED_REWARD_KINDS}"
  )
