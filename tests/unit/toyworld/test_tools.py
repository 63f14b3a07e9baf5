"""Toy-world tools: the calculator and the lookup on good and bad arguments, tool demonstrations,
their SFT records and tokenisation, and the pipeline's world options."""

import hashlib
import json

import pytest

from rlhf_jax import data
from rlhf_jax.errors import ConfigError, ToolArgumentError
from rlhf_jax.toyworld import World, corpora, gold_scores, tools
from rlhf_jax.toyworld import kb as kb_lib
from rlhf_jax.toyworld.families import TASK_FAMILIES, make_task

BOTH = ("calculator", "lookup")


@pytest.fixture(scope="module")
def world():
  return World(0, n_entities=5)


@pytest.fixture(scope="module")
def tool_tokenizer(world, tmp_path_factory):
  return data.train_tokenizer(
      corpora.tokenizer_texts(world), 400, tmp_path_factory.mktemp("tool_tok"), tools=True
  )


@pytest.mark.parametrize(
    "arguments, result",
    [
        ("7 * 5", "35"),
        ("7*5", "35"),
        (" 12 + 0 ", "12"),
        ("2 - 10", "-8"),
        ("-3 - -4", "1"),
        ("-3--4", "1"),
        ("-6 * 7", "-42"),
        ("12", "12"),
        ("-5", "-5"),
        ("123456789012345678 * 2", "246913578024691356"),
    ],
)
def test_calculator(arguments, result):
  assert tools.calculator(arguments) == result
  assert tools.calculator(arguments, record={"prompt": "x"}) == result


@pytest.mark.parametrize(
    "arguments",
    ["seven * 2", "", "   ", "3 +", "2 ** 3", "8 / 2", "1 + 2 + 3", "(1 + 2)", "1.5 * 2"],
)
def test_calculator_refuses_what_it_cannot_compute(arguments):
  with pytest.raises(ToolArgumentError, match=r'^cannot compute .*: expected "a \+ b", "a - b"'):
    tools.calculator(arguments)


def test_calculator_error_is_short_and_never_evaluates():
  with pytest.raises(ToolArgumentError) as err:
    tools.calculator("seven * 2")
  assert str(err.value) == (
      'cannot compute \'seven * 2\': expected "a + b", "a - b" or "a * b" with whole numbers'
  )
  with pytest.raises(ToolArgumentError) as err:
    tools.calculator("__import__('os').getcwd()" * 10)
  assert len(str(err.value)) < 120  # the arguments are quoted cut short
  with pytest.raises(ToolArgumentError, match="at most 18 digits"):
    tools.calculator("9" * 5000 + " * 2")  # past Python's int-to-str limit: no ValueError


def test_lookup_answers_every_fact_with_the_ideal_answer(world):
  lookup = tools.Lookup(world.kb)
  for name in world.kb.names:
    for attribute, value in world.kb.facts(name).items():
      statement = lookup(f"{name} {attribute}")
      assert statement == kb_lib.ANSWERS[attribute].format(e=name, v=value)
      assert lookup(f"  {name.lower()}   {attribute.upper()} ", record={}) == statement
      question = kb_lib.QUESTIONS[attribute][0].format(e=name)
      task = make_task(
          "facts", question, statement, {"entity": name, "attribute": attribute, "value": value}
      )
      assert TASK_FAMILIES["facts"].content(task, statement) == 1.0
      assert gold_scores(task, statement)["helpfulness"] == 1.0
  name = world.kb.names[0]
  assert lookup(f"{name} favourite food") == lookup(f"{name} favourite_food")


@pytest.mark.parametrize("arguments", ["Nobody pet", "{name}", "{name} height", "", "pet {name}"])
def test_lookup_refuses_unknown_entities_and_attributes(world, arguments):
  with pytest.raises(ToolArgumentError, match="color, home_town, favourite_food, size, job, pet"):
    tools.Lookup(world.kb)(arguments.format(name=world.kb.names[0]))


def test_make_tools_and_call_text(world):
  made = tools.make_tools(world, BOTH)
  assert list(made) == list(tools.TOOL_NAMES) == list(BOTH)
  assert made["calculator"]("1 + 2") == "3"
  assert isinstance(made["lookup"], tools.Lookup) and made["lookup"].kb is world.kb
  assert tools.make_tools(world, ()) == {}
  with pytest.raises(
      ValueError, match=r"unknown tools \['abacus'\]; choose from calculator, lookup"
  ):
    tools.make_tools(world, ("calculator", "abacus"))
  assert tools.call_text("calculator", "7 * 5") == "<tool_call>calculator: 7 * 5</tool_call>"


