"""Data layer: record validation, HF datasets loading, SFT masking, padding vs packing, loader resume,
toy instruction generator.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in tests/integration/data/test_data.py.
"""

import collections
import json
import logging
import pickle
import re

import datasets
import numpy as np
import pytest

from rlhf_jax.data import (
    BatchIterator,
    ChatTemplateError,
    Example,
    RecordError,
    check_chat_template,
    encode_prompt,
    load_records,
    load_tokenizer,
    num_tokens,
    pack_examples,
    pad_batch,
    tokenize_sft,
    validate_record,
)
from rlhf_jax.toyworld import FAMILIES, generate_sft_records, score
from tests.helpers.data import build_tokenizer, build_tokenizer_dir

# ---------------------------------------------------------------- records


def write_jsonl(path, lines):
  path.write_text("".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
  return path


GOOD_PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


GOOD = {
    "pairwise": GOOD_PAIR,
    "ranking": {"prompt": "p", "responses": list("abcd")},
    "kto": {"prompt": "p", "completion": "c", "label": True},
    "safety": {"prompt": "p", "response": "r", "safe": False},
    "sft": {"prompt": "p", "completion": "c"},
    "text": {"text": "t"},
}
CHAT_BAD_ROLE = [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]

# (kind, bad line 3, regex its message must match after "path:3: ")
MALFORMED = [
    (
        "pairwise",
        '{"prompt": "p", "chosen": \n',
        r"invalid JSON \(.*\); each line must hold one JSON",
    ),
    (
        "pairwise",
        {"prompt": "p", "chosen": "a"},
        r"field 'rejected': missing; .*needs \(prompt, chosen",
    ),
    ("pairwise", {"prompt": "p", "choosen": "a", "rejected": "b"}, r"'chosen': missing.*rename it"),
    (
        "pairwise",
        {**GOOD_PAIR, "margin": "big"},
        r"field 'margin': expected an integer 0\.\.3, got 'big'$",
    ),
    ("pairwise", {**GOOD_PAIR, "margin": 5}, r"field 'margin': expected an integer 0\.\.3 .*got 5"),
    ("pairwise", {**GOOD_PAIR, "chosen": "  "}, r"field 'chosen': is empty"),
    (
        "pairwise",
        {**GOOD_PAIR, "prompt": 7},
        r"field 'prompt': expected a string or a list of chat",
    ),
    (
        "pairwise",
        [1, 2],
        r"expected a JSON object with fields \(prompt, chosen, rejected, optional",
    ),
    (
        "ranking",
        {"prompt": "p", "responses": ["a", "b", "c", 4]},
        r"field 'responses\[3\]': expected a str",
    ),
    # Empty texts: whitespace-only counts as empty, in every kind and position.
    ("sft", {"prompt": "p", "completion": ""}, r"field 'completion': is empty; fill in the text"),
    ("sft", {"prompt": "p", "completion": " \n\t"}, r"field 'completion': is empty"),
    ("sft", {"prompt": " ", "completion": "c"}, r"field 'prompt': is empty"),
    (
        "sft",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        r"field 'messages\[1\]\.content': is empty",
    ),
    ("kto", {"prompt": "p", "completion": "\n", "label": True}, r"field 'completion': is empty"),
    ("safety", {"prompt": "p", "response": "", "safe": True}, r"field 'response': is empty"),
    (
        "ranking",
        {"prompt": "p", "responses": ["a", "b", "\t "]},
        r"field 'responses\[2\]': is empty",
    ),
    # Missing or mistyped fields.
    ("sft", {"prompt": "p", "completion": 3}, r"field 'completion': expected a string, got 3$"),
    (
        "sft",
        {"prompt": "p"},
        r"field 'completion': missing; a record of kind 'sft' \(config.data.kind\) needs \(prompt, "
        r"completion",
    ),
    # A record of another kind names the kind its fields fit and the config key to set.
    (
        "sft",
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        r"field 'completion': missing; .* it has the fields of a 'pairwise' record: if the file "
        r"holds those, set config.data.kind='pairwise'",
    ),
    (
        "pairwise",
        {"prompt": "p", "completion": "a", "label": True},
        r"field 'chosen': missing; .*'kto' record: .*config.data.kind='kto'",
    ),
    ("text", {"txt": "hello"}, r"field 'text': missing; .*\(found 'txt': rename it to 'text'\?\)"),
    (
        "ranking",
        {"prompt": "p", "responses": "a, b"},
        r"field 'responses': expected a list of 2\.\.9 str",
    ),
    # Rankings: 2..9 distinct responses.
    (
        "ranking",
        {"prompt": "p", "responses": ["a"]},
        r"'responses': expected 2\.\.9 .*got 1; K-choose-2 need",
    ),
    ("ranking", {"prompt": "p", "responses": []}, r"'responses': expected 2\.\.9 .*got 0"),
    (
        "ranking",
        {"prompt": "p", "responses": list("abcdefghij")},
        r"'responses': expected 2\.\.9 .*got 10; ",
    ),
    (
        "ranking",
        {"prompt": "p", "responses": ["a", "b", "a ", "c", "b"]},
        r"field 'responses': responses \[0, 2\] are identical \('a'\); a ranking orders distinct",
    ),
    (
        "pairwise",
        {"prompt": "p", "chosen": "same", "rejected": " same\n"},
        r"field 'rejected': is identical to 'chosen'; a preference pair needs two different responses$",
    ),
    (
        "kto",
        {"prompt": "p", "completion": "c", "label": "yes"},
        r"'label': expected a boolean \(JSON true",
    ),
    ("safety", {"prompt": "p", "response": "r", "safe": 1}, r"field 'safe': expected a boolean"),
    (
        "sft",
        {"messages": CHAT_BAD_ROLE},
        r"'messages\[1\]\.role': expected one of system, user, .*'bot'",
    ),
    ("sft", {"messages": CHAT_BAD_ROLE[:1]}, r"field 'messages': the last message .*'user'"),
    (
        "sft",
        {"prompt": "p", "completion": "c", "messages": []},
        r"kind 'sft' has either .* not both",
    ),
]


@pytest.mark.parametrize("kind, bad_line, expected", MALFORMED)
def test_malformed_lines_name_file_line_and_field(tmp_path, kind, bad_line, expected):
  # Line 2 is blank and skipped, so the bad record is on line 3.
  path = write_jsonl(tmp_path / "train.jsonl", [json.dumps(GOOD[kind]) + "\n", "\n", bad_line])
  with pytest.raises(RecordError) as info:
    load_records(path, kind)
  message = str(info.value)
  assert message.startswith(f"{path}:3: ")
  assert re.search(expected, message), message


def test_not_utf8_names_file_and_line(tmp_path):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(
      json.dumps(GOOD_PAIR).encode() + b"\n" + '{"prompt": "caf\xe9"}\n'.encode("latin-1")
  )
  with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:2: not UTF-8 .*re-encode"):
    load_records(path, "pairwise")


def test_rankings_of_two_to_nine_are_valid():
  for k in (2, 9):
    record = {"prompt": "p", "responses": [f"r{i}" for i in range(k)]}
    assert validate_record(record, "ranking", source="x", line=1) == record


def test_record_error_carries_location_and_pickles():
  with pytest.raises(ValueError) as info:  # a RecordError is a ValueError
    validate_record({"text": 3}, "text", source="data/x.jsonl", line=17)
  err = info.value
  assert (err.source, err.line, err.field) == ("data/x.jsonl", 17, "text")
  assert str(pickle.loads(pickle.dumps(err))) == str(err)
  in_memory = RecordError("records[3]", None, "prompt", "too long")
  assert str(in_memory) == "records[3]: field 'prompt': too long"
  assert str(pickle.loads(pickle.dumps(in_memory))) == str(in_memory)
  with pytest.raises(ValueError, match="unknown record kind 'dpo'"):
    validate_record({}, "dpo", source="x", line=1)


def test_valid_records_are_normalised(tmp_path):
  lines = [
      {**GOOD_PAIR, "margin": 2.0, "labeler": "ann", "id": 7},
      {**GOOD_PAIR, "margin": None},
      {"prompt": [{"role": "user", "content": "hi", "name": None}], "chosen": "a", "rejected": "b"},
  ]
  path = write_jsonl(tmp_path / "p.jsonl", [json.dumps(line) + "\n" for line in lines])
  records = load_records(path, "pairwise")
  assert records[0] == {**GOOD_PAIR, "margin": 2, "labeler": "ann", "id": 7}
  assert isinstance(records[0]["margin"], int)
  assert records[1] == GOOD_PAIR  # None means absent (HF datasets fill missing columns with None)
  assert records[2]["prompt"] == [{"role": "user", "content": "hi"}]
  with pytest.raises(ValueError, match="no records found"):
    load_records(write_jsonl(tmp_path / "empty.jsonl", ["\n"]), "text")


def test_sft_messages_may_hold_tool_results_but_end_with_the_assistant():
  chat = [
      {"role": "user", "content": "What is 7 * 5?"},
      {"role": "assistant", "content": "<tool_call>calculator: 7 * 5</tool_call>"},
      {"role": "tool", "content": "35"},
      {"role": "assistant", "content": "35"},
  ]
  record = {"messages": chat, "family": "arithmetic"}
  assert validate_record(record, "sft", source="x", line=1) == record
  with pytest.raises(RecordError, match=r"the last message is from 'tool'; an sft conversation"):
    validate_record({"messages": chat[:3]}, "sft", source="x", line=1)
  bad = [{**chat[0], "role": "robot"}, *chat[1:]]
  with pytest.raises(
      RecordError, match=r"'messages\[0\]\.role': expected one of system, user, assistant, tool"
  ):
    validate_record({"messages": bad}, "sft", source="x", line=1)


def test_hf_json_file_via_load_dataset(tmp_path):
  path = tmp_path / "pairs.json"  # a JSON array: read by datasets.load_dataset("json", ...)
  rows = [{**GOOD_PAIR, "margin": 3}, {"prompt": "q", "chosen": "c", "rejected": "d"}]
  path.write_text(json.dumps(rows))
  assert (
      load_records(path, "pairwise") == rows
  )  # the missing margin (None in the dataset) stays absent
  path.write_text(json.dumps([GOOD_PAIR, {**GOOD_PAIR, "margin": 9}]))
  with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:2: field 'margin'"):
    load_records(path, "pairwise")


def test_hf_save_to_disk_and_objects(tmp_path):
  chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
  train = datasets.Dataset.from_list([{"messages": chat}, {"messages": chat + chat}])
  test = datasets.Dataset.from_list([{"messages": chat[:1]}])  # ends with a user turn: invalid
  train.save_to_disk(str(tmp_path / "single"))
  datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "splits"))

  assert load_records(tmp_path / "single", "sft") == [{"messages": chat}, {"messages": chat + chat}]
  assert load_records(train, "sft")[1] == {"messages": chat + chat}
  assert len(load_records(tmp_path / "splits", "sft", split="train")) == 2
  with pytest.raises(ValueError, match="choose a split with split=..., one of 'train', 'test'"):
    load_records(tmp_path / "splits", "sft")
  with pytest.raises(RecordError, match=r"splits\[test\]:1: field 'messages': the last message"):
    load_records(tmp_path / "splits", "sft", split="test")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return build_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  return build_tokenizer(tokenizer_dir)


