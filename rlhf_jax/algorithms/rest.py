"""ReST (Gulcehre et al. 2023): Grow a data set from the policy, Improve the policy on its best part.

Grow step g (g = 1..grow_steps): sample N = `samples_per_prompt` responses to each of
`prompts_per_grow` prompts (the first ones of `config.data.source`; with `fresh_prompts`, the next
unseen ones) from the current policy and score them with the reward model(s) (the same
`RewardSpec` as PPO and rejection sampling, e.g. the Llama 2 combination of helpfulness and
safety). Improve steps k = 1..K, one per threshold of the rising list `thresholds`: fine-tune with
the SFT driver (`config.train`, `config.optim`, `config.data.packing`) on the Grow set's samples
with reward >= tau_k, each step from the previous step's policy, so the later steps train on ever
fewer, better samples. The next Grow step samples from the last Improve step's policy.
`threshold_kind="quantile"`: tau_k is the thresholds' quantile of the Grow set's rewards (robust to
the scale of whitened reward models; tau 0.9 keeps the best 10%), `"absolute"`: a reward value.

Rejection sampling (`rejection_sampling.py`) is the special case of one Improve step that keeps
each prompt's best sample; ReST keeps everything above a global threshold (a prompt may contribute
several samples or none) and reuses one Grow set for several Improve steps.

WORKDIR/grow_<g>/samples.jsonl: every sample (prompt, completion, reward, scores, gold_combined
on toy prompts); WORKDIR/grow_<g>/improve_<k>/: kept.jsonl and the SFT run (checkpoints, metrics,
export); WORKDIR/steps.json: per Grow step the mean reward and gold of the policy's samples, per
Improve step its threshold, tau, the kept count and the kept set's mean reward and gold;
WORKDIR/export: the final policy. A rerun skips finished steps and resumes an interrupted SFT.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax.algorithms import common, ppo_rollout, registry, rejection_sampling, reward_functions
from rlhf_jax.algorithms.ppo import load_prompts
from rlhf_jax.errors import ConfigError
from rlhf_jax.toyworld import annotators
from rlhf_jax.train import metrics

_log = logging.getLogger(__name__)
THRESHOLD_KINDS = ("quantile", "absolute")  # config.rest.threshold_kind


def check_config(r: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the field for a bad `config.rest` (before anything loads)."""
  for name in (
      "grow_steps",
      "prompts_per_grow",
      "samples_per_prompt",
      "batch_prompts",
      "max_new_tokens",
  ):
    if r[name] < 1:
      raise ConfigError(f"config.rest.{name}={r[name]}; it must be >= 1")
  if r.temperature <= 0:
    raise ConfigError(f"config.rest.temperature={r.temperature}; it must be > 0")
  if r.threshold_kind not in THRESHOLD_KINDS:
    raise ConfigError(
        f"config.rest.threshold_kind={r.threshold_kind!r}; choose one of " f"{THRESHOLD_KINDS}"
    )
  thresholds = tuple(r.thresholds)
  if not thresholds:
    raise ConfigError("config.rest.thresholds is empty: give one threshold per Improve step")
  if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
    raise ConfigError(
        f"config.rest.thresholds={thresholds} must rise strictly "
        "(tau_1 < tau_2 < ...): each Improve step keeps a better part of the Grow set"
    )
  if r.threshold_kind == "quantile" and not all(0 < q < 1 for q in thresholds):
    raise ConfigError(
        f"config.rest.thresholds={thresholds}: quantiles must lie in (0, 1) "
        "(threshold_kind='quantile'); use threshold_kind='absolute' for reward values"
    )


@functools.partial(jax.jit, static_argnames="kind")
def reward_thresholds(rewards: jax.Array, thresholds: jax.Array, *, kind: str) -> jax.Array:
  """The Improve steps' reward thresholds tau [K] from the Grow set's rewards [M] float and the
  configured thresholds [K]: kind "quantile" -> those quantiles of `rewards` (linear
  interpolation, as `np.quantile`); "absolute" -> the thresholds themselves."""
  chex.assert_rank([rewards, thresholds], 1)
  if kind == "quantile":
    return jnp.quantile(rewards, thresholds)
  return thresholds.astype(rewards.dtype)


@jax.jit
def keep_masks(rewards: jax.Array, taus: jax.Array) -> jax.Array:
  """[K, M] bool: row k marks the samples (rewards [M]) that Improve step k trains on,
  reward >= tau_k (taus [K])."""
  chex.assert_rank([rewards, taus], 1)
  return rewards[None, :] >= taus[:, None]


def improve_sets(
    samples: Sequence[dict], thresholds: Sequence[float], *, kind: str
) -> list[tuple[float, list[dict]]]:
  """(tau_k, kept samples) per Improve step: the samples with reward >= tau_k and a non-empty
  completion (SFT records need one); taus from all the samples' rewards."""
  rewards = jnp.asarray([s["reward"] for s in samples], jnp.float32)
  taus = reward_thresholds(rewards, jnp.asarray(thresholds, jnp.float32), kind=kind)
  masks = np.asarray(keep_masks(rewards, taus))
  return [
      (float(tau), [s for s, keep in zip(samples, mask) if keep and s["completion"]])
      for tau, mask in zip(np.asarray(taus), masks)
  ]


