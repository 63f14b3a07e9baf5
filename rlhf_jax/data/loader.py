"""A deterministic, resumable, endless batch iterator over tokenised examples.

The stream is epoch 0's order, then epoch 1's, ... where epoch e's order is a permutation drawn from
(seed, e); a batch may straddle two epochs, so every example is seen once per epoch and no batch is
ragged. The position in the stream is (epoch, index of the next example in that epoch's order); it is
all `state()` saves, and `restore(state)` continues with exactly the batches an uninterrupted run
would have produced. Batches are the dicts of data/sft.py (`pad_batch` / `pack_examples`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from rlhf_jax.data.sft import Example, pack_examples, pad_batch


class Batching(NamedTuple):
  """How examples become batches: `pad(examples)` one per row, `pack(examples) -> (batch, count)`
  first-fit of a prefix, `length(example)` tokens it takes in a row."""

  pad: Callable[[list[Any]], dict[str, np.ndarray]]
  pack: Callable[[list[Any]], tuple[dict[str, np.ndarray], int]]
  length: Callable[[Any], int]


def sft_batching(batch_size: int, seq_len: int, logit_budget: int | None = None) -> Batching:
  """SFT examples' batching; `logit_budget`: batches list their target tokens (data/sft.py)."""
  return Batching(
      pad=lambda examples: pad_batch(examples, seq_len, logit_budget),
      pack=lambda examples: pack_examples(examples, seq_len, batch_size, logit_budget),
      length=lambda example: len(example.tokens),
  )


class BatchIterator:
  """Yields [batch_size, seq_len] batch dicts forever.

  Without packing, each row holds one example. With packing, rows are filled first-fit from the
  upcoming examples of the stream, stopping at the first one that fits nowhere (it opens the next
  batch), so the consumed examples are always a contiguous stretch of the stream.
  `batching` turns examples into batches (default: SFT `Example`s, data/sft.py; reward-model
  comparisons bring their own, data/preference.py).
  """

  def __init__(
      self,
      examples: Sequence[Example],
      *,
      batch_size: int,
      seq_len: int,
      seed: int,
      packing: bool,
      shuffle: bool = True,
      batching: Batching | None = None,
  ):
    if not examples:
      raise ValueError("BatchIterator needs at least one example")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self._batching = batching or sft_batching(batch_size, seq_len)
    longest = max(self._batching.length(example) for example in examples)
    if longest > seq_len:
      raise ValueError(
          f"an example has {longest} tokens > seq_len={seq_len}; tokenize with max_len <= seq_len"
      )
    self._examples = examples
    self._batch_size, self._seq_len = batch_size, seq_len
    self._seed, self._packing, self._shuffle = seed, packing, shuffle
    self._epoch, self._index = 0, 0
    self._cached_order: tuple[int, np.ndarray] | None = None

  def _order(self, epoch: int) -> np.ndarray:
    if self._cached_order is None or self._cached_order[0] != epoch:
      n = len(self._examples)
      # Seeding with (seed, epoch) makes any epoch's order computable on its own after a restore.
      rng = np.random.default_rng((self._seed, epoch))
      self._cached_order = (epoch, rng.permutation(n) if self._shuffle else np.arange(n))
    return self._cached_order[1]

  def _upcoming(self) -> Iterator[Example]:
    """The stream from the current position on, without moving it."""
    epoch, index = self._epoch, self._index
    while True:
      order = self._order(epoch)
      for i in order[index:]:
        yield self._examples[i]
      epoch, index = epoch + 1, 0

  def _advance(self, count: int) -> None:
    index = self._index + count
    n = len(self._examples)
    self._epoch, self._index = self._epoch + index // n, index % n

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    stream = self._upcoming()
    if not self._packing:
      examples = [next(stream) for _ in range(self._batch_size)]
      batch = self._batching.pad(examples)
      self._advance(len(examples))
      return batch
    # Every example has >= 1 token, so no more than rows * seq_len of them can be packed; one
    # beyond the budget is enough for pack_examples to see where the batch ends.
    budget, candidates = self._batch_size * self._seq_len, []
    while budget >= 0:
      candidates.append(next(stream))
      budget -= self._batching.length(candidates[-1])
    batch, count = self._batching.pack(candidates)
    self._advance(count)
    return batch

  def state(self) -> dict[str, int]:
    """The stream position, JSON-serialisable: {"epoch": int, "index": int}."""
    return {"epoch": int(self._epoch), "index": int(self._index)}

  def restore(self, state: dict) -> None:
    """Continues from a position saved by `state()` (with the same examples, seed and shapes)."""
    epoch, index = state.get("epoch"), state.get("index")
    valid_epoch = isinstance(epoch, int) and epoch >= 0
    if not (valid_epoch and isinstance(index, int) and 0 <= index < len(self._examples)):
      raise ValueError(
          f"bad data iterator state {state!r}: expected {{'epoch': int >= 0, 'index': int in "
          f"0..{len(self._examples) - 1}}} as written by BatchIterator.state() for these examples"
      )
    self._epoch, self._index = epoch, index


def num_tokens(batch: dict[str, np.ndarray]) -> int:
  """Count of real (non-padding) tokens in a batch, for tokens/s."""
  return int(np.count_nonzero(batch["segment_ids"]))
