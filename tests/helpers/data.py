"""The SFT data tests' tokenizer (tests/{unit,integration}/data/test_data.py)."""

from rlhf_jax.data import (
    load_tokenizer,
    train_tokenizer,
)
from rlhf_jax.toyworld import corpus_texts, generate_sft_records

# ---------------------------------------------------------------- SFT tokenisation


def build_tokenizer_dir(tmp_path_factory):
  texts = corpus_texts(generate_sft_records(200, seed=0))
  out_dir = tmp_path_factory.mktemp("tok")
  train_tokenizer(texts, 512, out_dir)
  return out_dir


def build_tokenizer(tokenizer_dir):
  return load_tokenizer(tokenizer_dir)
