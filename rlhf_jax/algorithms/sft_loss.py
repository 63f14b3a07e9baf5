"""The SFT `loss_fn(params, batch, rng)` for the shared train step."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rlhf_jax.losses.common import shift_for_next_token
from rlhf_jax.losses.sft import sft_loss
from rlhf_jax.models import apply, apply_at


def make_sft_loss_fn(graphdef: nnx.GraphDef):
  """batch: tokens, loss_mask, segment_ids, positions, each [B, T] (see rlhf_jax.data.sft); with
  a target list (logit_index, logit_target, logit_mask [B, M]) the LM head runs on its M slots
  only, for the same loss."""
  def loss_fn(params, batch, rng):
    del rng  # no dropout
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    if "logit_index" in batch:
      logits = apply_at(graphdef, params, *args, batch["logit_index"])  # [B, M, V]
      targets = jnp.take_along_axis(batch["tokens"], batch["logit_target"], axis=1)
      return sft_loss(logits, targets, batch["logit_mask"])
    logits, _ = apply(graphdef, params, *args)
    targets, mask = shift_for_next_token(batch["tokens"], batch["loss_mask"], batch["segment_ids"])
    return sft_loss(logits[:, :-1], targets, mask)
  return loss_fn
