"""The comparison-data tests' tokenizer, records and packed batches
(tests/{unit,integration}/data/test_preference.py)."""

import numpy as np

from rlhf_jax.data import load_tokenizer, train_tokenizer
from rlhf_jax.data.preference import (
    tokenize_comparisons,
)
from rlhf_jax.toyworld import corpus_texts, generate_sft_records

BOS, EOS = 1, 2


def build_tokenizer(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("tok")
  train_tokenizer(corpus_texts(generate_sft_records(200, seed=0)), 384, out_dir)
  tok = load_tokenizer(out_dir)
  assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
  return tok


CHAT_PROMPT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 7 + 5?"},
]
PAIRS = [
    {"prompt": "Repeat: sun", "chosen": "sun", "rejected": "moon", "margin": 2, "family": "copy"},
    {"prompt": CHAT_PROMPT, "chosen": "12", "rejected": "13"},  # no margin -> -1
    {
        "prompt": "Reverse the list: red, blue",
        "chosen": "blue, red",
        "rejected": "red, blue",
        "margin": 0,
    },
]
RANKINGS = [
    {"prompt": "Count the words in the list: a, b, c", "responses": ["3", "4", "2", "three words"]},
    {"prompt": "Give the first word of the list: cat, dog", "responses": ["cat", "dog"]},
    {"prompt": CHAT_PROMPT, "responses": ["12", "twelve", "13"]},
]


def key(comparison):
  return tuple(tuple(s.tolist()) for s in comparison.sequences)


def build_mixed(tokenizer):
  """Pairwise and ranking comparisons of different lengths."""
  pairs, _ = tokenize_comparisons(PAIRS, "pairwise", tokenizer, max_len=128)
  ranked, _ = tokenize_comparisons(RANKINGS, "ranking", tokenizer, max_len=128)
  return pairs + ranked


# ---------------------------------------------------------------- loader


def build_many(tokenizer):
  words = ["sun", "moon", "star", "red", "blue", "cat", "dog", "tree", "rain", "snow"]
  rng = np.random.default_rng(0)
  records = []
  for i in range(23):
    k = int(rng.integers(2, 5))
    picked = rng.choice(words, size=int(rng.integers(1, 6)))
    records.append(
        {
            "prompt": f"Repeat: {', '.join(picked)} ({i})",
            "responses": [f"{w} {i}" for w in rng.choice(words, size=k, replace=False)],
        }
    )
  comparisons, _ = tokenize_comparisons(records, "ranking", tokenizer, max_len=64, max_responses=4)
  assert len(comparisons) == 23
  return comparisons
