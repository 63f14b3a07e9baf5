"""Toy BPE tokenizer: HF round trip, special tokens, chat template, determinism."""

import json

import pytest
from transformers import AutoTokenizer

from rlhf_jax.data import (
    SPECIAL_TOKENS,
    TOOL_CHAT_TEMPLATE,
    TOOL_TOKENS,
    ChatTemplateError,
    check_chat_template,
    load_tokenizer,
    render_prompt,
    train_tokenizer,
)
from rlhf_jax.data.tokenizer import render_chat
from rlhf_jax.toyworld import corpus_texts, generate_sft_records

VOCAB_SIZE = 512


@pytest.fixture(scope="module")
def texts():
  return corpus_texts(generate_sft_records(300, seed=0))


@pytest.fixture(scope="module")
def tokenizer_dir(texts, tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("tokenizer")
  train_tokenizer(texts, VOCAB_SIZE, out_dir)
  return out_dir


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  return load_tokenizer(tokenizer_dir)


def test_saved_files_load_with_plain_auto_tokenizer(tokenizer_dir, tokenizer):
  config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
  assert "<|assistant|>" in config["chat_template"]
  plain = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
  assert (plain.pad_token, plain.bos_token, plain.eos_token) == ("<pad>", "<bos>", "<eos>")
  text = "Reverse the list: cat, dog, sun"
  assert plain(text)["input_ids"] == tokenizer(text)["input_ids"]
  assert plain.chat_template == tokenizer.chat_template


def test_special_token_ids(tokenizer):
  assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
  assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
  # Special tokens inside text stay single ids (the chat format relies on it) ...
  ids = tokenizer("<|user|>\nhi<|end|>", add_special_tokens=False)["input_ids"]
  assert ids[0] == 4 and ids[-1] == 6
  # ... and encoding adds no BOS/EOS by itself: data/sft.py adds them explicitly.
  assert tokenizer("What is 1 + 2?")["input_ids"][0] not in (1, 2)


def test_vocabulary_learned_merges(tokenizer):
  assert 256 + len(SPECIAL_TOKENS) < len(tokenizer) <= VOCAB_SIZE
  # Frequent toy words are single tokens, so BPE did its job.
  assert len(tokenizer(" apple", add_special_tokens=False)["input_ids"]) == 1
  assert len(tokenizer("What is", add_special_tokens=False)["input_ids"]) == 2


@pytest.mark.parametrize(
    "text",
    ["What is 12 * 7?", "sun, dog, cat", "a , b", "  padded  \n", "naïve café 🙂 ünïcødé", "\t"],
)
def test_encode_decode_round_trip(tokenizer, text):
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  assert tokenizer.decode(ids) == text


def test_decode_can_skip_chat_tokens(tokenizer):
  ids = tokenizer("12<|end|>\n", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  assert tokenizer.decode(ids, skip_special_tokens=True) == "12\n"


def test_render_prompt(tokenizer):
  assert (
      render_prompt(tokenizer, "What is 7 + 5?")
      == "<|user|>\nWhat is 7 + 5?<|end|>\n<|assistant|>\n"
  )
  messages = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello"},
      {"role": "user", "content": "Repeat: sun"},
  ]
  assert render_prompt(tokenizer, messages) == (
      "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n"
      "<|user|>\nRepeat: sun<|end|>\n<|assistant|>\n"
  )
  with pytest.raises(Exception, match="role must be system, user or assistant"):
    render_prompt(tokenizer, [{"role": "robot", "content": "x"}])


def test_training_is_deterministic(texts, tokenizer_dir, tmp_path):
  train_tokenizer(texts, VOCAB_SIZE, tmp_path)
  assert (tmp_path / "tokenizer.json").read_bytes() == (
      tokenizer_dir / "tokenizer.json"
  ).read_bytes()


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    load_tokenizer(tmp_path / "missing")
  with pytest.raises(ValueError, match="vocab_size=100 is too small"):
    train_tokenizer(["abc"], 100, tmp_path)


# The chat template as it was before tools existed: a tokenizer without tools keeps it.
PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)
TOOL_EXAMPLE = [
    {"role": "user", "content": "What is 7 * 5?"},
    {"role": "assistant", "content": "<tool_call>calculator: 7 * 5</tool_call>"},
    {"role": "tool", "content": "35"},
    {"role": "assistant", "content": "35"},
]


@pytest.fixture(scope="module")
def tool_tokenizer_dir(texts, tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("tool_tokenizer")
  train_tokenizer(texts, 384, out_dir, tools=True)
  return out_dir


def test_without_tools_the_files_are_unchanged(texts, tokenizer_dir, tmp_path):
  train_tokenizer(texts, VOCAB_SIZE, tmp_path, tools=False)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes()
  config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
  assert config["chat_template"] == PLAIN_TEMPLATE
  assert "<tool_call>" not in load_tokenizer(tokenizer_dir).get_vocab()


def test_tool_tokenizer_ids_template_and_calls(tool_tokenizer_dir):
  tokenizer = load_tokenizer(tool_tokenizer_dir)  # load_tokenizer checks the template
  check_chat_template(tokenizer)
  assert tokenizer.chat_template == TOOL_CHAT_TEMPLATE
  special = list(SPECIAL_TOKENS + TOOL_TOKENS)
  assert tokenizer.convert_tokens_to_ids(special) == list(range(10))  # 0..6 as without tools
  assert render_chat(tokenizer, TOOL_EXAMPLE, add_generation_prompt=False) == (
      "<|user|>\nWhat is 7 * 5?<|end|>\n<|assistant|>\n<tool_call>calculator: 7 * 5</tool_call>"
      "<|end|>\n<|tool|>\n35<|end|>\n<|assistant|>\n35<|end|>\n"
  )
  ids = tokenizer("<tool_call>calculator: 7 * 5</tool_call>", add_special_tokens=False)["input_ids"]
  assert ids[0] == 7 and ids[-1] == 8 and 9 not in ids
  assert tokenizer.decode(ids) == "<tool_call>calculator: 7 * 5</tool_call>"
  assert tokenizer.decode(ids, skip_special_tokens=True) == "calculator: 7 * 5"
  with pytest.raises(Exception, match="role must be system, user, assistant or tool, got robot"):
    render_prompt(tokenizer, [{"role": "robot", "content": "x"}])


def test_tool_template_needs_the_tool_tokens(tokenizer_dir):
  tokenizer = load_tokenizer(tokenizer_dir)  # a private copy: its template is changed
  with pytest.raises(Exception, match="role must be system, user or assistant, got tool"):
    render_chat(tokenizer, TOOL_EXAMPLE, add_generation_prompt=False)
  tokenizer.chat_template = TOOL_CHAT_TEMPLATE
  with pytest.raises(ChatTemplateError, match=r"writes <tool_call>, </tool_call>, <\|tool\|>, "):
    check_chat_template(tokenizer)
