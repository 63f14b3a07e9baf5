"""Format constraints on a response: pure checks, rendering, and hindsight relabeling helpers.

A constraint is a small JSON-serialisable dict:

    {"kind": "max_words", "n": 5}          at most n whitespace-separated words
    {"kind": "uppercase"}                  letters present, none lower case
    {"kind": "ends_with", "text": "!"}     the stripped response ends with `text`
    {"kind": "num_items", "n": 3}          exactly n list items (see `count_items`)
    {"kind": "starts_with", "word": "Sure"}  the first word is `word` (any case)
    {"kind": "include_word", "word": "gladly"}  `word` occurs as a whole word (any case)

Every check depends on the response text alone, so HIR can relabel any sampled output with the
constraints it met (`satisfied_constraints`, `observed_constraints`) without knowing the task.
A blank response meets no constraint: relabeling an empty output as a success would teach nothing.
"""

from __future__ import annotations

import re

from rlhf_jax.toyworld import text

KINDS = ("starts_with", "include_word", "num_items", "max_words", "uppercase", "ends_with")
_PARAMS = {
    "starts_with": ("word",),
    "include_word": ("word",),
    "num_items": ("n",),
    "max_words": ("n",),
    "uppercase": (),
    "ends_with": ("text",),
}
_RENDER = {
    "starts_with": "Start your answer with the word '{word}'.",
    "include_word": "Include the word '{word}'.",
    "num_items": "List exactly {n} items.",
    "max_words": "Use at most {n} words.",
    "uppercase": "Write in uppercase.",
    "ends_with": "End your answer with '{text}'.",
}
_ITEM_SEPARATORS = re.compile(r"[,;\n]|\band\b")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")


def validate_constraint(constraint: dict) -> None:
  """Raises ValueError naming the problem if `constraint` is not one of the documented forms."""
  kind = constraint.get("kind") if isinstance(constraint, dict) else None
  if kind not in _PARAMS:
    raise ValueError(f"constraint {constraint!r}: 'kind' must be one of {', '.join(KINDS)}")
  wanted = set(_PARAMS[kind]) | {"kind"}
  if set(constraint) != wanted:
    raise ValueError(
        f"constraint {constraint!r}: a {kind!r} constraint has exactly the keys "
        f"{sorted(wanted)}"
    )
  if "n" in constraint and (not isinstance(constraint["n"], int) or constraint["n"] < 1):
    raise ValueError(f"constraint {constraint!r}: 'n' must be a positive integer")


def count_items(response: str) -> int:
  """List items: after a lead-in ending in ':' (if any), segments split on , ; newline or 'and'.

  Bullets ("- ", "1. ") are ignored and only segments with a letter or digit count, so
  "Sure: cat, dog, and owl" and "- cat\\n- dog\\n- owl" both have 3 items.
  """
  body = response.split(":", 1)[1] if ":" in response else response
  segments = (_BULLET.sub("", segment) for segment in _ITEM_SEPARATORS.split(body))
  return sum(1 for segment in segments if re.search(r"[A-Za-z0-9]", segment))


def check_constraint(response: str, constraint: dict) -> bool:
  """Whether `response` meets one constraint (module docstring)."""
  validate_constraint(constraint)
  if not response.strip():
    return False
  kind = constraint["kind"]
  if kind == "max_words":
    return text.word_count(response) <= constraint["n"]
  if kind == "uppercase":
    return any(c.isalpha() for c in response) and response == response.upper()
  if kind == "ends_with":
    return response.rstrip().endswith(constraint["text"])
  if kind == "num_items":
    return count_items(response) == constraint["n"]
  tokens = text.words(response)
  word = text.normalize(constraint["word"])
  if kind == "starts_with":
    return bool(tokens) and tokens[0] == word
  return word in tokens  # include_word


def check_constraints(response: str, constraints: list[dict]) -> list[bool]:
  """One bool per constraint, in order."""
  return [check_constraint(response, constraint) for constraint in constraints]


def satisfied_constraints(response: str, candidate_constraints: list[dict]) -> list[dict]:
  """The candidates that `response` meets, in order (HIR: relabel an instruction with these)."""
  return [
      c
      for c, ok in zip(candidate_constraints, check_constraints(response, candidate_constraints))
      if ok
  ]


def observed_constraints(response: str) -> list[dict]:
  """The tightest constraints `response` meets, read off the text itself, in KINDS order.

  starts_with its first word; num_items if it has 2+ items; max_words its word count; uppercase and
  ends_with '!' when they hold. Every one of them passes `check_constraints(response, ...)`.
  """
  tokens = text.words(response)
  if not tokens:
    return []
  observed = [{"kind": "starts_with", "word": tokens[0]}]
  if count_items(response) >= 2:
    observed.append({"kind": "num_items", "n": count_items(response)})
  observed.append({"kind": "max_words", "n": text.word_count(response)})
  if check_constraint(response, {"kind": "uppercase"}):
    observed.append({"kind": "uppercase"})
  if response.rstrip().endswith("!"):
    observed.append({"kind": "ends_with", "text": "!"})
  return observed


def render_constraints(constraints: list[dict]) -> str:
  """The instruction text, one fixed sentence per constraint: "Use at most 5 words. Write in uppercase."

  One phrasing per kind, so relabeled instructions look exactly like generated ones.
  """
  for constraint in constraints:
    validate_constraint(constraint)
  return " ".join(_RENDER[c["kind"]].format(**c) for c in constraints)
