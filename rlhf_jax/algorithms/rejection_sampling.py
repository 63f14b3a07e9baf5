"""Llama 2's iterated rejection sampling: best-of-K under the reward model, then SFT on the best.

Round r (r = 1..rounds): for the same `prompts_per_round` prompts every round (the first ones of
`config.data.source` after the first `prompt_offset`; with `fresh_prompts`, the next
`prompts_per_round` unseen ones), sample K
responses per prompt from the current policy at temperature `temperatures[r-1]`, score them with the reward model(s) (the same `RewardSpec` as PPO, e.g. the
Llama 2 combination of helpfulness and safety), keep the best response per prompt -- with
`keep_best_across_rounds`, the best one seen for that prompt in any round so far, so a worse round
cannot undo an earlier one -- and fine-tune the current policy on the kept set with the SFT driver
(`config.train`, `config.optim`, `config.data.packing`). The next round samples from the result.

WORKDIR/round_<r>/: kept.jsonl (prompt, completion, reward, round, gold on toy prompts),
the SFT run (checkpoints, metrics, export); WORKDIR/rounds.json: per round the mean reward and gold
of the policy's own first sample and of the kept best-of-K set; WORKDIR/export: the last round's
policy. A rerun skips finished rounds and resumes an interrupted SFT from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np

from rlhf_jax import data
from rlhf_jax.algorithms import common, ppo_rollout, registry, reward_functions, sft
from rlhf_jax.algorithms.ppo import load_prompts
from rlhf_jax.algorithms.ppo_rollout import best_of_k
from rlhf_jax.data import files
from rlhf_jax.errors import ConfigError
from rlhf_jax.toyworld import annotators
from rlhf_jax.toyworld import world as world_lib
from rlhf_jax.train import checkpoint, metrics

_log = logging.getLogger(__name__)


# Pieces shared with ReST (algorithms/rest.py): sample-score-filter, then SFT on what is kept.


def gold_combined(record: dict, text: str) -> float | None:
  """The toy world's gold combined score of `text` for a toy task record; None for other prompts."""
  if "family" in record and "answer" in record:
    return world_lib.gold_scores(record, text)["combined"]
  return None


def mean_or_none(values) -> float | None:
  """The mean of the values that are not None (None if there are none)."""
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def policy_tokenizer(config: ml_collections.ConfigDict, *, key: str):
  """(tokenizer directory, tokenizer) of the policy export `config.init_from` (or
  `config.data.tokenizer`); `key` names the method in the error for an empty init_from."""
  if not config.init_from:
    raise ConfigError(f"config.init_from is empty: {key} starts from a policy export")
  tokenizer_dir = config.data.tokenizer or checkpoint.read_export_metadata(config.init_from).get(
      "tokenizer"
  )
  return tokenizer_dir, data.load_tokenizer(tokenizer_dir)


def step_prompts(
    prompts: list[dict],
    *,
    steps: int,
    per_step: int,
    fresh: bool,
    key: str,
    source: str,
    offset: int = 0,
) -> list[list[dict]]:
  """The prompts of each of `steps` sampling steps, after the first `offset` of `prompts`: the
  first `per_step` every step, or with `fresh` the next `per_step` unseen ones; `key` names the
  config block in the error."""
  if offset < 0:
    raise ConfigError(f"{key}.prompt_offset must be >= 0, got {offset}")
  need = offset + (steps if fresh else 1) * per_step
  if need > len(prompts) and (fresh or offset):
    skipped = f"{offset} skipped (prompt_offset) + " if offset else ""
    field = "fresh_prompts" if fresh else "prompt_offset"
    raise ConfigError(
        f"{key}.{field}: {skipped}{steps if fresh else 1} step(s) x {per_step} "
        f"prompts each need {need} prompts; {source} has {len(prompts)}"
    )
  return [prompts[offset + (s * per_step if fresh else 0) :][:per_step] for s in range(steps)]


def finetune(
    config: ml_collections.ConfigDict, init_from: str, source: str, tokenizer_dir: str, workdir: str
) -> str | None:
  """SFT (`config.train`, `config.optim`, `config.data.packing`) from the export `init_from` on
  the records in `source`, in `workdir`; resumes an interrupted run. Returns WORKDIR/export, or
  None when the run stopped early (`train.stop_after_steps`: rerun to continue)."""
  export = os.path.join(workdir, "export")
  if not os.path.exists(export):
    sft_cfg = ml_collections.ConfigDict(config.to_dict())
    sft_cfg.algorithm, sft_cfg.init_from = "sft", init_from
    sft_cfg.data.update(kind="sft", source=source, tokenizer=tokenizer_dir)
    sft.train(sft_cfg, workdir)
  return export if os.path.exists(export) else None


def export_final(policy_export: str, workdir: str) -> None:
  """Copies the last policy export to WORKDIR/export (what later pipeline stages start from)."""
  checkpoint.copy_export(policy_export, os.path.join(workdir, "export"))


