"""RLAIF (Lee et al. 2023): preference labels from the AI judge (toyworld/judge.py), not people.

Distilled RLAIF, the pipeline's "ai_feedback" data stage (`collect`): a policy samples two
responses per prompt; the judge compares them under a principle chosen per prompt and its
position-swapped soft label p = P(first better) makes a pairwise record (chosen = the response p
favours, `soft_label` = max(p, 1 - p)) that a reward stage reads with `reward.soft_labels=True`.
The stage's summary reports how often the judge agrees with the toy world's gold labels on the
very pairs it labelled (the paper's AI-human agreement, with gold in the humans' place).

Direct RLAIF (`sibling_rewards`, PPO's `ppo.reward.judge`): the judge itself is the reward. Each
sample's reward is the mean swapped p that it beats each of its prompt's other samples. Pairwise
against siblings rather than against a fixed reference response: the judge was trained to compare
two answers, not to score one; a fixed reference stops giving signal once the policy beats it on
every prompt (p -> 1 everywhere), while siblings stay as good as the policy; and the rewards of
a prompt's samples sum to k / 2, so the prompt's difficulty cancels as with an RLOO baseline.

Judge modes (`judge_mode`, `judge.judge_preferences`): "score" (the default) reads the judge's
expected 0-9 grade of each response alone and compares two by Bradley-Terry, sigmoid(s_a - s_b);
"pointwise" grades by log p(its critique starts "No problems."), which tells a response with a
problem from one without but not one problem from three; "pairwise" is RLAIF's comparison prompt
with position swapping. A grade has no position to be biased by. How each agrees with gold on the
toy world: docs/toyworld.md, "RLAIF and Constitutional AI".

Principles: `()` = Constitutional AI / Llama 2's split, HARMLESS on prompts flagged unsafe and
CORRECT elsewhere; otherwise one drawn uniformly per prompt from the list. A principle is a name
of `PRINCIPLES` ("HARMLESS") or any principle text (the judge knows the ones it was trained on).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np

from rlhf_jax import data, sharding
from rlhf_jax.algorithms import common, ppo_rollout
from rlhf_jax.errors import ConfigError
from rlhf_jax.evaluation import gold as gold_eval
from rlhf_jax.toyworld import annotators, judge
from rlhf_jax.toyworld import world as world_lib
from rlhf_jax.train import metrics

_log = logging.getLogger(__name__)
ALGORITHM = "ai_feedback"
PRINCIPLES = {
    "CORRECT": judge.CORRECT,
    "HARMLESS": judge.HARMLESS,
    "FORMAT": judge.FORMAT,
    "CONCISE": judge.CONCISE,
}
# prefer(items [(task, response_a, response_b)], *, principle) -> single-order p(A) [N], e.g.
# functools.partial(judge.judge_preferences, graphdef, params, tokenizer, swap=False).
Prefer = Callable[..., np.ndarray]


def resolve_principles(principles: Sequence[str], key: str) -> tuple[str, ...]:
  """Names of PRINCIPLES -> their texts; other strings are principle texts. `key` names the config
  field in errors."""
  if isinstance(principles, str):
    raise ConfigError(f"{key}={principles!r}: give a list of principles, e.g. ('HARMLESS',)")
  out = []
  for p in principles:
    if not isinstance(p, str) or not p.strip():
      raise ConfigError(
          f"{key} has an empty or non-text principle {p!r}; give names of "
          f"{list(PRINCIPLES)} or principle texts"
      )
    out.append(PRINCIPLES.get(p, p))
  return tuple(out)


def choose_principles(
    tasks: Sequence[dict], principles: Sequence[str], rng: np.random.Generator
) -> list[str]:
  """One principle per task: principles () -> HARMLESS for tasks flagged unsafe, else CORRECT;
  otherwise uniform draws from `principles` (texts)."""
  if not principles:
    return [judge.HARMLESS if t.get("unsafe", False) else judge.CORRECT for t in tasks]
  return [principles[i] for i in rng.integers(len(principles), size=len(tasks))]


def swapped_preferences(
    prefer: Prefer, items: Sequence[tuple], principles: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
  """(p_ab, p_ba) [N]: the judge's single-order p(A) for each item (task, a, b) shown as (a, b) and
  as (b, a), one `prefer` call per principle and order. `judge.swap_debias(p_ab, p_ba)` is the
  position-swapped P(a better)."""
  p_ab, p_ba = np.zeros(len(items)), np.zeros(len(items))
  for principle in dict.fromkeys(principles):  # first-seen order: deterministic calls
    index = [i for i, p in enumerate(principles) if p == principle]
    chosen = [items[i] for i in index]
    p_ab[index] = prefer(chosen, principle=principle)
    p_ba[index] = prefer([(t, b, a) for t, a, b in chosen], principle=principle)
  return p_ab, p_ba


class Labelled(NamedTuple):
  """AI-labelled pairs: the pairwise `records` and, per record, the judge's single-order p(A) in
  the sampled order (a = the first sample) `p_ab`, `p_ba` [N] and `gold` [N]: gold label of a over
  b under the record's principle (1, 0, NaN = tie or a principle / family gold does not label)."""

  records: list[dict]
  p_ab: np.ndarray
  p_ba: np.ndarray
  gold: np.ndarray
  skipped: int  # pairs not labelled: identical or empty responses


