"""Records, public preference data sets, tokenizer, SFT tokenisation and batching. See each module's
docstring for formats."""

from rlhf_jax.data.loader import BatchIterator, num_tokens, sft_batching
from rlhf_jax.data.public import SCHEMAS, detect_schema, load_preferences, shp_margin
from rlhf_jax.data.records import (
    KINDS,
    RecordError,
    load_located_records,
    load_records,
    read_rows,
    validate_record,
)
from rlhf_jax.data.sft import (
    PROMPT_OVERFLOW_POLICIES,
    Example,
    encode_prompt,
    pack_examples,
    pad_batch,
    tokenize_sft,
)
from rlhf_jax.data.sources import resolve_source
from rlhf_jax.data.tokenizer import (
    SPECIAL_TOKENS,
    TOOL_CHAT_TEMPLATE,
    TOOL_TOKENS,
    ChatTemplateError,
    check_chat_template,
    load_tokenizer,
    render_prompt,
    train_tokenizer,
)

__all__ = [
    "BatchIterator",
    "ChatTemplateError",
    "Example",
    "KINDS",
    "PROMPT_OVERFLOW_POLICIES",
    "RecordError",
    "SCHEMAS",
    "SPECIAL_TOKENS",
    "TOOL_CHAT_TEMPLATE",
    "TOOL_TOKENS",
    "check_chat_template",
    "detect_schema",
    "encode_prompt",
    "load_preferences",
    "load_located_records",
    "load_records",
    "load_tokenizer",
    "num_tokens",
    "sft_batching",
    "pack_examples",
    "pad_batch",
    "read_rows",
    "render_prompt",
    "resolve_source",
    "shp_margin",
    "tokenize_sft",
    "train_tokenizer",
    "validate_record",
]