@registry.register(
    "rejection_sampling",
    policy=True,
    stage_fields=("rejection_sampling.reward.helpful", "rejection_sampling.reward.safety"),
    blocks=("rejection_sampling",),
)
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Llama 2's iterated rejection sampling: each round samples `samples_per_prompt` responses per
  prompt from the current policy, keeps the reward model's best (`round_<r>/kept.jsonl`) and
  fine-tunes on them (`finetune`); the next round samples from that model. Rounds already
  sampled or trained are skipped on a rerun. Returns the per-round summary (`rounds.json`)."""
  mesh = common.start_run(config, workdir, write=False, train_batch=False)
  rs = config.rejection_sampling
  if len(rs.temperatures) != rs.rounds:
    raise ConfigError(
        f"config.rejection_sampling.temperatures has {len(rs.temperatures)} entries for "
        f"rounds={rs.rounds}; give one temperature per round"
    )
  tokenizer_dir, tokenizer = policy_tokenizer(config, key="rejection sampling")
  round_prompts = step_prompts(
      load_prompts(config.data.source),
      steps=rs.rounds,
      per_step=rs.prompts_per_round,
      fresh=rs.fresh_prompts,
      key="config.rejection_sampling",
      source=config.data.source,
      offset=rs.prompt_offset,
  )
  functions = reward_functions.from_config(rs.reward, key="config.rejection_sampling.reward")
  rms = ppo_rollout.load_reward_models(rs.reward, mesh, key="config.rejection_sampling.reward")
  spec = ppo_rollout.reward_spec(rs.reward, rms)

  summary_path = os.path.join(workdir, "rounds.json")
  summary = files.read_json(summary_path, fix=files.REWRITE) if os.path.exists(summary_path) else []
  best: dict[str, dict] = {}  # prompt -> the best kept record so far (across rounds)
  policy_export = config.init_from
  for r in range(1, rs.rounds + 1):
    round_dir = os.path.join(workdir, f"round_{r}")
    kept_path = os.path.join(round_dir, "kept.jsonl")
    if not os.path.exists(kept_path):
      policy = common.load_policy(policy_export, mesh)
      samples = best_of_k(
          policy.params,
          policy.sampler,
          rms,
          spec,
          tokenizer,
          round_prompts[r - 1],
          k=rs.samples_per_prompt,
          temperature=rs.temperatures[r - 1],
          max_new_tokens=rs.max_new_tokens,
          max_prompt_len=rs.max_prompt_len,
          batch_prompts=rs.batch_prompts,
          rng=jax.random.key(config.seed + r),
          functions=functions,
      )
      kept, row = _keep_best(samples, best, r, across_rounds=rs.keep_best_across_rounds)
      row = {"round": r, "temperature": rs.temperatures[r - 1], **row}
      summary = [s for s in summary if s["round"] != r] + [row]
      metrics.write_json(summary, summary_path)
      kept = [k for k in kept if k["completion"]]
      annotators.write_jsonl(kept, kept_path)  # last, atomic: its presence means "sampled"
      _log.info("rejection sampling round %d: %s", r, row)
    else:
      kept = metrics.read_jsonl(kept_path)
    if rs.keep_best_across_rounds:  # from what the file holds, so a resumed run sees the same
      best.update({_key(k["prompt"]): k for k in kept})
    export = finetune(config, policy_export, kept_path, tokenizer_dir, round_dir)
    if export is None:  # stopped early (stop_after_steps): rerun to continue
      return {"stopped_in_round": r}
    policy_export = export
  export_final(policy_export, workdir)
  return {
      "rounds": rs.rounds,
      **{
          f"round_{s['round']}/{k}": v
          for s in summary
          for k, v in s.items()
          if k != "round" and v is not None
      },
  }


def _keep_best(samples: list, best: dict, r: int, *, across_rounds: bool) -> tuple[list, dict]:
  """Round r's kept records (each prompt's highest-reward sample, or the best of an earlier round
  when `across_rounds` and it scored higher; `best`: prompt key -> kept record) and the round's
  summary: mean reward and gold of the first sample and of the kept ones."""
  kept = []
  first_gold, best_gold = [], []
  for sample in samples:
    record, i = sample["record"], int(np.argmax(sample["rewards"]))
    candidate = {
        "prompt": record["prompt"],
        "completion": sample["texts"][i],
        "reward": float(sample["rewards"][i]),
        "round": r,
    }
    previous = best.get(_key(record["prompt"]))
    if across_rounds and previous and previous["reward"] >= candidate["reward"]:
      candidate = previous
    gold = gold_combined(record, candidate["completion"])
    if gold is not None:
      candidate = {**candidate, "gold_combined": gold}
    first_gold.append(gold_combined(record, sample["texts"][0]))
    best_gold.append(gold)
    kept.append(candidate)
  row = dict(
      sample_reward=float(np.mean([s["rewards"][0] for s in samples])),
      best_reward=float(np.mean([k["reward"] for k in kept])),
      sample_gold=mean_or_none(first_gold),
      best_gold=mean_or_none(best_gold),
      from_earlier_rounds=sum(k["round"] < r for k in kept),
  )
  return kept, row


def _key(prompt) -> str:
  return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
