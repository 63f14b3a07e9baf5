"""The toy world's exact checkers as reward functions (`algorithms/reward_functions.py`): the
verifiable-reward track (RLVR: a checker, not a learned reward model, scores each completion).

Each has the reward-function signature `fn(prompts, completions, *, family, answer, info, **_)`
on toy-world task records (`World.tasks`) and returns a score in [0, 1] for the completions of its
task families and None for the others, so several combine (`reward.functions` in a config):

| function | families | score |
| --- | --- | --- |
| `arithmetic` | arithmetic | the family's content score: 1 for the right number, partial for a near one |
| `word_list` | word_list | the family's content score (reverse, sort, count, first, last) |
| `constraints` | any task with constraints (constrained) | fraction of its constraints met |
| `gold` | all | the world's combined gold (helpfulness x safety; safety on unsafe requests) |

These are reported apart from the preference world's combined gold: a checker can verify what
a small model must compute, where a reward model cannot (docs/toyworld.md).
"""

from __future__ import annotations

from typing import Sequence

from rlhf_jax.toyworld import constraints as cons
from rlhf_jax.toyworld.families import TASK_FAMILIES
from rlhf_jax.toyworld.world import gold_scores


def _tasks(prompts, family, answer, info, unsafe=None) -> list[dict]:
  unsafe = unsafe if unsafe is not None else [False] * len(prompts)
  return [
      {"prompt": p, "family": f, "answer": a, "info": i or {}, "unsafe": bool(u)}
      for p, f, a, i, u in zip(prompts, family, answer, info, unsafe)
  ]


def _content_of(name: str):
  def check(
      prompts: Sequence[str],
      completions: Sequence[str],
      *,
      family: Sequence[str],
      answer: Sequence[str],
      info: Sequence[dict],
      **_,
  ) -> list[float | None]:
    content = TASK_FAMILIES[name].content
    return [
        content(task, c) if task["family"] == name else None
        for task, c in zip(_tasks(prompts, family, answer, info), completions)
    ]

  check.__name__ = check.__qualname__ = name
  check.__doc__ = f"The {name} family's exact content score of each completion; None elsewhere."
  return check


arithmetic = _content_of("arithmetic")
word_list = _content_of("word_list")


def constraints(
    prompts: Sequence[str], completions: Sequence[str], *, info: Sequence[dict], **_
) -> list[float | None]:
  """The fraction of its task's constraints each completion meets; None for tasks without any."""
  out = []
  for c, i in zip(completions, info):
    wanted = (i or {}).get("constraints") or []
    out.append(sum(cons.check_constraints(c, wanted)) / len(wanted) if wanted else None)
  return out


def gold(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    family: Sequence[str],
    answer: Sequence[str],
    info: Sequence[dict] | None = None,
    unsafe: Sequence[bool] | None = None,
    **_,
) -> list[float]:
  """The world's combined gold score of each completion (an oracle reward; PPO's
  `reward.gold=True` is this function)."""
  info = info if info is not None else [None] * len(prompts)
  tasks = _tasks(prompts, family, answer, info, unsafe)
  return [gold_scores(t, c)["combined"] for t, c in zip(tasks, completions)]
