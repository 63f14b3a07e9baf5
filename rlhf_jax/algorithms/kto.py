"""KTO (Ethayarajh et al. 2024) on unpaired desirable / undesirable responses, from an SFT export.

data (kind "kto" records {prompt, completion, label: bool}) -> each example paired with a
mismatched completion (`mismatched_partners`: the completion of another record, under this
record's prompt) -> comparisons of two responses to one prompt, packed into rows as DPO's pairs
(data/preference.py) -> the reference's summed response log-probs (precomputed or per batch, as
DPO: `dpo.attach_reference`) -> sharded training of the policy with `losses.preference.kto_loss`
-> held-out metrics and export (`dpo.finish`).

The reference point z0 is estimated per batch, as TRL's KTOTrainer does: the mean over the batch's
examples of `log pi(y' | x) - log pi_ref(y' | x)` on the mismatched pairs (x, y'), clamped at 0 and
without gradient. As in TRL the mismatched completions are assigned once when the data is prepared
(TRL shifts them within each batch of its preprocessing; here a seeded shuffle is rotated by one,
skipping partners with the same prompt or completion), so their reference log-probs can be
precomputed with the examples'.

In a comparison batch, response slot 0 is the example and slot 1 its mismatched pair; the label
travels in the comparison's `margin` (1 desirable, 0 undesirable; -1 on empty slots).

WORKDIR: config.json, checkpoints/, metrics.jsonl + tb/ (train and held-out loss, the implicit
rewards `beta (log pi - log pi_ref)` of desirable and undesirable examples, the fraction whose
reward has their label's sign, z0), eval.json (held-out metrics), export/.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import data, scoring
from rlhf_jax.algorithms import common, dpo, registry
from rlhf_jax.algorithms.reward import (
    comparison_iterators,
    load_comparisons,
    response_logit_budget,
)
from rlhf_jax.data.preference import num_tokens
from rlhf_jax.errors import ConfigError
from rlhf_jax.losses import preference
from rlhf_jax.train import checkpoint

Array = jax.Array


def mismatched_partners(records: list, seed: int) -> np.ndarray:
  """partner[i]: the record whose completion pairs with record i's prompt to estimate z0. A seeded
  permutation rotated by one, each record taking the next one in it whose prompt and completion
  (stripped) both differ from its own. ValueError if some record has none."""
  order = np.random.default_rng(seed).permutation(len(records))
  partner = np.empty(len(records), np.int64)
  for k, i in enumerate(order):
    prompt, completion = records[i]["prompt"], records[i]["completion"].strip()
    for shift in range(1, len(order)):
      j = order[(k + shift) % len(order)]
      if records[j]["prompt"] != prompt and records[j]["completion"].strip() != completion:
        partner[i] = j
        break
    else:
      raise ValueError(
          f"KTO record {int(i)} has no record with another prompt and another "
          "completion: the reference point z0 needs mismatched (prompt, completion) "
          "pairs; add records with other prompts"
      )
  return partner


def kto_to_pairs(records: list, seed: int) -> list:
  """KTO records -> pairwise records {prompt, chosen: the completion, rejected: a mismatched
  completion, label}, one per record and in order ("chosen" / "rejected" only name the slots)."""
  partner = mismatched_partners(records, seed)
  return [
      {
          "prompt": r["prompt"],
          "chosen": r["completion"],
          "rejected": records[j]["completion"],
          "label": r["label"],
      }
      for r, j in zip(records, partner)
  ]


def kl_estimate(kl_logps: Array, kl_ref_logps: Array, weight: Array) -> Array:
  """z0 before clamping: the `weight`-weighted batch mean of `kl_logps - kl_ref_logps` ([B] each,
  the mismatched pairs' summed log-probs), without gradient: [] float32."""
  logratios = kl_logps.astype(jnp.float32) - kl_ref_logps.astype(jnp.float32)
  weight = weight.astype(jnp.float32)
  mean = jnp.sum(weight * logratios) / jnp.maximum(jnp.sum(weight), 1.0)
  return jax.lax.stop_gradient(mean)


def kto_batch_loss(
    cfg: ml_collections.ConfigDict, logps: Array, ref_logps: Array, desirable: Array, weight: Array
):
  """KTO on a batch. logps, ref_logps: [N, 2] summed response log-probs of (the example, its
  mismatched pair) under the policy and the reference; desirable: [N] bool; weight: [N] 0/1
  (empty slots 0). -> (loss, metrics); the rewards are reported as "rewards/desirable" and
  "rewards/undesirable"."""
  z = kl_estimate(logps[:, 1], ref_logps[:, 1], weight)
  loss, metrics = preference.kto_loss(
      logps[:, 0],
      ref_logps[:, 0],
      desirable,
      z,
      beta=cfg.beta,
      desirable_weight=cfg.desirable_weight,
      undesirable_weight=cfg.undesirable_weight,
      weight=weight,
  )
  metrics["rewards/desirable"] = metrics.pop("rewards/chosen")
  metrics["rewards/undesirable"] = metrics.pop("rewards/rejected")
  return loss, metrics


def make_kto_loss_fn(graphdef, cfg: ml_collections.ConfigDict, *, reference_in_step: bool = False):
  """loss_fn(params, batch, rng) on comparison batches of (example, mismatched pair); the
  reference's log-probs as `dpo.batch_ref_logps`."""

  def loss_fn(params, batch, rng):
    del rng
    logps, _ = scoring.comparison_logps(graphdef, params, batch)  # [R, P, 2]
    ref_logps = dpo.batch_ref_logps(graphdef, params, batch, reference_in_step)
    flat = lambda x: x.reshape(-1, 2)
    return kto_batch_loss(
        cfg,
        flat(logps),
        flat(ref_logps),
        batch["margin"].reshape(-1) == 1,
        flat(batch["valid"])[:, 0],
    )

  return loss_fn


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the config key, before any model or data loads."""
  k = config.kto
  if config.data.kind != "kto":
    raise ConfigError(
        f"config.data.kind={config.data.kind!r}: KTO trains on 'kto' records "
        "(prompt, completion, label: true = desirable)"
    )
  if k.reference not in dpo.REFERENCE_MODES:
    raise ConfigError(f"config.kto.reference={k.reference!r}; choose one of {dpo.REFERENCE_MODES}")
  if not config.init_from:
    raise ConfigError(
        "config.init_from is empty: KTO starts from a policy export (e.g. the SFT "
        "run's), which is also its reference"
    )
  one = jnp.zeros((1, 2))
  try:
    kto_batch_loss(k, one, one, jnp.ones((1,), bool), jnp.ones((1,)))
  except ValueError as e:
    raise ConfigError(
        f"config.kto (beta={k.beta!r}, desirable_weight={k.desirable_weight!r}, "
        f"undesirable_weight={k.undesirable_weight!r}): {e}"
    ) from None


def _label_stats(comparisons: list, stats: dict) -> dict:
  desirable = sum(c.margin == 1 for c in comparisons)
  return {**stats, "desirable": desirable, "undesirable": len(comparisons) - desirable}


@registry.register("kto", policy=True, blocks=("kto", "reward"))
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = common.start_run(config, workdir)
  check_config(config)
  d, t, k = config.data, config.train, config.kto
  tokenizer_dir = d.tokenizer or checkpoint.read_export_metadata(config.init_from).get("tokenizer")
  tokenizer = data.load_tokenizer(tokenizer_dir)
  model_cfg = common.model_config(config, vocab_size=len(tokenizer), head="lm")
  comparisons = load_comparisons(
      config,
      tokenizer,
      model_cfg,
      num_responses=2,
      to_pairs=functools.partial(kto_to_pairs, seed=config.seed),
  )
  # The label rides in the comparison's margin slot (pairwise records without a margin have -1).
  label = lambda cmp, records: [c._replace(margin=int(records[c.index]["label"])) for c in cmp]
  train_cmp = label(comparisons.train, comparisons.train_records)
  eval_cmp = label(comparisons.eval, comparisons.eval_records)

  in_step = bool(model_cfg.lora_rank) and k.reference == "per_batch"
  make_loss = lambda graphdef: make_kto_loss_fn(graphdef, k, reference_in_step=in_step)
  setup = common.setup_training(config, mesh, model_cfg, make_loss)
  budget = response_logit_budget(config, train_cmp, eval_cmp)
  train_cmp, eval_cmp, wrap = dpo.attach_reference(
      config, setup, k.reference, train_cmp, eval_cmp, mesh, logit_budget=budget
  )
  batches, eval_iter = comparison_iterators(
      config, train_cmp, eval_cmp, num_responses=2, logit_budget=budget
  )
  evaluate = common.make_evaluate(make_loss(setup.graphdef), setup, wrap(eval_iter), t.eval_batches)
  state = common.train_loop(
      config,
      workdir,
      setup,
      wrap(batches),
      data_state=batches.state,
      restore_data=batches.restore,
      evaluate=evaluate,
      count_tokens=num_tokens,
  )
  if int(state.step) < t.steps:  # stopped early (stop_after_steps): the rerun finishes
    return {"step": int(state.step)}
  return dpo.finish(
      config,
      workdir,
      state,
      evaluate,
      model_cfg=model_cfg,
      tokenizer_dir=tokenizer_dir,
      data_stats={
          "train": _label_stats(train_cmp, comparisons.stats),
          "eval": _label_stats(eval_cmp, comparisons.eval_stats),
      },
  )