def _gold(principle: str, task: dict, a: str, b: str) -> float:
  if principle not in judge.LABELLERS:
    return float("nan")
  label = judge.gold_label(principle, task, a, b)
  return float("nan") if label is None else label


def label_pairs(
    prefer: Prefer,
    tasks: Sequence[dict],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    principles: Sequence[str],
) -> Labelled:
  """Pairwise preference records from the judge's position-swapped labels.

  Pairs whose responses are identical (up to surrounding whitespace) or empty are skipped: they
  hold no preference. Each record: {"prompt", "chosen", "rejected", "soft_label" (P(chosen
  better) = max(p, 1 - p), p = swapped P(a better); a is chosen at p = 1/2), "principle",
  "family", "unsafe", "gold" (chosen over rejected by gold: 1.0, 0.0, or None)}.
  """
  assert len(tasks) == len(responses_a) == len(responses_b) == len(principles)
  keep = [
      i
      for i, (a, b) in enumerate(zip(responses_a, responses_b))
      if a.strip() and b.strip() and a.strip() != b.strip()
  ]
  items = [(tasks[i], responses_a[i], responses_b[i]) for i in keep]
  kept_principles = [principles[i] for i in keep]
  p_ab, p_ba = swapped_preferences(prefer, items, kept_principles)
  p = judge.swap_debias(p_ab, p_ba)
  gold = np.array([_gold(pr, *item) for pr, item in zip(kept_principles, items)], np.float64)
  records = []
  for (task, a, b), principle, p_a, g in zip(items, kept_principles, p, gold):
    a_chosen = p_a >= 0.5
    chosen_gold = None if np.isnan(g) else float(g if a_chosen else 1.0 - g)
    records.append(
        {
            "prompt": task["prompt"],
            "chosen": a if a_chosen else b,
            "rejected": b if a_chosen else a,
            "soft_label": float(max(p_a, 1.0 - p_a)),
            "principle": principle,
            "family": task.get("family", ""),
            "unsafe": bool(task.get("unsafe", False)),
            "gold": chosen_gold,
        }
    )
  return Labelled(records, p_ab, p_ba, gold.reshape(-1), len(tasks) - len(keep))


def agreement_summary(labelled: Labelled) -> dict:
  """Judge-gold agreement on the labelled pairs that gold decides (`judge.agreement_metrics`:
  single-order, swapped, position bias, ...), overall, by principle and by family; with the
  counts of pairs, skipped pairs, gold-decided pairs, and the mean soft label."""
  records, gold = labelled.records, labelled.gold
  decided = ~np.isnan(gold)

  def metrics(index: np.ndarray) -> dict | None:
    index = index & decided
    if not index.any():
      return None
    return judge.agreement_metrics(labelled.p_ab[index], labelled.p_ba[index], gold[index])

  def grouped(key: str) -> dict:
    values = np.array([r[key] for r in records])
    return {v: metrics(values == v) for v in sorted(set(values.tolist()))}

  return {
      "pairs": len(records),
      "skipped": labelled.skipped,
      "gold_decided": int(decided.sum()),
      "mean_soft_label": float(np.mean([r["soft_label"] for r in records])) if records else None,
      "overall": metrics(np.ones(len(records), bool)),
      "principles": grouped("principle"),
      "families": grouped("family"),
  }


