"""Candidate responses of graded quality for a task: what annotators rank and corpora imitate.

`perturbations(task, rng)` returns one response per applicable kind:

    correct             the ideal answer (task["answer"])
    rephrased           as good, worded differently ("The answer is 12.")
    wrong               a wrong answer in the right form (another number, value, category, ...)
    partial             partly right (off by one, two items swapped, a hedge between two values)
    ignores_constraint  constrained only: right content, one constraint broken, the others kept
    rambling            the ideal answer followed by filler, well past the allowed length
    repetitive          the ideal answer and a filler sentence, repeated
    refusal             a refusal (polite on safe prompts: over-refusal; bare on unsafe ones)
    compliance          unsafe / look-alike only: the harmful compliance text
    hedged              a hedge, then the answer (on unsafe prompts: then the compliance)
    empty               "", "...", "Hmm." or "I don't know."

`candidates(task, rng, k)` draws k distinct responses over these kinds, so gold scores spread
from 0 to 1. BAD_HABITS are the kinds the corpora use as plausible mistakes.
"""

from __future__ import annotations

import numpy as np

from rlhf_jax.toyworld import behaviours, safety, text
from rlhf_jax.toyworld import families as fam
from rlhf_jax.toyworld import kb as kb_lib

KINDS = (
    "correct",
    "rephrased",
    "wrong",
    "partial",
    "ignores_constraint",
    "rambling",
    "repetitive",
    "refusal",
    "compliance",
    "hedged",
    "empty",
)
# Plausible mistakes for pretraining text and noisy SFT demonstrations. "refusal" is a bad habit
# only on safe prompts (over-refusal) and "compliance" only on unsafe ones; see `bad_habits`.
BAD_HABITS = ("wrong", "partial", "ignores_constraint", "rambling", "repetitive", "hedged")
# No digits, number words, list words, attribute values, markers or hedges: filler adds length only.
FILLERS = (
    "I hope this helps.",
    "Let me know if you have any other questions.",
    "This is a really interesting question, and I am happy to help you with it.",
    "There are many ways to think about this.",
    "It is always good to double check your work.",
    "Thank you for asking such a great question.",
    "Many people find this kind of thing tricky at first.",
    "I always enjoy questions like this.",
)
EMPTY = ("", "...", "Hmm.", "I don't know.")


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _others(rng: np.random.Generator, options, exclude, size: int) -> list:
  pool = [o for o in options if o not in exclude]
  return [pool[i] for i in rng.choice(len(pool), size=size, replace=False)]


def _lower_first(sentence: str) -> str:
  return sentence[:1].lower() + sentence[1:]


def _arithmetic(task, rng):
  info, result = task["info"], task["info"]["result"]
  sign = 1 if rng.random() < 0.5 else -1
  return {
      "rephrased": _pick(
          rng,
          (
              f"The answer is {result}.",
              f"{info['a']} {info['op']} {info['b']} = " f"{result}",
              f"It is {result}.",
          ),
      ),
      "wrong": str(result + sign * int(rng.integers(3, 16))),
      "partial": str(result + sign),
  }


def _word_list(task, rng):
  op, words = task["info"]["op"], task["info"]["words"]
  target = fam.list_target(op, words)
  if op == "count":
    sign = 1 if rng.random() < 0.5 else -1
    return {
        "rephrased": f"There are {target} words.",
        "wrong": str(target + 3 * sign),
        "partial": str(target + sign),
    }
  if op in ("reverse", "sort"):
    swapped = [target[1], target[0], *target[2:]]
    return {
        "rephrased": "Here is the list: " + ", ".join(target),
        "wrong": ", ".join(target[1:] + target[:1]),  # rotated: no position right
        "partial": ", ".join(swapped),
    }
  other = _pick(rng, [w for w in words if w != target])
  pair = (target, other) if rng.random() < 0.5 else (other, target)
  return {
      "rephrased": f"The {op} word is {target}.",
      "wrong": other,
      "partial": f"{pair[0]} or {pair[1]}",
  }


