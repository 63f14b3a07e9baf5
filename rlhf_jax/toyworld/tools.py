"""Tools a toy-world model may call: a calculator and a knowledge-base lookup.

A tool is a callable `tool(arguments: str, *, record: dict | None = None) -> str`: it gets the text
the model wrote after the tool's name and returns the observation the model reads next (`record`,
the task being answered, is there for tools that need it; these two do not). Arguments a tool
cannot use raise `rlhf_jax.errors.ToolArgumentError`, whose short message becomes the observation
instead (the model's mistake, not the tool's).

- calculator: "7 * 5" -> "35". One whole-number operation ("a + b", "a - b", "a * b"; negative
  operands allowed, spaces optional) or a single whole number; parsed, never eval()'d.
- lookup: "Zorblax pet" -> "Zorblax has a pet owl.". An entity of the world's knowledge base (any
  case) and an attribute (a key of `kb.ATTRIBUTES`; "favourite food" for "favourite_food"); the
  result is the fact's sentence, the same as the `facts` family's ideal answer.

The format (a tool-enabled tokenizer, `data.train_tokenizer(..., tools=True)`): the assistant's
turn is one call, `<tool_call>NAME: ARGUMENTS</tool_call>` (`call_text`; generation stops after
`</tool_call>`), the result is a message of role "tool", and the assistant answers in a new turn:

    <|user|>\\nWhat is 7 * 5?<|end|>\\n<|assistant|>\\n<tool_call>calculator: 7 * 5</tool_call><|end|>\\n
    <|tool|>\\n35<|end|>\\n<|assistant|>\\n35<|end|>\\n

`tool_conversation` writes that conversation for an arithmetic or facts task: the SFT
demonstrations of tool use (`corpora.sft_records(..., tool_demo_rate=...)`).
"""

from __future__ import annotations

import re
from typing import Callable, Collection, Mapping

from rlhf_jax.errors import ToolArgumentError
from rlhf_jax.toyworld import kb as kb_lib

TOOL_NAMES = ("calculator", "lookup")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_DIGITS = 18  # per operand: keeps results exact and short (and under Python's int-str limit)
_SHOWN = 40  # characters of bad arguments quoted in an error observation
_INTEGER = r"-?[0-9]+"
_EXPRESSION = re.compile(rf"\s*({_INTEGER})\s*(?:([-+*])\s*({_INTEGER})\s*)?")
_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

Tool = Callable[..., str]


def _quoted(arguments: str) -> str:
  """The arguments on one line, cut to _SHOWN characters, in single quotes."""
  shown = " ".join(arguments.split())
  return f"'{shown if len(shown) <= _SHOWN else shown[: _SHOWN - 3] + '...'}'"


def calculator(arguments: str, *, record: dict | None = None) -> str:
  """The value of "a op b" (op +, - or *; whole numbers, possibly negative) or of a single whole
  number, as a decimal string: "7 * 5" -> "35", "-3--4" -> "1". Raises ToolArgumentError on
  anything else. `record` is unused."""
  del record
  match = _EXPRESSION.fullmatch(arguments)
  if match is None:
    raise ToolArgumentError(
        f'cannot compute {_quoted(arguments)}: expected "a + b", "a - b" or "a * b" with whole '
        "numbers"
    )
  a, op, b = match.groups()
  if max(len(x.lstrip("-")) for x in (a, b or "0")) > MAX_DIGITS:
    raise ToolArgumentError(
        f"cannot compute {_quoted(arguments)}: numbers of at most {MAX_DIGITS} digits"
    )
  return str(int(a) if op is None else _OPERATIONS[op](int(a), int(b)))


