"""A small byte-level BPE tokenizer for the toy world, saved in the HF format.

`train_tokenizer` writes `tokenizer.json` and `tokenizer_config.json` (with the chat template), so
`transformers.AutoTokenizer.from_pretrained(out_dir)` loads it like any HF tokenizer and the rest of
the code treats toy and real tokenizers alike.

Special tokens and ids: <pad>=0, <bos>=1, <eos>=2, <|system|>=3, <|user|>=4, <|assistant|>=5,
<|end|>=6. Encoding never adds BOS/EOS by itself; callers add them explicitly (see data/sft.py).

Chat format, one line per turn header:

    <|user|>\\nWhat is 7 + 5?<|end|>\\n<|assistant|>\\n12<|end|>\\n
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerBase:
    """Trains a byte-level BPE on `texts`, saves it to `out_dir` and returns it loaded from there.

    Deterministic: the same texts (in the same order) and vocab_size give the same tokenizer.json.
    The vocabulary may end up smaller than `vocab_size` when the texts have few distinct merges.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{len(alphabet)} byte tokens + {len(SPECIAL_TOKENS)} special tokens"
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: the chat template puts content right after "\n", as generation sees it.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # listed first, so their ids are 0..6
        initial_alphabet=alphabet,  # every byte stays encodable, even unseen ones
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        # The generic fast-tokenizer class: transformers 4 and 5 both load it from tokenizer.json.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": PAD,
        "bos_token": BOS,
        "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        # Keep decode(encode(s)) == s; the clean-up would turn "a , b" into "a, b".
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Loads a tokenizer directory with AutoTokenizer: local files only, no remote code."""
    path = Path(path)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer.json or tokenizer_config.json here; pass a directory written by "
            "train_tokenizer or an HF checkpoint directory"
        )
    from transformers import AutoTokenizer  # imported here: ~1.5 s, and batching code never needs it

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt_or_messages: str | list[dict]) -> str:
    """The text the model sees before it answers: the chat template with the generation prompt.

    A plain string becomes a single user turn; a list of {role, content} messages is used as is.
    """
    if isinstance(prompt_or_messages, str):
        messages = [{"role": "user", "content": prompt_or_messages}]
    else:
        messages = list(prompt_or_messages)
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], *, add_generation_prompt: bool
) -> str:
    """`messages` rendered with the tokenizer's chat template (as text, not ids)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template; add one to its "
            "tokenizer_config.json (train_tokenizer writes one)"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