def sibling_rewards(
    prefer: Prefer,
    tasks: Sequence[dict],
    responses: Sequence[str],
    k: int,
    principles: Sequence[str],
) -> np.ndarray:
  """Direct RLAIF: [N * k] rewards of k samples per task (task-major, as PPO's rollout), each the
  mean over its siblings of the swapped P(it beats that sibling) under its task's principle.

  tasks, principles: [N]. Every unordered pair is judged once in both orders, so a task's rewards
  sum to k / 2; identical responses get 1/2 from each other.
  """
  assert len(responses) == len(tasks) * k and len(principles) == len(tasks) and k >= 2
  pairs = [(t, i, j) for t in range(len(tasks)) for i in range(k) for j in range(i + 1, k)]
  items = [(tasks[t], responses[t * k + i], responses[t * k + j]) for t, i, j in pairs]
  p_ab, p_ba = swapped_preferences(prefer, items, [principles[t] for t, _, _ in pairs])
  p = judge.swap_debias(p_ab, p_ba)
  rewards = np.zeros(len(responses))
  for (t, i, j), p_i in zip(pairs, p):
    rewards[t * k + i] += p_i
    rewards[t * k + j] += 1.0 - p_i
  return rewards / (k - 1)


def paths_of(stage: str, stage_dir: str) -> dict:
  """{"<stage>/pairs", "<stage>/pairs_eval"}: the pairwise data sets an ai_feedback stage writes."""
  return {
      f"{stage}/{name}": os.path.join(stage_dir, f"{name}.jsonl")
      for name in ("pairs", "pairs_eval")
  }


def check_config(f: ml_collections.ConfigDict, stage: str, stages: Sequence[str]) -> None:
  """Errors of an ai_feedback stage config, before any model loads."""
  key = f"config.{stage}"
  if not f.judge or f.judge not in stages:
    raise ConfigError(
        f"{key}.judge={f.judge!r} must name the judge's stage in config.stages "
        f"({', '.join(stages)})"
    )
  if f.prompts < 1 or f.eval_prompts < 1:
    raise ConfigError(
        f"{key}.prompts and .eval_prompts must be >= 1 (got {f.prompts}, " f"{f.eval_prompts})"
    )
  if f.judge_mode not in judge.JUDGE_MODES:
    raise ConfigError(f"{key}.judge_mode={f.judge_mode!r}: choose one of {judge.JUDGE_MODES}")
  if f.judge_batch_size % judge.ROW_BUCKET:
    raise ConfigError(
        f"{key}.judge_batch_size={f.judge_batch_size} must be a multiple of " f"{judge.ROW_BUCKET}"
    )
  resolve_principles(f.principles, f"{key}.principles")
  world_lib.World(0).tasks(1, seed=0, families=tuple(f.families) or None)  # unknown families


