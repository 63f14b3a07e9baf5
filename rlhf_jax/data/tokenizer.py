"""A small byte-level BPE tokenizer for the toy world, saved in the HF format.

`train_tokenizer` writes `tokenizer.json` and `tokenizer_config.json` (with the chat template), so
`transformers.AutoTokenizer.from_pretrained(out_dir)` loads it like any HF tokenizer and the rest of
the code treats toy and real tokenizers alike.

Special tokens and ids: <pad>=0, <bos>=1, <eos>=2, <|system|>=3, <|user|>=4, <|assistant|>=5,
<|end|>=6. Encoding never adds BOS/EOS by itself; callers add them explicitly (see data/sft.py).
A tool-enabled tokenizer (`train_tokenizer(..., tools=True)`) adds <tool_call>=7, </tool_call>=8,
<|tool|>=9 (TOOL_TOKENS) and the chat template TOOL_CHAT_TEMPLATE, which allows a "tool" role.

Chat format, one line per turn header:

    <|user|>\\nWhat is 7 + 5?<|end|>\\n<|assistant|>\\n12<|end|>\\n

With tools, an assistant turn may be one call, `<tool_call>NAME: ARGUMENTS</tool_call>` (generation
stops after `</tool_call>`); the tool's result is a "tool" turn, and the assistant goes on in a new
turn (toyworld/tools.py):

    <|user|>\\nWhat is 7 * 5?<|end|>\\n<|assistant|>\\n<tool_call>calculator: 7 * 5</tool_call><|end|>\\n
    <|tool|>\\n35<|end|>\\n<|assistant|>\\n35<|end|>\\n

Any tokenizer's chat template is checked before use (`check_chat_template`, run by `load_tokenizer`
and on the first render with each template): every special-looking marker the template writes
(`<|user|>`, `<start_of_turn>`, `<s>`, ...) must be one token of the tokenizer. Otherwise the marker
would be split into ordinary pieces and every example would silently teach a different format.
"""

from __future__ import annotations

import json
import re
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rlhf_jax.data import files
from rlhf_jax.errors import ConfigPathError

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerBase

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Only in a tool-enabled tokenizer, right after SPECIAL_TOKENS (ids 7, 8, 9).
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<|tool|>")


def _chat_template(roles: tuple[str, ...]) -> str:
  """The chat template that renders each message as `<|role|>\\ncontent<|end|>\\n` and refuses
  any role outside `roles`."""
  allowed = ", ".join(roles[:-1]) + " or " + roles[-1]
  return (
      "{%- for message in messages -%}"
      f"{{%- if message['role'] not in {list(roles)} -%}}"
      f"{{{{ raise_exception('role must be {allowed}, got ' + message['role']) }}}}"
      "{%- endif -%}"
      "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
      "{%- endfor -%}"
      "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
  )


CHAT_TEMPLATE = _chat_template(("system", "user", "assistant"))
# CHAT_TEMPLATE with tool results: {"role": "tool", "content": "35"} -> "<|tool|>\\n35<|end|>\\n".
TOOL_CHAT_TEMPLATE = _chat_template(("system", "user", "assistant", "tool"))


