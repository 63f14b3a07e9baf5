"""DPO and its relatives (IPO, cDPO, hinge, SimPO, ORPO, CPL) on preference pairs, from an SFT
export.

data (pairwise records, or rankings turned into pairs) -> comparisons (data/preference.py: chosen
and rejected responses as segments of packed rows) -> the reference's summed response log-probs
-> sharded training of the policy with a pair loss of `losses.preference` (`config.dpo.loss_type`:
`dpo_loss`'s sigmoid / ipo / hinge, or `simpo_loss`, `orpo_loss`, `cpl_loss`) on the shared train
step -> export (an LM, what the next stage and the gold evaluation load).

SimPO and ORPO have no reference model (nothing is precomputed or held for them); they read the
responses' lengths (length-averaged log-probs) and ORPO the chosen responses' token-mean NLL, its
SFT term, all from the same forward pass. CPL uses the reference as a prior unless
`reference_free`.

The reference is the policy's starting point (`config.init_from`). Its log-probs are either
precomputed once over the whole data set before training (`config.dpo.reference="precompute"`,
the default: one forward pass per comparison in all, and no reference model in memory during
training) or computed for every batch by a separate jitted forward pass ("per_batch": the
reference is held beside the policy, as TRL does without `precompute_ref_log_probs`). Both give
the same loss; `reference_free=True` needs neither.

WORKDIR: config.json, checkpoints/, metrics.jsonl + tb/ (train and held-out loss, implicit
rewards, preference accuracy), eval.json (held-out metrics), export/. `attach_reference` and
`finish` are shared with the KTO driver (kto.py).
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import data, scoring, sharding
from rlhf_jax.algorithms import common, registry
from rlhf_jax.algorithms.reward import (
    comparison_iterators,
    load_comparisons,
    response_logit_budget,
)
from rlhf_jax.data.preference import logit_budget_for, num_tokens, pack_comparisons
from rlhf_jax.errors import ConfigError
from rlhf_jax.losses import registry as loss_registry
from rlhf_jax.models import lora
from rlhf_jax.train import checkpoint

_log = logging.getLogger(__name__)

REFERENCE_MODES = ("precompute", "per_batch")


def uses_reference(cfg: ml_collections.ConfigDict) -> bool:
  """Whether `config.dpo` needs the reference's log-probs (precomputed or per batch)."""
  return not cfg.reference_free and loss_registry.get_pair_loss(cfg.loss_type).reference


def pair_loss(cfg: ml_collections.ConfigDict, logps, lengths, ref_logps, weight):
  """The registered pair loss `cfg.loss_type` (losses/registry.py) with its hyper-parameters,
  `cfg[cfg.loss_type]`, on pairs. logps, ref_logps: [N, 2] summed response log-probs (chosen,
  rejected) of the policy and the reference (read only if `uses_reference(cfg)`, else zeros);
  lengths: [N, 2] response token counts; weight: [N] 0/1 (empty slots 0). -> (loss, metrics)."""
  entry = loss_registry.get_pair_loss(cfg.loss_type)
  refs = ref_logps if uses_reference(cfg) else jnp.zeros_like(logps)
  pairs = loss_registry.PairLogps(
      chosen=logps[:, 0],
      rejected=logps[:, 1],
      ref_chosen=refs[:, 0],
      ref_rejected=refs[:, 1],
      chosen_len=lengths[:, 0],
      rejected_len=lengths[:, 1],
      weight=weight.astype(jnp.float32),
  )
  return entry.fn(pairs, **cfg[cfg.loss_type].to_dict())


def check_loss_config(cfg: ml_collections.ConfigDict) -> None:
  """ConfigError naming the `config.dpo` fields when the loss type is not registered or its
  hyper-parameters are invalid: the pure loss checks them on a one-pair batch, before any model
  loads."""
  losses = loss_registry.pair_losses()
  options = {"loss_type", "reference_free", "reference", "ranking_pairs"}
  stray = sorted(set(cfg) - options - set(losses))
  if stray:  # e.g. `config.dpo.beta` set in code: it would be silently ignored
    raise ConfigError(
        f"config.dpo.{stray[0]} is not a DPO option; a loss's hyper-parameters are in its own "
        f"block (config.dpo.{cfg.loss_type}: {', '.join(cfg.get(cfg.loss_type, {}))})"
    )
  if cfg.loss_type not in losses:
    raise ConfigError(
        f"config.dpo.loss_type={cfg.loss_type!r}; choose one of {', '.join(sorted(losses))} "
        "(or register a pair loss: losses/registry.py)"
    )
  if cfg.loss_type not in cfg:
    raise ConfigError(
        f"config.dpo.{cfg.loss_type} is missing: the loss {cfg.loss_type!r} was registered after "
        "the config was made; register it before calling base_config()"
    )
  unknown = set(cfg[cfg.loss_type]) - set(losses[cfg.loss_type].defaults)
  if unknown:
    raise ConfigError(
        f"config.dpo.{cfg.loss_type}.{sorted(unknown)[0]} is not a hyper-parameter of the "
        f"{cfg.loss_type!r} loss ({', '.join(losses[cfg.loss_type].defaults)})"
    )
  pair = jnp.full((1, 2), -1.0)
  try:
    pair_loss(cfg, pair, jnp.ones((1, 2), jnp.int32), pair, jnp.ones((1,)))
  except (ValueError, TypeError) as e:
    fields = ", ".join(
        f"config.dpo.{cfg.loss_type}.{k}={v!r}" for k, v in cfg[cfg.loss_type].items()
    )
    raise ConfigError(f"{fields} (loss_type={cfg.loss_type!r}): {e}") from None