def collect(
    config: ml_collections.ConfigDict,
    stage: str,
    stage_dir: str,
    paths: dict,
    policy_export: str,
    judge_export: str,
) -> dict:
  """The ai_feedback stage: for `config.<stage>.prompts` training tasks (and `eval_prompts`
  held-out ones) of `families` (() = all), two samples of the policy labelled by the judge, as
  pairwise records in WORKDIR/<stage>/pairs.jsonl and pairs_eval.jsonl (named "<stage>/pairs" and
  "<stage>/pairs_eval" for later stages' data.source); WORKDIR/<stage>/summary.json holds the
  judge-gold agreement on them (`agreement_summary`). Returns the new paths."""
  f, w = config[stage], config.world
  out = paths_of(stage, stage_dir)
  if all(os.path.exists(p) for p in out.values()):
    return out
  check_config(f, stage, config.stages)
  if not policy_export:
    raise ConfigError(f"config.{stage} (ai_feedback) needs a policy stage before it to sample from")
  mesh = sharding.make_mesh(config.mesh.shape)
  tokenizer = data.load_tokenizer(paths["tokenizer"])
  policy, ai_judge = common.load_policy(policy_export, mesh), common.load_policy(judge_export, mesh)
  prefer = functools.partial(
      judge.judge_preferences,
      ai_judge.graphdef,
      ai_judge.params,
      tokenizer,
      swap=False,
      batch_size=f.judge_batch_size,
      mode=f.judge_mode,
  )
  principles = resolve_principles(f.principles, f"config.{stage}.principles")
  world = world_lib.World.from_config(w)
  os.makedirs(stage_dir, exist_ok=True)
  summary = {}
  for split, n, seed, name in (
      ("train", f.prompts, w.seed + 3, "pairs"),
      ("eval", f.eval_prompts, w.seed + 6, "pairs_eval"),
  ):
    tasks = world.tasks(n, seed=seed, families=tuple(f.families) or None, split=split)
    texts, _ = gold_eval.sample_responses(
        policy,
        tokenizer,
        [t for t in tasks for _ in range(2)],
        jax.random.key(seed),
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        batch_size=f.batch_size,
    )
    chosen = choose_principles(tasks, principles, np.random.default_rng([w.seed, seed]))
    labelled = label_pairs(prefer, tasks, texts[0::2], texts[1::2], chosen)
    annotators.write_jsonl(labelled.records, out[f"{stage}/{name}"])
    summary[name] = agreement_summary(labelled)
  metrics.write_json(
      {"policy": policy_export, "judge": judge_export, **summary},
      os.path.join(stage_dir, "summary.json"),
  )
  overall = summary["pairs"]["overall"] or {}
  _log.info(
      "%s: %d AI-labelled pairs (%d skipped); judge-gold agreement %s (swapped) on %d "
      "gold-decided pairs",
      stage,
      summary["pairs"]["pairs"],
      summary["pairs"]["skipped"],
      overall.get("agreement_swapped"),
      summary["pairs"]["gold_decided"],
  )
  return out


def check_judge_reward(reward_cfg: ml_collections.ConfigDict, samples_per_prompt: int) -> None:
  """Errors of PPO's `config.ppo.reward.judge` (direct RLAIF), before any model loads."""
  if samples_per_prompt < 2:
    raise ConfigError(
        f"config.ppo.reward.judge compares a prompt's samples with each other: set "
        f"config.ppo.samples_per_prompt >= 2 (it is {samples_per_prompt})"
    )
  resolve_principles(reward_cfg.judge_principles, "config.ppo.reward.judge_principles")
  if reward_cfg.judge_mode not in judge.JUDGE_MODES:
    raise ConfigError(
        f"config.ppo.reward.judge_mode={reward_cfg.judge_mode!r}: choose one of "
        f"{judge.JUDGE_MODES}"
    )


def judge_reward_fn(ppo_cfg: ml_collections.ConfigDict, mesh, tokenizer, *, seed: int):
  """PPO's text reward for `config.ppo.reward.judge`: loads the judge export and returns
  reward(records, out, *, iteration) -> [prompts x samples] `sibling_rewards` of the rollout's
  decoded samples (records: the iteration's prompt records, task-major as the rollout)."""
  check_judge_reward(ppo_cfg.reward, ppo_cfg.samples_per_prompt)
  principles = resolve_principles(
      ppo_cfg.reward.judge_principles, "config.ppo.reward.judge_principles"
  )
  ai_judge = common.load_policy(ppo_cfg.reward.judge, mesh)
  prefer = functools.partial(
      judge.judge_preferences,
      ai_judge.graphdef,
      ai_judge.params,
      tokenizer,
      swap=False,
      mode=ppo_cfg.reward.judge_mode,
  )

  def reward(records: Sequence[dict], out, *, iteration: int) -> np.ndarray:
    chosen = choose_principles(records, principles, np.random.default_rng([seed, iteration]))
    return sibling_rewards(
        prefer,
        records,
        ppo_rollout.decode_responses(tokenizer, out),
        ppo_cfg.samples_per_prompt,
        chosen,
    )

  return reward