def encode(tokenizer, text):
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_sft_prompt_completion_mask_is_exact(tokenizer):
  record = {"prompt": "What is 7 + 5?", "completion": "12"}
  (example,), stats = tokenize_sft([record], tokenizer, max_len=64)
  prompt = [1] + encode(tokenizer, "<|user|>\nWhat is 7 + 5?<|end|>\n<|assistant|>\n")
  target = encode(tokenizer, "12<|end|>\n") + [2]
  assert example.tokens.dtype == np.int32 and example.loss_mask.dtype == np.bool_
  assert example.tokens.tolist() == prompt + target
  assert example.loss_mask.tolist() == [False] * len(prompt) + [True] * len(target)
  # Hand check of the boundary: the last input is the "\n" after <|assistant|> (id 5), then the
  # targets are "12", <|end|> (id 6), "\n", <eos> (id 2).
  first = len(prompt)
  assert example.tokens[first - 2] == 5 and not example.loss_mask[first - 1]
  assert tokenizer.decode(example.tokens[example.loss_mask]) == "12<|end|>\n<eos>"
  assert stats == {"examples": 1, "dropped": 0, "truncated": 0, "left_truncated": 0}


def test_sft_messages_supervise_every_assistant_turn(tokenizer):
  messages = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Repeat: sun"},
      {"role": "assistant", "content": "sun"},
      {"role": "user", "content": "Repeat: moon"},
      {"role": "assistant", "content": "moon"},
  ]
  (example,), _ = tokenize_sft([{"messages": messages}], tokenizer, max_len=128)
  mask = example.loss_mask
  spans = np.split(example.tokens, np.flatnonzero(np.diff(mask)) + 1)
  texts = [tokenizer.decode(span) for span in spans]
  assert texts == [
      "<bos><|system|>\nBe brief.<|end|>\n<|user|>\nRepeat: sun<|end|>\n<|assistant|>\n",
      "sun<|end|>\n",
      "<|user|>\nRepeat: moon<|end|>\n<|assistant|>\n",
      "moon<|end|>\n<eos>",
  ]
  span_is_target = [bool(span[0]) for span in np.split(mask, np.flatnonzero(np.diff(mask)) + 1)]
  assert span_is_target == [False, True, False, True]