def batch_ref_logps(graphdef, params, batch: dict, reference_in_step: bool):
  """The reference's summed response log-probs [R, P, 2]: batch["ref_logps"], or with
  `reference_in_step` (a LoRA policy, reference "per_batch") a forward pass of the base under the
  adapters, `lora.reference_params(params)`, inside the step: no copy of the base is held, and a
  pass outside the step could not read the params the step donates."""
  if not reference_in_step:
    return batch["ref_logps"]
  ref_params = lora.reference_params(jax.lax.stop_gradient(params))
  return scoring.comparison_logps(graphdef, ref_params, batch)[0]


def make_dpo_loss_fn(graphdef, cfg: ml_collections.ConfigDict, *, reference_in_step: bool = False):
  """loss_fn(params, batch, rng) on comparison batches of pairs: the policy's summed response
  log-probs (and lengths) against the reference's (`batch_ref_logps`) with `pair_loss`, each pair
  weighted by whether its slot is used."""

  def loss_fn(params, batch, rng):
    del rng
    logps, lengths = scoring.comparison_logps(graphdef, params, batch)  # [R, P, 2] each
    ref_logps = batch_ref_logps(graphdef, params, batch, reference_in_step)
    flat = lambda x: x.reshape(-1, 2)
    return pair_loss(cfg, flat(logps), flat(lengths), flat(ref_logps), flat(batch["valid"])[:, 1])

  return loss_fn


RANKING_PAIRS = ("best_vs_rest", "all")


def ranking_to_pairs(records: list, mode: str) -> list:
  """Ranking records (responses best first) -> pairwise records: "best_vs_rest" pairs the best
  response with each other one (K - 1 pairs), "all" makes every ordered pair (K choose 2, as
  InstructGPT's reward model sees a ranking). Other fields (e.g. "family") are kept."""
  out = []
  for record in records:
    responses = record["responses"]
    rest = {k: v for k, v in record.items() if k not in ("responses", "chosen", "rejected")}
    pairs = (
        [(0, j) for j in range(1, len(responses))]
        if mode == "best_vs_rest"
        else [(i, j) for i in range(len(responses)) for j in range(i + 1, len(responses))]
    )
    out += [{**rest, "chosen": responses[i], "rejected": responses[j]} for i, j in pairs]
  return out


def precompute_reference(
    logps_fn,
    comparisons: list,
    *,
    seq_len: int,
    rows: int,
    per_row: int,
    mesh,
    share_prompt: bool = False,
    logit_budget: int | None = None,
) -> list:
  """Each comparison with its `ref_logps` [2] filled in, from forward passes over rows packed with
  up to `per_row` comparisons (as training packs them: a pair is ~100 tokens of a 512-token row),
  the LM head on the response tokens only (`logit_budget`, default: `logit_budget_for` these
  comparisons). Comparisons are told apart by their `index`, which must be unique in the list."""
  if len({c.index for c in comparisons}) != len(comparisons):
    raise ValueError("precompute_reference: comparison indices are not unique")
  found, rest = {}, list(comparisons)
  budget = logit_budget or logit_budget_for(comparisons, seq_len, share_prompt)
  while rest:
    batch, count = pack_comparisons(
        rest, seq_len, rows, per_row, 2, share_prompt=share_prompt, logit_budget=budget
    )
    sums = np.asarray(jax.device_get(logps_fn(sharding.put_batch(batch, mesh))))  # [R, P, 2]
    for r, p in zip(*np.nonzero(batch["comparison"] >= 0)):
      found[int(batch["comparison"][r, p])] = sums[r, p].astype(np.float32)
    rest = rest[count:]
  return [c._replace(ref_logps=found[c.index]) for c in comparisons]


class _WithReference:
  """A batch iterator whose batches get the reference's log-probs (`per_batch` mode); state() and
  restore() are the wrapped iterator's."""

  def __init__(self, batches, logps_fn, mesh):
    self.batches, self.logps_fn, self.mesh = batches, logps_fn, mesh

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self.batches)
    ref = self.logps_fn(sharding.put_batch(batch, self.mesh))
    return {**batch, "ref_logps": np.asarray(jax.device_get(ref), np.float32)}


