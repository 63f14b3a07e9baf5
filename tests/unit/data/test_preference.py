"""Reward-model data: comparisons are tokenised exactly like SFT examples, bad records name themselves,
overflow policies keep every scored EOS, and packing rows with several comparisons changes no score.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/data/test_preference.py.
"""

import collections
import json
import re

import numpy as np
import pytest

from rlhf_jax.data import BatchIterator, RecordError, tokenize_sft
from rlhf_jax.data.preference import (
    Comparison,
    comparison_batch,
    comparison_batching,
    comparison_length,
    pack_comparisons,
    tokenize_comparisons,
)
from tests.helpers.preference_data import (
    BOS,
    EOS,
    PAIRS,
    RANKINGS,
    build_many,
    build_mixed,
    build_tokenizer,
    key,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return build_tokenizer(tmp_path_factory)


def sft_tokens(tokenizer, prompt, response):
  (example,), _ = tokenize_sft(
      [{"prompt": prompt, "completion": response}], tokenizer, max_len=1 << 20
  )
  return example.tokens.tolist()


def responses(record):
  return [record["chosen"], record["rejected"]] if "chosen" in record else record["responses"]


# ---------------------------------------------------------------- tokenisation


@pytest.mark.parametrize("kind, records", [("pairwise", PAIRS), ("ranking", RANKINGS)])
def test_sequences_are_the_sft_tokens_of_each_response(tokenizer, kind, records):
  comparisons, stats = tokenize_comparisons(records, kind, tokenizer, max_len=128)
  assert stats == {
      "comparisons": 3,
      "dropped": 0,
      "left_truncated": 0,
      "responses": sum(len(responses(r)) for r in records),
  }
  for i, (comparison, record) in enumerate(zip(comparisons, records)):
    assert comparison.index == i
    texts = responses(record)
    assert [s.tolist() for s in comparison.sequences] == [
        sft_tokens(tokenizer, record["prompt"], text) for text in texts
    ]
    assert all(s.dtype == np.int32 and s[0] == BOS and s[-1] == EOS for s in comparison.sequences)
    assert comparison.ranks.dtype == np.int32
    assert comparison.ranks.tolist() == list(range(len(texts)))  # best first
    assert comparison.margin == record.get("margin", -1)
  assert [c.margin for c in comparisons] == ([2, -1, 0] if kind == "pairwise" else [-1, -1, -1])
  # The responses of one prompt share every token before the first SFT target (the prompt).
  for comparison, record in zip(comparisons, records):
    n = prompt_len(tokenizer, record)
    assert len({tuple(s[:n].tolist()) for s in comparison.sequences}) == 1


def test_index_maps_back_to_the_record_when_some_are_dropped(tokenizer):
  long = {"prompt": "Repeat: " + ", ".join(["sun"] * 60), "chosen": "sun", "rejected": "moon"}
  records = [long, PAIRS[0], long, PAIRS[2]]
  comparisons, stats = tokenize_comparisons(records, "pairwise", tokenizer, max_len=48)
  assert [c.index for c in comparisons] == [1, 3]
  assert stats["dropped"] == 2 and stats["comparisons"] == 2
  for c in comparisons:
    assert c.sequences[0].tolist() == sft_tokens(
        tokenizer, records[c.index]["prompt"], records[c.index]["chosen"]
    )


BAD = [
    (
        "ranking",
        {"prompt": "p", "responses": ["only one"]},
        {},
        r"^records\[2\]: field 'responses': expected 2\.\.9 responses .*got 1",
    ),
    (
        "ranking",
        {"prompt": "p", "responses": ["a", "b", "a"]},
        {},
        r"^records\[2\]: field 'responses': responses \[0, 2\] are identical",
    ),
    (
        "ranking",
        {"prompt": "p", "responses": ["a", "b", " b\n"]},
        {},
        r"^records\[2\]: field 'responses': responses \[1, 2\] are identical",
    ),
    (
        "pairwise",
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {},
        r"^records\[2\]: field 'rejected': is identical to 'chosen'",
    ),
    (
        "pairwise",
        {"prompt": "p", "chosen": "same", "rejected": "  same\n"},
        {},
        r"^records\[2\]: field 'rejected': is identical to 'chosen'",
    ),
    (
        "pairwise",
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 4},
        {},
        r"^records\[2\]: field 'margin': expected an integer 0\.\.3 .*got 4",
    ),
    (
        "pairwise",
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": -1},
        {},
        r"^records\[2\]: field 'margin': expected an integer 0\.\.3 .*got -1",
    ),
    (
        "pairwise",
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5},
        {},
        r"^records\[2\]: field 'margin': expected an integer 0\.\.3, got 1\.5",
    ),
    (
        "pairwise",
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"},
        {},
        r"^records\[2\]: field 'margin': expected an integer 0\.\.3, got 'big'",
    ),
    (
        "pairwise",
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": True},
        {},
        r"^records\[2\]: field 'margin': expected an integer",
    ),
    (
        "ranking",
        {"prompt": "p", "responses": list("abcd")},
        {"max_responses": 3},
        r"^records\[2\]: field 'responses': 4 responses > max_responses=3; raise "
        r"config\.reward\.max_responses",
    ),
    (
        "ranking",
        {"prompt": "p", "responses": list("abcdefghij")},
        {},
        r"^records\[2\]: field 'responses': expected 2\.\.9 responses .*got 10",
    ),
]


