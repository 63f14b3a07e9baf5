"""The SFT `loss_fn(params, batch, rng)` for the shared train step."""

from __future__ import annotations

from flax import nnx

from rlhf_jax.losses.common import shift_for_next_token
from rlhf_jax.losses.sft import sft_loss
from rlhf_jax.models import apply


def make_sft_loss_fn(graphdef: nnx.GraphDef):
  """batch: tokens, loss_mask, segment_ids, positions, each [B, T] (see rlhf_jax.data.sft)."""
  def loss_fn(params, batch, rng):
    del rng  # no dropout
    logits, _ = apply(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    targets, mask = shift_for_next_token(batch["tokens"], batch["loss_mask"], batch["segment_ids"])
    return sft_loss(logits[:, :-1], targets, mask)
  return loss_fn
