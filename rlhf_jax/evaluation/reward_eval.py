"""Held-out evaluation of the pipeline's reward models, alone and combined (Llama 2 rule or linear).

For each reward stage: its own held-out report (written by the reward driver: accuracy against the
annotators' labels and against gold, by margin level and family), Kendall tau against gold on the
held-out rankings (`rankings_eval`, all families, combined gold), and accuracy on gold-labelled
pairs of the prompts where safety decides (`safety_critical_eval`). `config.combine` names a
helpfulness and a safety stage; their combination, by the configured rule and by the other one
for comparison, is scored on the same rankings and pairs.
The combination is computed as PPO computes its reward (`ppo_rollout.RewardSpec`: each model's
score whitened by its own held-out statistics, then the Llama 2 rule or the weighted sum).

Best-of-n (`best_of_n_report`): what optimising each reward really buys. The policy the reward
models branched from samples K = max(n) responses per held-out task; for each n the reward's best
of n (over K/n disjoint groups) is scored by gold, beside the mean sample (n = 1) and the gold
oracle's best of K. Best of n is KL(best-of-n || policy) = log n - (n - 1)/n nats away from the
policy, so this is the reward-model over-optimisation curve of Gao et al. (2022) without RL: a
reward that is only trustworthy near the policy makes gold peak at small n and fall, while its
own score of the pick (the proxy) keeps rising: WORKDIR/eval/best_of_n.png draws both.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from rlhf_jax import data, sharding
from rlhf_jax.algorithms import common, ppo_rollout, rejection_sampling, reward, reward_functions
from rlhf_jax.data import files
from rlhf_jax.evaluation import plots, reward_metrics
from rlhf_jax.losses import reward as reward_losses
from rlhf_jax.toyworld import behaviours
from rlhf_jax.toyworld import world as world_lib
from rlhf_jax.train.metrics import format_table, read_jsonl


def combine_scores(
    helpful: Sequence[np.ndarray],
    safety: Sequence[np.ndarray],
    records: Sequence[dict],
    spec: ppo_rollout.RewardSpec,
) -> list[np.ndarray]:
  """Per-record combined rewards, exactly as PPO makes them (`RewardSpec`: each model's score
  whitened by its own statistics); a record's `unsafe` flag marks a safety-critical prompt."""
  out = []
  for h, s, record in zip(helpful, safety, records):
    unsafe = np.full(h.shape, bool(record.get("unsafe", False)))
    out.append(np.asarray(spec({"helpful": h, "safety": s}, unsafe)))
  return out


def best_of_n_kl(n: int) -> float:
  """KL(best-of-n || policy) in nats, for a reward without ties: log n - (n - 1) / n."""
  return float(np.log(n) - (n - 1) / n)