@pytest.mark.parametrize("kind, bad, kwargs, expected", BAD)
def test_bad_records_name_the_record_and_field(tokenizer, kind, bad, kwargs, expected):
  good = PAIRS if kind == "pairwise" else RANKINGS[1:]  # rankings of 2 and 3 responses
  records = [good[0], good[1], bad]
  with pytest.raises(RecordError) as info:
    tokenize_comparisons(records, kind, tokenizer, max_len=128, **kwargs)
  assert re.search(expected, str(info.value)), str(info.value)
  assert info.value.source == "records[2]"
  # With a source, the message names it instead.
  with pytest.raises(RecordError, match=r"^data/rm\.jsonl\[2\]: field "):
    tokenize_comparisons(records, kind, tokenizer, max_len=128, source="data/rm.jsonl", **kwargs)


def test_integral_float_margin_is_accepted(tokenizer):
  (comparison,), _ = tokenize_comparisons(
      [{**PAIRS[0], "margin": 3.0}], "pairwise", tokenizer, max_len=128
  )
  assert comparison.margin == 3 and isinstance(comparison.margin, int)


@pytest.mark.parametrize("margin", [None, "big", 2.5])
def test_ranking_metadata_named_margin_is_not_a_preference_level(tokenizer, margin):
  record = {**RANKINGS[1], "margin": margin}
  (comparison,), _ = tokenize_comparisons([record], "ranking", tokenizer, max_len=128)
  assert comparison.margin == -1


def test_bad_kind_and_policy(tokenizer):
  with pytest.raises(ValueError, match="pairwise or ranking, got 'sft'"):
    tokenize_comparisons([{"prompt": "p", "completion": "c"}], "sft", tokenizer, max_len=64)
  with pytest.raises(
      ValueError, match=r"overflow='truncate'; expected one of skip, error, truncate_left"
  ):
    tokenize_comparisons(PAIRS, "pairwise", tokenizer, max_len=64, overflow="truncate")


# ---------------------------------------------------------------- overflow


LONG_PROMPT = {
    "prompt": "Repeat: " + ", ".join(["sun", "moon", "star"] * 12),
    "chosen": "sun, moon",
    "rejected": "a much longer answer that is wrong",
    "margin": 1,
}


def full_sequences(tokenizer, record):
  return [np.asarray(sft_tokens(tokenizer, record["prompt"], r)) for r in responses(record)]


def prompt_len(tokenizer, record):
  """Tokens before the first SFT target: BOS, the rendered prompt and the assistant header."""
  (example,), _ = tokenize_sft(
      [{"prompt": record["prompt"], "completion": "x"}], tokenizer, max_len=1 << 20
  )
  return int(np.argmax(example.loss_mask))


def test_overflow_skip_drops_and_counts(tokenizer, caplog):
  full = full_sequences(tokenizer, LONG_PROMPT)
  max_len = max(len(s) for s in full) - 1
  records = [PAIRS[0], LONG_PROMPT, PAIRS[2]]
  with caplog.at_level("WARNING"):
    comparisons, stats = tokenize_comparisons(records, "pairwise", tokenizer, max_len=max_len)
  assert [c.index for c in comparisons] == [0, 2]
  assert stats == {"comparisons": 2, "dropped": 1, "left_truncated": 0, "responses": 4}
  assert "dropped 1" in caplog.text
  # max_total (all responses of the record together) also drops.
  total = sum(len(s) for s in full)
  _, stats = tokenize_comparisons(records, "pairwise", tokenizer, max_len=1000, max_total=total - 1)
  assert stats["dropped"] == 1
  _, stats = tokenize_comparisons(
      records, "pairwise", tokenizer, max_len=max_len + 1, max_total=total
  )
  assert stats["dropped"] == 0


