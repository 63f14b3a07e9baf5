"""Procedurally generated instructions with exact answers: the toy world's first SFT task suite.

Task families live in a registry, `FAMILIES`: name -> Family(make, check), where
`make(rng) -> (prompt, answer)` draws one task and `check(answer, response) -> bool` grades a reply.
A new family is one function decorated with `@register_family("name")`.

    arithmetic  "What is 7 + 5?"                    -> "12"      (+, -, * on 0..12)
    word_list   "Reverse the list: cat, dog, sun"   -> "sun, dog, cat"
                (also sort / count / first / last of 3..5 distinct words)
    copy        "Repeat: owl hat moon"              -> "owl hat moon"

A record is {"prompt", "completion", "family", "answer"}; `answer` is what `check` grades against
(today the completion itself; later families may accept several answers).
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

WORDS = (
    "apple",
    "bird",
    "box",
    "cat",
    "dog",
    "egg",
    "fish",
    "goat",
    "hat",
    "ice",
    "jam",
    "kite",
    "lamp",
    "moon",
    "nest",
    "owl",
    "pen",
    "rain",
    "sun",
    "tree",
    "van",
    "wolf",
    "yak",
    "zoo",
)
MAX_OPERAND = 12


class Family(NamedTuple):
  make: Callable[[np.random.Generator], tuple[str, str]]  # rng -> (prompt, answer)
  check: Callable[[str, str], bool]  # (answer, response) -> correct?


FAMILIES: dict[str, Family] = {}


def exact_match(answer: str, response: str) -> bool:
  """Correct iff equal after stripping surrounding whitespace (a trailing newline is no error)."""
  return response.strip() == answer.strip()


def register_family(name: str, check: Callable[[str, str], bool] = exact_match):
  """Decorator adding `make(rng) -> (prompt, answer)` to FAMILIES under `name`."""

  def add(make: Callable[[np.random.Generator], tuple[str, str]]):
    if name in FAMILIES:
      raise ValueError(f"task family {name!r} is already registered")
    FAMILIES[name] = Family(make, check)
    return make

  return add


def _words(rng: np.random.Generator, low: int, high: int) -> list[str]:
  """low..high distinct words, so sort / first / last have one right answer."""
  count = int(rng.integers(low, high + 1))
  return [WORDS[i] for i in rng.choice(len(WORDS), size=count, replace=False)]


@register_family("arithmetic")
def _arithmetic(rng: np.random.Generator) -> tuple[str, str]:
  a, b = (int(x) for x in rng.integers(0, MAX_OPERAND + 1, size=2))
  op = "+-*"[int(rng.integers(3))]
  result = {"+": a + b, "-": a - b, "*": a * b}[op]
  return f"What is {a} {op} {b}?", str(result)


_LIST_OPS = {
    "reverse": ("Reverse the list", lambda words: ", ".join(reversed(words))),
    "sort": ("Sort the list alphabetically", lambda words: ", ".join(sorted(words))),
    "count": ("Count the words in the list", lambda words: str(len(words))),
    "first": ("Give the first word of the list", lambda words: words[0]),
    "last": ("Give the last word of the list", lambda words: words[-1]),
}


@register_family("word_list")
def _word_list(rng: np.random.Generator) -> tuple[str, str]:
  instruction, solve = list(_LIST_OPS.values())[int(rng.integers(len(_LIST_OPS)))]
  words = _words(rng, 3, 5)
  return f"{instruction}: {', '.join(words)}", solve(words)


@register_family("copy")
def _copy(rng: np.random.Generator) -> tuple[str, str]:
  text = " ".join(_words(rng, 1, 6))
  return f"Repeat: {text}", text


def generate_sft_records(n: int, seed: int, families: Sequence[str] | None = None) -> list[dict]:
  """n records drawn from `families` (default: all registered), deterministic in (n, seed, families).

  One random stream drives everything, so the first m records of n are the records of m.
  """
  names = tuple(FAMILIES) if families is None else tuple(families)
  unknown = [name for name in names if name not in FAMILIES]
  if unknown or not names:
    raise ValueError(
        f"task families {list(names)} not all registered; choose from {', '.join(FAMILIES)}"
    )
  rng = np.random.default_rng(seed)
  records = []
  for _ in range(n):
    family = names[int(rng.integers(len(names)))]
    prompt, answer = FAMILIES[family].make(rng)
    records.append({"prompt": prompt, "completion": answer, "family": family, "answer": answer})
  return records


def corpus_texts(records: Iterable[dict]) -> list[str]:
  """Texts to train the tokenizer on: every prompt and completion, as the model will see them."""
  return [text for record in records for text in (record["prompt"], record["completion"])]


def score(record: dict, response: str) -> float:
  """1.0 if `response` solves the record's task (per its family's check), else 0.0.

  `record` needs "family" and "answer" (as made by generate_sft_records).
  """
  family = FAMILIES.get(record["family"])
  if family is None:
    raise ValueError(f"unknown task family {record['family']!r}; registered: {', '.join(FAMILIES)}")
  return float(family.check(record["answer"], response))
