"""The SFT `loss_fn(params, batch, rng)` for the shared train step."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rlhf_jax.losses.common import shift_for_next_token
from rlhf_jax.losses.sft import sft_loss
from rlhf_jax.models import apply, apply_at


def target_logits(graphdef: nnx.GraphDef, params, batch: dict):
  """(logits [B, N, V], targets [B, N], mask [B, N]) of an SFT-layout batch's next-token targets
  (tokens, loss_mask, segment_ids, positions [B, T]; rlhf_jax.data.sft). With a target list
  (logit_index, logit_target, logit_mask [B, M]) N = M and the LM head runs on those slots only;
  otherwise N = T - 1, every slot's logits."""
  args = (batch["tokens"], batch["positions"], batch["segment_ids"])
  if "logit_index" in batch:
    logits = apply_at(graphdef, params, *args, batch["logit_index"])
    targets = jnp.take_along_axis(batch["tokens"], batch["logit_target"], axis=1)
    return logits, targets, batch["logit_mask"]
  logits, _ = apply(graphdef, params, *args)
  targets, mask = shift_for_next_token(batch["tokens"], batch["loss_mask"], batch["segment_ids"])
  return logits[:, :-1], targets, mask


def make_sft_loss_fn(graphdef: nnx.GraphDef):
  """batch: tokens, loss_mask, segment_ids, positions, each [B, T] (see rlhf_jax.data.sft); with
  a target list (logit_index, logit_target, logit_mask [B, M]) the LM head runs on its M slots
  only, for the same loss (`target_logits`)."""

  def loss_fn(params, batch, rng):
    del rng  # no dropout
    return sft_loss(*target_logits(graphdef, params, batch))

  return loss_fn