def grow(
    policy_export: str,
    mesh,
    rms: dict,
    spec,
    tokenizer,
    prompts: list[dict],
    r: ml_collections.ConfigDict,
    rng,
    functions: reward_functions.RewardFunctions = reward_functions.NONE,
) -> list[dict]:
  """The Grow set: N samples per prompt from the export's policy, each a record (prompt,
  completion, reward, scores {model: raw score}, gold_combined on toy prompts); the reward is the
  reward models' and/or the reward `functions`' (added)."""
  policy = common.load_policy(policy_export, mesh)
  grown = rejection_sampling.best_of_k(
      policy.params,
      policy.sampler,
      rms,
      spec,
      tokenizer,
      prompts,
      k=r.samples_per_prompt,
      temperature=r.temperature,
      max_new_tokens=r.max_new_tokens,
      max_prompt_len=r.max_prompt_len,
      batch_prompts=r.batch_prompts,
      rng=rng,
      functions=functions,
  )
  out = []
  for prompt in grown:
    record = prompt["record"]
    for i, text in enumerate(prompt["texts"]):
      sample = {
          "prompt": record["prompt"],
          "completion": text,
          "reward": float(prompt["rewards"][i]),
          "scores": {name: float(x[i]) for name, x in prompt["scores"].items()},
      }
      gold = rejection_sampling.gold_combined(record, text)
      out.append(sample if gold is None else {**sample, "gold_combined": gold})
  return out


def _summary(samples: Sequence[dict]) -> dict:
  return {
      "reward": float(np.mean([s["reward"] for s in samples])),
      "gold": rejection_sampling.mean_or_none([s.get("gold_combined") for s in samples]),
  }


@registry.register(
    "rest",
    policy=True,
    stage_fields=("rest.reward.helpful", "rest.reward.safety"),
    blocks=("rest",),
)
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """ReST (Gulcehre et al. 2023): each Grow step samples the current policy on fresh prompts and
  scores the samples with the reward model (`grow_<g>/samples.jsonl`); each Improve step
  fine-tunes on the samples above a rising threshold (`grow_<g>/improve_<k>/`). Finished steps are
  skipped on a rerun. Returns each step's summary (`steps.json`)."""
  mesh = common.start_run(config, workdir, write=False, train_batch=False)
  r = config.rest
  check_config(r)
  tokenizer_dir, tokenizer = rejection_sampling.policy_tokenizer(config, key="ReST")
  grow_prompts = rejection_sampling.step_prompts(
      load_prompts(config.data.source),
      steps=r.grow_steps,
      per_step=r.prompts_per_grow,
      fresh=r.fresh_prompts,
      key="config.rest",
      source=config.data.source,
  )
  functions = reward_functions.from_config(r.reward, key="config.rest.reward")
  rms = ppo_rollout.load_reward_models(r.reward, mesh, key="config.rest.reward")
  spec = ppo_rollout.reward_spec(r.reward, rms)

  steps: list[dict] = []

  def record(row: dict) -> None:
    steps.append(row)
    _log.info("ReST %s", row)
    metrics.write_json(steps, os.path.join(workdir, "steps.json"))

  policy_export = config.init_from
  for g in range(1, r.grow_steps + 1):
    grow_dir = os.path.join(workdir, f"grow_{g}")
    samples_path = os.path.join(grow_dir, "samples.jsonl")
    if not os.path.exists(samples_path):
      rng = jax.random.key(config.seed + g)
      samples = grow(
          policy_export,
          mesh,
          rms,
          spec,
          tokenizer,
          grow_prompts[g - 1],
          r,
          rng,
          functions=functions,
      )
      annotators.write_jsonl(samples, samples_path)
    samples = metrics.read_jsonl(samples_path)
    record(
        {
            "grow": g,
            "improve": 0,
            "samples": len(samples),
            "empty": sum(not s["completion"] for s in samples),
            **_summary(samples),
        }
    )
    sets = improve_sets(samples, r.thresholds, kind=r.threshold_kind)
    for k, (threshold, (tau, kept)) in enumerate(zip(r.thresholds, sets), start=1):
      if not kept:
        raise _nothing_kept(r, k, threshold, tau, g, samples)
      improve_dir = os.path.join(grow_dir, f"improve_{k}")
      kept_path = os.path.join(improve_dir, "kept.jsonl")
      if not os.path.exists(kept_path):  # a resumed SFT continues on the data it started on
        annotators.write_jsonl(kept, kept_path)
      kept = metrics.read_jsonl(kept_path)
      record(
          {
              "grow": g,
              "improve": k,
              "threshold": threshold,
              "tau": tau,
              "kept": len(kept),
              **_summary(kept),
          }
      )
      export = rejection_sampling.finetune(
          config, policy_export, kept_path, tokenizer_dir, improve_dir
      )
      if export is None:  # stopped early (stop_after_steps): rerun to continue
        return {"stopped_in": f"grow_{g}/improve_{k}"}
      policy_export = export
  rejection_sampling.export_final(policy_export, workdir)
  label = lambda s: f"grow_{s['grow']}" + (f"/improve_{s['improve']}" if s["improve"] else "")
  return {
      "grow_steps": r.grow_steps,
      **{
          f"{label(s)}/{name}": v
          for s in steps
          for name, v in s.items()
          if name not in ("grow", "improve") and v is not None
      },
  }


def _nothing_kept(r, k: int, threshold, tau: float, g: int, samples: list) -> ValueError:
  """The error for Improve step k of Grow step g keeping no sample: the threshold, the rewards."""
  rewards = [s["reward"] for s in samples]
  return ValueError(
      f"config.rest.thresholds[{k - 1}]={threshold} ({r.threshold_kind}: reward >= {tau:.4g})"
      f" keeps no sample of Grow step {g} ({len(samples)} samples, rewards "
      f"{min(rewards):.4g} to {max(rewards):.4g}, {sum(not s['completion'] for s in samples)}"
      f" empty); lower it"
  )
