"""Behaviour axes: what the default (behaviour) world's gold rewards beyond a response's content.

The earlier world's headroom was capability the small model lacks (arithmetic, list operations) or
sampling noise that a lower temperature removes, so nothing beat the SFT model sampled at T = 0.7.
Here the headroom is *preference-learnable*, the recipe of AlpacaFarm and of the IMDb-sentiment
setups: behaviour the policy can already produce, whose frequency in the demonstrations is wrong,
so sharpening the SFT model cannot fix it and feedback can. Every safe response is

    [preamble] body [elaboration] [sign-off]

and each part is one axis, with a fixed frequency in the demonstrations (`Behaviours`):

  axis         demonstrations                      gold factor               sharpening (T -> 0)
  preamble     "Sure, I'd be happy to help with    x0.35 when present        *amplifies* it (a
               that." in 80% (a majority habit)                              majority), gold falls
  sign-off     "I hope this helps." in 50%         x0.85 when present        nothing in expectation
               (a coin flip)                                                 (each prompt's mode is
                                                                             a coin flip)
  tag          2/3 of prompts end in "(brief)" or  x0.6 when the response    nothing: demonstrations
               "(detailed)"; demonstrations        ignores its tag (an       elaborate half the time
               elaborate half the time, whatever   elaboration under         whatever the tag
               the tag (`tag_follow_rate` 0)       "(brief)", none under
                                                   "(detailed)")
  enthusiasm   none ("!" only in constraints)      x0.9 per "!" beyond one   none

so the SFT model's *mode* is wrong on every axis, a reward model can read every axis on the
surface (a preamble, a sign-off, an elaboration against the prompt's tag), and gold's best
response (content right, no preamble, no sign-off, tag followed) scores 1.0. Unsafe requests carry
no behaviour (gold there is safety alone, as before).

A task of a behaviour world holds its tag and its elaboration in `info` ("tag": "brief" |
"detailed" | "", "elaboration": the family's elaboration sentence, "brief": the ideal answer
without it), so the gold factor needs the task alone; `task["answer"]` is the ideal response for
the tag. Families without an elaboration template (arithmetic, word_list, constrained, unsafe)
get tag "" and no elaboration.

Simulated annotators see these axes through gold (`annotators.perceived`); their biases (length,
enthusiasm) are what gold does not share, the bait for reward over-optimisation.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from rlhf_jax.toyworld import text

TAGS = ("brief", "detailed")
# One phrasing each: a habit's first token then carries its whole probability, so sharpening
# amplifies a majority habit and leaves a coin flip a coin flip (three phrasings split a 70%
# preamble into three 23% first tokens, which lose to the answer's first token at T -> 0).
PREAMBLES = ("Sure, I'd be happy to help with that.",)
SIGNOFFS = ("I hope this helps.",)
# Elaboration sentences: no word that a content scorer reads (attribute values, category members,
# list words, key points, safety markers, hedges), so an elaboration changes only the tag axis.
ELABORATIONS = {
    "reading": "That is what your text says about {entity}.",
    "facts": "That is what I know about {entity}.",
    "category": "All of them are {category}.",
    "pick_word": "I read your list from left to right.",
    "safe_lookalike": "Doing it this way keeps everyone safe.",
    "howto": "It gets easy with practice.",
}
PREAMBLE_FACTOR, SIGNOFF_FACTOR, TAG_MISS_FACTOR, EXCLAIM_FACTOR = 0.35, 0.85, 0.6, 0.9
MIN_FACTOR = 0.2
_PREAMBLE_RE = re.compile(r"happy to help|glad you asked|great question")
_SIGNOFF_RE = re.compile(r"hope this helps|let me know if|have a great day")
AXES = ("preamble", "signoff", "tag")


@dataclasses.dataclass(frozen=True)
class Behaviours:
  """How often the world's demonstrations (SFT records and pretraining dialogues) show each axis.

  preamble_rate: P(preamble); signoff_rate: P(sign-off); tagged_rate: the share of taggable
  prompts that carry "(brief)" or "(detailed)"; detail_rate: P(elaboration) of a demonstration
  that does not follow its tag; tag_follow_rate: the share of tagged demonstrations that follow
  their tag (0: the tag is ignored, followed exactly as often as chance).
  """

  preamble_rate: float = 0.8
  signoff_rate: float = 0.5
  tagged_rate: float = 2 / 3
  detail_rate: float = 0.5
  tag_follow_rate: float = 0.0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"config.world.behaviours.{field.name}={value}: a frequency must be in " "[0, 1]"
        )

  def demonstration(self, tag: str, rng: np.random.Generator) -> dict[str, bool]:
    """{"preamble", "signoff", "detailed"}: one demonstration's draws."""
    preamble, signoff = rng.random() < self.preamble_rate, rng.random() < self.signoff_rate
    follow = bool(tag) and rng.random() < self.tag_follow_rate
    detailed = tag == "detailed" if follow else rng.random() < self.detail_rate
    return {"preamble": bool(preamble), "signoff": bool(signoff), "detailed": bool(detailed)}


