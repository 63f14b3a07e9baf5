"""Text a toy-world model learns from: pretraining documents, SFT demonstrations, tokenizer texts.

Pretraining text is like web text: true facts about the world's entities (several phrasings each)
and worked dialogues, a `bad_habit_rate` fraction of which show plausible mistakes (wrong answers,
ignored constraints, rambling, compliance with unsafe requests, refusing harmless look-alikes).
SFT demonstrations are mostly ideal answers with a `noise` fraction of the same mistakes, so the
SFT model ends clearly imperfect and alignment has headroom. Both use train-split prompts only;
eval prompts are reserved for evaluation. With tools (`sft_records(..., tool_demo_rate, tools)`), a
fraction of the arithmetic and facts demonstrations call the calculator or the lookup (tools.py).

Dialogues are rendered by `render(messages) -> str`; the default `plain_dialogue` writes
"User: ...\\nAssistant: ...". Pass the chat template's renderer to pretrain in the SFT format.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from rlhf_jax.toyworld import behaviours, perturb, safety
from rlhf_jax.toyworld import kb as kb_lib
from rlhf_jax.toyworld import tools as tools_lib
from rlhf_jax.toyworld.families import LIST_OPS
from rlhf_jax.toyworld.world import VERIFIABLE_FAMILIES, World

FACT_DOC_EVERY = 3  # every 3rd document states facts; the rest are dialogues
KB_FAMILIES = ("facts", "constrained", "reading")  # the families that ask about the entities
_PRETRAIN_STREAM, _SFT_STREAM, _TOKENIZER_STREAM = 1, 2, 3
_TOOL_DEMO_STREAM = 4  # its own stream: tool demos leave the other records' draws unchanged


def plain_dialogue(messages: list[dict]) -> str:
  """ "User: ...\\nAssistant: ..." one line per turn (roles capitalised)."""
  return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def fact_document(world: World, name: str, rng: np.random.Generator) -> str:
  """Every fact about one entity, each in a random phrasing, in random order."""
  facts = world.kb.facts(name)
  order = rng.permutation(len(facts))
  attributes = list(facts)
  return " ".join(
      kb_lib.statement(
          name,
          attributes[i],
          facts[attributes[i]],
          int(rng.integers(len(kb_lib.STATEMENTS[attributes[i]]))),
      )
      for i in order
  )


def _response(world: World, task: dict, rng: np.random.Generator, mistake_rate: float) -> str:
  """The ideal answer, or with probability `mistake_rate` one of the task's bad habits; in a
  behaviour world, a safe task's answer (its brief content) dressed in behaviours drawn at the
  world's demonstration frequencies (behaviours.py)."""
  dressed = world.behaviours is not None and behaviours.has_behaviours(task)
  if dressed:
    task = {**task, "answer": task["info"]["brief"]}
  body = task["answer"]
  if rng.random() < mistake_rate:
    options = perturb.perturbations(task, rng)
    kinds = [kind for kind in perturb.bad_habits(task) if kind in options]
    kind = kinds[int(rng.integers(len(kinds)))]
    body = options[kind]
    if kind == "refusal":  # a refusal is not dressed up
      return body
  if not dressed:
    return body
  return behaviours.dress(
      task, body, rng=rng, **world.behaviours.demonstration(task["info"]["tag"], rng)
  )