def test_overflow_error_names_the_record(tokenizer):
  full = full_sequences(tokenizer, LONG_PROMPT)
  longest, total = max(len(s) for s in full), sum(len(s) for s in full)
  with pytest.raises(RecordError) as info:
    tokenize_comparisons(
        [PAIRS[0], LONG_PROMPT],
        "pairwise",
        tokenizer,
        max_len=longest - 1,
        overflow="error",
        source="train.jsonl",
    )
  message = str(info.value)
  assert message.startswith("train.jsonl[1]: ")
  assert f"needs {longest} tokens" in message and f"together {total}" in message
  assert f"max_len={longest - 1}" in message and "truncate_left" in message
  with pytest.raises(
      RecordError, match=r"^records\[1\]: .*max_len=1000 per response or 50 per row"
  ):
    tokenize_comparisons(
        [PAIRS[0], LONG_PROMPT], "pairwise", tokenizer, max_len=1000, max_total=50, overflow="error"
    )


@pytest.mark.parametrize("limit", ["max_len", "max_total"])
def test_overflow_truncate_left_cuts_the_shared_prompt_only(tokenizer, caplog, limit):
  full = full_sequences(tokenizer, LONG_PROMPT)
  n_prompt = prompt_len(tokenizer, LONG_PROMPT)
  n_prompt0 = prompt_len(tokenizer, PAIRS[0])
  longest, total = max(len(s) for s in full), sum(len(s) for s in full)
  max_len, max_total = (longest - 10, None) if limit == "max_len" else (1000, total - 15)
  with caplog.at_level("WARNING"):
    comparisons, stats = tokenize_comparisons(
        [PAIRS[0], LONG_PROMPT],
        "pairwise",
        tokenizer,
        max_len=max_len,
        max_total=max_total,
        overflow="truncate_left",
    )
  assert stats["left_truncated"] == 1 and stats["dropped"] == 0 and stats["comparisons"] == 2
  assert "cut the prompt start of 1" in caplog.text
  assert [s.tolist() for s in comparisons[0].sequences] == [
      s.tolist() for s in full_sequences(tokenizer, PAIRS[0])
  ]
  cut = comparisons[1].sequences
  assert all(len(s) <= max_len for s in cut)
  assert sum(len(s) for s in cut) <= (max_total or 1 << 30)
  removed = {len(f) - len(s) for f, s in zip(full, cut)}
  assert len(removed) == 1 and removed.pop() > 0  # the same prompt tokens left every response
  for f, s in zip(full, cut):
    assert s[0] == BOS
    keep = len(s) - 1
    np.testing.assert_array_equal(
        s[1:], f[len(f) - keep :]
    )  # the prompt's end and the whole response
    np.testing.assert_array_equal(s[len(s) - (len(f) - n_prompt) :], f[n_prompt:])  # response, EOS
    assert s[-1] == EOS
    assert len(s) - 1 - (len(f) - n_prompt) >= 1  # some of the prompt (assistant header) stays
  assert comparisons[1].margin == 1 and comparisons[1].index == 1
  # The response starts where it did, less the prompt tokens cut (DPO sums log-probs from there).
  assert comparisons[0].prompt_len == n_prompt0 and comparisons[1].prompt_len == n_prompt - (
      len(full[0]) - len(cut[0])
  )
  assert cut[0][comparisons[1].prompt_len :].tolist() == full[0][n_prompt:].tolist()
  # Minimal cut: one token fewer would not fit.
  if limit == "max_len":
    assert max(len(s) for s in cut) == max_len
  else:
    assert sum(len(s) for s in cut) > max_total - len(cut)


def test_overflow_truncate_left_drops_what_cannot_fit(tokenizer):
  # The response alone is longer than max_len: no prompt cut can save it.
  record = {"prompt": "Repeat: sun", "chosen": " ".join(["sun"] * 40), "rejected": "moon"}
  n_prompt = prompt_len(tokenizer, record)
  comparisons, stats = tokenize_comparisons(
      [record, PAIRS[0]], "pairwise", tokenizer, max_len=n_prompt + 5, overflow="truncate_left"
  )
  assert [c.index for c in comparisons] == [1]
  assert stats["dropped"] == 1 and stats["left_truncated"] == 0


# ---------------------------------------------------------------- batch layout


