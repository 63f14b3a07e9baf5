"""Hindsight instruction relabeling on toy-world tasks: the instruction a sampled response follows.

A "constrained" task's prompt is a request and its rendered constraints
(`f"{request} {render_constraints(constraints)}"`, families.py). `relabel(task, response)`
rewrites it to the constraints the response actually met, constraint by constraint, keeping the
original order and kinds (so relabeled prompts look like generated ones):

  met                        kept as it is
  starts_with / num_items /  replaced by what the response did (observed_constraints): its first
  max_words not met          word, its item count (2+), its word count -- HER's "achieved goal"
  uppercase / ends_with /    dropped (there is no achieved version of them to ask for)
  include_word not met

If nothing is left, the response's observed word limit is asked for, so the prompt stays a
constrained one. Every constraint of the result is met by the response (tests check it). The
request itself (category, entity) is kept: whether the *content* is right is gold's to say, and
the HIR driver keeps a relabeled sample only when its gold score under the new instruction is high.

A behaviour-world task with a "(brief)" / "(detailed)" tag (behaviours.py) is relabeled to the
tag its response follows: "(detailed)" when it elaborates, "(brief)" when it does not (its prompt,
`info["tag"]` and ideal answer rewritten) -- the instruction the response achieved, whatever it
was asked; an untagged task stays untagged. Preambles and sign-offs are no instruction; gold still
prices them.

Other families (arithmetic, word_list, facts, unsafe, safe_lookalike untagged) have no instruction to
relabel (what was asked is what the answer is judged against): `relabel` returns the task as it
is, and the driver keeps a sample only when its gold score under that instruction is high.
A blank response follows no instruction: `relabel` returns None.
"""

from __future__ import annotations

from rlhf_jax.toyworld import behaviours
from rlhf_jax.toyworld import constraints as cons

SUBSTITUTED = ("starts_with", "num_items", "max_words")  # kinds an unmet constraint is observed in


def request_of(task: dict) -> str:
  """A constrained task's request: its prompt without the rendered constraints ("Name some
  fruits.")."""
  rendered = cons.render_constraints(task["info"]["constraints"])
  if not task["prompt"].endswith(" " + rendered):
    raise ValueError(
        f"task prompt {task['prompt']!r} does not end with its rendered constraints "
        f"{rendered!r}; not a constrained task as families.py makes them"
    )
  return task["prompt"][: -len(rendered) - 1]


def relabeled_constraints(response: str, constraints: list[dict]) -> list[dict]:
  """The constraints `response` meets, derived from `constraints` (module docstring); [] when the
  response is blank."""
  observed = {c["kind"]: c for c in cons.observed_constraints(response)}
  if not observed:
    return []
  out = []
  for constraint, met in zip(constraints, cons.check_constraints(response, constraints)):
    kind = constraint["kind"]
    if met:
      out.append(constraint)
    elif kind in SUBSTITUTED and kind in observed:
      achieved = dict(observed[kind])
      if kind == "starts_with":  # generated prompts capitalise it ("Sure"); checks ignore case
        achieved["word"] = achieved["word"].capitalize()
      out.append(achieved)
  return out or [observed["max_words"]]


def relabel(task: dict, response: str) -> dict | None:
  """The task whose instruction `response` follows (module docstring): a constrained task with its
  prompt and `info["constraints"]` (and, for lists, `info["needed"]`) rewritten; any other task
  unchanged; None for a blank response."""
  if not response.strip():
    return None
  if task["info"].get("tag"):
    return behaviours.retag(
        task, "detailed" if behaviours.detect(task, response)["detailed"] else "brief"
    )
  if task["family"] != "constrained":
    return task
  new = relabeled_constraints(response, task["info"]["constraints"])
  info = {**task["info"], "constraints": new}
  if info["request"] == "list":  # as families._constrained: "exactly n items" needs n, else 2
    info["needed"] = next((c["n"] for c in new if c["kind"] == "num_items"), 2)
  return {**task, "prompt": f"{request_of(task)} {cons.render_constraints(new)}", "info": info}