def best_of_n_gold(gold: np.ndarray, rewards: np.ndarray, n: int) -> float:
  """Mean gold of the reward's best of n, over the K/n disjoint groups of each row: gold, rewards
  [P, K] (K divisible by n) -> float. The first index wins reward ties."""
  prompts, k = gold.shape
  if k % n:
    raise ValueError(f"best of {n} needs K divisible by {n}, got K={k}")
  g, r = gold.reshape(prompts, k // n, n), rewards.reshape(prompts, k // n, n)
  return float(np.take_along_axis(g, r.argmax(-1)[..., None], -1).mean())


def within_prompt_corr(rewards: np.ndarray, gold: np.ndarray) -> float | None:
  """Pearson correlation of rewards and gold [P, K] after removing each prompt's mean from both:
  how well a reward orders one prompt's samples, which is all best of n and policy-gradient
  methods use (a reward that only knows which prompts are easy scores 0). None if either is
  constant within every prompt."""
  r = rewards - rewards.mean(1, keepdims=True)
  g = gold - gold.mean(1, keepdims=True)
  denom = np.sqrt((r * r).sum() * (g * g).sum())
  return float((r * g).sum() / denom) if denom > 0 else None


# The best-of-n "reward" that needs no reward model: the policy's own per-token log-prob of a sample.
LIKELIHOOD = "policy mean log-prob"


def best_of_n_report(
    policy,
    rms: dict,
    rewards: dict,
    tokenizer,
    tasks: Sequence[dict],
    ns: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    rng,
    max_prompt_len: int = 128,
    batch_prompts: int = 32,
    functions: reward_functions.RewardFunctions = reward_functions.NONE,
) -> dict:
  """{"n": ns, "kl": [...], "prompts", "mean": {...}, "oracle": {...}, reward name:
  {"combined" [..], "helpfulness" [..], "safety" [..], "within_prompt_corr": {family: r}}}: gold
  of each reward's best of n (one entry per n), on toy-world `tasks`, one sample set for all
  rewards, and how well the reward orders each prompt's samples by gold combined
  (`within_prompt_corr`, per task family and "all"); also for the policy's own mean log-prob of
  each sample (`LIKELIHOOD`), the selection a confident policy makes without any reward model.

  rms: {model name: RewardModel}; rewards: {reward name: (RewardSpec, {spec role: model name})},
  e.g. {"combined": (spec, {"helpful": "rm_helpful", "safety": "rm_safety"})}; functions: reward
  functions, each a reward of its own (named as configured).
  """
  k = max(ns)
  samples = rejection_sampling.best_of_k(
      policy.params,
      policy.sampler,
      rms,
      None,
      tokenizer,
      list(tasks),
      k=k,
      temperature=temperature,
      max_new_tokens=max_new_tokens,
      max_prompt_len=max_prompt_len,
      batch_prompts=batch_prompts,
      rng=rng,
  )
  gold = {
      key: np.asarray(
          [[world_lib.gold_scores(s["record"], t)[key] for t in s["texts"]] for s in samples]
      )
      for key in ("combined", "helpfulness", "safety")
  }
  unsafe = np.asarray([[bool(s["record"].get("unsafe", False))] * k for s in samples])
  families = np.asarray([s["record"].get("family", "other") for s in samples])
  # A behaviour world's safe prompts: where the behaviour axes decide (behaviours.py).
  dressed = np.asarray([behaviours.has_behaviours(s["record"]) for s in samples])
  out = {
      "n": list(ns),
      "kl": [best_of_n_kl(n) for n in ns],
      "prompts": len(samples),
      "mean": {key: float(g.mean()) for key, g in gold.items()},
      "oracle": {key: float(g.max(-1).mean()) for key, g in gold.items()},
      "oracle_curve": {key: [best_of_n_gold(g, g, n) for n in ns] for key, g in gold.items()},
  }

  def curve(values: np.ndarray) -> dict:  # values: [P, k], one per sample
    c = {key: [best_of_n_gold(g, values, n) for n in ns] for key, g in gold.items()}
    # The proxy: the reward's own mean score of its pick (Gao et al.'s x-axis partner of gold).
    c["proxy"] = [best_of_n_gold(values, values, n) for n in ns]
    c["within_prompt_corr"] = {
        f: within_prompt_corr(values[families == f], gold["combined"][families == f])
        for f in sorted(set(families))
    }
    c["within_prompt_corr"]["all"] = within_prompt_corr(values, gold["combined"])
    if dressed.any():
      c["within_prompt_corr"]["behaviour"] = within_prompt_corr(
          values[dressed], gold["combined"][dressed]
      )
    return c

  for name, (spec, roles) in rewards.items():
    scores = {role: np.stack([s["scores"][roles[role]] for s in samples]) for role in spec.names}
    out[name] = curve(np.asarray(spec(scores, unsafe)))
  if functions:
    per_function = functions.scores(
        [s["record"] for s in samples for _ in range(k)], [t for s in samples for t in s["texts"]]
    )
    for name, values in per_function.items():
      out[name] = curve(values.reshape(len(samples), k))
  # No reward model: the policy's own mean log-prob of each sample (at the sampling temperature).
  out[LIKELIHOOD] = curve(np.stack([s["mean_logprob"] for s in samples]))
  return out


def evaluate_reward_stages(
    config: ml_collections.ConfigDict,
    workdir: str,
    paths: dict,
    stages: Sequence[str],
    policy_export: str = "",
    tasks_path: str = "",
) -> dict:
  """Reports for every reward stage (and the combination); writes WORKDIR/eval/reward.json, prints
  the tables. With `policy_export` (the policy the reward models branched from) and
  `config.eval.best_of_n`, also measures the best-of-n gold curve of every reward on the tasks of
  `tasks_path` (default the world's eval_tasks). Returns (a flat summary, the best-of-n report or
  None)."""
  mesh = sharding.make_mesh(config.mesh.shape)
  tokenizer = data.load_tokenizer(paths["tokenizer"])
  # eval.reward_records: the first N held-out rankings and safety-critical pairs (0 = all).
  limit = config.get("eval", {}).get("reward_records") or None
  rankings = read_jsonl(paths["rankings_eval"])[:limit]
  critical = read_jsonl(paths["safety_critical_eval"])[:limit]
  results, scored, stats, rms = {}, {}, {}, {}
  for stage in stages:
    rm = rms[stage] = reward.load_reward_model(os.path.join(workdir, stage, "export"), mesh)
    own = files.read_json(os.path.join(workdir, stage, "eval.json"), fix=files.REWRITE)["report"]
    ranked = reward.score_records(rm, tokenizer, rankings, "ranking")
    pairs = reward.score_records(rm, tokenizer, critical, "pairwise")
    scored[stage] = (ranked, pairs)
    stats[stage] = rm.stats
    results[stage] = {
        "held_out": own,
        "rankings": reward.report("ranking", *ranked),
        "safety_critical": reward.report("pairwise", *pairs),
    }
  combine = config.get("combine")
  # Each model alone (whitened, as PPO would use it) and the selected combination.
  rewards = {
      stage: (
          ppo_rollout.RewardSpec(names=("helpful",), stats={"helpful": rm.stats}),
          {"helpful": stage},
      )
      for stage, rm in rms.items()
  }
  combined = combine is not None and combine.helpful in scored and combine.safety in scored
  if combined:
    (h_ranked, h_pairs), (s_ranked, s_pairs) = scored[combine.helpful], scored[combine.safety]
    # Both models read the same records at the same length, so they keep the same ones.
    assert [r["prompt"] for r in h_ranked[0]] == [r["prompt"] for r in s_ranked[0]]
    for kind in reward_losses.COMBINED_REWARD_KINDS:  # the configured one, and the other to compare
      spec = ppo_rollout.RewardSpec(
          names=("helpful", "safety"),
          stats={"helpful": stats[combine.helpful], "safety": stats[combine.safety]},
          combine=kind,
          safety_threshold=combine.safety_threshold,
          helpful_weight=combine.helpful_weight,
          safety_weight=combine.safety_weight,
      )
      selected = "" if kind == combine.kind else " [not selected]"
      if not selected:
        rewards[f"combined ({kind})"] = (
            spec,
            {"helpful": combine.helpful, "safety": combine.safety},
        )
      results[f"combined ({kind}){selected}"] = {
          "rankings": reward.report(
              "ranking", h_ranked[0], combine_scores(h_ranked[1], s_ranked[1], h_ranked[0], spec)
          ),
          "safety_critical": reward.report(
              "pairwise", h_pairs[0], combine_scores(h_pairs[1], s_pairs[1], h_pairs[0], spec)
          ),
      }
  ns = tuple(config.get("eval", {}).get("best_of_n", ()) or ())
  if policy_export and ns:
    e = config.eval
    tasks = read_jsonl(tasks_path or paths["eval_tasks"])[: e.get("best_of_n_prompts") or None]
    report = best_of_n_report(
        common.load_policy(policy_export, mesh),
        rms,
        rewards,
        tokenizer,
        tasks,
        ns,
        max_new_tokens=e.max_new_tokens,
        temperature=e.temperature,
        rng=jax.random.key(config.seed + 1),
        functions=reward_functions.load(
            e.get("best_of_n_functions", ()), key="config.eval.best_of_n"
        ),
    )
    results["best_of_n"] = {"policy": policy_export, **report}
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  if results.get("best_of_n") and jax.process_index() == 0:
    plots.plot_best_of_n(results["best_of_n"], os.path.join(out_dir, "best_of_n.png"))
  with open(os.path.join(out_dir, "reward.json"), "w") as f:
    json.dump(results, f, indent=1)
  if jax.process_index() == 0:
    _print_tables(results)
  return summarise(results), results.get("best_of_n")


def best_of_n_rows(report: dict) -> list[dict]:
  """Table rows: per reward and n, KL and the gold of the reward's best of n."""
  oracle = report.get("oracle_curve")
  rows = (
      [
          {
              "reward": "(gold oracle)",
              "n": n,
              "kl": kl,
              **{f"gold_{k}": oracle[k][i] for k in ("combined", "helpfulness", "safety")},
          }
          for i, (n, kl) in enumerate(zip(report["n"], report["kl"]))
      ]
      if oracle
      else [
          {
              "reward": "(gold oracle)",
              "n": report["n"][-1],
              "kl": report["kl"][-1],
              **{f"gold_{k}": v for k, v in report["oracle"].items()},
          }
      ]
  )
  for name, curve in report.items():
    if (
        isinstance(curve, dict)
        and "combined" in curve
        and name not in ("mean", "oracle", "oracle_curve")
    ):
      rows += [
          {
              "reward": name,
              "n": n,
              "kl": kl,
              **{f"gold_{k}": curve[k][i] for k in ("combined", "helpfulness", "safety")},
              **({"proxy": curve["proxy"][i]} if "proxy" in curve else {}),
          }
          for i, (n, kl) in enumerate(zip(report["n"], report["kl"]))
      ]
  return rows


def within_prompt_rows(report: dict) -> list[dict]:
  """Table rows: per reward, its within-prompt correlation with gold by task family."""
  return [
      {"reward": name, **curve["within_prompt_corr"]}
      for name, curve in report.items()
      if isinstance(curve, dict) and "within_prompt_corr" in curve
  ]


def _print_tables(results: dict) -> None:
  best_of_n = results.get("best_of_n")
  results = {name: r for name, r in results.items() if name != "best_of_n"}
  keep = lambda rows, keys: [{k: row.get(k) for k in ("model", "slice", *keys)} for row in rows]
  held = {name: r["held_out"] for name, r in results.items() if "held_out" in r}
  pairs = [
      row
      for name, report in held.items()
      if "by_margin" in report
      for row in keep(reward_metrics.report_rows(report, name), ("n", "accuracy", "gold_accuracy"))
      if not row["slice"].startswith("family")
  ]
  rankings = [
      row
      for name, report in held.items()
      if "by_margin" not in report
      for row in keep(
          reward_metrics.report_rows(report, name),
          ("n", "kendall_tau_labels", "kendall_tau_gold", "pair_accuracy_labels"),
      )
  ]
  if pairs:
    print(
        "\nReward models on their held-out preference pairs (accuracy vs annotator labels / gold):"
    )
    print(format_table(pairs))
  if rankings:
    print("\nReward models on their held-out rankings (Kendall tau vs annotator order / gold):")
    print(format_table(rankings))
  ranked = [
      keep(
          reward_metrics.report_rows(r["rankings"], name),
          ("n", "kendall_tau_gold", "top1_gold", "pair_accuracy_labels"),
      )[0]
      for name, r in results.items()
  ]
  critical = [
      keep(reward_metrics.report_rows(r["safety_critical"], name), ("n", "gold_accuracy"))
      for name, r in results.items()
  ]
  print("\nHeld-out rankings (all families, gold = combined helpfulness/safety):")
  print(format_table(ranked))
  print("\nSafety-critical pairs (unsafe and look-alike prompts, labelled by gold):")
  print(
      format_table(
          [
              row
              for rows in critical
              for row in rows
              if row["slice"] in ("all", "family=unsafe", "family=safe_lookalike")
          ]
      )
  )
  if best_of_n:
    print(
        f"\nBest of n samples of {best_of_n['policy']} on {best_of_n['prompts']} held-out tasks, "
        "picked by each reward and scored by gold (n = 1: a plain sample):"
    )
    print(format_table(best_of_n_rows(best_of_n)))
    print(
        "\nHow well each reward orders one prompt's samples (correlation with gold combined after "
        "removing each prompt's mean), by task family:"
    )
    print(format_table(within_prompt_rows(best_of_n)))


def summarise(results: dict) -> dict:
  summary = {}
  for name, r in results.items():
    if name.endswith("[not selected]") or name == "best_of_n":
      continue
    key = name.split(" ")[0]
    overall = r.get("held_out", {}).get("overall", {})
    for metric in ("accuracy", "gold_accuracy", "pair_accuracy_labels"):
      if metric in overall:
        summary[f"{key}/held_out_{metric}"] = overall[metric]
    summary[f"{key}/kendall_tau_gold"] = r["rankings"]["overall"]["kendall_tau_gold"]
    summary[f"{key}/safety_critical_gold_accuracy"] = r["safety_critical"]["overall"][
        "gold_accuracy"
    ]
  return summary