SHORT = {"prompt": "Repeat: sun", "completion": "sun"}
LONG_ANSWER = {"prompt": "Repeat: sun", "completion": " ".join(["sun"] * 40)}
LONG_PROMPT = {"prompt": " ".join(["moon"] * 40), "completion": "moon"}
# A prompt that fits max_len=20 on its own, with a response that does not.
LONG_BOTH = {"prompt": "Repeat: sun, sun, sun", "completion": " ".join(["sun"] * 40)}


def prompt_length(tokenizer, prompt):
  """BOS + the rendered context up to the assistant header, counted independently of tokenize_sft."""
  return 1 + len(encode(tokenizer, f"<|user|>\n{prompt}<|end|>\n<|assistant|>\n"))


def test_sft_skips_long_prompts_by_default_and_cuts_long_completions(tokenizer, caplog):
  full, _ = tokenize_sft([LONG_ANSWER], tokenizer, max_len=1000)
  with caplog.at_level(logging.WARNING, logger="rlhf_jax.data.sft"):
    examples, stats = tokenize_sft([SHORT, LONG_ANSWER, LONG_PROMPT], tokenizer, max_len=20)
  assert stats == {"examples": 2, "dropped": 1, "truncated": 1, "left_truncated": 0}
  assert "of 3 records, dropped 1 whose prompt fills max_len" in caplog.text
  assert "response end of 1" in caplog.text
  cut = examples[1]
  assert len(cut.tokens) == 20
  np.testing.assert_array_equal(cut.tokens, full[0].tokens[:20])
  np.testing.assert_array_equal(cut.loss_mask, full[0].loss_mask[:20])
  explicit, explicit_stats = tokenize_sft(
      [SHORT, LONG_ANSWER, LONG_PROMPT], tokenizer, max_len=20, prompt_overflow="skip"
  )
  assert explicit_stats == stats
  assert [e.tokens.tolist() for e in explicit] == [e.tokens.tolist() for e in examples]


