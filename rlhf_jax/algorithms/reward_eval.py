"""Held-out evaluation of the pipeline's reward models, alone and combined (Llama 2 rule or linear).

For each reward stage: its own held-out report (written by the reward driver: accuracy against the
annotators' labels and against gold, by margin level and family), Kendall tau against gold on the
held-out rankings (`rankings_eval`, all families, combined gold), and accuracy on gold-labelled
pairs of the prompts where safety decides (`safety_critical_eval`). `config.combine` names a
helpfulness and a safety stage; their combination, by the configured rule and by the other one
for comparison, is scored on the same rankings and pairs.
The combination is computed as PPO computes its reward (`ppo_rollout.RewardSpec`: each model's
score whitened by its own held-out statistics, then the Llama 2 rule or the weighted sum).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from rlhf_jax import data, reward_metrics, sharding
from rlhf_jax.algorithms import ppo_rollout, reward
from rlhf_jax.losses import reward as reward_losses
from rlhf_jax.metrics import format_table


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def combine_scores(helpful: Sequence[np.ndarray], safety: Sequence[np.ndarray],
                   records: Sequence[dict], spec: ppo_rollout.RewardSpec) -> list[np.ndarray]:
  """Per-record combined rewards, exactly as PPO makes them (`RewardSpec`: each model's score
  whitened by its own statistics); a record's `unsafe` flag marks a safety-critical prompt."""
  out = []
  for h, s, record in zip(helpful, safety, records):
    unsafe = np.full(h.shape, bool(record.get("unsafe", False)))
    out.append(np.asarray(spec({"helpful": h, "safety": s}, unsafe)))
  return out


def evaluate_reward_stages(config: ml_collections.ConfigDict, workdir: str, paths: dict,
                           stages: Sequence[str]) -> dict:
  """Reports for every reward stage (and the combination); writes WORKDIR/eval/reward.json, prints
  the tables, returns a flat summary."""
  mesh = sharding.make_mesh(config.mesh.shape)
  tokenizer = data.load_tokenizer(paths["tokenizer"])
  rankings = _read_jsonl(paths["rankings_eval"])
  critical = _read_jsonl(paths["safety_critical_eval"])
  results, scored, stats = {}, {}, {}
  for stage in stages:
    rm = reward.load_reward_model(os.path.join(workdir, stage, "export"), mesh)
    with open(os.path.join(workdir, stage, "eval.json")) as f:
      own = json.load(f)["report"]
    ranked = reward.score_records(rm, tokenizer, rankings, "ranking")
    pairs = reward.score_records(rm, tokenizer, critical, "pairwise")
    scored[stage] = (ranked, pairs)
    stats[stage] = rm.stats
    results[stage] = {"held_out": own, "rankings": reward.report("ranking", *ranked),
                      "safety_critical": reward.report("pairwise", *pairs)}
  combine = config.get("combine")
  if combine is not None and combine.helpful in scored and combine.safety in scored:
    (h_ranked, h_pairs), (s_ranked, s_pairs) = scored[combine.helpful], scored[combine.safety]
    # Both models read the same records at the same length, so they keep the same ones.
    assert [r["prompt"] for r in h_ranked[0]] == [r["prompt"] for r in s_ranked[0]]
    for kind in reward_losses.COMBINED_REWARD_KINDS:  # the configured one, and the other to compare
      spec = ppo_rollout.RewardSpec(
          names=("helpful", "safety"),
          stats={"helpful": stats[combine.helpful], "safety": stats[combine.safety]}, combine=kind,
          safety_threshold=combine.safety_threshold, helpful_weight=combine.helpful_weight,
          safety_weight=combine.safety_weight)
      selected = "" if kind == combine.kind else " [not selected]"
      results[f"combined ({kind}){selected}"] = {
          "rankings": reward.report("ranking", h_ranked[0],
                                    combine_scores(h_ranked[1], s_ranked[1], h_ranked[0], spec)),
          "safety_critical": reward.report("pairwise", h_pairs[0],
                                           combine_scores(h_pairs[1], s_pairs[1], h_pairs[0], spec))}
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "reward.json"), "w") as f:
    json.dump(results, f, indent=1)
  if jax.process_index() == 0:
    _print_tables(results)
  return summarise(results)


def _print_tables(results: dict) -> None:
  keep = lambda rows, keys: [{k: row.get(k) for k in ("model", "slice", *keys)} for row in rows]
  held = {name: r["held_out"] for name, r in results.items() if "held_out" in r}
  pairs = [row for name, report in held.items() if "by_margin" in report
           for row in keep(reward_metrics.report_rows(report, name), ("n", "accuracy", "gold_accuracy"))
           if not row["slice"].startswith("family")]
  rankings = [row for name, report in held.items() if "by_margin" not in report
              for row in keep(reward_metrics.report_rows(report, name),
                              ("n", "kendall_tau_labels", "kendall_tau_gold", "pair_accuracy_labels"))]
  if pairs:
    print("\nReward models on their held-out preference pairs (accuracy vs annotator labels / gold):")
    print(format_table(pairs))
  if rankings:
    print("\nReward models on their held-out rankings (Kendall tau vs annotator order / gold):")
    print(format_table(rankings))
  ranked = [keep(reward_metrics.report_rows(r["rankings"], name),
                 ("n", "kendall_tau_gold", "top1_gold", "pair_accuracy_labels"))[0]
            for name, r in results.items()]
  critical = [keep(reward_metrics.report_rows(r["safety_critical"], name), ("n", "gold_accuracy"))
              for name, r in results.items()]
  print("\nHeld-out rankings (all families, gold = combined helpfulness/safety):")
  print(format_table(ranked))
  print("\nSafety-critical pairs (unsafe and look-alike prompts, labelled by gold):")
  print(format_table([row for rows in critical for row in rows
                      if row["slice"] in ("all", "family=unsafe", "family=safe_lookalike")]))


def summarise(results: dict) -> dict:
  summary = {}
  for name, r in results.items():
    if name.endswith("[not selected]"):
      continue
    key = name.split(" ")[0]
    overall = r.get("held_out", {}).get("overall", {})
    for metric in ("accuracy", "gold_accuracy", "pair_accuracy_labels"):
      if metric in overall:
        summary[f"{key}/held_out_{metric}"] = overall[metric]
    summary[f"{key}/kendall_tau_gold"] = r["rankings"]["overall"]["kendall_tau_gold"]
    summary[f"{key}/safety_critical_gold_accuracy"] = r["safety_critical"]["overall"]["gold_accuracy"]
  return summary