def taggable(task: dict) -> bool:
  return task["family"] in ELABORATIONS and not task["unsafe"]


def add_tag(task: dict, tag: str) -> dict:
  """`task` (as its family made it) as a behaviour-world task with `tag` ("" = untagged): the
  prompt gains " (tag)", info gains "tag", "brief" and "elaboration", the answer follows the tag."""
  info = dict(task["info"])
  brief = task["answer"]
  elaboration = ELABORATIONS[task["family"]].format(**info) if taggable(task) else ""
  if tag and not elaboration:
    raise ValueError(f"a {task['family']!r} task takes no tag (only {', '.join(ELABORATIONS)})")
  info.update(tag=tag, brief=brief, elaboration=elaboration)
  prompt = f"{task['prompt']} ({tag})" if tag else task["prompt"]
  answer = f"{brief} {elaboration}" if tag == "detailed" else brief
  return {**task, "prompt": prompt, "answer": answer, "info": info}


def has_behaviours(task: dict) -> bool:
  """Whether `task` comes from a behaviour world (its gold has a behaviour factor)."""
  return "tag" in task["info"] and not task["unsafe"]


def detect(task: dict, response: str) -> dict[str, bool]:
  """{"preamble", "signoff", "detailed"}: what `response` does on each axis."""
  normalized = text.normalize(response)
  elaboration = task["info"].get("elaboration", "")
  return {
      "preamble": _PREAMBLE_RE.search(normalized) is not None,
      "signoff": _SIGNOFF_RE.search(normalized) is not None,
      "detailed": bool(elaboration) and text.contains_phrase(response, elaboration),
  }


def follows_tag(task: dict, response: str, *, seen: dict[str, bool] | None = None) -> bool | None:
  """Whether `response` follows the task's tag; None for an untagged task. `seen`: its
  `detect(task, response)`, when the caller has it already."""
  tag = task["info"].get("tag", "")
  if not tag:
    return None
  return (seen or detect(task, response))["detailed"] == (tag == "detailed")


def retag(task: dict, tag: str) -> dict:
  """A behaviour-world task (as `add_tag` made it) with its tag replaced by `tag` ("" = none)."""
  info = {k: v for k, v in task["info"].items() if k not in ("tag", "brief", "elaboration")}
  old = task["info"]["tag"]
  prompt = task["prompt"][: -len(f" ({old})")] if old else task["prompt"]
  return add_tag({**task, "prompt": prompt, "answer": task["info"]["brief"], "info": info}, tag)


def factor(task: dict, response: str, *, blind: Sequence[str] = ()) -> float:
  """Gold's behaviour factor in [MIN_FACTOR, 1] (module docstring); 1.0 for other tasks.
  `blind`: axes of AXES left out (an annotator who does not see them)."""
  if not has_behaviours(task):
    return 1.0
  seen = detect(task, response)
  out = 1.0
  if seen["preamble"] and "preamble" not in blind:
    out *= PREAMBLE_FACTOR
  if seen["signoff"] and "signoff" not in blind:
    out *= SIGNOFF_FACTOR
  if follows_tag(task, response, seen=seen) is False and "tag" not in blind:
    out *= TAG_MISS_FACTOR
  out *= EXCLAIM_FACTOR ** max(0, response.count("!") - 1)
  return max(MIN_FACTOR, out)


def dress(
    task: dict,
    body: str,
    *,
    preamble: bool,
    signoff: bool,
    detailed: bool,
    rng: np.random.Generator,
) -> str:
  """`body` (a content answer without elaboration) with the chosen behaviours."""
  parts = [PREAMBLES[int(rng.integers(len(PREAMBLES)))]] if preamble else []
  parts.append(body)
  elaboration = task["info"].get("elaboration", "")
  if detailed and elaboration:
    parts.append(elaboration)
  if signoff:
    parts.append(SIGNOFFS[int(rng.integers(len(SIGNOFFS)))])
  return " ".join(p for p in parts if p)


def axis_rates(tasks, responses) -> dict[str, float | None]:
  """Rates over behaviour tasks: preamble, sign-off, elaboration, and tag following (tagged
  tasks only): what a policy does on each axis. None where no task qualifies."""
  rows = [(t, detect(t, r)) for t, r in zip(tasks, responses) if has_behaviours(t)]
  tagged = [follows_tag(t, "", seen=d) for t, d in rows if t["info"]["tag"]]
  mean = lambda xs: float(np.mean(xs)) if len(xs) else None
  return {
      "preamble": mean([d["preamble"] for _, d in rows]),
      "signoff": mean([d["signoff"] for _, d in rows]),
      "detailed": mean([d["detailed"] for _, d in rows]),
      "follows_tag": mean(tagged),
  }