def test_sft_prompt_overflow_error_names_record_and_lengths(tokenizer):
  n_prompt = prompt_length(tokenizer, LONG_PROMPT["prompt"])
  n_response = len(encode(tokenizer, "moon<|end|>\n")) + 1  # + EOS
  assert n_prompt >= 20
  with pytest.raises(RecordError) as info:
    tokenize_sft([SHORT, LONG_ANSWER, LONG_PROMPT], tokenizer, max_len=20, prompt_overflow="error")
  assert str(info.value).startswith(
      f"records[2]: field 'prompt': {n_prompt} prompt tokens (BOS and chat template included) >= "
      f"max_len=20, leaving no room for its {n_response} response tokens; raise max_len"
  )
  # A prompt one token short of max_len still leaves room for a target: not an overflow.
  _, stats = tokenize_sft([LONG_PROMPT], tokenizer, max_len=n_prompt + 1, prompt_overflow="error")
  assert stats == {"examples": 1, "dropped": 0, "truncated": 1, "left_truncated": 0}


def test_sft_prompt_overflow_truncate_left_keeps_bos_and_prompt_end(tokenizer):
  max_len = 20
  (full_prompt,), _ = tokenize_sft([LONG_PROMPT], tokenizer, max_len=1000)
  (full_answer,), _ = tokenize_sft([LONG_BOTH], tokenizer, max_len=1000)
  examples, stats = tokenize_sft(
      [SHORT, LONG_PROMPT, LONG_BOTH], tokenizer, max_len=max_len, prompt_overflow="truncate_left"
  )
  assert stats == {"examples": 3, "dropped": 0, "truncated": 1, "left_truncated": 2}
  short, cut_prompt, cut_answer = examples
  assert (
      short.tokens.tolist()
      == tokenize_sft([SHORT], tokenizer, max_len=max_len)[0][0].tokens.tolist()
  )

  # Long prompt, short response: the whole response fits; the prompt keeps max_len - response tokens.
  n_prompt = prompt_length(tokenizer, LONG_PROMPT["prompt"])
  n_response = len(full_prompt.tokens) - n_prompt
  keep = max_len - n_response
  expected = np.concatenate([full_prompt.tokens[:1], full_prompt.tokens[n_prompt - (keep - 1) :]])
  assert cut_prompt.tokens.tolist() == expected.tolist() and len(expected) == max_len
  assert cut_prompt.loss_mask.tolist() == [False] * keep + [True] * n_response
  assert tokenizer.decode(cut_prompt.tokens[:keep]).startswith("<bos>")
  assert tokenizer.decode(cut_prompt.tokens[:keep]).endswith(" moon<|end|>\n<|assistant|>\n")
  assert tokenizer.decode(cut_prompt.tokens[keep:]) == "moon<|end|>\n<eos>"

  # Short-enough prompt but a response longer than max_len: the prompt is cut to max_len // 2 (it
  # cannot be crowded out), then the response loses its end.
  n_prompt = prompt_length(tokenizer, LONG_BOTH["prompt"])
  keep = max_len // 2
  assert keep < n_prompt < max_len
  expected = np.concatenate(
      [
          full_answer.tokens[:1],
          full_answer.tokens[n_prompt - (keep - 1) : n_prompt],
          full_answer.tokens[n_prompt : n_prompt + max_len - keep],
      ]
  )
  assert cut_answer.tokens.tolist() == expected.tolist()
  assert cut_answer.loss_mask.tolist() == [False] * keep + [True] * (max_len - keep)


