"""SFT examples: chat-formatted token ids with a mask of the supervised tokens, and fixed-shape batches.

An `Example` is one document:

    tokens    int32[n]  BOS + rendered conversation + EOS
    loss_mask bool[n]   True exactly at target tokens: all the template renders for an assistant turn
                        after its `<|assistant|>\\n` header (content, `<|end|>`, `\\n`), and the final EOS

A prompt/completion record is the conversation [user: prompt, assistant: completion]; a messages record
supervises all its assistant turns. The mask marks targets, not inputs: the model's logits at t-1
predict token t, and the loss code does the shift. The first token (BOS) is never a target, so a
shifted loss never reaches across a document boundary in a packed row.

Every piece of the conversation (context up to the assistant header, assistant turn) is tokenised on
its own, exactly as at generation time, when the prompt is encoded alone and the model continues it.

Lengths. The *prompt* of an example is everything before its first target (BOS, the chat template's
headers and the context); the *response* is the rest (for a multi-turn record, later user turns too).
`tokenize_sft(..., max_len, prompt_overflow=...)` treats a prompt of max_len tokens or more, which
leaves no room for a single target, by policy:

    "skip" (default)  drop the record; counted in stats["dropped"] and logged
    "error"           raise RecordError naming the record (its file and line when `where` gives
                      them), the prompt and response lengths and max_len
    "truncate_left"   cut the prompt from the left, keeping BOS and its last tokens (so the assistant
                      header stays), so that the example fits: the prompt keeps
                      max(max_len - response_len, max_len // 2) tokens, BOS included -- the response
                      fits whole when it can, and a long response cannot crowd its prompt out below
                      half of max_len. This applies to *every* example longer than max_len, not only
                      to overflowing prompts; counted in stats["left_truncated"].

Whatever the policy, an example still longer than max_len then loses the end of its response (EOS
included), counted in stats["truncated"].

Batch dict (from `pad_batch` and `pack_examples`; numpy, fixed shapes so a jitted step never recompiles):

    tokens      [B, T] int32  token ids; 0 on padding (whatever the tokenizer's pad id)
    loss_mask   [B, T] bool   target tokens (see above); False on padding
    segment_ids [B, T] int32  1, 2, 3, ... for the documents of a row, in order; 0 on padding
    positions   [B, T] int32  0, 1, 2, ... restarting at every document; 0 on padding

Attention must stay within a segment (segment_ids equal and non-zero), which makes padded and packed
batches compute the same per-document log-probabilities.

With `logit_budget=M` the batch also lists each row's target tokens, so the LM head (the
vocabulary projection and the log-softmax) runs on those M slots only, not on the prompts':

    logit_index  [B, M] int32  slot whose logits predict the target (the slot before it)
    logit_target [B, M] int32  the target's slot (0 on unused entries)
    logit_mask   [B, M] bool   the entry is in use

`logit_budget_for` gives an M no row can exceed (the largest target share of an example times T).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Sequence

import numpy as np

from rlhf_jax.data.records import RecordError, validate_record
from rlhf_jax.data.tokenizer import render_chat
from rlhf_jax.errors import ConfigError

_log = logging.getLogger(__name__)

PROMPT_OVERFLOW_POLICIES = ("skip", "error", "truncate_left")


class Example(NamedTuple):
  tokens: np.ndarray  # int32[n]
  loss_mask: np.ndarray  # bool[n]


def _conversation(record: dict) -> list[dict]:
  if "messages" in record:
    return record["messages"]
  if "prompt" in record and "completion" in record:
    prompt = record["prompt"]
    context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return context + [{"role": "assistant", "content": record["completion"]}]
  raise ValueError(
      f"not an sft record (needs prompt+completion or messages): keys {sorted(record)}"
  )


def _pieces(tokenizer: Any, messages: list[dict]) -> list[tuple[str, bool]]:
  """The rendered conversation cut into (text, supervised) pieces, up to the last assistant turn."""
  pieces, rendered = [], ""
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    context = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
    turn = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
    if not (context.startswith(rendered) and turn.startswith(context)):
      raise ValueError(
          "the tokenizer's chat template does not render conversations as growing prefixes, so "
          "assistant turns cannot be located; use a template where each turn only appends text"
      )
    pieces += [(context[len(rendered) :], False), (turn[len(context) :], True)]
    rendered = turn
  return pieces


def tokenize_sft(
    records: Sequence[dict],
    tokenizer: Any,
    *,
    max_len: int,
    prompt_overflow: str = "skip",
    where: Sequence[str] | None = None,
    max_len_key: str | None = None,
) -> tuple[list[Example], dict]:
  """sft records -> (examples, stats), each example at most `max_len` tokens.

  Records are validated first (`validate_record(kind='sft')`), so an empty completion is an error,
  never an example that teaches an empty answer. Errors name `where[i]` (e.g. 'train.jsonl:17',
  from `load_located_records`), or `records[i]` without it; `max_len_key` is the config key that
  set max_len (e.g. 'config.train.seq_len'), named in them. `prompt_overflow` is the policy for
  prompts of max_len tokens or more (module docstring): "skip", "error" or "truncate_left".
  stats = {"examples", "dropped", "truncated", "left_truncated"}; one warning is logged when
  anything was dropped or cut.
  """
  if where is not None and len(where) != len(records):
    raise ValueError(f"where has {len(where)} entries for {len(records)} records")
  where = [f"records[{i}]" for i in range(len(records))] if where is None else where
  if prompt_overflow not in PROMPT_OVERFLOW_POLICIES:
    policies = ", ".join(map(repr, PROMPT_OVERFLOW_POLICIES))
    raise ConfigError(
        f"prompt_overflow={prompt_overflow!r}; expected one of {policies} (config.data.prompt_overflow)"
    )
  if max_len < 2:
    raise ConfigError(
        f"max_len={max_len}: an example needs at least 2 tokens (a BOS/prompt and a target); "
        "raise config.train.seq_len"
    )
  records = [validate_record(r, "sft", source=w, line=None) for w, r in zip(where, records)]
  all_pieces = [_pieces(tokenizer, _conversation(record)) for record in records]
  texts = [text for pieces in all_pieces for text, _ in pieces]
  # One batched call: the Rust tokenizer encodes the whole list in parallel.
  ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
  bos_text, bos_id, eos_id = tokenizer.bos_token, tokenizer.bos_token_id, tokenizer.eos_token_id

  examples, dropped, truncated, left_truncated = [], 0, 0, 0
  for index, pieces in enumerate(all_pieces):
    tokens, mask = [], []
    # Some templates (Llama 3) write BOS themselves; a second one would be out of distribution.
    if bos_id is not None and not (bos_text and pieces[0][0].startswith(bos_text)):
      tokens, mask = [bos_id], [False]
    for _, supervised in pieces:
      piece_ids = next(ids)
      tokens += piece_ids
      mask += [supervised] * len(piece_ids)
    if eos_id is not None and tokens[-1] != eos_id:
      tokens, mask = tokens + [eos_id], mask + [True]
    prompt_len = mask.index(True)  # validation guarantees a non-empty assistant turn
    response_len = len(tokens) - prompt_len
    if prompt_len >= max_len and prompt_overflow == "error":
      limit, policy = (
          (max_len_key, "set config.data.prompt_overflow")
          if max_len_key
          else ("max_len", "pass prompt_overflow")
      )
      raise RecordError(
          where[index],
          None,
          "prompt",
          f"{prompt_len} prompt tokens (BOS and chat template included) >= {limit}={max_len}, "
          f"leaving no room for its {response_len} response tokens; raise {limit}, shorten the "
          f"prompt, or {policy}='truncate_left' (keep its end) or 'skip'",
      )
    if prompt_len >= max_len and prompt_overflow == "skip":
      dropped += 1
      continue
    if prompt_overflow == "truncate_left" and len(tokens) > max_len:
      keep = max(max_len - response_len, max_len // 2)  # prompt tokens kept, BOS included
      if keep < prompt_len:
        head = 1 if bos_id is not None and tokens[0] == bos_id else 0
        cut = slice(head, prompt_len - (keep - head))
        del tokens[cut], mask[cut]
        left_truncated += 1
    if len(tokens) > max_len:
      truncated += 1
      tokens, mask = tokens[:max_len], mask[:max_len]
    examples.append(Example(np.asarray(tokens, np.int32), np.asarray(mask, np.bool_)))

  stats = {
      "examples": len(examples),
      "dropped": dropped,
      "truncated": truncated,
      "left_truncated": left_truncated,
  }
  if dropped or truncated or left_truncated:
    _log.warning(
        "tokenize_sft(max_len=%d, prompt_overflow=%r): of %d records, dropped %d whose prompt fills "
        "max_len, cut the prompt start of %d and the response end of %d; raise max_len to keep them",
        max_len,
        prompt_overflow,
        len(records),
        dropped,
        left_truncated,
        truncated,
    )
  return examples, stats


def _empty_batch(rows: int, seq_len: int, logit_budget: int | None = None) -> dict[str, np.ndarray]:
  listed = (
      {}
      if logit_budget is None
      else {
          "logit_index": np.zeros((rows, logit_budget), np.int32),
          "logit_target": np.zeros((rows, logit_budget), np.int32),
          "logit_mask": np.zeros((rows, logit_budget), np.bool_),
      }
  )
  return {
      "tokens": np.zeros((rows, seq_len), np.int32),
      "loss_mask": np.zeros((rows, seq_len), np.bool_),
      "segment_ids": np.zeros((rows, seq_len), np.int32),
      "positions": np.zeros((rows, seq_len), np.int32),
      **listed,
  }


def logit_budget_for(examples: Sequence[Example], seq_len: int, multiple: int = 8) -> int:
  """The `logit_budget` M for rows of `seq_len` tokens of these examples (module docstring): the
  largest share of target tokens in an example times seq_len, rounded up to `multiple`, at most
  seq_len. No row of them, packed in any way, holds more targets."""
  if not examples:
    return seq_len
  share = max(np.count_nonzero(e.loss_mask) / len(e.tokens) for e in examples)
  return budget_from_share(share, seq_len, multiple)


def budget_from_share(share: float, seq_len: int, multiple: int = 8) -> int:
  """A logit budget for rows of `seq_len` tokens whose examples have at most `share` of their
  tokens listed: share x seq_len rounded up to `multiple`, at most seq_len (SFT targets here,
  comparisons' responses in data/preference.py)."""
  return min(seq_len, -(-int(np.ceil(share * seq_len - 1e-9)) // multiple) * multiple)


def _check_fits(example: Example, seq_len: int, index: int) -> int:
  n = len(example.tokens)
  if n > seq_len:
    raise ValueError(
        f"example {index} has {n} tokens > seq_len={seq_len}; tokenize with max_len <= seq_len"
    )
  if n == 0 or example.loss_mask[0]:
    raise ValueError(f"example {index}: must be non-empty and its first token must not be a target")
  return n


def _place(batch: dict, row: int, start: int, example: Example, segment: int) -> None:
  stop = start + len(example.tokens)
  batch["tokens"][row, start:stop] = example.tokens
  batch["loss_mask"][row, start:stop] = example.loss_mask
  batch["segment_ids"][row, start:stop] = segment
  batch["positions"][row, start:stop] = np.arange(stop - start)
  if "logit_index" in batch:
    targets = start + np.flatnonzero(example.loss_mask)
    offset = int(np.count_nonzero(batch["logit_mask"][row]))
    end = append_listed(batch, row, offset, targets, targets - 1, "target")
    batch["logit_mask"][row, offset:end] = True


def append_listed(
    batch: dict, row: int, offset: int, targets: np.ndarray, sources: np.ndarray, what: str
) -> int:
  """Writes tokens to entries offset.. of a row's logit list (`logit_budget`): their slots
  `targets` and the slots whose logits predict them, `sources`. Returns the entry after them;
  a row past its budget is an error. Shared by SFT targets and comparisons' responses."""
  end = offset + len(targets)
  if end > batch["logit_index"].shape[1]:
    raise ValueError(
        f"row {row} needs {end} {what} log-probs > logit_budget="
        f"{batch['logit_index'].shape[1]} (use logit_budget_for)"
    )
  batch["logit_target"][row, offset:end] = targets
  batch["logit_index"][row, offset:end] = sources
  return end


def pad_batch(
    examples: Sequence[Example], seq_len: int, logit_budget: int | None = None
) -> dict[str, np.ndarray]:
  """One example per row, right-padded to seq_len: a [len(examples), seq_len] batch dict."""
  batch = _empty_batch(len(examples), seq_len, logit_budget)
  for row, example in enumerate(examples):
    _check_fits(example, seq_len, row)
    _place(batch, row, 0, example, segment=1)
  return batch


def pack_examples(
    examples: Sequence[Example], seq_len: int, rows: int, logit_budget: int | None = None
) -> tuple[dict[str, np.ndarray], int]:
  """Greedy first-fit packing of a prefix of `examples` into a [rows, seq_len] batch dict.

  Examples are taken in order, each into the first row with room, until one fits in no row.
  Returns (batch, number of examples packed); the packed ones are exactly examples[:count], so a
  caller's position in its example stream stays a single index.
  """
  batch = _empty_batch(rows, seq_len, logit_budget)
  used = np.zeros(rows, np.int64)  # tokens filled per row
  documents = np.zeros(rows, np.int64)  # documents per row, i.e. the last segment id
  for count, example in enumerate(examples):
    n = _check_fits(example, seq_len, count)
    free = np.flatnonzero(used + n <= seq_len)
    if free.size == 0:
      return batch, count
    row = int(free[0])
    documents[row] += 1
    _place(batch, row, int(used[row]), example, segment=int(documents[row]))
    used[row] += n
  return batch, len(examples)


def encode_prompt(tokenizer: Any, prompt: str | list[dict]) -> list[int]:
  """Token ids a model is sampled from for `prompt`: BOS + the rendered context up to and including
  the assistant header, tokenised exactly as the context piece of a training example."""
  messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
  text = render_chat(tokenizer, messages, add_generation_prompt=True)
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  bos_text, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
  if bos_id is not None and not (bos_text and text.startswith(bos_text)):
    ids = [bos_id] + ids
  return ids
