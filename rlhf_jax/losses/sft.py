"""Supervised fine-tuning loss: masked next-token NLL, and the SFT `loss_fn(params, batch, rng)` for
the shared train step (`make_sft_loss_fn`)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.losses.common import shift_for_next_token, token_logprobs
from rlhf_jax.models import apply, apply_at

Array = jax.Array


def sft_loss(logits: Array, targets: Array, mask: Array) -> tuple[Array, dict[str, Array]]:
  """Mean NLL over the target tokens of the batch.

  logits: [B, T, V] (already aligned: logits[:, t] predict targets[:, t]); targets: [B, T] int;
  mask: [B, T] bool, True on supervised tokens (response tokens; prompt and padding False).

  Returns (loss, metrics). The loss is `sum(mask * nll) / sum(mask)`: a mean per token over the
  whole batch, not per sequence. `metrics["loss_weight"]` is the token count, so the train step
  combines micro-batches by token count and the gradient-accumulated loss equals the global
  per-token mean for any micro-batch split.
  """
  chex.assert_rank(logits, 3)
  chex.assert_equal_shape([logits[..., 0], targets, mask])
  mask_f = mask.astype(jnp.float32)
  logp = token_logprobs(logits, targets)
  num_tokens = jnp.sum(mask_f)
  loss = -jnp.sum(logp * mask_f) / jnp.maximum(num_tokens, 1.0)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  accuracy = jnp.sum(correct * mask_f) / jnp.maximum(num_tokens, 1.0)
  return loss, {"loss": loss, "token_accuracy": accuracy, "loss_weight": num_tokens}


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