def test_sft_rejects_empty_completion_and_bad_policy(tokenizer):
  with pytest.raises(RecordError, match=r"^records\[1\]: field 'completion': is empty"):
    tokenize_sft([SHORT, {"prompt": "Repeat: sun", "completion": "  "}], tokenizer, max_len=64)
  with pytest.raises(
      ValueError, match=r"prompt_overflow='truncate'; expected one of 'skip', 'error', "
  ):
    tokenize_sft([SHORT], tokenizer, max_len=64, prompt_overflow="truncate")
  with pytest.raises(ValueError, match=r"max_len=1: an example needs at least 2 tokens"):
    tokenize_sft([SHORT], tokenizer, max_len=1)


# ---------------------------------------------------------------- chat template vs tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def with_template(tokenizer_dir, tmp_path, template):
  """A copy of the toy tokenizer directory whose tokenizer_config.json carries `template`."""
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  config["chat_template"] = template
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  return tmp_path


def test_template_tokens_missing_from_tokenizer_fail_at_load(tokenizer_dir, tmp_path):
  with pytest.raises(ChatTemplateError) as info:
    load_tokenizer(with_template(tokenizer_dir, tmp_path, CHATML))
  message = str(info.value)
  assert re.search(
      r"its chat_template writes <\|im_start\|>, <\|im_end\|>, which the tokenizer does not "
      r"have as special tokens, so each would be split",
      message,
  ), message
  assert str(tmp_path) in message


def test_template_check_names_only_the_missing_tokens(tokenizer_dir, tmp_path):
  # <|user|> and <|end|> exist in the toy tokenizer; <|human|> does not.
  template = (
      "{% for m in messages %}{{ '<|user|>' if m['role'] == 'user' else '<|human|>' }}\n"
      "{{ m['content'] }}<|end|>\n{% endfor %}"
  )
  with pytest.raises(ChatTemplateError, match=r"writes <\|human\|>, which the tokenizer"):
    load_tokenizer(with_template(tokenizer_dir, tmp_path, template))


def test_template_check_at_first_use(tokenizer_dir):
  tokenizer = load_tokenizer(tokenizer_dir)  # a private copy: the template is changed below
  check_chat_template(tokenizer)  # the toy template passes
  tokenize_sft([SHORT], tokenizer, max_len=64)
  tokenizer.chat_template = CHATML
  with pytest.raises(ChatTemplateError, match=r"writes <\|im_start\|>, <\|im_end\|>"):
    tokenize_sft([SHORT], tokenizer, max_len=64)
  with pytest.raises(ChatTemplateError, match=r"writes <\|im_start\|>"):
    encode_prompt(tokenizer, "Repeat: sun")
  tokenizer.chat_template = None
  with pytest.raises(ChatTemplateError, match=r"has no chat_template; add one"):
    encode_prompt(tokenizer, "Repeat: sun")


