"""Reward-model examples: the responses to one prompt, each tokenised as a full sequence, with their order.

A `Comparison` is one prompt (one batch element) and its K responses:

    sequences  K x int32[n_k]  BOS + rendered prompt + assistant header + response + <|end|> ... EOS,
                               exactly the tokens of the SFT example {prompt, completion: response}
                               (data/sft.py), i.e. what a policy generates and PPO scores
    ranks      int32[K]        0 = best; a pairwise record is (chosen 0, rejected 1), a ranking record
                               is 0, 1, ..., K-1 in its (best-first) order
    margin     int             the pair's preference level 0..3 (Llama 2), -1 when the record has none
    soft_label float           P(chosen better) of a pairwise record's `soft_label` (1.0 without one)
    index      int             the record's position in the list given to `tokenize_comparisons`
    prompt_len int             tokens before the first response token (BOS + prompt + header; the
                               same in every sequence of the comparison)
    ref_logps  float32[K]|None the reference model's summed response log-probs (DPO's precomputed
                               reference), None when not computed

Scores are read at each sequence's last token (EOS), so every response must fit whole: a sequence
longer than `max_len` is handled by `overflow` ("skip": drop the record, counted and logged;
"error": raise RecordError naming the record and the lengths; "truncate_left": cut the shared prompt
from the left, keeping BOS and at least half of it, until every response fits, else drop).

Batch dict (numpy, fixed shapes so a jitted step never recompiles). A row holds whole comparisons,
each response a segment of its own (attention stays inside it, positions restart), so a response's
score does not depend on what shares its row; `comparison_batch` puts one comparison in each row,
`pack_comparisons` fills rows first-fit with up to `per_row` comparisons:

    tokens      [R, T] int32        0 on padding
    segment_ids [R, T] int32        1, 2, ... one per response in the row; 0 on padding
    positions   [R, T] int32        0, 1, 2, ... restarting at every response
    score_index [R, P, K] int32     position in the row of each response's last token (0 if unused)
    ranks       [R, P, K] int32     0 = best; unused slots hold K
    valid       [R, P, K] bool      the slot holds a response
    margin      [R, P] int32        preference level, -1 = none (or an unused comparison slot)
    soft_label  [R, P] float32      P(chosen better), 1 = a hard label (and unused slots)
    response_start [R, P, K] int32  position in the row of each response's first token: the
                                    response spans response_start..score_index (0 if unused)
    ref_logps   [R, P, K] float32   the comparisons' `ref_logps` (0 where absent)
    comparison  [R, P] int32        the comparison's `index` (-1 = unused slot)

P = comparisons per row, K = responses per comparison (2 for pairs).

**Logits only where they are read** (`logit_budget=M`, for training on response log-probs: DPO,
KTO): a policy's logits are needed only for the response tokens, not for the prompt's, which in
real preference data are most of a row's tokens (and at a 150k vocabulary one float32 logit
row is 600 KB per position). The batch then lists, per row, the response tokens in order:

    logit_index [R, M] int32        slot whose logits predict the token (the token's predecessor,
                                    or for a shared prompt's response its prompt's last slot)
    logit_target [R, M] int32       slot of the token itself (0 on unused entries)
    logit_end   [R, P, K] int32     one past the response's last entry: the response's tokens are
                                    entries logit_end - (score_index - response_start + 1) ..
                                    logit_end - 1 (0 if unused)

`logit_budget_for` gives an M that no row can exceed: a row's response tokens are at most the
largest response share of any comparison times the row length.

**Shared prompts** (`share_prompt=True`; prefix sharing, Wang et al. 2024): a comparison's K
responses share their prompt tokens, so the row holds the prompt once and then each response's own
tokens, `prompt_len + sum(n_k - prompt_len)` tokens instead of `sum(n_k)`. Every token of the
comparison is in one segment, and

    branch_ids  [R, T] int32        0 on the prompt (and padding), k + 1 on response k's tokens

tells the attention (`models.layers.attention_mask`) that a response sees the prompt and itself but
no sibling. Positions continue from the prompt into each response (so each response is encoded
exactly as its own sequence would be); `response_start` is the slot of the response's first token,
whose log-prob comes from the logits at the prompt's last slot, `response_start[..., 0] - 1`, not
from the slot before it (`scoring.comparison_logps` handles both layouts).
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Sequence

import numpy as np

from rlhf_jax.data.loader import Batching
from rlhf_jax.data.records import RecordError, validate_record
from rlhf_jax.data.sft import append_listed, budget_from_share, tokenize_sft

_log = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("skip", "error", "truncate_left")
COMPARISON_KINDS = ("pairwise", "ranking")


class Comparison(NamedTuple):
  sequences: list[np.ndarray]
  ranks: np.ndarray
  margin: int
  index: int
  prompt_len: int = 1
  ref_logps: np.ndarray | None = None
  soft_label: float = 1.0


def responses_of(record: dict, kind: str) -> list[str]:
  """The record's responses, best first: [chosen, rejected] or the ranking's list."""
  return [record["chosen"], record["rejected"]] if kind == "pairwise" else list(record["responses"])


def _fit(
    sequences: list[np.ndarray],
    prompt_len: int,
    max_len: int,
    max_total: int,
    overflow: str,
    share_prompt: bool = False,
) -> list[np.ndarray] | None:
  longest = max(len(s) for s in sequences)
  total = _length([len(s) for s in sequences], prompt_len, share_prompt)
  if longest <= max_len and total <= max_total:
    return sequences
  if overflow == "truncate_left":
    # The prompt is shared, so cutting `cut` of its tokens shortens every response's sequence
    # (and a row by `cut` per response, or by `cut` once when the row holds the prompt once).
    copies = 1 if share_prompt else len(sequences)
    cut = max(longest - max_len, -(-(total - max_total) // copies))
    # Keep BOS and at least half the prompt: its end holds the assistant header, and a prompt
    # cut into its header is a sequence no policy ever produces.
    if cut <= (prompt_len - 1) // 2:
      return [np.concatenate([s[:1], s[1 + cut :]]) for s in sequences]
  return None


def tokenize_comparisons(
    records: Sequence[dict],
    kind: str,
    tokenizer,
    *,
    max_len: int,
    max_total: int | None = None,
    max_responses: int = 9,
    overflow: str = "skip",
    source: str = "records",
    share_prompt: bool = False,
) -> tuple[list[Comparison], dict]:
  """pairwise or ranking records -> (comparisons, stats).

  Each response's sequence must fit `max_len` (the model's positions) and all of a record's
  responses together `max_total` (the row length; default: unbounded), else `overflow` applies.
  Records are validated first (errors name `{source}[i]`). A ranking with more than
  `max_responses` responses raises (raise the limit or split it). `share_prompt`: the row holds
  the prompt once (module docstring), which is what `max_total` then bounds. stats =
  {"comparisons", "dropped", "left_truncated", "responses"}; one warning is logged when anything
  was dropped.
  """
  if kind not in COMPARISON_KINDS:
    raise ValueError(
        f"reward-model data must be of kind {' or '.join(COMPARISON_KINDS)}, got {kind!r}"
    )
  if overflow not in OVERFLOW_POLICIES:
    raise ValueError(f"overflow={overflow!r}; expected one of {', '.join(OVERFLOW_POLICIES)}")
  records = [
      validate_record(r, kind, source=f"{source}[{i}]", line=None) for i, r in enumerate(records)
  ]
  sft_records, owners = [], []
  for i, record in enumerate(records):
    responses = responses_of(record, kind)
    if len(responses) > max_responses:
      raise RecordError(
          f"{source}[{i}]",
          None,
          "responses",
          f"{len(responses)} responses > max_responses={max_responses}; raise "
          "config.reward.max_responses (every batch element is padded to it) or split the ranking",
      )
    sft_records += [{"prompt": record["prompt"], "completion": r} for r in responses]
    owners += [i] * len(responses)
  # No length limit here: overflow is decided per record, on all its responses together.
  examples, _ = tokenize_sft(sft_records, tokenizer, max_len=1 << 30, prompt_overflow="error")
  grouped: dict[int, list] = {}
  for owner, example in zip(owners, examples):
    grouped.setdefault(owner, []).append(example)

  comparisons, dropped, left_truncated = [], 0, 0
  for i, record in enumerate(records):
    group = grouped[i]
    prompt_len = int(np.argmax(group[0].loss_mask))  # tokens before the first target
    sequences = [e.tokens for e in group]
    fitted = _fit(sequences, prompt_len, max_len, max_total or 1 << 62, overflow, share_prompt)
    if fitted is None:
      if overflow == "error":
        raise RecordError(
            f"{source}[{i}]",
            None,
            None,
            f"its longest response needs {max(len(s) for s in sequences)} tokens (prompt "
            f"{prompt_len}) and all {len(sequences)} together {sum(len(s) for s in sequences)}, "
            f"over max_len={max_len} per response or {max_total} per row; raise "
            "config.train.seq_len (and the model's max_seq_len), or set "
            "config.data.prompt_overflow to 'skip' or 'truncate_left'",
        )
      dropped += 1
      continue
    left_truncated += fitted is not sequences
    # "margin" is a validated field of pairwise records only (metadata elsewhere).
    margin = record.get("margin", -1) if kind == "pairwise" else -1
    cut = len(sequences[0]) - len(fitted[0])  # prompt tokens truncate_left removed
    soft_label = record.get("soft_label", 1.0) if kind == "pairwise" else 1.0
    comparisons.append(
        Comparison(
            fitted,
            np.arange(len(fitted), dtype=np.int32),
            margin,
            i,
            prompt_len - cut,
            soft_label=soft_label,
        )
    )
  stats = {
      "comparisons": len(comparisons),
      "dropped": dropped,
      "left_truncated": left_truncated,
      "responses": sum(len(c.sequences) for c in comparisons),
  }
  if dropped or left_truncated:
    _log.warning(
        "tokenize_comparisons(max_len=%d, overflow=%r): of %d %s records, dropped %d and "
        "cut the prompt start of %d; raise max_len to keep them",
        max_len,
        overflow,
        len(records),
        kind,
        dropped,
        left_truncated,
    )
  return comparisons, stats


def _empty(
    rows: int,
    seq_len: int,
    per_row: int,
    num_responses: int,
    share_prompt: bool = False,
    logit_budget: int | None = None,
) -> dict[str, np.ndarray]:
  r, p, k = rows, per_row, num_responses
  extra = {"branch_ids": np.zeros((r, seq_len), np.int32)} if share_prompt else {}
  if logit_budget is not None:
    extra.update(
        logit_index=np.zeros((r, logit_budget), np.int32),
        logit_target=np.zeros((r, logit_budget), np.int32),
        logit_end=np.zeros((r, p, k), np.int32),
    )
  return {
      **extra,
      "tokens": np.zeros((r, seq_len), np.int32),
      "segment_ids": np.zeros((r, seq_len), np.int32),
      "positions": np.zeros((r, seq_len), np.int32),
      "score_index": np.zeros((r, p, k), np.int32),
      "ranks": np.full((r, p, k), k, np.int32),
      "valid": np.zeros((r, p, k), np.bool_),
      "margin": np.full((r, p), -1, np.int32),
      "soft_label": np.ones((r, p), np.float32),
      "response_start": np.zeros((r, p, k), np.int32),
      "ref_logps": np.zeros((r, p, k), np.float32),
      "comparison": np.full((r, p), -1, np.int32),
  }


def _length(lengths: Sequence[int], prompt_len: int, share_prompt: bool) -> int:
  return sum(lengths) - (len(lengths) - 1) * prompt_len * share_prompt


def comparison_length(comparison: Comparison, share_prompt: bool = False) -> int:
  """Tokens the comparison takes in a row: all its sequences, or with `share_prompt` the prompt
  once plus each response."""
  return _length([len(s) for s in comparison.sequences], comparison.prompt_len, share_prompt)


def response_tokens(comparison: Comparison) -> int:
  """The comparison's response tokens (the log-probs a policy's logits are needed for)."""
  return sum(len(s) - comparison.prompt_len for s in comparison.sequences)


def logit_budget_for(
    comparisons: Sequence[Comparison], seq_len: int, share_prompt: bool = False, multiple: int = 8
) -> int:
  """The `logit_budget` M for rows of `seq_len` tokens of these comparisons (module docstring):
  the largest response share of a comparison times seq_len, rounded up to `multiple`, at most
  seq_len. No row of them, packed in any way, holds more response tokens."""
  if not comparisons:
    return seq_len
  share = max(response_tokens(c) / comparison_length(c, share_prompt) for c in comparisons)
  return budget_from_share(share, seq_len, multiple)


def _check(
    comparison: Comparison, seq_len: int, num_responses: int, share_prompt: bool = False
) -> int:
  if len(comparison.sequences) > num_responses:
    raise ValueError(
        f"comparison {comparison.index} has {len(comparison.sequences)} responses > "
        f"num_responses={num_responses}"
    )
  if share_prompt:
    prompt = comparison.sequences[0][: comparison.prompt_len]
    for k, sequence in enumerate(comparison.sequences):
      if len(sequence) <= comparison.prompt_len or not np.array_equal(
          sequence[: comparison.prompt_len], prompt
      ):
        raise ValueError(
            f"comparison {comparison.index}, response {k}: share_prompt needs every "
            f"sequence to start with the same {comparison.prompt_len} prompt tokens and "
            "to have a response after them"
        )
  n = comparison_length(comparison, share_prompt)
  if n > seq_len:
    raise ValueError(
        f"comparison {comparison.index} needs {n} tokens (all its responses) > "
        f"seq_len={seq_len}; tokenize with a smaller max_len or raise seq_len"
    )
  return n


def _place(
    batch: dict,
    row: int,
    slot: int,
    start: int,
    first_segment: int,
    comparison: Comparison,
    share_prompt: bool = False,
) -> None:
  pl = comparison.prompt_len
  # Shared: the prompt once (branch 0), then each response's own tokens, all in one segment.
  skip = pl if share_prompt else 0  # leading tokens of each sequence already in the row
  prompt_end = start + pl - 1  # the shared prompt's last slot
  if share_prompt:
    batch["tokens"][row, start : start + pl] = comparison.sequences[0][:pl]
    batch["segment_ids"][row, start : start + pl] = first_segment
    batch["positions"][row, start : start + pl] = np.arange(pl)
    start += pl
  for k, sequence in enumerate(comparison.sequences):
    stop = start + len(sequence) - skip
    batch["tokens"][row, start:stop] = sequence[skip:]
    batch["segment_ids"][row, start:stop] = first_segment + (0 if share_prompt else k)
    batch["positions"][row, start:stop] = np.arange(skip, len(sequence))
    if share_prompt:
      batch["branch_ids"][row, start:stop] = k + 1
    first = start + pl - skip  # the response's first token
    batch["response_start"][row, slot, k] = first
    batch["score_index"][row, slot, k] = stop - 1
    if "logit_index" in batch:
      _list_logits(batch, row, slot, k, first, stop, prompt_end if share_prompt else first - 1)
    start = stop
  n = len(comparison.sequences)
  batch["ranks"][row, slot, :n] = comparison.ranks
  batch["valid"][row, slot, :n] = True
  batch["margin"][row, slot] = comparison.margin
  batch["soft_label"][row, slot] = comparison.soft_label
  batch["comparison"][row, slot] = comparison.index
  if comparison.ref_logps is not None:
    batch["ref_logps"][row, slot, :n] = comparison.ref_logps


def _list_logits(
    batch: dict, row: int, slot: int, k: int, first: int, stop: int, first_source: int
) -> None:
  """Appends response k's tokens first..stop-1 to the row's logit list (`logit_budget`)."""
  targets = np.arange(first, stop)
  sources = targets - 1
  sources[:1] = first_source  # the prompt's last slot when the prompt is shared
  batch["logit_end"][row, slot, k] = append_listed(
      batch, row, int(batch["logit_end"][row].max()), targets, sources, "response"
  )


def comparison_batch(
    comparisons: Sequence[Comparison],
    seq_len: int,
    num_responses: int,
    share_prompt: bool = False,
    logit_budget: int | None = None,
) -> dict[str, np.ndarray]:
  """One comparison per row: a batch dict with R = len(comparisons), P = 1 (module docstring)."""
  batch = _empty(len(comparisons), seq_len, 1, num_responses, share_prompt, logit_budget)
  for row, comparison in enumerate(comparisons):
    _check(comparison, seq_len, num_responses, share_prompt)
    _place(batch, row, 0, 0, 1, comparison, share_prompt=share_prompt)
  return batch


def pack_comparisons(
    comparisons: Sequence[Comparison],
    seq_len: int,
    rows: int,
    per_row: int,
    num_responses: int,
    share_prompt: bool = False,
    logit_budget: int | None = None,
) -> tuple[dict[str, np.ndarray], int]:
  """Greedy first-fit packing of a prefix of `comparisons` into `rows` rows of `seq_len` tokens,
  at most `per_row` comparisons each. Returns (batch, number packed = comparisons[:count])."""
  batch = _empty(rows, seq_len, per_row, num_responses, share_prompt, logit_budget)
  used = np.zeros(rows, np.int64)
  slots = np.zeros(rows, np.int64)
  segments = np.zeros(rows, np.int64)
  for count, comparison in enumerate(comparisons):
    n = _check(comparison, seq_len, num_responses, share_prompt)
    free = np.flatnonzero((used + n <= seq_len) & (slots < per_row))
    if free.size == 0:
      return batch, count
    row = int(free[0])
    _place(
        batch,
        row,
        int(slots[row]),
        int(used[row]),
        int(segments[row]) + 1,
        comparison,
        share_prompt=share_prompt,
    )
    used[row] += n
    slots[row] += 1
    segments[row] += 1 if share_prompt else len(comparison.sequences)
  return batch, len(comparisons)


def num_tokens(batch: dict[str, np.ndarray]) -> int:
  return int(np.count_nonzero(batch["segment_ids"]))


def comparison_batching(
    rows: int,
    seq_len: int,
    per_row: int,
    num_responses: int,
    share_prompt: bool = False,
    logit_budget: int | None = None,
) -> Batching:
  """The `data.BatchIterator` batching of comparisons (pack: up to `per_row` per row)."""
  return Batching(
      pad=lambda comparisons: comparison_batch(
          comparisons, seq_len, num_responses, share_prompt, logit_budget
      ),
      pack=lambda comparisons: pack_comparisons(
          comparisons, seq_len, rows, per_row, num_responses, share_prompt, logit_budget
      ),
      length=lambda comparison: comparison_length(comparison, share_prompt),
  )