def read_back(batch):
  """Every comparison slot of a batch as (row, sequences, ranks, margin), checking the layout."""
  rows, seq_len = batch["tokens"].shape
  _, per_row, k = batch["score_index"].shape
  out = []
  for r in range(rows):
    seg = batch["segment_ids"][r]
    seen = set()
    for p in range(per_row):
      valid = batch["valid"][r, p]
      n = int(valid.sum())
      assert valid.tolist() == [True] * n + [False] * (k - n)  # valid slots come first
      if n == 0:
        assert batch["margin"][r, p] == -1 and (batch["ranks"][r, p] == k).all()
        continue
      assert (batch["ranks"][r, p, n:] == k).all()
      sequences = []
      for j in range(n):
        last = int(batch["score_index"][r, p, j])
        s = int(seg[last])
        assert s > 0 and s not in seen  # a response's own segment
        seen.add(s)
        where = np.flatnonzero(seg == s)
        assert where.tolist() == list(range(where[0], last + 1))  # contiguous, ends at score_index
        np.testing.assert_array_equal(batch["positions"][r, where], np.arange(where.size))
        sequences.append(tuple(batch["tokens"][r, where].tolist()))
      out.append(
          (
              r,
              tuple(sequences),
              tuple(batch["ranks"][r, p, :n].tolist()),
              int(batch["margin"][r, p]),
          )
      )
    assert seen == set(np.unique(seg[seg > 0]).tolist())  # no segment without a score slot
    assert (batch["tokens"][r][seg == 0] == 0).all() and (
        batch["positions"][r][seg == 0] == 0
    ).all()
  return out


@pytest.fixture(scope="module")
def mixed(tokenizer):
  return build_mixed(tokenizer)


def test_comparison_batch_one_per_row(mixed):
  batch = comparison_batch(mixed, seq_len=128, num_responses=4)
  shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
  assert shapes == {
      "tokens": ((6, 128), np.int32),
      "segment_ids": ((6, 128), np.int32),
      "positions": ((6, 128), np.int32),
      "score_index": ((6, 1, 4), np.int32),
      "ranks": ((6, 1, 4), np.int32),
      "valid": ((6, 1, 4), np.bool_),
      "margin": ((6, 1), np.int32),
      "soft_label": ((6, 1), np.float32),
      "response_start": ((6, 1, 4), np.int32),
      "ref_logps": ((6, 1, 4), np.float32),
      "comparison": ((6, 1), np.int32),
  }
  slots = read_back(batch)
  assert [s[0] for s in slots] == list(range(6))
  for (_, sequences, ranks, margin), c in zip(slots, mixed):
    assert sequences == key(c)
    assert ranks == tuple(c.ranks.tolist()) and margin == c.margin
  assert batch["segment_ids"][3, : batch["score_index"][3, 0, 3] + 1].max() == 4  # segments 1..K
  picked = np.take_along_axis(batch["tokens"], batch["score_index"].reshape(6, 4), axis=1)
  assert (picked[batch["valid"].reshape(6, 4)] == EOS).all()  # scores are read at EOS
  with pytest.raises(ValueError, match="has 4 responses > num_responses=3"):
    comparison_batch(mixed, seq_len=128, num_responses=3)
  longest = max(comparison_length(c) for c in mixed)
  with pytest.raises(ValueError, match=rf"needs {longest} tokens \(all its responses\) > seq_len="):
    comparison_batch(mixed, seq_len=longest - 1, num_responses=4)


def fake(index, *lengths):
  sequences = [
      np.arange(100 * index + 10 * k, 100 * index + 10 * k + n, dtype=np.int32)
      for k, n in enumerate(lengths)
  ]
  return Comparison(sequences, np.arange(len(lengths), dtype=np.int32), index % 4, index)


def test_pack_is_first_fit_in_order():
  comparisons = [
      fake(1, 3, 3),
      fake(2, 4, 4),
      fake(3, 2, 2),
      fake(4, 1, 1),
      fake(5, 1, 1),
      fake(6, 1),
  ]
  batch, count = pack_comparisons(comparisons, seq_len=10, rows=2, per_row=3, num_responses=2)
  # 6 -> row 0; 8 does not fit row 0 -> row 1; 4 -> row 0 (full); 2 -> row 1 (full); 2 fits nowhere.
  assert count == 4
  slots = read_back(batch)
  assert [(row, sequences) for row, sequences, _, _ in slots] == [
      (0, key(comparisons[0])),
      (0, key(comparisons[2])),
      (1, key(comparisons[1])),
      (1, key(comparisons[3])),
  ]
  assert batch["segment_ids"].tolist() == [
      [1, 1, 1, 2, 2, 2, 3, 3, 4, 4],
      [1, 1, 1, 1, 2, 2, 2, 2, 3, 4],
  ]
  assert batch["score_index"][:, :, :].tolist() == [
      [[2, 5], [7, 9], [0, 0]],
      [[3, 7], [8, 9], [0, 0]],
  ]
  assert batch["margin"].tolist() == [[1, 3, -1], [2, 0, -1]]
  assert batch["valid"][:, 2].sum() == 0

  # per_row caps the comparisons of a row even when tokens are left.
  small = [fake(i, 1, 1) for i in range(1, 8)]
  batch, count = pack_comparisons(small, seq_len=100, rows=3, per_row=2, num_responses=2)
  assert count == 6
  assert [row for row, *_ in read_back(batch)] == [0, 0, 1, 1, 2, 2]
  batch, count = pack_comparisons(small[:2], seq_len=100, rows=3, per_row=2, num_responses=3)
  assert count == 2 and batch["valid"].sum() == 4 and (batch["ranks"][0, :, 2] == 3).all()

  with pytest.raises(
      ValueError, match=r"comparison 9 needs 11 tokens \(all its responses\) > seq_len=10"
  ):
    pack_comparisons([fake(1, 2, 2), fake(9, 5, 6)], seq_len=10, rows=4, per_row=2, num_responses=2)
  with pytest.raises(ValueError, match="comparison 9 has 3 responses > num_responses=2"):
    pack_comparisons([fake(9, 1, 1, 1)], seq_len=10, rows=4, per_row=2, num_responses=2)