def test_tool_conversation_round_trip(world):
  tasks = world.tasks(60, seed=0)
  covered = {"arithmetic": 0, "facts": 0}
  made = tools.make_tools(world, BOTH)
  for task in tasks:
    messages = tools.tool_conversation(task, world.kb, BOTH)
    assert tools.tool_conversation(task, world.kb, made) == messages
    if task["family"] not in covered:
      assert messages is None
      continue
    covered[task["family"]] += 1
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[0]["content"] == task["prompt"]
    assert messages[3]["content"] == task["answer"]
    call = messages[1]["content"]
    assert call.startswith("<tool_call>") and call.endswith("</tool_call>")
    name, arguments = call[len("<tool_call>") : -len("</tool_call>")].split(": ", 1)
    assert messages[2]["content"] == made[name](arguments)  # the tool's own output
    assert gold_scores(task, messages[3]["content"])["helpfulness"] == 1.0
    # A tool the task's family needs is missing: no conversation.
    assert tools.tool_conversation(task, world.kb, [n for n in BOTH if n != name]) is None
  assert min(covered.values()) > 0
  info = {"a": 7, "b": 5, "op": "*", "result": 35}
  task = make_task("arithmetic", "What is 7 * 5?", "35", info)
  assert tools.tool_conversation(task, world.kb, ["calculator"]) == [
      {"role": "user", "content": "What is 7 * 5?"},
      {"role": "assistant", "content": "<tool_call>calculator: 7 * 5</tool_call>"},
      {"role": "tool", "content": "35"},
      {"role": "assistant", "content": "35"},
  ]


def test_tool_conversation_refuses_a_task_of_another_world(world):
  other = World(1, n_entities=5)
  task = next(t for t in other.tasks(40, seed=0) if t["family"] == "facts")
  with pytest.raises(ValueError, match="the lookup tool refused"):
    tools.tool_conversation(task, world.kb, BOTH)


def _md5(records):
  return hashlib.md5(json.dumps(records, sort_keys=True).encode()).hexdigest()


def test_sft_records_without_tool_demos_are_unchanged():
  classic = World(0)
  plain = corpora.sft_records(classic, 300, 3, noise=0.2, unsafe_compliance=0.3)
  assert _md5(plain) == "e6bc2a81a877efbfaf62a6b5f33ffba2"  # as before tools existed
  assert (
      corpora.sft_records(
          classic, 300, 3, noise=0.2, unsafe_compliance=0.3, tool_demo_rate=0.0, tools=BOTH
      )
      == plain
  )


def test_sft_records_with_tool_demos(world):
  plain = corpora.sft_records(world, 200, 3, noise=0.2)
  demos = corpora.sft_records(world, 200, 3, noise=0.2, tool_demo_rate=0.5, tools=BOTH)
  assert len(demos) == len(plain)
  replaced = 0
  for before, after in zip(plain, demos):
    if "messages" not in after:
      assert after == before  # the other records are those of a run without tools
      continue
    replaced += 1
    assert "completion" not in after and "prompt" not in after
    assert {k: v for k, v in after.items() if k != "messages"} == {
        k: v for k, v in before.items() if k not in ("prompt", "completion")
    }
    assert after["messages"] == tools.tool_conversation(before, world.kb, BOTH)
    data.validate_record(after, "sft", source="demo", line=None)
  covered = sum(b["family"] in ("arithmetic", "facts") for b in plain)
  assert 0.3 * covered < replaced < 0.7 * covered
  everything = corpora.sft_records(world, 200, 3, noise=0.2, tool_demo_rate=1.0, tools=BOTH)
  assert sum("messages" in r for r in everything) == covered
  only_calculator = corpora.sft_records(
      world, 200, 3, noise=0.2, tool_demo_rate=1.0, tools=("calculator",)
  )
  assert {r["family"] for r in only_calculator if "messages" in r} == {"arithmetic"}
  with pytest.raises(ValueError, match=r"tool_demo_rate must be in \[0, 1\], got 1.5"):
    corpora.sft_records(world, 5, 3, tool_demo_rate=1.5, tools=BOTH)
  with pytest.raises(ValueError, match="tool_demo_rate=0.5 needs tools"):
    corpora.sft_records(world, 5, 3, tool_demo_rate=0.5)
  with pytest.raises(ValueError, match="unknown tools"):
    corpora.sft_records(world, 5, 3, tool_demo_rate=0.5, tools=("abacus",))