def test_template_check_accepts_plain_text_markers_and_special_tokens(tokenizer_dir):
  tokenizer = load_tokenizer(tokenizer_dir)
  # Llama 2 style: [INST] and <<SYS>> are plain text on purpose; BOS/EOS come from the tokenizer.
  tokenizer.chat_template = (
      "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>\n{{ m['content'] }}"
      "\n<</SYS>>\n{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %} "
      "{{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
  )
  check_chat_template(tokenizer)
  tokenizer.chat_template = "{{ raise_exception('no chat here') }}"
  with pytest.raises(
      ChatTemplateError, match=r"cannot render a user/assistant conversation \(no chat"
  ):
    check_chat_template(tokenizer)


# ---------------------------------------------------------------- batching


def make_example(length, first_id):
  """Distinct ids per example; the first token is never a target (as after tokenize_sft)."""
  mask = np.arange(length) >= length // 2
  mask[0] = False
  return Example(np.arange(first_id, first_id + length, dtype=np.int32), mask)


def test_pack_first_fit_segments_and_positions():
  examples = [make_example(3, 10), make_example(4, 20), make_example(2, 30), make_example(3, 40)]
  batch, count = pack_examples(examples, seq_len=6, rows=2)
  # 3 -> row 0; 4 does not fit row 0 -> row 1; 2 -> row 0 (first fit); 3 fits nowhere: stop.
  assert count == 3
  assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]
  assert batch["positions"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]
  assert batch["tokens"].tolist() == [[10, 11, 12, 30, 31, 0], [20, 21, 22, 23, 0, 0]]
  assert batch["loss_mask"].tolist() == [
      [False, True, True, False, True, False],
      [False, False, True, True, False, False],
  ]
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "tokens": ((2, 6), np.int32),
      "loss_mask": ((2, 6), np.bool_),
      "segment_ids": ((2, 6), np.int32),
      "positions": ((2, 6), np.int32),
  }
  padded = pad_batch(examples[:2], seq_len=6)
  assert padded["segment_ids"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
  assert padded["positions"].tolist() == [[0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 0, 0]]
  assert num_tokens(padded) == 7
  with pytest.raises(ValueError, match="7 tokens > seq_len=6"):
    pad_batch([make_example(7, 0)], seq_len=6)


def triples(batch):
  """Multiset of (input token, target token, target is supervised) within documents."""
  seg, tok, mask = batch["segment_ids"], batch["tokens"], batch["loss_mask"]
  same_doc = (seg[:, :-1] == seg[:, 1:]) & (seg[:, 1:] != 0)
  return collections.Counter(
      zip(
          tok[:, :-1][same_doc].tolist(),
          tok[:, 1:][same_doc].tolist(),
          mask[:, 1:][same_doc].tolist(),
      )
  )


def test_pad_and_pack_give_the_same_training_signal(tokenizer):
  examples, _ = tokenize_sft(generate_sft_records(40, seed=3), tokenizer, max_len=64)
  padded = pad_batch(examples, seq_len=64)
  packed, count = pack_examples(examples, seq_len=64, rows=len(examples))
  assert count == len(examples)
  assert triples(padded) == triples(packed)
  assert sum(triples(packed).values()) == sum(len(e.tokens) - 1 for e in examples)
  assert num_tokens(packed) == num_tokens(padded) == sum(len(e.tokens) for e in examples)
  assert packed["loss_mask"].sum() == padded["loss_mask"].sum()
  used_rows = np.count_nonzero(packed["segment_ids"].any(axis=1))
  assert used_rows <= len(examples) // 2  # toy examples are short; packing must actually pack
  # Every packed document, read back by its segment id, is one of the examples, whole.
  docs = sorted(
      tuple(row[seg == s])
      for row, seg in zip(packed["tokens"], packed["segment_ids"])
      for s in range(1, seg.max() + 1)
  )
  assert docs == sorted(tuple(e.tokens) for e in examples)


def test_target_list_layout():
  batch, _ = pack_examples(
      [make_example(4, 10), make_example(3, 20)], seq_len=8, rows=1, logit_budget=4
  )
  # Targets: tokens 2, 3 of the first example (slots 2, 3) and 1, 2 of the second (slots 5, 6).
  assert batch["logit_target"].tolist() == [[2, 3, 5, 6]]
  assert batch["logit_index"].tolist() == [[1, 2, 4, 5]]
  assert batch["logit_mask"].tolist() == [[True] * 4]
  from rlhf_jax.data.sft import logit_budget_for

  assert logit_budget_for([make_example(4, 10)], 8, multiple=1) == 4  # 2 of 4 tokens x 8


# ---------------------------------------------------------------- loader


def ids_in(batch):
  return batch["tokens"][:, 0].tolist()  # make_example(length, first_id) starts with its id


def test_loader_epochs_are_permutations():
  examples = [make_example(3, 100 * i) for i in range(10)]
  it = BatchIterator(examples, batch_size=4, seq_len=5, seed=1, packing=False)
  stream = [i for _ in range(5) for i in ids_in(next(it))]  # 20 rows = 2 epochs exactly
  assert sorted(stream[:10]) == sorted(stream[10:]) == [100 * i for i in range(10)]
  assert stream[:10] != stream[10:]  # each epoch reshuffles
  assert it.state() == {"epoch": 2, "index": 0}
  ordered = BatchIterator(examples, batch_size=4, seq_len=5, seed=1, packing=False, shuffle=False)
  assert ids_in(next(ordered)) == [0, 100, 200, 300]


@pytest.mark.parametrize("packing", [False, True])
def test_loader_resume_gives_identical_batches(packing):
  rng = np.random.default_rng(0)
  examples = [make_example(int(n), 100 * i) for i, n in enumerate(rng.integers(2, 9, size=13))]
  kwargs = dict(batch_size=3, seq_len=10, seed=5, packing=packing)
  reference = BatchIterator(examples, **kwargs)
  batches = [next(reference) for _ in range(12)]  # several epochs
  assert all(b["tokens"].shape == (3, 10) for b in batches)

  first = BatchIterator(examples, **kwargs)
  for _ in range(5):
    next(first)
  saved = json.loads(json.dumps(first.state()))
  resumed = BatchIterator(examples, **kwargs)
  resumed.restore(saved)
  for expected in batches[5:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  assert resumed.state() == reference.state()
  with pytest.raises(ValueError, match="bad data iterator state"):
    resumed.restore({"epoch": 0, "index": 13})


# ---------------------------------------------------------------- toy instructions


def reference_answer(prompt):
  """Solves a toy prompt independently of the generator."""
  if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", prompt):
    return str(eval(f"{m[1]} {m[2]} {m[3]}"))  # noqa: S307 -- digits and one operator only
  head, _, tail = prompt.partition(": ")
  words = tail.split(", ")
  return {
      "Repeat": tail,
      "Reverse the list": ", ".join(words[::-1]),
      "Sort the list alphabetically": ", ".join(sorted(words)),
      "Count the words in the list": str(len(words)),
      "Give the first word of the list": words[0],
      "Give the last word of the list": words[-1],
  }[head]


def test_toy_generator_is_deterministic_and_correct():
  records = generate_sft_records(200, seed=7)
  assert records == generate_sft_records(200, seed=7)
  assert records[:50] == generate_sft_records(50, seed=7)
  assert records != generate_sft_records(200, seed=8)
  assert {r["family"] for r in records} == set(FAMILIES) == {"arithmetic", "word_list", "copy"}
  ops = {r["prompt"].split(":")[0] for r in records if r["family"] == "word_list"}
  assert len(ops) == 5
  for record in records:
    assert validate_record(record, "sft", source="toy", line=1) == record
    assert record["completion"] == record["answer"] == reference_answer(record["prompt"])
  assert {r["family"] for r in generate_sft_records(30, seed=1, families=["copy"])} == {"copy"}
  with pytest.raises(ValueError, match="not all registered"):
    generate_sft_records(3, seed=1, families=["chess"])


def test_toy_score():
  for record in generate_sft_records(30, seed=2):
    assert score(record, record["answer"]) == 1.0
    assert score(record, f"  {record['answer']}\n") == 1.0
    assert score(record, record["answer"] + "0") == 0.0
    assert score(record, "") == 0.0
  assert score({"family": "arithmetic", "answer": "12"}, "13") == 0.0
