"""Task families: a generator of tasks and a content scorer for each.

`TASK_FAMILIES[name] = Family(make, content)`: `make(rng, kb) -> task` draws one task,
`content(task, response) -> float in [0, 1]` grades what the response says (partial credit),
before the style factors and refusal/hedge discounts that `world.gold_helpfulness` applies.

A task is a JSON-serialisable dict {"prompt", "family", "answer", "unsafe", "info"}; each key of
`info` has one type across all families, so tasks written as JSONL load as one `datasets` table.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from rlhf_jax.toyworld import constraints as cons
from rlhf_jax.toyworld import kb as kb_lib
from rlhf_jax.toyworld import safety, text

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
ARITHMETIC_TEMPLATES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.")
LIST_OPS = {
    "reverse": "Reverse the list",
    "sort": "Sort the list alphabetically",
    "count": "Count the words in the list",
    "first": "Give the first word of the list",
    "last": "Give the last word of the list",
}
CATEGORIES = {
    "animals": (
        "horse",
        "cow",
        "sheep",
        "lion",
        "tiger",
        "bear",
        "fox",
        "deer",
        "mouse",
        "camel",
        "zebra",
        "monkey",
    ),
    "fruits": (
        "banana",
        "cherry",
        "grape",
        "lemon",
        "mango",
        "peach",
        "pear",
        "plum",
        "melon",
        "kiwi",
        "lime",
        "apricot",
    ),
    "vegetables": (
        "carrot",
        "potato",
        "onion",
        "pea",
        "leek",
        "cabbage",
        "turnip",
        "spinach",
        "celery",
        "radish",
        "garlic",
        "lettuce",
    ),
    "tools": (
        "hammer",
        "saw",
        "drill",
        "wrench",
        "chisel",
        "shovel",
        "rake",
        "axe",
        "pliers",
        "ladder",
        "spanner",
        "trowel",
    ),
    "instruments": (
        "drum",
        "flute",
        "guitar",
        "harp",
        "piano",
        "violin",
        "trumpet",
        "cello",
        "banjo",
        "oboe",
        "tuba",
        "lute",
    ),
}
LIST_REQUESTS = ("Name some {c}.", "List some {c}.", "Give me a few {c}.")
DESCRIBE_REQUESTS = ("Describe {e}.", "Tell me about {e}.")
START_WORDS = ("Sure", "Okay", "Here", "Well", "Yes")
INCLUDE_WORDS = ("gladly", "certainly", "indeed", "happily", "truly")
# Padding that lengthens a response without adding items or content (to violate max_words).
PADDING = {"list": " are all good picks", "describe": " as far as I know"}
DEFAULT_ITEMS, DESCRIBE_FACTS = 3, 2


class Family(NamedTuple):
  make: Callable[[np.random.Generator, kb_lib.KnowledgeBase], dict]
  content: Callable[[dict, str], float]


TASK_FAMILIES: dict[str, Family] = {}


def _register(name: str, content: Callable[[dict, str], float]):
  def add(make):
    TASK_FAMILIES[name] = Family(make, content)
    return make

  return add


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def make_task(family: str, prompt: str, answer: str, info: dict, unsafe: bool = False) -> dict:
  """The task dict; `answer` is the ideal response."""
  return {"prompt": prompt, "family": family, "answer": answer, "unsafe": unsafe, "info": info}


# ------------------------------------------------------------------------------------ arithmetic


def number_content(target: int, response: str) -> float:
  """The last number written is the answer ("7 + 5 = 12" -> 12): exact 1.0, else up to 0.3, less
  the further off; no number 0.0."""
  found = text.numbers(response)
  if not found:
    return 0.0
  error = abs(found[-1] - target)
  return 1.0 if error == 0 else 0.3 * math.exp(-error / max(2.0, abs(target) / 5))


def _arithmetic_content(task: dict, response: str) -> float:
  return number_content(task["info"]["result"], response)


@_register("arithmetic", _arithmetic_content)
def _arithmetic(rng, kb, *, max_operand: int = MAX_OPERAND):
  a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
  op = _pick(rng, "+-*")
  result = {"+": a + b, "-": a - b, "*": a * b}[op]
  prompt = _pick(rng, ARITHMETIC_TEMPLATES).format(a=a, op=op, b=b)
  return make_task("arithmetic", prompt, str(result), {"a": a, "b": b, "op": op, "result": result})


# ------------------------------------------------------------------------------------- word_list


def list_target(op: str, words: list[str]) -> list[str] | int | str:
  return {
      "reverse": lambda: words[::-1],
      "sort": lambda: sorted(words),
      "count": lambda: len(words),
      "first": lambda: words[0],
      "last": lambda: words[-1],
  }[op]()


def _word_list_content(task: dict, response: str) -> float:
  """reverse/sort: fraction of positions right (extra or missing items count as wrong); count: as
  arithmetic; first/last: 1.0, split among hedged alternatives, 0.1 for another word of the list."""
  op, words = task["info"]["op"], task["info"]["words"]
  target = list_target(op, words)
  if op == "count":
    return number_content(target, response)
  said = [w for w in text.words(response) if w in words]
  if op in ("reverse", "sort"):
    right = sum(s == t for s, t in zip(said, target))
    return right / max(len(target), len(said))
  mentioned = list(dict.fromkeys(said))
  if target in mentioned:
    return 1.0 / len(mentioned)
  return 0.1 if mentioned else 0.0


@_register("word_list", _word_list_content)
def _word_list(rng, kb):
  op = _pick(rng, tuple(LIST_OPS))
  words = [WORDS[i] for i in rng.choice(len(WORDS), size=int(rng.integers(3, 6)), replace=False)]
  target = list_target(op, words)
  answer = ", ".join(target) if isinstance(target, list) else str(target)
  prompt = f"{LIST_OPS[op]}: {', '.join(words)}"
  return make_task("word_list", prompt, answer, {"op": op, "words": words})


# ----------------------------------------------------------------------------------------- facts


def _mentioned_values(attribute: str, response: str) -> list[str]:
  return text.phrases_in(response, kb_lib.ATTRIBUTES[attribute])


def _facts_content(task: dict, response: str) -> float:
  """The right value 1.0, split among hedged alternatives; only a wrong value 0.1; none 0.0."""
  info = task["info"]
  mentioned = _mentioned_values(info["attribute"], response)
  if info["value"] in mentioned:
    return 1.0 / len(mentioned)
  return 0.1 if mentioned else 0.0


@_register("facts", _facts_content)
def _facts(rng, kb):
  entity = _pick(rng, kb.entities)
  attribute = _pick(rng, tuple(kb_lib.ATTRIBUTES))
  name, value = entity["name"], entity[attribute]
  prompt = _pick(rng, kb_lib.QUESTIONS[attribute]).format(e=name)
  answer = kb_lib.ANSWERS[attribute].format(e=name, v=value)
  return make_task(
      "facts", prompt, answer, {"entity": name, "attribute": attribute, "value": value}
  )


# ----------------------------------------------------------------------------------- constrained


def compose(request: str, body: str, constraints: list[dict], skip: str | None = None) -> str:
  """A response with content `body` that meets `constraints`, except the one of kind `skip`.

  Lead-in words go before a colon ("Sure, gladly: cat, dog, owl!") so they never count as items;
  skipping max_words pads the body with content-free words so the response runs over the limit.
  """
  kinds = {c["kind"]: c for c in constraints if c["kind"] != skip}
  lead = [kinds[k]["word"] for k in ("starts_with", "include_word") if k in kinds]
  lead = [word.capitalize() if i == 0 else word for i, word in enumerate(lead)]
  if skip == "max_words":
    limit = next(c["n"] for c in constraints if c["kind"] == "max_words")
    while text.word_count(", ".join(lead) + " " + body) <= limit:
      body += PADDING[request]
  response = (", ".join(lead) + ": " + body) if lead else body
  response += kinds["ends_with"]["text"] if "ends_with" in kinds else "."
  return response.upper() if "uppercase" in kinds else response


def describe_body(name: str, facts: dict[str, str], attributes: list[str]) -> str:
  """ "Zorblax is red and lives in Quillby" for the given attributes."""
  traits = [kb_lib.TRAITS[a].format(v=facts[a]) for a in attributes]
  return f"{name} " + " and ".join(traits)


def list_validity(category: str, needed: int, response: str) -> float:
  """min(1, distinct members / needed) x members / (members + words of other categories)."""
  said = set(text.words(response))
  members = len(said & set(CATEGORIES[category]))
  others = sum(len(said & set(words)) for c, words in CATEGORIES.items() if c != category)
  return 0.0 if not members else min(1.0, members / needed) * members / (members + others)


def describe_validity(facts: dict[str, str], needed: int, response: str) -> float:
  """min(1, right facts / needed) x right / (right + wrong values of the same attributes)."""
  right = wrong = 0
  for attribute, value in facts.items():
    mentioned = _mentioned_values(attribute, response)
    right += value in mentioned
    wrong += sum(v != value for v in mentioned)
  return 0.0 if not right else min(1.0, right / needed) * right / (right + wrong)


def _constrained_content(task: dict, response: str) -> float:
  """content validity x (0.2 + 0.8 x fraction of constraints met).

  The 0.2 floor keeps a valid answer that ignores its only constraint above a useless one, so
  "ignores one constraint" sits between right and wrong.
  """
  info = task["info"]
  if info["request"] == "list":
    validity = list_validity(info["category"], info["needed"], response)
  else:
    validity = describe_validity(info["facts"], info["needed"], response)
  met = cons.check_constraints(response, info["constraints"])
  return validity * (1.0 - 0.8 * (1.0 - sum(met) / len(met)))  # = 0.2 + 0.8 x met, exact at 1


def sample_constraints(rng: np.random.Generator, request: str) -> list[dict]:
  """1-3 distinct constraint kinds (num_items only for lists), in KINDS order; max_words gets its
  n later, from the ideal answer."""
  allowed = [k for k in cons.KINDS if request == "list" or k != "num_items"]
  count = int(rng.integers(1, 4))
  chosen = {allowed[i] for i in rng.choice(len(allowed), size=count, replace=False)}
  params = {
      "starts_with": lambda: {"word": _pick(rng, START_WORDS)},
      "include_word": lambda: {"word": _pick(rng, INCLUDE_WORDS)},
      "num_items": lambda: {"n": int(rng.integers(2, 6))},
      "max_words": lambda: {"n": 0},
      "uppercase": dict,
      "ends_with": lambda: {"text": "!"},
  }
  return [{"kind": k, **params[k]()} for k in cons.KINDS if k in chosen]


@_register("constrained", _constrained_content)
def _constrained(rng, kb):
  request = _pick(rng, ("list", "describe"))
  constraints = sample_constraints(rng, request)
  if request == "list":
    category = _pick(rng, tuple(CATEGORIES))
    n_items = next((c["n"] for c in constraints if c["kind"] == "num_items"), None)
    words = CATEGORIES[category]
    size = n_items or DEFAULT_ITEMS
    body = ", ".join(words[i] for i in rng.choice(len(words), size=size, replace=False))
    base = _pick(rng, LIST_REQUESTS).format(c=category)
    # "Name some animals" is answered by two; "List exactly 4 items" needs four.
    info = {"request": "list", "category": category, "needed": n_items or 2}
  else:
    entity = _pick(rng, kb.entities)
    facts = kb.facts(entity["name"])
    shown = [list(facts)[i] for i in sorted(rng.choice(len(facts), DESCRIBE_FACTS, replace=False))]
    body = describe_body(entity["name"], facts, shown)
    base = _pick(rng, DESCRIBE_REQUESTS).format(e=entity["name"])
    info = {
        "request": "describe",
        "entity": entity["name"],
        "facts": facts,
        "needed": DESCRIBE_FACTS,
    }
  answer = compose(request, body, constraints)
  for c in constraints:
    if c["kind"] == "max_words":  # tight to 3 words of slack, so the limit binds on rambling
      c["n"] = text.word_count(answer) + int(rng.integers(0, 4))
  info["constraints"] = constraints
  info["body"] = body
  prompt = f"{base} {cons.render_constraints(constraints)}"
  return make_task("constrained", prompt, answer, info)


# ------------------------------------------------------------------------- unsafe / look-alikes


@_register("unsafe", safety.unsafe_content)
def _unsafe(rng, kb):
  intent = _pick(rng, tuple(safety.INTENTS))
  prompt = _pick(rng, safety.REQUEST_TEMPLATES).format(x=safety.INTENTS[intent]["request"])
  return make_task("unsafe", prompt, safety.ideal_refusal(intent), {"intent": intent}, unsafe=True)


@_register("safe_lookalike", safety.lookalike_content)
def _safe_lookalike(rng, kb):
  intent = _pick(rng, tuple(safety.INTENTS))
  spec = safety.INTENTS[intent]
  prompt = _pick(rng, safety.REQUEST_TEMPLATES).format(x=spec["lookalike"])
  return make_task("safe_lookalike", prompt, spec["answer"], {"intent": intent})


# ------------------------------------------- the behaviour world's content (the SFT mode gets right)

READING_FACTS = 2  # facts stated in a reading prompt, the asked one among them


@_register("reading", _facts_content)
def _reading(rng, kb):
  """A fact question about facts stated in the prompt: reading, not recall."""
  entity = _pick(rng, kb.entities)
  facts = kb.facts(entity["name"])
  shown = [list(facts)[i] for i in rng.choice(len(facts), READING_FACTS, replace=False)]
  attribute = shown[int(rng.integers(READING_FACTS))]
  name, value = entity["name"], facts[attribute]
  question = _pick(rng, kb_lib.QUESTIONS[attribute]).format(e=name)
  prompt = f"{describe_body(name, facts, shown)}. {question}"
  answer = kb_lib.ANSWERS[attribute].format(e=name, v=value)
  return make_task(
      "reading", prompt, answer, {"entity": name, "attribute": attribute, "value": value}
  )


def _category_content(task: dict, response: str) -> float:
  return list_validity(task["info"]["category"], task["info"]["needed"], response)


@_register("category", _category_content)
def _category(rng, kb):
  """Name members of a category: "Name some fruits." -> "plum, lime, pear." (two or more)."""
  category = _pick(rng, tuple(CATEGORIES))
  words = CATEGORIES[category]
  body = ", ".join(words[i] for i in rng.choice(len(words), size=DEFAULT_ITEMS, replace=False))
  prompt = _pick(rng, LIST_REQUESTS).format(c=category)
  return make_task(
      "category",
      prompt,
      f"{body[0].upper()}{body[1:]}.",
      {"category": category, "needed": 2, "body": body},
  )


@_register("pick_word", _word_list_content)
def _pick_word(rng, kb):
  """The first or last word of a list (the word_list operations a small model gets right)."""
  op = _pick(rng, ("first", "last"))
  words = [WORDS[i] for i in rng.choice(len(WORDS), size=int(rng.integers(3, 6)), replace=False)]
  prompt = f"{LIST_OPS[op]}: {', '.join(words)}"
  answer = f"The {op} word is {list_target(op, words)}."
  return make_task("pick_word", prompt, answer, {"op": op, "words": words})


# Everyday how-to requests with one good answer each (its key points score it, as a look-alike's
# do): content a small model learns at once, so the behaviour world's headroom is behaviour.
HOWTO = {
    "boil an egg": ("Boil it for eight minutes, then cool it.", ("eight minutes", "cool it")),
    "water a cactus": ("Water it every two weeks in dry soil.", ("two weeks", "dry soil")),
    "clean a cast iron pan": ("Scrub it with hot water, then oil it.", ("hot water", "oil it")),
    "fold a paper plane": ("Fold it in half, then fold the wings.", ("in half", "the wings")),
    "tie a bowline knot": (
        "Make a small loop and pass the end through.",
        ("small loop", "end through"),
    ),
    "keep bread fresh": ("Keep it in a paper bag or freeze it.", ("paper bag", "freeze it")),
    "fall asleep faster": (
        "Keep the room dark and put screens away.",
        ("room dark", "screens away"),
    ),
    "remove a coffee stain": ("Blot it, then rinse it in cold water.", ("blot it", "cold water")),
    "start running": (
        "Run one minute, walk one minute, and repeat.",
        ("run one minute", "walk one minute"),
    ),
    "save money on groceries": (
        "Shop with a list and buy store brands.",
        ("with a list", "store brands"),
    ),
    "learn to juggle": ("Start with one ball, then add a second.", ("one ball", "add a second")),
    "grow basil": ("Give it lots of sun and pinch off the flowers.", ("lots of sun", "pinch off")),
    "pack a suitcase": (
        "Roll your clothes and put shoes at the bottom.",
        ("roll your clothes", "at the bottom"),
    ),
    "make cold brew coffee": (
        "Steep coarse coffee in cold water overnight.",
        ("coarse coffee", "overnight"),
    ),
    "change a bike tyre": (
        "Lever the tyre off and swap the tube.",
        ("lever the tyre", "swap the tube"),
    ),
    "write a thank you note": (
        "Name the gift and say why you like it.",
        ("name the gift", "why you like it"),
    ),
}
HOWTO_TEMPLATES = (
    "How do I {x}?",
    "Tell me how to {x}.",
    "What is the best way to {x}?",
    "Explain how to {x}.",
    "Can you help me {x}?",
)


def _howto_content(task: dict, response: str) -> float:
  """0.2 + 0.8 x the fraction of key points covered; an attempt without one 0.1; else 0."""
  keypoints = HOWTO[task["info"]["topic"]][1]
  covered = len(text.phrases_in(response, keypoints)) / len(keypoints)
  if covered:
    return 0.2 + 0.8 * covered
  return 0.1 if len(text.words(response)) >= 3 and not safety.is_refusal(response) else 0.0


@_register("howto", _howto_content)
def _howto(rng, kb):
  topic = _pick(rng, tuple(HOWTO))
  prompt = _pick(rng, HOWTO_TEMPLATES).format(x=topic)
  return make_task("howto", prompt, HOWTO[topic][0], {"topic": topic})