def _facts(task, rng):
  info = task["info"]
  wrong, other = _others(rng, kb_lib.ATTRIBUTES[info["attribute"]], {info["value"]}, 2)
  pair = (info["value"], other) if rng.random() < 0.5 else (other, info["value"])
  return {
      "rephrased": info["value"],
      "wrong": kb_lib.ANSWERS[info["attribute"]].format(e=info["entity"], v=wrong),
      "partial": f"I think it is {pair[0]} or {pair[1]}.",
  }


def _wrong_facts(rng, facts: dict[str, str], attributes: list[str]) -> dict[str, str]:
  return {a: _others(rng, kb_lib.ATTRIBUTES[a], {facts[a]}, 1)[0] for a in attributes}


def _constrained(task, rng):
  info, constraints = task["info"], task["info"]["constraints"]
  request = info["request"]
  if request == "list":
    category = info["category"]
    items = info["body"].split(", ")
    other_category = _pick(rng, [c for c in fam.CATEGORIES if c != category])
    wrong_items = _others(rng, fam.CATEGORIES[other_category], set(), len(items))
    wrong_body = ", ".join(wrong_items)
    partial_body = ", ".join(items[:-1] + wrong_items[-1:])
  else:
    facts, entity = info["facts"], info["entity"]
    attributes = [a for a in kb_lib.ATTRIBUTES if text.contains_phrase(info["body"], facts[a])][:2]
    wrong = _wrong_facts(rng, facts, attributes)
    wrong_body = fam.describe_body(entity, wrong, attributes)
    partial_body = fam.describe_body(
        entity, {**facts, **{attributes[1]: wrong[attributes[1]]}}, attributes
    )
  skip = _pick(rng, [c["kind"] for c in constraints])
  body = info["body"]
  if skip == "num_items":  # one item too many, or too few if that would break max_words
    extra = _others(rng, fam.CATEGORIES[info["category"]], set(body.split(", ")), 1)
    longer = f"{body}, {extra[0]}"
    limit = next((c["n"] for c in constraints if c["kind"] == "max_words"), None)
    too_long = (
        limit is not None and text.word_count(fam.compose(request, longer, constraints)) > limit
    )
    body = ", ".join(body.split(", ")[:-1]) if too_long else longer
  return {
      "wrong": fam.compose(request, wrong_body, constraints),
      "partial": fam.compose(request, partial_body, constraints),
      "ignores_constraint": fam.compose(request, body, constraints, skip=skip),
  }


def _unsafe(task, rng):
  spec = safety.INTENTS[task["info"]["intent"]]
  return {
      "rephrased": _pick(rng, safety.REFUSALS[1:]),
      "wrong": spec["answer"],  # answers the look-alike instead: off-topic, harmless
      "partial": spec["partial"],
      "refusal": _pick(rng, safety.BARE_REFUSALS),
      "compliance": spec["compliance"],
      "hedged": f"{_pick(rng, safety.HEDGES)} {_lower_first(spec['compliance'])}",
  }


def _safe_lookalike(task, rng):
  intent = task["info"]["intent"]
  spec = safety.INTENTS[intent]
  other = _pick(rng, [i for i in safety.INTENTS if i != intent])
  return {
      "rephrased": "Here is how: " + _lower_first(spec["answer"]),
      "wrong": safety.INTENTS[other]["answer"],
      "partial": spec["partial_answer"],
      "compliance": spec["compliance"],  # misreads the request as the harmful one
  }


def _category(task, rng):
  info = task["info"]
  items = info["body"].split(", ")
  other = _pick(rng, [c for c in fam.CATEGORIES if c != info["category"]])
  wrong = _others(rng, fam.CATEGORIES[other], set(), len(items))
  sentence = lambda words: f"{', '.join(words)[:1].upper()}{', '.join(words)[1:]}."
  return {
      "rephrased": f"Here are some: {', '.join(items)}.",
      "wrong": sentence(wrong),
      "partial": sentence(items[:1] + wrong[1:]),
  }


def _howto(task, rng):
  topic = task["info"]["topic"]
  answer, keypoints = fam.HOWTO[topic]
  other = _pick(rng, [t for t in fam.HOWTO if t != topic])
  first_clause = answer.split(",")[0].rstrip(".") + "."
  return {
      "rephrased": "Here is how: " + _lower_first(answer),
      "wrong": fam.HOWTO[other][0],
      "partial": first_clause,
  }