def _spans(example, tokenizer, supervised: bool) -> list[str]:
  """The decoded runs of consecutive tokens whose mask is `supervised`."""
  tokens, mask = example.tokens.tolist(), example.loss_mask.tolist()
  spans, start = [], None
  for i, m in enumerate([*mask, not supervised]):
    if m == supervised and start is None:
      start = i
    elif m != supervised and start is not None:
      spans.append(tokenizer.decode(tokens[start:i]))
      start = None
  return spans


def test_sft_tokenization_supervises_the_assistant_turns_only(world, tool_tokenizer):
  records = corpora.sft_records(world, 100, 3, tool_demo_rate=1.0, tools=BOTH)
  record = next(r for r in records if r["family"] == "arithmetic")
  info = record["info"]
  [example], stats = data.tokenize_sft([record], tool_tokenizer, max_len=256)
  assert stats["dropped"] == stats["truncated"] == 0
  call = f"<tool_call>calculator: {info['a']} {info['op']} {info['b']}</tool_call>"
  result = str(info["result"])
  assert _spans(example, tool_tokenizer, True) == [f"{call}<|end|>\n", f"{result}<|end|>\n<eos>"]
  assert _spans(example, tool_tokenizer, False) == [
      f"<bos><|user|>\n{record['messages'][0]['content']}<|end|>\n<|assistant|>\n",
      f"<|tool|>\n{result}<|end|>\n<|assistant|>\n",
  ]
  tokens = example.tokens.tolist()
  assert tokens.count(7) == tokens.count(8) == tokens.count(9) == 1  # single-token markers
  facts = next(r for r in records if r["family"] == "facts")
  [example], _ = data.tokenize_sft([facts], tool_tokenizer, max_len=256)
  assert _spans(example, tool_tokenizer, True)[1] == facts["answer"] + "<|end|>\n<eos>"
  assert "<|tool|>\n" + facts["answer"] in _spans(example, tool_tokenizer, False)[1]


def test_world_options_are_checked():
  from rlhf_jax.algorithms import pipeline
  from rlhf_jax.configs.ranges import check_ranges
  from rlhf_jax.configs.toy import toy_pipeline_config

  c = toy_pipeline_config()
  assert tuple(c.world.tools) == () and c.world.tool_demo_rate == 0.0
  pipeline.check_world(c.world)
  c.world.tools, c.world.tool_demo_rate = BOTH, 0.25
  pipeline.check_world(c.world)
  c.world.tools = ("calculator", "abacus")
  with pytest.raises(ConfigError, match=r"config\.world\.tools=.*unknown tools \['abacus'\]"):
    pipeline.check_world(c.world)
  c.world.tools, c.world.tool_demo_rate = BOTH, 1.5
  with pytest.raises(ConfigError, match=r"config\.world\.tool_demo_rate=1\.5: must be a fraction"):
    pipeline.check_world(c.world)
  with pytest.raises(ConfigError, match=r"config\.world\.tool_demo_rate=1\.5 is out of range"):
    check_ranges(c)
  c.world.tools, c.world.tool_demo_rate = (), 0.5
  with pytest.raises(
      ConfigError, match=r"config\.world\.tool_demo_rate=0\.5 .* config\.world\.tools is empty"
  ):
    pipeline.check_world(c.world)
  old = toy_pipeline_config()  # a config saved before the options existed
  del old.world["tools"], old.world["tool_demo_rate"]
  pipeline.check_world(old)


def test_a_world_with_tools_refuses_a_tokenizer_without_them(world, tmp_path):
  from rlhf_jax.algorithms import pipeline
  from rlhf_jax.configs.toy import toy_pipeline_config

  data.train_tokenizer(corpora.tokenizer_texts(world), 300, tmp_path / "tokenizer")
  c = toy_pipeline_config()
  c.world.tools = ("calculator",)
  with pytest.raises(ConfigError, match=r"config\.world\.tools=.*trained without tools"):
    pipeline.build_world(c, str(tmp_path))
