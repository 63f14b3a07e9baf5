"""Hindsight Instruction Relabeling loss (Zhang et al. 2023): SFT on relabeled pairs, a contrastive
term over instructions, and an entropy bonus.

Each example is one output y_b scored under G instructions: slot 0 is its own relabeled
instruction x*_b (one the output satisfies), slots 1..G-1 are other instructions (ones it does
not satisfy), padded to a fixed G so nothing recompiles.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import token_logprobs

Array = jax.Array


def hir_loss(
    logits: Array,
    targets: Array,
    mask: Array,
    valid: Array,
    *,
    contrastive_coef: float,
    entropy_coef: float,
) -> tuple[Array, dict[str, Array]]:
  """The HIR loss, a mean over examples.

  logits: [B, G, T, V], aligned (logits[:, g, t] predict targets[:, g, t]); targets: [B, G, T] int;
  mask: [B, G, T] bool, True on the response tokens of y_b under instruction g; valid: [B, G]
  bool, the slot holds a sequence (valid[b, 0] False: a padding example, weight 0).

  Per example b, with s_bg = sum_t mask * log p(y_b,t | x_g, y_b,<t) ([B, G] summed log-probs):

    nll_b         = -mean_t log p(y_b | x*_b)   (slot 0's tokens; HIR's supervised term)
    contrastive_b = -log softmax_g(s_bg)[0]     over the valid slots: the output's own instruction
                                                against the others; exactly 0 with none valid
    entropy_b     = mean_t H(softmax(logits[b, 0, t]))  over slot 0's tokens
    loss          = mean_b [nll_b + contrastive_coef * contrastive_b - entropy_coef * entropy_b]

  The paper's contrastive term uses log P(o | p) as the logit (summed, as here); the entropy term
  is a bonus (subtracted), as in the authors' code, keeping the policy from collapsing onto the
  relabeled data. `metrics["loss_weight"]` is the number of examples, so micro-batches combine
  into the same mean. `instruction_accuracy`: the fraction of examples with at least one negative
  whose own instruction scores highest.
  """
  chex.assert_rank(logits, 4)
  chex.assert_equal_shape([logits[..., 0], targets, mask])
  chex.assert_equal_shape([valid, mask[..., 0]])
  mask = mask & valid[..., None]
  mask_f = mask.astype(jnp.float32)
  example = valid[:, 0].astype(jnp.float32)  # [B]
  num_examples = jnp.maximum(jnp.sum(example), 1.0)
  mean_over_examples = lambda x: jnp.sum(x * example) / num_examples

  logp = token_logprobs(logits, targets)  # [B, G, T]
  scores = jnp.sum(logp * mask_f, axis=-1)  # [B, G]
  own_tokens = jnp.maximum(jnp.sum(mask_f[:, 0], axis=-1), 1.0)  # [B]
  nll = -scores[:, 0] / own_tokens

  # Slot 0 always takes part (a padding example's is 0): no all -inf row, so no NaN gradient.
  in_softmax = valid.at[:, 0].set(True)
  masked_scores = jnp.where(in_softmax, scores, -jnp.inf)
  contrastive = jax.nn.logsumexp(masked_scores, axis=-1) - scores[:, 0]

  own_logits = logits[:, 0].astype(jnp.float32)  # [B, T, V]
  own_logp = jax.nn.log_softmax(own_logits, axis=-1)
  token_entropy = -jnp.sum(jnp.exp(own_logp) * own_logp, axis=-1)  # [B, T]
  entropy = jnp.sum(token_entropy * mask_f[:, 0], axis=-1) / own_tokens

  per_example = nll + contrastive_coef * contrastive - entropy_coef * entropy
  loss = mean_over_examples(per_example)
  negatives = jnp.sum(valid[:, 1:], axis=-1)  # [B]
  has_negative = (negatives > 0) & valid[:, 0]
  best_is_own = jnp.argmax(masked_scores, axis=-1) == 0
  instruction_accuracy = jnp.sum(jnp.where(has_negative, best_is_own, False)) / jnp.maximum(
      jnp.sum(has_negative), 1
  )
  return loss, {
      "loss": loss,
      "nll": mean_over_examples(nll),
      "contrastive": mean_over_examples(contrastive),
      "entropy": mean_over_examples(entropy),
      "negatives": mean_over_examples(negatives.astype(jnp.float32)),
      "instruction_accuracy": instruction_accuracy.astype(jnp.float32),
      "loss_weight": jnp.sum(example),
  }
