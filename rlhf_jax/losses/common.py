"""Array helpers shared by the losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_logprobs(logits: Array, targets: Array, *, temperature: float = 1.0) -> Array:
  """log softmax(logits / temperature)[targets]. logits: [B, T, V], targets: [B, T] -> [B, T] f32."""
  logits = logits.astype(jnp.float32) / temperature
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - logz


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  mask = mask.astype(x.dtype)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def shift_for_next_token(tokens: Array, loss_mask: Array, segment_ids: Array):
  """Targets and mask aligned with logits [:, :-1]: logits at t predict token t+1.

  A target only counts inside one document (packed rows) and where `loss_mask` marks it.
  Returns (targets [B, T-1], mask [B, T-1] bool).
  """
  targets = tokens[:, 1:]
  same_doc = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
  return targets, loss_mask[:, 1:].astype(bool) & same_doc
