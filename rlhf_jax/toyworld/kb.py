"""The knowledge base: made-up entities ("Zorblax") with six attributes each, from a seed.

Value vocabularies are fixed and disjoint across attributes (no value of one attribute is a value
of another), so a scorer can tell which attribute a mentioned value belongs to; only the names and
the assignment of values to entities depend on the seed. Facts reach a model only through the
pretraining text (`statement`), so answering a `facts` question tests what pretraining taught.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": (
        "red",
        "blue",
        "green",
        "yellow",
        "purple",
        "orange",
        "silver",
        "golden",
        "pink",
        "grey",
        "white",
        "black",
    ),
    "home_town": (
        "Brindlemoor",
        "Quillby",
        "Fernwick",
        "Ashcombe",
        "Dunmere",
        "Larkhollow",
        "Mosswell",
        "Pebbleford",
        "Thistledown",
        "Wrenfield",
        "Cobbleton",
        "Glimmerdale",
    ),
    "favourite_food": (
        "plum pie",
        "fish soup",
        "honey cake",
        "mushroom stew",
        "cheese bread",
        "berry jam",
        "pumpkin soup",
        "apple tart",
        "rice pudding",
        "bean stew",
        "carrot cake",
        "nut bread",
    ),
    "size": ("tiny", "small", "mid-sized", "large", "huge", "giant"),
    "job": (
        "baker",
        "farmer",
        "sailor",
        "painter",
        "miner",
        "tailor",
        "singer",
        "builder",
        "weaver",
        "doctor",
        "teacher",
        "fisher",
    ),
    "pet": (
        "owl",
        "goat",
        "toad",
        "ferret",
        "parrot",
        "tortoise",
        "hamster",
        "pony",
        "lizard",
        "rabbit",
        "crab",
        "snail",
    ),
}

# Questions a `facts` task asks, and the ideal one-sentence answer.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What color is {e}?", "What is the color of {e}?"),
    "home_town": ("Where does {e} live?", "What is the home town of {e}?"),
    "favourite_food": ("What is the favourite food of {e}?", "What does {e} like to eat most?"),
    "size": ("How big is {e}?", "What size is {e}?"),
    "job": ("What does {e} do for a living?", "What is the job of {e}?"),
    "pet": ("What pet does {e} have?", "Which pet does {e} keep?"),
}
ANSWERS = {
    "color": "{e} is {v}.",
    "home_town": "{e} lives in {v}.",
    "favourite_food": "{e}'s favourite food is {v}.",
    "size": "{e} is {v}.",
    "job": "{e} works as a {v}.",
    "pet": "{e} has a pet {v}.",
}
# Short clauses for descriptions: "Zorblax is red and lives in Quillby".
TRAITS = {
    "color": "is {v}",
    "home_town": "lives in {v}",
    "favourite_food": "loves {v}",
    "size": "is {v}",
    "job": "works as a {v}",
    "pet": "has a pet {v}",
}
# Phrasings of each fact in the pretraining text; several, so a model learns the fact, not a string.
STATEMENTS: dict[str, tuple[str, ...]] = {
    "color": ("{e} is {v}.", "The color of {e} is {v}.", "Everyone in town knows that {e} is {v}."),
    "home_town": ("{e} lives in {v}.", "{e} comes from {v}.", "The home town of {e} is {v}."),
    "favourite_food": (
        "{e}'s favourite food is {v}.",
        "{e} loves to eat {v}.",
        "The favourite food of {e} is {v}.",
    ),
    "size": ("{e} is {v}.", "In size, {e} is {v}.", "People say that {e} is {v}."),
    "job": ("{e} works as a {v}.", "{e} is a {v} by trade.", "The job of {e} is {v}."),
    "pet": ("{e} has a pet {v}.", "{e} keeps a {v} as a pet.", "The pet of {e} is a {v}."),
}

# "Zor" + "blax": a first syllable that may end in a soft consonant, then one that may start
# with a cluster. Few, easy sounds keep names pronounceable and short in BPE tokens.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_CLUSTERS = _ONSETS + ("bl", "br", "dr", "fl", "gl", "gr", "kl", "pl", "tr", "vr", "zn")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ai")
_SOFT_CODAS = ("", "", "l", "m", "n", "r", "z")
_CODAS = ("", "b", "k", "l", "n", "r", "x", "z", "sh", "nd", "rk")


class KnowledgeBase(NamedTuple):
  """`entities`: one dict per entity, {"name": "Zorblax", "color": "red", ..., "pet": "owl"}."""

  entities: tuple[dict, ...]

  @property
  def names(self) -> list[str]:
    return [entity["name"] for entity in self.entities]

  def facts(self, name: str) -> dict[str, str]:
    """attribute -> value of the entity called `name`."""
    for entity in self.entities:
      if entity["name"] == name:
        return {attr: entity[attr] for attr in ATTRIBUTES}
    raise KeyError(f"no entity named {name!r} in this knowledge base")


def _name(rng: np.random.Generator) -> str:
  """Two syllables (onset, vowel, coda), the second with an onset: "Zor" + "blax"."""
  pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
  first = pick(_ONSETS) + pick(_VOWELS) + pick(_SOFT_CODAS)
  second = pick(_CLUSTERS) + pick(_VOWELS) + pick(_CODAS)
  return (first + second).capitalize()


def generate_kb(
    rng: np.random.Generator, n_entities: int = 40, reserved: frozenset[str] = frozenset()
) -> KnowledgeBase:
  """`n_entities` entities with distinct names (none in `reserved`, lower case) and random values."""
  all_values = {v.lower() for values in ATTRIBUTES.values() for v in values}
  names: list[str] = []
  while len(names) < n_entities:
    name = _name(rng)
    # Short names could be real words ("Bon"); long ones are hard to learn for a small model.
    if 5 <= len(name) <= 8 and name not in names and name.lower() not in reserved | all_values:
      names.append(name)
  entities = []
  for name in names:
    entity = {"name": name}
    for attr, values in ATTRIBUTES.items():
      entity[attr] = values[int(rng.integers(len(values)))]
    entities.append(entity)
  return KnowledgeBase(tuple(entities))


def statement(name: str, attribute: str, value: str, phrasing: int) -> str:
  """One pretraining sentence stating a fact; `phrasing` indexes STATEMENTS[attribute] (mod its size)."""
  templates = STATEMENTS[attribute]
  return templates[phrasing % len(templates)].format(e=name, v=value)