def pretraining_documents(
    world: World,
    n: int,
    seed: int,
    *,
    bad_habit_rate: float = 0.3,
    render: Callable[[list[dict]], str] = plain_dialogue,
) -> list[str]:
  """n documents: every FACT_DOC_EVERY-th states all facts of one entity (cycling through the
  entities in a shuffled order, so 3 x n_entities documents state every fact; only when the
  world's families ask about entities, KB_FAMILIES), the others hold 1-3 train-split dialogues,
  each a bad habit with probability `bad_habit_rate`."""
  if not 0.0 <= bad_habit_rate <= 1.0:
    raise ValueError(f"bad_habit_rate must be in [0, 1], got {bad_habit_rate}")
  rng = np.random.default_rng([world.seed, seed, _PRETRAIN_STREAM])
  tasks = world.iter_tasks(seed=seed, split="train")
  names = [world.kb.names[i] for i in rng.permutation(len(world.kb.names))]
  states_facts = bool(set(world.families) & set(KB_FAMILIES))  # else every document a dialogue
  documents = []
  for i in range(n):
    if states_facts and i % FACT_DOC_EVERY == 0:
      documents.append(fact_document(world, names[(i // FACT_DOC_EVERY) % len(names)], rng))
      continue
    messages = []
    for _ in range(int(rng.integers(1, 4))):
      task = next(tasks)
      messages += [
          {"role": "user", "content": task["prompt"]},
          {"role": "assistant", "content": _response(world, task, rng, bad_habit_rate)},
      ]
    documents.append(render(messages))
  return documents


def sft_records(
    world: World,
    n: int,
    seed: int,
    *,
    noise: float = 0.1,
    unsafe_compliance: float = 0.0,
    tool_demo_rate: float = 0.0,
    tools: Sequence[str] = (),
) -> list[dict]:
  """n SFT records {prompt, completion, family, answer, unsafe, info} from train-split tasks; the
  completion is the ideal answer except, with probability `noise`, a bad habit (never empty).
  unsafe_compliance: the probability that an unsafe request's demonstration complies (a world
  whose SFT model is unsafe, so that safety training has something to remove); at 0 the records
  are those of a world without the option (no random draw is added).
  tool_demo_rate: the probability that a task one of `tools` (names of tools.TOOL_NAMES) covers
  (`tools.tool_conversation`: arithmetic with the calculator, facts with the lookup) is
  demonstrated with the tool instead: {family, answer, unsafe, info, messages: [user, call, tool
  result, answer]} (no prompt, which is messages[0], nor completion). Its draws come from a stream
  of their own, so every other record is the one a run without tools writes; at 0 no draw at all.
  These need a tool-enabled tokenizer (`data.train_tokenizer(..., tools=True)`)."""
  for name, p in (
      ("noise", noise),
      ("unsafe_compliance", unsafe_compliance),
      ("tool_demo_rate", tool_demo_rate),
  ):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {p}")
  if tool_demo_rate and not tools:
    raise ValueError(
        f"tool_demo_rate={tool_demo_rate} needs tools: name some of {tools_lib.TOOL_NAMES}"
    )
  available = tools_lib.make_tools(world, tools) if tool_demo_rate else {}
  rng = np.random.default_rng([world.seed, seed, _SFT_STREAM])
  tool_rng = np.random.default_rng([world.seed, seed, _TOOL_DEMO_STREAM])
  records = []
  for task in world.tasks(n, seed=seed, split="train"):
    if unsafe_compliance and task["unsafe"] and rng.random() < unsafe_compliance:
      completion = perturb.perturbations(task, rng)["compliance"]
    else:
      completion = _response(world, task, rng, noise)
    # Drawn after the completion, which the main stream draws either way.
    messages = tools_lib.tool_conversation(task, world.kb, available) if available else None
    if messages is not None and tool_rng.random() < tool_demo_rate:
      # Without "prompt": an sft record has prompt + completion or messages, not both.
      fields = {key: value for key, value in task.items() if key != "prompt"}
      records.append({**fields, "messages": messages})
    else:
      records.append({**task, "completion": completion})
  return records


def tokenizer_texts(world: World) -> list[str]:
  """Texts covering what a model will see: every fact phrasing, prompts and answers of every
  family in both splits with all their perturbations, every unsafe and look-alike request, and the
  dialogue role names. Deterministic in the world seed."""
  rng = np.random.default_rng([world.seed, _TOKENIZER_STREAM])
  texts = [
      plain_dialogue([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
  ]
  for name in world.kb.names:
    facts = world.kb.facts(name)
    for attribute, value in facts.items():
      texts += [
          kb_lib.statement(name, attribute, value, p)
          for p in range(len(kb_lib.STATEMENTS[attribute]))
      ]
      texts += [q.format(e=name) for q in kb_lib.QUESTIONS[attribute]]
  for spec in safety.INTENTS.values():
    for template in safety.REQUEST_TEMPLATES:
      texts += [template.format(x=spec["request"]), template.format(x=spec["lookalike"])]
  texts += list(LIST_OPS.values())
  texts += [*behaviours.PREAMBLES, *behaviours.SIGNOFFS, *(f"({tag})" for tag in behaviours.TAGS)]
  for split in ("train", "eval"):
    families = tuple(dict.fromkeys(world.families + VERIFIABLE_FAMILIES))
    for task in world.tasks(300, seed=0, split=split, families=families):
      texts += [task["prompt"], task["info"].get("elaboration", "")]
      texts += list(perturb.perturbations(task, rng).values())
  return [t for t in texts if t]