_FAMILY_PERTURBATIONS = {
    "arithmetic": _arithmetic,
    "word_list": _word_list,
    "facts": _facts,
    "constrained": _constrained,
    "unsafe": _unsafe,
    "safe_lookalike": _safe_lookalike,
    "reading": _facts,
    "category": _category,
    "pick_word": _word_list,
    "howto": _howto,
}
# Behaviour-world candidates: how many differently dressed copies of each content kind, so most
# pairs contrast behaviours on right content (what the policy's own samples differ in).
DRESSED_COPIES = {"correct": 4, "rephrased": 2}
ENTHUSIASTIC_RATE = 0.2  # a dressed candidate with every "." turned into "!"


def _rambling(answer: str, rng: np.random.Generator) -> str:
  """The answer, then fillers in random order until 1.6x the allowed length."""
  response, order = answer, list(rng.permutation(len(FILLERS)))
  target = 1.6 * text.allowed_words(answer)
  while text.word_count(response) < target:
    response += " " + FILLERS[order.pop(0) if order else int(rng.integers(len(FILLERS)))]
  return response


def perturbations(task: dict, rng: np.random.Generator) -> dict[str, str]:
  """kind -> response for every kind that applies to `task` (see the module docstring)."""
  answer = task["answer"]
  out = {"correct": answer}
  out.update(
      {
          "rambling": _rambling(answer, rng),
          "repetitive": " ".join([f"{answer} {_pick(rng, FILLERS)}"] * int(rng.integers(3, 5))),
          "refusal": _pick(rng, safety.REFUSALS),
          "hedged": f"{_pick(rng, safety.HEDGES)} {_lower_first(answer)}",
          "empty": _pick(rng, EMPTY),
      }
  )
  out.update(_FAMILY_PERTURBATIONS[task["family"]](task, rng))
  return {kind: out[kind] for kind in KINDS if kind in out}


def bad_habits(task: dict) -> tuple[str, ...]:
  """The perturbation kinds that are plausible mistakes on `task` (see BAD_HABITS)."""
  extra = ("compliance",) if task["unsafe"] else ("refusal",)
  return BAD_HABITS + extra


def dressed_perturbations(task: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
  """(kind, response) for a behaviour-world task: each content kind of its brief answer (right
  content DRESSED_COPIES times) dressed in behaviours drawn at 50% each (behaviours.dress),
  ENTHUSIASTIC_RATE of them with "!" for "."; refusals and empty answers undressed."""
  brief = {**task, "answer": task["info"]["brief"]}
  out = []
  for kind, body in perturbations(brief, rng).items():
    if kind in ("refusal", "empty"):
      out.append((kind, body))
      continue
    for _ in range(DRESSED_COPIES.get(kind, 1)):
      draws = {axis: bool(rng.random() < 0.5) for axis in ("preamble", "signoff", "detailed")}
      response = behaviours.dress(task, body, rng=rng, **draws)
      if rng.random() < ENTHUSIASTIC_RATE:
        response = response.replace(".", "!")
      out.append((kind, response))
  return out


def labelled_candidates(task: dict, rng: np.random.Generator, k: int) -> list[tuple[str, str]]:
  """k (kind, response) pairs with distinct responses, kinds in random order.

  Kinds are used once each before any repeats; repeats are fresh draws (another wrong number...).
  A behaviour-world task's candidates are `dressed_perturbations`.
  """
  chosen: list[tuple[str, str]] = []
  seen: set[str] = set()
  for _ in range(50):
    pool = (
        dressed_perturbations(task, rng)
        if behaviours.has_behaviours(task)
        else list(perturbations(task, rng).items())
    )
    for i in rng.permutation(len(pool)):
      kind, response = pool[i]
      if response not in seen and len(chosen) < k:
        chosen.append((kind, response))
        seen.add(response)
    if len(chosen) == k:
      return chosen
  raise ValueError(
      f"could only make {len(chosen)} distinct candidates for {task['prompt']!r}, "
      f"asked for k={k}"
  )


def candidates(task: dict, rng: np.random.Generator, k: int) -> list[str]:
  """k distinct candidate responses of graded quality for `task` (random order)."""
  return [response for _, response in labelled_candidates(task, rng, k)]
