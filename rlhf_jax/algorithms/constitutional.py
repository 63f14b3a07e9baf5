"""Constitutional AI, supervised stage (SL-CAI, Bai et al. 2022): algorithm "constitutional_sl".

Red-team prompts (toy-world tasks of `constitutional.families`, default the unsafe requests and
their safe look-alikes, from `data.source`) -> the policy's response -> the AI judge
(toyworld/judge.py) critiques it under a principle drawn at random from `constitutional.
constitution` and rewrites it given its critique, `n_revisions` times -> SFT of the policy
(`sft.train`, this config's train / optim) on the final revisions, mixed with
`helpful_fraction` of helpful SFT records (`helpful_source`) so that helpfulness does not
collapse into refusals. The RL stage (RL-CAI) is the ai_feedback stage with the HARMLESS principle
on the SL-CAI model's pairs -> a reward model -> PPO (algorithms/ai_feedback.py).

WORKDIR: revisions.jsonl (per prompt: the response, each step's principle, critique and revision,
the final revision as "completion", and gold helpfulness / safety / combined before and after),
revision_summary.json (their means by family), sft_data.jsonl (what SFT trains on), then SFT's
checkpoints/, metrics.jsonl and export/.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from rlhf_jax import data
from rlhf_jax.algorithms import ai_feedback, common, registry, sft
from rlhf_jax.algorithms.ppo import load_prompts
from rlhf_jax.data import files
from rlhf_jax.errors import ConfigError
from rlhf_jax.evaluation import gold as gold_eval
from rlhf_jax.toyworld import annotators, judge
from rlhf_jax.toyworld import world as world_lib
from rlhf_jax.train import checkpoint, metrics

_log = logging.getLogger(__name__)
# revise(items [(task, response)], rng, *, principle) -> [{"critique", "revision"}], e.g.
# functools.partial(judge.critique_and_revise, sampler, params, tokenizer).
Revise = Callable[..., list[dict]]


def revise_responses(
    revise: Revise,
    tasks: Sequence[dict],
    responses: Sequence[str],
    constitution: Sequence[str],
    n_revisions: int,
    rng: np.random.Generator,
    key: jax.Array,
) -> list[dict]:
  """SL-CAI's critique -> revision loop: `n_revisions` rounds, each drawing one principle per
  response from `constitution` and calling `revise` once per principle drawn (key folded with the
  round and principle). An empty revision keeps the previous text.

  Returns one record per task: {"prompt", "completion" (the final revision), "response" (the
  original), "family", "unsafe", "steps": [{"principle", "critique", "revision"}], "gold_before",
  "gold_after" (`world.gold_scores`: helpfulness, safety, combined)}.
  """
  assert len(tasks) == len(responses) and n_revisions >= 1 and constitution
  current, steps = list(responses), [[] for _ in tasks]
  for round_ in range(n_revisions):
    drawn = [constitution[i] for i in rng.integers(len(constitution), size=len(tasks))]
    for j, principle in enumerate(dict.fromkeys(drawn)):
      index = [i for i, p in enumerate(drawn) if p == principle]
      outs = revise(
          [(tasks[i], current[i]) for i in index],
          jax.random.fold_in(key, round_ * len(constitution) + j),
          principle=principle,
      )
      assert len(outs) == len(index)
      for i, o in zip(index, outs):
        steps[i].append(
            {"principle": principle, "critique": o["critique"], "revision": o["revision"]}
        )
        if o["revision"].strip():
          current[i] = o["revision"].strip()
  return [
      {
          "prompt": t["prompt"],
          "completion": final,
          "response": r,
          "family": t["family"],
          "unsafe": bool(t.get("unsafe", False)),
          "steps": s,
          "gold_before": world_lib.gold_scores(t, r),
          "gold_after": world_lib.gold_scores(t, final),
      }
      for t, r, final, s in zip(tasks, responses, current, steps)
  ]


def revision_summary(records: Sequence[dict]) -> dict:
  """Mean gold before/after revision, overall and by family, and the fraction of changed texts."""

  def means(rows: list[dict]) -> dict:
    out = {
        "n": len(rows),
        "changed": float(np.mean([r["completion"] != r["response"] for r in rows])),
    }
    for when in ("before", "after"):
      for k in ("helpfulness", "safety", "combined"):
        out[f"{k}_{when}"] = float(np.mean([r[f"gold_{when}"][k] for r in rows]))
    return out

  families = sorted({r["family"] for r in records})
  return {
      "overall": means(list(records)),
      "families": {f: means([r for r in records if r["family"] == f]) for f in families},
  }


def mix_helpful(
    revisions: Sequence[dict], helpful: Sequence[dict], fraction: float, rng: np.random.Generator
) -> list[dict]:
  """SFT records: the revisions' {prompt, completion} and helpful records drawn without
  replacement so that they are `fraction` of the result, shuffled."""
  n = min(len(helpful), round(len(revisions) * fraction / (1.0 - fraction)))
  picked = [helpful[i] for i in rng.choice(len(helpful), size=n, replace=False)] if n else []
  out = [
      {"prompt": r["prompt"], "completion": r["completion"], "source": "revision"}
      for r in revisions
  ] + [{**h, "source": "helpful"} for h in picked]
  return [out[i] for i in rng.permutation(len(out))]


def check_config(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Errors of a constitutional_sl config, before any model loads; returns the constitution."""
  c = config.constitutional
  constitution = ai_feedback.resolve_principles(
      c.constitution, "config.constitutional.constitution"
  )
  if not constitution:
    raise ConfigError(
        "config.constitutional.constitution is empty: give principle names "
        f"({', '.join(ai_feedback.PRINCIPLES)}) or texts"
    )
  if not c.judge:
    raise ConfigError(
        "config.constitutional.judge is empty: give the AI judge's export (in a "
        "pipeline, its stage name)"
    )
  if not config.init_from:
    raise ConfigError("config.init_from is empty: SL-CAI revises a policy's responses")
  if c.n_revisions < 1 or c.prompts < 1:
    raise ConfigError(
        f"config.constitutional.n_revisions and .prompts must be >= 1 (got "
        f"{c.n_revisions}, {c.prompts})"
    )
  if not 0.0 <= c.helpful_fraction < 1.0:
    raise ConfigError(
        f"config.constitutional.helpful_fraction={c.helpful_fraction} must be in " "[0, 1)"
    )
  if c.helpful_fraction > 0 and not c.helpful_source:
    raise ConfigError(
        "config.constitutional.helpful_fraction > 0 needs "
        "config.constitutional.helpful_source (SFT records)"
    )
  world_lib.World(0).tasks(1, seed=0, families=tuple(c.families) or None)  # unknown families
  return constitution


