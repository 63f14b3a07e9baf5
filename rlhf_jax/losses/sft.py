"""Supervised fine-tuning loss: masked next-token NLL."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import token_logprobs

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