# `<|name|>` (ChatML, Llama 3, Phi, ours) and `<name>` / `</name>` (Gemma, Llama 2's `<s>`) markers,
# but not `<<SYS>>` (Llama 2 writes that as plain text on purpose).
_MARKER = re.compile(r"(?<!<)<(?:\|[^<>|\s]+\||/?[A-Za-z_][^<>\s]*)>(?!>)")
# Probe conversations, most complete first: some templates refuse a system turn.
_PROBES = (
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ],
    [
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ],
)
# Also rendered for TOOL_CHAT_TEMPLATE, so that its tool markers are checked too (other templates
# may render a "tool" turn with markers their tokenizer lacks and never uses).
_TOOL_PROBE = [
    {"role": "user", "content": "U"},
    {"role": "assistant", "content": "<tool_call>T: X</tool_call>"},
    {"role": "tool", "content": "R"},
    {"role": "assistant", "content": "A"},
]
# tokenizer -> the chat template that passed check_chat_template (re-checked if the template changes).
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ChatTemplateError(ValueError):
  """The tokenizer has no chat template, or one that writes markers the tokenizer cannot encode."""


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path, *, tools: bool = False
) -> PreTrainedTokenizerBase:
  """Trains a byte-level BPE on `texts`, saves it to `out_dir` and returns it loaded from there.

  Deterministic: the same texts (in the same order) and vocab_size give the same tokenizer.json.
  The vocabulary may end up smaller than `vocab_size` when the texts have few distinct merges.
  tools: also the special tokens TOOL_TOKENS (ids 7, 8, 9) and the chat template
  TOOL_CHAT_TEMPLATE; without, the files are exactly those of a tokenizer without the option.
  """
  special = SPECIAL_TOKENS + TOOL_TOKENS if tools else SPECIAL_TOKENS
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + len(special):
    raise ValueError(
        f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
        f"{len(alphabet)} byte tokens + {len(special)} special tokens"
    )
  tokenizer = Tokenizer(models.BPE())
  # No prefix space: the chat template puts content right after "\n", as generation sees it.
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(special),  # listed first, so their ids are 0..6 (0..9 with tools)
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
      "chat_template": TOOL_CHAT_TEMPLATE if tools else CHAT_TEMPLATE,
      # Keep decode(encode(s)) == s; the clean-up would turn "a , b" into "a, b".
      "clean_up_tokenization_spaces": False,
  }
  (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
  """Loads a tokenizer directory with AutoTokenizer: local files only, no remote code."""
  path = Path(path)
  if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
    raise ConfigPathError(
        f"{path}: no tokenizer.json or tokenizer_config.json here; point config.data.tokenizer at "
        "a directory written by train_tokenizer or an HF checkpoint directory"
    )
  from transformers import AutoTokenizer  # imported here: ~1.5 s, and batching code never needs it

  fix = "copy the tokenizer's files again (or train it again)"
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (path / name).is_file():  # a cut-short file is named, not left to the loader's traceback
      files.read_json(path / name, fix=fix)
  with files.reading(path, fix=fix):
    tokenizer = AutoTokenizer.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=False
    )
  if getattr(tokenizer, "chat_template", None):  # a pretraining-only tokenizer needs none
    check_chat_template(tokenizer)
  return tokenizer


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
  """Raises `ChatTemplateError` unless the tokenizer has a chat template whose special markers
  (see module docstring) are each a single token: an added/special token, or a vocabulary entry
  that encodes to exactly its own id. The error names every missing marker."""
  template = getattr(tokenizer, "chat_template", None)
  name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
  if not template:
    raise ChatTemplateError(
        f"tokenizer {name!r} has no chat_template; add one to its tokenizer_config.json "
        "(train_tokenizer writes one)"
    )
  rendered, failure = None, None
  for probe in _PROBES:
    try:
      rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
      break
    except Exception as err:  # noqa: BLE001 -- templates raise whatever they like
      failure = err
  if rendered is None:
    raise ChatTemplateError(
        f"tokenizer {name!r}: its chat_template cannot render a user/assistant conversation ({failure})"
    )
  if template == TOOL_CHAT_TEMPLATE:
    rendered += tokenizer.apply_chat_template(_TOOL_PROBE, tokenize=False)
  added = tokenizer.get_added_vocab()
  vocab = tokenizer.get_vocab()
  missing = []
  for marker in dict.fromkeys(_MARKER.findall(rendered)):  # unique, in order of appearance
    if marker in added:
      continue
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if marker in vocab and ids == [vocab[marker]]:
      continue
    missing.append(marker)
  if missing:
    raise ChatTemplateError(
        f"tokenizer {name!r}: its chat_template writes {', '.join(missing)}, which the tokenizer does "
        "not have as special tokens, so each would be split into ordinary pieces; use the tokenizer "
        "that belongs to this template, or add them (tokenizer.add_special_tokens("
        "{'additional_special_tokens': [...]}) and resize the model's embeddings)"
    )


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
  """`messages` rendered with the tokenizer's chat template (as text, not ids).

  The first render with a template checks it (`check_chat_template`); later ones reuse the result.
  """
  template = getattr(tokenizer, "chat_template", None)
  if not template or _checked.get(tokenizer) is not template:
    check_chat_template(tokenizer)
    _checked[tokenizer] = template
  return tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=add_generation_prompt
  )
