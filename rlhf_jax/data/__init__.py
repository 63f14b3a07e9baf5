"""Records, tokenizer, SFT tokenisation and batching. See each module's docstring for formats."""

from rlhf_jax.data.loader import BatchIterator, num_tokens
from rlhf_jax.data.records import KINDS, RecordError, load_records, validate_record
from rlhf_jax.data.sft import Example, encode_prompt, pack_examples, pad_batch, tokenize_sft
from rlhf_jax.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, render_prompt, train_tokenizer

__all__ = [
    "BatchIterator",
    "Example",
    "encode_prompt",
    "KINDS",
    "RecordError",
    "SPECIAL_TOKENS",
    "load_records",
    "load_tokenizer",
    "num_tokens",
    "pack_examples",
    "pad_batch",
    "render_prompt",
    "tokenize_sft",
    "train_tokenizer",
    "validate_record",
]