@registry.register(
    "constitutional_sl",
    policy=True,
    stage_fields=("constitutional.judge",),
    data_fields=("constitutional.helpful_source",),
    blocks=("constitutional",),
)
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = common.start_run(config, workdir, write=False, train_batch=False)
  c = config.constitutional
  constitution = check_config(config)
  revisions_path = os.path.join(workdir, "revisions.jsonl")
  summary_path = os.path.join(workdir, "revision_summary.json")
  if not os.path.exists(revisions_path):  # a rerun resumes in SFT
    tasks = [
        t
        for t in load_prompts(config.data.source)
        if not c.families or t.get("family") in c.families
    ][: c.prompts]
    if not tasks or not all("family" in t and "answer" in t for t in tasks):
      raise ConfigError(
          f"config.data.source={config.data.source}: SL-CAI needs toy-world task "
          f"records of families {tuple(c.families)} (with 'family' and 'answer')"
      )
    tokenizer = data.load_tokenizer(
        config.data.tokenizer or checkpoint.read_export_metadata(config.init_from).get("tokenizer")
    )
    policy = common.load_policy(config.init_from, mesh)
    responses, _ = gold_eval.sample_responses(
        policy,
        tokenizer,
        tasks,
        jax.random.key(config.seed),
        max_new_tokens=c.max_new_tokens,
        temperature=c.temperature,
        batch_size=c.batch_size,
    )
    ai_judge = common.load_policy(c.judge, mesh)
    revise = functools.partial(
        judge.critique_and_revise,
        ai_judge.sampler,
        ai_judge.params,
        tokenizer,
        max_new_tokens=c.max_new_tokens,
        temperature=c.revision_temperature,
        batch_size=c.batch_size,
    )
    records = revise_responses(
        revise,
        tasks,
        responses,
        constitution,
        c.n_revisions,
        np.random.default_rng(config.seed),
        jax.random.key(config.seed + 1),
    )
    summary = revision_summary(records)
    metrics.write_json(summary, summary_path)
    annotators.write_jsonl(records, revisions_path)  # last: its presence means "done"
    o = summary["overall"]
    _log.info(
        "SL-CAI: %d revisions (%.0f%% changed); gold safety %.3f -> %.3f, helpfulness "
        "%.3f -> %.3f",
        o["n"],
        100 * o["changed"],
        o["safety_before"],
        o["safety_after"],
        o["helpfulness_before"],
        o["helpfulness_after"],
    )
  summary = files.read_json(summary_path, fix=files.REWRITE)
  helpful = data.load_records(c.helpful_source, "sft") if c.helpful_fraction > 0 else []
  sft_records = mix_helpful(
      metrics.read_jsonl(revisions_path),
      helpful,
      c.helpful_fraction,
      np.random.default_rng(config.seed + 2),
  )
  sft_path = os.path.join(workdir, "sft_data.jsonl")
  annotators.write_jsonl(sft_records, sft_path)
  sft_config = ml_collections.ConfigDict(config.to_dict())
  sft_config.algorithm, sft_config.data.kind, sft_config.data.source = "sft", "sft", sft_path
  sft_config.data.eval_source = ""  # held out: data.eval_fraction of the mix
  result = sft.train(sft_config, workdir)
  return {**{f"revision/{k}": v for k, v in summary["overall"].items()}, **result}
