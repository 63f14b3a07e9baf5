"""Scoring sequences with a model (no gradients): per-token log-probs of responses under a policy or
a reference, and scalar scores from a reward/value model. PPO, DPO and the evaluations use these."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.losses.common import token_logprobs
from rlhf_jax.models import apply, apply_at, apply_rows

Array = jax.Array


def response_logprobs(
    graphdef: nnx.GraphDef,
    params,
    tokens: Array,
    segment_ids: Array,
    positions: Array,
    response_mask: Array,
    *,
    temperature: float = 1.0,
    share: tuple[int, int] | None = None,
    response_len: int | None = None,
) -> Array:
  """log pi(token_t | tokens_<t) / T-scaled, at response positions: [B, T] float32, 0 elsewhere.

  tokens, segment_ids, positions, response_mask: [B, T] (e.g. from `generate.full_sequence`).
  Column t holds the log-prob of tokens[:, t] (from the logits at t-1), so it lines up with
  `response_mask`; the first column is never a response token. share: (K, N), rows in groups of K
  sharing all but their last N columns, each group's prefix run once (`models.apply_rows`).
  response_len: N, the responses lie in the last N columns (a rollout's layout): the LM head runs
  on those only (default: every column).
  """
  head_from = logit_columns_from(tokens.shape[1], response_len)
  logits, _ = apply_rows(
      graphdef, params, tokens, positions, segment_ids, share, head_from=head_from
  )
  logp = token_logprobs(logits[:, :-1], tokens[:, head_from + 1 :], temperature=temperature)
  logp = jnp.pad(logp, ((0, 0), (head_from + 1, 0)))
  return jnp.where(response_mask, logp, 0.0)


def logit_columns_from(length: int, response_len: int | None) -> int:
  """The first column whose logits a response in the last `response_len` of `length` columns
  needs (the one before it); 0 for None (every column)."""
  if response_len is None:
    return 0
  if not 0 < response_len < length:
    raise ValueError(
        f"response_len={response_len} must be in [1, {length - 1}] for rows of " f"{length} columns"
    )
  return length - response_len - 1


def last_token_scores(
    graphdef: nnx.GraphDef,
    params,
    tokens: Array,
    segment_ids: Array,
    positions: Array,
    share: tuple[int, int] | None = None,
) -> Array:
  """A scalar-head model's score at each row's last real token: [B] float32 (`share` as in
  `response_logprobs`)."""
  scores, _ = apply_rows(graphdef, params, tokens, positions, segment_ids, share)
  last = jnp.max(jnp.where(segment_ids > 0, jnp.arange(tokens.shape[1])[None], -1), axis=1)
  return jnp.take_along_axis(scores, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]


def comparison_logps(graphdef: nnx.GraphDef, params, batch: dict) -> tuple[Array, Array]:
  """Summed log-probs of every response slot of a comparison batch (data/preference.py) under an
  LM: ([R, P, K] float32 sums of log pi(y_t | ...) over each response's tokens
  `response_start..score_index`, [R, P, K] int32 response lengths). One forward pass per row;
  the span sums are differences of a running sum, so packed responses cost nothing extra. Unused
  slots give 0 (mask with batch["valid"]). Rows with shared prompts (batch["branch_ids"]): a
  response's first token is scored from the logits at its prompt's last slot, the others from
  their predecessors in the response, as in the unshared layout. Batches with a logit list
  (batch["logit_index"] [R, M], `data.preference` `logit_budget`): the LM head and log-softmax
  run on those M slots only, not on every slot of the row; the sums are the same."""
  branch_ids = batch.get("branch_ids")
  start, end = batch["response_start"], batch["score_index"]
  lengths = jnp.where(batch["valid"], end - start + 1, 0)
  if "logit_index" in batch:
    return _listed_logps(graphdef, params, batch, lengths), lengths
  logits, _ = apply(
      graphdef,
      params,
      batch["tokens"],
      batch["positions"],
      batch["segment_ids"],
      branch_ids=branch_ids,
  )
  logp = token_logprobs(logits[:, :-1], batch["tokens"][:, 1:])
  running = jnp.cumsum(jnp.concatenate([jnp.zeros_like(logp[:, :1]), logp], axis=1), axis=1)
  r, p, k = batch["score_index"].shape
  take = lambda x, index: jnp.take_along_axis(x, index.reshape(r, p * k), axis=1).reshape(r, p, k)
  if branch_ids is None:
    sums = take(running, end) - take(running, jnp.maximum(start - 1, 0))
  else:
    # Token `start` follows the prompt's last slot, not slot start - 1 (a sibling's last token).
    prompt_end = jnp.broadcast_to(jnp.maximum(start[..., :1] - 1, 0), start.shape)
    rows = jnp.take_along_axis(logits, prompt_end.reshape(r, p * k, 1), axis=1)  # [R, P*K, V]
    first = token_logprobs(rows, take(batch["tokens"], start).reshape(r, p * k)).reshape(r, p, k)
    sums = first + take(running, end) - take(running, start)
  return jnp.where(batch["valid"], sums, 0.0), lengths


def _listed_logps(graphdef: nnx.GraphDef, params, batch: dict, lengths: Array) -> Array:
  """`comparison_logps`'s sums [R, P, K] from the batch's logit list: log-probs of the tokens at
  logit_target from the logits at logit_index, summed over each response's run of entries."""
  logits = apply_at(
      graphdef,
      params,
      batch["tokens"],
      batch["positions"],
      batch["segment_ids"],
      batch["logit_index"],
      branch_ids=batch.get("branch_ids"),
  )  # [R, M, V]
  targets = jnp.take_along_axis(batch["tokens"], batch["logit_target"], axis=1)
  logp = token_logprobs(logits, targets)  # [R, M]
  r, p, k = lengths.shape
  used = batch["logit_end"].reshape(r, p * k).max(axis=1)  # entries in use per row
  logp = jnp.where(jnp.arange(logp.shape[1])[None] < used[:, None], logp, 0.0)
  running = jnp.cumsum(jnp.pad(logp, ((0, 0), (1, 0))), axis=1)  # [R, M + 1]

  def take(index):
    return jnp.take_along_axis(running, index.reshape(r, p * k), axis=1).reshape(r, p, k)

  end = batch["logit_end"]
  sums = take(end) - take(jnp.maximum(end - lengths, 0))
  return jnp.where(batch["valid"], sums, 0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature"))
def sequence_logprob_sums(
    graphdef: nnx.GraphDef,
    params,
    tokens,
    segment_ids,
    positions,
    response_mask,
    temperature: float = 1.0,
) -> Array:
  """Sum of response log-probs per row: [B] float32 (jitted)."""
  lp = response_logprobs(
      graphdef, params, tokens, segment_ids, positions, response_mask, temperature=temperature
  )
  return jnp.sum(lp, axis=1)


def comparison_scores(graphdef: nnx.GraphDef, params, batch: dict) -> Array:
  """Scores of every response slot of a comparison batch (data/preference.py): [R, P, K] float32.

  batch["tokens"|"segment_ids"|"positions"]: [R, T] (and "branch_ids" with shared prompts);
  batch["score_index"]: [R, P, K], the row position of each response's last token. Unused slots
  score garbage: mask with batch["valid"].
  """
  scores, _ = apply(
      graphdef,
      params,
      batch["tokens"],
      batch["positions"],
      batch["segment_ids"],
      branch_ids=batch.get("branch_ids"),
  )
  return pick_scores(scores, batch["score_index"])


def pick_scores(scores: Array, score_index: Array) -> Array:
  """Per-position scores [R, T] read at each response's last token: [R, P, K] (score_index [R, P, K])."""
  r, p, k = score_index.shape
  return jnp.take_along_axis(scores, score_index.reshape(r, p * k), axis=1).reshape(r, p, k)