class Lookup:
  """The lookup tool of a knowledge base: "ENTITY ATTRIBUTE" -> the fact's sentence.

  `Lookup(World(seed).kb)("zorblax pet")` -> "Zorblax has a pet owl." (`kb.ANSWERS[attribute]`
  with the entity's name as the knowledge base spells it: the `facts` family's ideal answer).
  """

  def __init__(self, kb: kb_lib.KnowledgeBase):
    self.kb = kb
    self._names = {name.lower(): name for name in kb.names}

  def __call__(self, arguments: str, *, record: dict | None = None) -> str:
    """The fact `arguments` ("ENTITY ATTRIBUTE") asks for; ToolArgumentError when the entity or the
    attribute is unknown (the message lists the attributes). `record` is unused."""
    del record
    attributes = ", ".join(kb_lib.ATTRIBUTES)
    entity, *rest = arguments.split() or [""]
    attribute = "_".join(rest).lower()
    if not entity or attribute not in kb_lib.ATTRIBUTES:
      raise ToolArgumentError(
          f'cannot look up {_quoted(arguments)}: expected "ENTITY ATTRIBUTE", the attribute one '
          f"of {attributes}"
      )
    name = self._names.get(entity.lower())
    if name is None:
      raise ToolArgumentError(
          f"cannot look up {_quoted(arguments)}: no entity named {entity!r} (attributes: "
          f"{attributes})"
      )
    value = self.kb.facts(name)[attribute]
    return kb_lib.ANSWERS[attribute].format(e=name, v=value)


def make_tools(world, names: Collection[str]) -> dict[str, Tool]:
  """{name: tool} for `names` (each one of TOOL_NAMES) in `world` (a `World`: lookup reads its
  knowledge base). Raises ValueError naming an unknown tool."""
  unknown = [name for name in names if name not in TOOL_NAMES]
  if unknown:
    raise ValueError(f"unknown tools {unknown}; choose from {', '.join(TOOL_NAMES)}")
  return {name: calculator if name == "calculator" else Lookup(world.kb) for name in names}


def call_text(name: str, arguments: str) -> str:
  """The assistant's call of tool `name`: "<tool_call>NAME: ARGUMENTS</tool_call>"."""
  return f"{CALL_OPEN}{name}: {arguments}{CALL_CLOSE}"


def tool_conversation(
    task: dict, kb: kb_lib.KnowledgeBase, tools: Collection[str] | Mapping[str, Tool]
) -> list[dict] | None:
  """The demonstration of `task` solved with a tool, or None when no tool in `tools` covers it.

  arithmetic with "calculator", facts with "lookup" (`kb`: the task's world's knowledge base):

      [{"role": "user", "content": task["prompt"]},
       {"role": "assistant", "content": call_text("calculator", "7 * 5")},
       {"role": "tool", "content": "35"},
       {"role": "assistant", "content": task["answer"]}]

  `tools` holds tool names, or is `make_tools`'s dict (whose tools are then called). The tool
  message is the tool's own output, checked against the task (a facts task from another world's
  knowledge base raises ValueError).
  """
  info = task["info"]
  if task["family"] == "arithmetic" and "calculator" in tools:
    name, arguments = "calculator", f"{info['a']} {info['op']} {info['b']}"
    expected = str(info["result"])
  elif task["family"] == "facts" and "lookup" in tools:
    name, arguments = "lookup", f"{info['entity']} {info['attribute']}"
    expected = kb_lib.ANSWERS[info["attribute"]].format(e=info["entity"], v=info["value"])
  else:
    return None
  if isinstance(tools, Mapping):
    tool = tools[name]
  else:
    tool = calculator if name == "calculator" else Lookup(kb)
  try:
    observation = tool(arguments, record=task)
  except ToolArgumentError as err:
    raise ValueError(
        f"task {task['prompt']!r}: the {name} tool refused {arguments!r}: {err}"
    ) from None
  if observation != expected:
    raise ValueError(
        f"task {task['prompt']!r}: the {name} tool says {observation!r}, the task {expected!r}; "
        "pass the knowledge base of the task's own world"
    )
  return [
      {"role": "user", "content": task["prompt"]},
      {"role": "assistant", "content": call_text(name, arguments)},
      {"role": "tool", "content": observation},
      {"role": "assistant", "content": task["answer"]},
  ]