def attach_reference(
    config: ml_collections.ConfigDict,
    setup: common.Setup,
    mode: str,
    train_cmp: list,
    eval_cmp: list,
    mesh,
    *,
    logit_budget: int,
):
  """The reference's log-probs for the comparisons: (train_cmp, eval_cmp, wrap). The reference is
  the starting params (restoring a checkpoint later replaces the state only). mode "precompute":
  the comparisons come back with their `ref_logps` filled in and `wrap` is the identity;
  "per_batch": they come back unchanged and `wrap(batch_iterator)` adds each batch's.
  A LoRA policy's reference is its base (adapters off), sharing the policy's base arrays (no copy,
  used before the first step donates them); "per_batch" then leaves the reference to the loss
  (`reference_in_step`) and `wrap` is the identity. logit_budget: the training batches' (the
  precomputation lists the response tokens as they do)."""
  if setup.model_cfg.lora_rank:
    if mode == "per_batch":
      return train_cmp, eval_cmp, lambda batches: batches
    reference = lora.reference_params(setup.state.params)
  else:
    reference = jax.tree.map(jnp.copy, setup.state.params)
  # Replicated outputs: every host reads the whole [R, P, 2] (a batch-sharded result would span
  # devices of other processes on a multi-host mesh, which no host can fetch).
  scores = jax.jit(
      functools.partial(scoring.comparison_logps, setup.graphdef),
      out_shardings=sharding.replicated(mesh),
  )
  logps_fn = lambda batch: scores(reference, batch)[0]  # params as an argument, not a constant
  if mode == "per_batch":
    return train_cmp, eval_cmp, lambda batches: _WithReference(batches, logps_fn, mesh)
  _log.info(
      "precomputing reference log-probs of %d + %d comparisons", len(train_cmp), len(eval_cmp)
  )
  fill = lambda cmp: precompute_reference(
      logps_fn,
      cmp,
      seq_len=config.train.seq_len,
      rows=config.train.batch_size,
      per_row=config.reward.comparisons_per_row,
      mesh=mesh,
      share_prompt=config.reward.share_prompt,
      logit_budget=logit_budget,
  )
  return fill(train_cmp), fill(eval_cmp), lambda batches: batches


def finish(
    config: ml_collections.ConfigDict,
    workdir: str,
    state,
    evaluate,
    *,
    model_cfg,
    tokenizer_dir: str,
    data_stats: dict,
) -> dict:
  """After training: WORKDIR/eval.json ({"held_out": evaluate(state), "data": data_stats}) and the
  policy's export; returns the driver's final metrics."""
  held_out = {k: float(v) for k, v in jax.device_get(evaluate(state)).items()}
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump({"held_out": held_out, "data": data_stats}, f, indent=1)
  common.export_model(
      config,
      os.path.join(workdir, "export"),
      state.params,
      model_cfg,
      tokenizer=os.path.abspath(tokenizer_dir),
      step=int(state.step),
  )
  return {"step": int(state.step), **{f"eval/{k}": v for k, v in held_out.items()}}


@registry.register("dpo", policy=True, blocks=("dpo", "reward"))
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = common.start_run(config, workdir)
  d, t, p = config.data, config.train, config.dpo
  if d.kind not in ("pairwise", "ranking"):
    raise ConfigError(
        f"config.data.kind={d.kind!r}: DPO trains on 'pairwise' records (prompt, "
        "chosen, rejected) or 'ranking' records (turned into pairs)"
    )
  if d.kind == "ranking" and p.ranking_pairs not in RANKING_PAIRS:
    raise ConfigError(
        f"config.dpo.ranking_pairs={p.ranking_pairs!r}; choose one of {RANKING_PAIRS}"
    )
  if p.reference not in REFERENCE_MODES:
    raise ConfigError(f"config.dpo.reference={p.reference!r}; choose one of {REFERENCE_MODES}")
  check_loss_config(p)
  if not config.init_from:
    raise ConfigError(
        "config.init_from is empty: DPO starts from a policy export (e.g. the SFT "
        "run's), which is also its reference"
    )
  tokenizer_dir = d.tokenizer or checkpoint.read_export_metadata(config.init_from).get("tokenizer")
  tokenizer = data.load_tokenizer(tokenizer_dir)
  model_cfg = common.model_config(config, vocab_size=len(tokenizer), head="lm")
  to_pairs = (
      functools.partial(ranking_to_pairs, mode=p.ranking_pairs) if d.kind == "ranking" else None
  )
  comparisons = load_comparisons(config, tokenizer, model_cfg, num_responses=2, to_pairs=to_pairs)

  in_step = bool(model_cfg.lora_rank) and uses_reference(p) and p.reference == "per_batch"
  make_loss = lambda graphdef: make_dpo_loss_fn(graphdef, p, reference_in_step=in_step)
  setup = common.setup_training(config, mesh, model_cfg, make_loss)
  train_cmp, eval_cmp = comparisons.train, comparisons.eval
  budget = response_logit_budget(config, train_cmp, eval_cmp)
  wrap = lambda batches: batches
  if uses_reference(p):
    train_cmp, eval_cmp, wrap = attach_reference(
        config, setup, p.reference, train_cmp, eval_cmp, mesh, logit_budget=budget
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
  return finish(
      config,
      workdir,
      state,
      evaluate,
      model_cfg=model_cfg,
      tokenizer_dir=tokenizer_dir,
      data_stats={"train": comparisons.stats, "eval": comparisons.eval_stats},
  )
