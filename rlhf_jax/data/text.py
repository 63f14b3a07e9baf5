"""Plain-text documents (pretraining) as `Example`s: every token after BOS is a target."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from rlhf_jax.data.sft import Example

_log = logging.getLogger(__name__)


def tokenize_text(
    records: Sequence[dict], tokenizer: Any, *, max_len: int
) -> tuple[list[Example], dict]:
  """`text` records -> examples of at most `max_len` tokens: BOS + text + EOS, all but BOS targets.

  A document longer than max_len is cut into consecutive chunks of max_len tokens (each but the
  first starting without BOS; a chunk's first token is an input only), so little text is lost. stats = {"examples", "documents", "chunked"}.
  """
  texts = [r["text"] for r in records]
  ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  examples, chunked = [], 0
  for piece in ids:
    tokens = ([bos] if bos is not None else []) + list(piece) + ([eos] if eos is not None else [])
    if len(tokens) > max_len:
      chunked += 1
    for start in range(0, len(tokens), max_len):
      chunk = np.asarray(tokens[start : start + max_len], np.int32)
      if len(chunk) < 2:
        continue  # a lone token predicts nothing
      mask = np.ones(len(chunk), np.bool_)
      mask[0] = False  # a document's first token (BOS, or a chunk's first) has nothing before it
      examples.append(Example(chunk, mask))
  if chunked:
    _log.info("tokenize_text(max_len=%d): split %d long documents into chunks", max_len, chunked)
  return examples, {"examples": len(examples), "documents": len(records), "chunked": chunked}