def test_pack_keeps_every_comparison_whole(mixed):
  batch, count = pack_comparisons(mixed, seq_len=128, rows=6, per_row=4, num_responses=4)
  assert count == len(mixed)
  slots = read_back(batch)
  assert sorted(s[1:] for s in slots) == sorted(
      (key(c), tuple(c.ranks.tolist()), c.margin) for c in mixed
  )
  assert len({row for row, *_ in slots}) < len(mixed)  # short comparisons really share rows


@pytest.fixture(scope="module")
def many(tokenizer):
  return build_many(tokenizer)


def stream_of(batch, ids):
  return [ids[sequences] for _, sequences, _, _ in read_back(batch)]


@pytest.mark.parametrize("packing", [False, True])
def test_loader_with_comparison_batching(many, packing):
  ids = {key(c): c.index for c in many}
  rows, seq_len = 4, 192
  per_row = 3 if packing else 1

  def make(seed):
    return BatchIterator(
        many,
        batch_size=rows,
        seq_len=seq_len,
        seed=seed,
        packing=packing,
        batching=comparison_batching(rows, seq_len, per_row, 4),
    )

  reference = make(3)
  batches, consumed = [], []
  for _ in range(14):
    batches.append(next(reference))
    s = reference.state()
    consumed.append(s["epoch"] * len(many) + s["index"])
  for b in batches:
    assert b["tokens"].shape == (rows, seq_len) and b["score_index"].shape == (rows, per_row, 4)
  # Deterministic for a seed; another seed is another order.
  again = make(3)
  for expected in batches:
    got = next(again)
    for name in expected:
      np.testing.assert_array_equal(got[name], expected[name])
  assert stream_of(next(make(4)), ids) != stream_of(batches[0], ids)

  # Every comparison once per epoch: the batches up to the end of epoch 0 hold each one once, and
  # after C comparisons consumed each has been seen C // n or C // n + 1 times.
  seen = [i for b in batches for i in stream_of(b, ids)]
  assert len(seen) == consumed[-1] > 2 * len(many)
  first = [i for b, c in zip(batches, consumed) if c <= len(many) for i in stream_of(b, ids)]
  assert len(first) == len(set(first)) and len(first) > len(many) // 2
  counts = collections.Counter(seen)
  q, extra = divmod(consumed[-1], len(many))
  assert set(counts) == set(range(len(many)))
  assert sorted(counts.values()) == [q] * (len(many) - extra) + [q + 1] * extra
  if packing:
    assert consumed[0] > rows  # rows really hold several comparisons

  # Resume: state() after 5 batches, restore into a fresh iterator, identical batches follow.
  first_run = make(3)
  for _ in range(5):
    next(first_run)
  saved = json.loads(json.dumps(first_run.state()))
  resumed = make(3)
  resumed.restore(saved)
  for expected in batches[5:]:
    got = next(resumed)
    for name in expected:
      np.testing.assert_array_equal(got[name], expected[name])
  assert resumed.state() == reference.state()


def test_loader_rejects_a_comparison_longer_than_a_row(many):
  longest = max(comparison_length(c) for c in many)
  with pytest.raises(ValueError, match=f"an example has {longest} tokens > seq_len={longest - 1}"):
    BatchIterator(
        many,
        batch_size=2,
        seq_len=longest - 1,
        seed=0,
        packing=True,
        batching=comparison_batching(2, longest - 1, 2, 4),
    )
