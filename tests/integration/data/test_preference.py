"""Reward-model data: comparisons are tokenised exactly like SFT examples, bad records name themselves,
overflow policies keep every scored EOS, and packing rows with several comparisons changes no score.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/data/test_preference.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import scoring
from rlhf_jax.data.preference import (
    comparison_batch,
    pack_comparisons,
)
from rlhf_jax.models import ModelConfig, create_model, split_model
from tests.helpers.preference import TINY
from tests.helpers.preference_data import (
    build_many,
    build_mixed,
    build_tokenizer,
    key,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return build_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def mixed(tokenizer):
  return build_mixed(tokenizer)


@pytest.fixture(scope="module")
def many(tokenizer):
  return build_many(tokenizer)


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_scores_equal_unpacked_and_alone(mixed, many, family):
  # A large head init so scores are O(1) and the tolerance means something.
  cfg = ModelConfig(
      **TINY,
      family=family,
      tie_embeddings=family == "gpt2",
      head="scalar",
      scalar_head_init_std=1.0,
  )
  graphdef, params = split_model(create_model(cfg, 0))
  comparisons = mixed + many[:10]
  score = jax.jit(lambda p, b: scoring.comparison_scores(graphdef, p, b))

  packed, count = pack_comparisons(
      comparisons, seq_len=256, rows=len(comparisons), per_row=4, num_responses=4
  )
  assert count == len(comparisons)
  unpacked = comparison_batch(comparisons, seq_len=256, num_responses=4)
  assert np.count_nonzero(packed["segment_ids"].any(axis=1)) < len(comparisons) // 2

  def by_comparison(batch):
    scores = np.asarray(score(params, batch))
    ids = {key(c): i for i, c in enumerate(comparisons)}
    out = {}
    for r in range(batch["tokens"].shape[0]):
      for p in range(batch["score_index"].shape[1]):
        n = int(batch["valid"][r, p].sum())
        if n:
          sequences = tuple(
              tuple(
                  batch["tokens"][r, batch["segment_ids"][r] == batch["segment_ids"][r, i]].tolist()
              )
              for i in batch["score_index"][r, p, :n]
          )
          out[ids[sequences]] = scores[r, p, :n]
    return out

  got_packed, got_unpacked = by_comparison(packed), by_comparison(unpacked)
  assert set(got_packed) == set(got_unpacked) == set(range(len(comparisons)))
  # Each sequence alone in its own row (right padding, which causal attention never sees).
  sequences = [s for c in comparisons for s in c.sequences]
  tokens = np.zeros((len(sequences), cfg.max_seq_len), np.int32)
  for row, s in enumerate(sequences):
    tokens[row, : len(s)] = s
  segment_ids = np.arange(cfg.max_seq_len)[None] < np.array([len(s) for s in sequences])[:, None]
  positions = np.where(segment_ids, np.arange(cfg.max_seq_len)[None], 0)
  alone_all = np.asarray(
      jax.jit(functools.partial(scoring.last_token_scores, graphdef))(
          params, jnp.asarray(tokens), jnp.asarray(segment_ids, jnp.int32), jnp.asarray(positions)
      )
  )
  starts = np.cumsum([0] + [len(c.sequences) for c in comparisons])
  spread = []
  for i, _c in enumerate(comparisons):
    alone = alone_all[starts[i] : starts[i + 1]]
    np.testing.assert_allclose(got_packed[i], got_unpacked[i], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_packed[i], alone, atol=1e-5, rtol=0)
    spread.append(np.ptp(alone))
  assert np.median(spread) > 1e-2  # responses really score differently
