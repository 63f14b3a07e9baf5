"""Reward-model driver: pairwise (Bradley-Terry, optional Llama 2 margin) or InstructGPT K-choose-2
ranking loss on a scalar-head model initialised from an SFT export.

data (pairwise | ranking records) -> comparisons [B, K, T] -> sharded training -> held-out report
-> export with reward statistics.

WORKDIR after a run: config.json, checkpoints/, metrics.jsonl, tb/, eval.json (the held-out report:
accuracy overall / by margin level / by family, or Kendall tau for rankings), export/ (params +
{"model", "tokenizer", "step", "reward": {"kind", "margins", "stats": {"mean", "std", "n"}}}).
The statistics are the mean and std of the model's scores over the held-out responses, so a later
stage (PPO) can whiten rewards without rescoring a reference set.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from rlhf_jax import data, scoring, sharding
from rlhf_jax.algorithms import common, registry
from rlhf_jax.data.preference import (
    comparison_batch,
    comparison_batching,
    comparison_length,
    logit_budget_for,
    num_tokens,
    tokenize_comparisons,
)
from rlhf_jax.data.records import MAX_RANKED
from rlhf_jax.errors import ConfigError
from rlhf_jax.evaluation import reward_metrics
from rlhf_jax.losses import reward as reward_losses
from rlhf_jax.losses.common import masked_mean, token_logprobs
from rlhf_jax.models import ModelConfig, abstract_model, apply_with_hidden
from rlhf_jax.models.layers import dense
from rlhf_jax.train import checkpoint
from rlhf_jax.train.metrics import format_table

_log = logging.getLogger(__name__)


LM_HEAD = "lm_head"  # the extra param of a reward model trained with `reward.lm_coef` > 0


def chosen_response_mask(batch: dict, seq_len: int) -> jax.Array:
  """[R, T] bool: the tokens of each comparison's best response (rank 0), response_start ..
  score_index (its last token, EOS included), from a comparison batch (data/preference.py)."""
  r = batch["score_index"].shape[0]
  chosen = batch["valid"] & (batch["ranks"] == 0)  # [R, P, K]
  t = jnp.arange(seq_len)[None, None, None, :]
  inside = (t >= batch["response_start"][..., None]) & (t <= batch["score_index"][..., None])
  return jnp.any(inside & chosen[..., None], axis=(1, 2)).reshape(r, seq_len)


def listed_chosen_mask(batch: dict) -> jax.Array:
  """[R, M] bool: the entries of a comparison batch's logit list (`logit_budget`,
  data/preference.py) that are tokens of each comparison's best response (rank 0):
  `chosen_response_mask`'s tokens, as list entries. Response k's tokens are its last
  score_index - response_start + 1 entries before logit_end."""
  chosen = batch["valid"] & (batch["ranks"] == 0)  # [R, P, K]
  end = batch["logit_end"]
  start = end - (batch["score_index"] - batch["response_start"] + 1)
  e = jnp.arange(batch["logit_index"].shape[1])[None, None, None, :]
  inside = (e >= start[..., None]) & (e < end[..., None]) & chosen[..., None]
  return jnp.any(inside, axis=(1, 2))


def make_reward_loss_fn(
    graphdef,
    *,
    kind: str,
    margins: Sequence[float],
    center_coef: float,
    soft_labels: bool = False,
    lm_coef: float = 0.0,
):
  """loss_fn(params, batch, rng) for comparison batches: pairwise_loss (with the margin table
  looked up by each pair's level, and with soft_labels each pair's `soft_label`) for kind
  "pairwise", ranking_loss for "ranking".

  lm_coef > 0: plus lm_coef x the next-token loss of the best responses, read from the reward
  model's final hidden states through an LM head kept beside the scalar head (`params[LM_HEAD]`,
  [E, V]; the GRM regulariser of Yang et al. 2024): the trunk has to stay a language model, which
  keeps what the SFT model knows available to the scalar head. Metric "lm_loss". With a logit
  list in the batch (`logit_budget`: logit_index, logit_target, logit_end) the LM head runs on the
  listed response tokens only, for the same loss (`listed_chosen_mask`)."""
  table = jnp.asarray(margins, jnp.float32)
  use_margin = any(margins)

  def loss_fn(params, batch, rng):
    del rng
    if lm_coef:
      lm_head, params = params[LM_HEAD], model_params(params)
      raw, hidden = apply_with_hidden(
          graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"]
      )
      scores = scoring.pick_scores(raw, batch["score_index"])
    else:
      scores = scoring.comparison_scores(graphdef, params, batch)  # [R, P, K]
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # comparisons [R * P, ...]
    scores, valid, ranks, level = (
        flat(scores),
        flat(batch["valid"]),
        flat(batch["ranks"]),
        flat(batch["margin"]),
    )
    if kind == "pairwise":
      # Level -1 (a pair without one, e.g. held-out data) gets no margin.
      margin = (
          jnp.where(level >= 0, table[jnp.clip(level, 0, len(margins) - 1)], 0.0)
          if use_margin
          else None
      )
      soft = flat(batch["soft_label"]) if soft_labels else None
      loss, metrics = reward_losses.pairwise_loss(
          scores[:, 0],
          scores[:, 1],
          margin,
          weight=valid[:, 1],
          soft_label=soft,
          center_coef=center_coef,
      )
    else:
      loss, metrics = reward_losses.ranking_loss(scores, ranks, valid, center_coef=center_coef)
    if not lm_coef:
      return loss, metrics
    tokens = batch["tokens"]
    if "logit_index" in batch:  # [R, M]: each listed token's predecessor slot and its own slot
      hidden = jnp.take_along_axis(hidden, batch["logit_index"][..., None], axis=1)
      targets = jnp.take_along_axis(tokens, batch["logit_target"], axis=1)
      mask = listed_chosen_mask(batch)
    else:  # column t: log p(tokens[t + 1])
      hidden, targets = hidden[:, :-1], tokens[:, 1:]
      mask = chosen_response_mask(batch, tokens.shape[1])[:, 1:]
    logits = dense(hidden, lm_head.astype(hidden.dtype))
    logp = token_logprobs(logits, targets)
    lm_loss = -masked_mean(logp, mask)
    return loss + lm_coef * lm_loss, {
        **metrics,
        "loss": loss + lm_coef * lm_loss,
        "lm_loss": lm_loss,
    }

  return loss_fn


def lm_head_params(
    config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh
) -> tuple[dict, dict]:
  """({LM_HEAD: [E, V]}, its sharding): the LM head of `config.init_from` (its `lm_head`, or the
  transposed embedding of a tied model), for a reward model trained with `reward.lm_coef`."""
  if not config.init_from:
    raise ConfigError(
        "config.reward.lm_coef > 0 keeps the LM head of config.init_from, which is "
        "empty; start the reward model from an LM export (the SFT model)"
    )
  saved = ModelConfig.from_dict(checkpoint.read_export_metadata(config.init_from)["model"])
  if saved.head != "lm":
    raise ConfigError(
        f"config.reward.lm_coef > 0 needs an LM export as config.init_from; "
        f"{config.init_from} has head={saved.head!r}"
    )
  lm_cfg = dataclasses.replace(model_cfg, head="lm", tie_embeddings=saved.tie_embeddings)
  _, abstract, axes = abstract_model(lm_cfg)
  lm = common.initial_params(config, lm_cfg, mesh, sharding.param_shardings(abstract, axes, mesh))
  spec = {LM_HEAD: P("embed", "vocab")}
  shape = {
      LM_HEAD: jax.ShapeDtypeStruct(
          (model_cfg.embed_dim, model_cfg.vocab_size), jnp.dtype(model_cfg.param_dtype)
      )
  }
  head_sharding = sharding.param_shardings(shape, spec, mesh)
  head = lm["embed"].T if saved.tie_embeddings else lm["lm_head"]
  return {LM_HEAD: jax.device_put(head, head_sharding[LM_HEAD])}, head_sharding


def model_params(params: dict) -> dict:
  """A reward model's own params: without the LM head that `reward.lm_coef` trains beside them."""
  return {k: v for k, v in params.items() if k != LM_HEAD}


@dataclasses.dataclass
class RewardModel:
  """A loaded reward model: score token sequences with `score_records`."""

  graphdef: Any
  params: Any
  model_cfg: ModelConfig
  mesh: Any
  stats: dict  # {"mean", "std", "n"} of held-out scores (export metadata), for whitening

  def score_batch(self, batch: dict) -> np.ndarray:
    """[R, P, K] scores of a host comparison batch (R divisible by the mesh's batch shards)."""
    scores = _comparison_scores(self.graphdef, self.params, sharding.put_batch(batch, self.mesh))
    return np.asarray(jax.device_get(scores))


# One jitted function for every reward model: models of one architecture (helpfulness and safety)
# share its compilations.
_comparison_scores = jax.jit(scoring.comparison_scores, static_argnums=0)


def cast_params(params, dtype: str):
  """Floating-point leaves cast to `dtype`, in place of their shardings (one jitted cast)."""
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.jit(lambda p: jax.tree.map(cast, p))(params)


def load_reward_model(export_dir: str, mesh, *, dtype: str = "") -> RewardModel:
  """A reward-model export, restored into its shardings; `dtype` ("bfloat16") holds its params and
  computes in that dtype (scores stay float32), e.g. for PPO's frozen models."""
  meta = checkpoint.read_export_metadata(export_dir)
  model_cfg = ModelConfig.from_dict(meta["model"])
  if model_cfg.head != "scalar":
    raise ConfigError(
        f"{export_dir} is a model with head={model_cfg.head!r}, not a reward model "
        "(head 'scalar'); give the export of a reward-model run"
    )
  graphdef, abstract, axes = abstract_model(model_cfg)  # the saved params' shapes and dtypes
  if dtype:
    model_cfg = dataclasses.replace(model_cfg, dtype=dtype, param_dtype=dtype)
    graphdef = abstract_model(model_cfg)[0]
  psh = sharding.param_shardings(abstract, axes, mesh)
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, psh
  )
  params, _ = checkpoint.load_params(export_dir, target)
  if dtype:
    params = cast_params(params, dtype)
  stats = meta.get("reward", {}).get("stats", {"mean": 0.0, "std": 1.0, "n": 0})
  return RewardModel(graphdef, params, model_cfg, mesh, stats)


def score_comparisons(
    rm: RewardModel, comparisons, seq_len: int, num_responses: int, batch_size: int
) -> list[np.ndarray]:
  """Scores of every comparison's responses, in order: one float array per comparison. Rows hold
  one comparison each, `seq_len` tokens (>= every comparison's total length)."""
  shards = math.prod(rm.mesh.shape[a] for a in ("data", "fsdp"))
  batch_size = -(-batch_size // shards) * shards
  out = []
  for start in range(0, len(comparisons), batch_size):
    chunk = list(comparisons[start : start + batch_size])
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))  # fixed shape: one compilation
    scores = rm.score_batch(comparison_batch(padded, seq_len, num_responses))
    out += [scores[i, 0, : len(c.sequences)] for i, c in enumerate(chunk)]
  return out


def score_records(
    rm: RewardModel,
    tokenizer,
    records: Sequence[dict],
    kind: str,
    *,
    seq_len: int | None = None,
    batch_size: int = 64,
) -> tuple[list[dict], list[np.ndarray]]:
  """(records kept, their responses' scores). Responses longer than `seq_len` (default: the model's
  max_seq_len) have their prompt cut from the left; records that still do not fit are dropped."""
  seq_len = seq_len or rm.model_cfg.max_seq_len
  k = 2 if kind == "pairwise" else MAX_RANKED
  comparisons, _ = tokenize_comparisons(
      records, kind, tokenizer, max_len=seq_len, max_responses=k, overflow="truncate_left"
  )
  if not comparisons:
    return [], []
  row_len = -(-max(comparison_length(c) for c in comparisons) // 128) * 128
  scores = score_comparisons(rm, comparisons, row_len, k, batch_size)
  return [records[c.index] for c in comparisons], scores


def report(kind: str, records: Sequence[dict], scores: Sequence[np.ndarray]) -> dict:
  if kind == "pairwise":
    return reward_metrics.preference_report(
        records, np.array([s[0] for s in scores]), np.array([s[1] for s in scores])
    )
  return reward_metrics.ranking_report(records, scores)


def _require_margins(records: Sequence[dict], source: str) -> None:
  for i, record in enumerate(records):
    if "margin" not in record:
      raise data.RecordError(
          f"{source}[{i}]",
          None,
          "margin",
          "missing, but config.reward.margins asks for the Llama 2 margin loss, which needs every "
          "pair's preference level 0..3; add the levels, or set config.reward.margins='none'",
      )


def _require_field(records: Sequence[dict], source: str, field: str, why: str) -> None:
  for i, record in enumerate(records):
    if field not in record:
      raise data.RecordError(
          f"{source}[{i}]", None, field, f"missing, but {why}; add it, or set that option off"
      )


@dataclasses.dataclass
class Comparisons:
  """Tokenised comparison data of a config: records and comparisons, train and held-out."""

  train_records: list
  eval_records: list
  train: list
  eval: list
  stats: dict
  eval_stats: dict


def load_comparisons(
    config: ml_collections.ConfigDict,
    tokenizer,
    model_cfg: ModelConfig,
    num_responses: int,
    to_pairs: Callable[[list], list] | None = None,
) -> Comparisons:
  """`config.data.source` (and `eval_source`, else the last `eval_fraction`) as comparisons of
  kind `config.data.kind`, each fitting the model and a row of `config.train.seq_len` tokens
  (`data.prompt_overflow` otherwise). `to_pairs`, when given, turns the loaded records into
  pairwise ones first (e.g. DPO on rankings). Shared by reward models and DPO."""
  d, t = config.data, config.train
  records = data.load_records(d.source, d.kind, split=d.split or None)
  if d.eval_source:
    train_records, eval_records = records, data.load_records(
        d.eval_source, d.kind, split=d.split or None
    )
  else:
    n_eval = max(1, int(len(records) * d.eval_fraction))
    train_records, eval_records = records[:-n_eval], records[-n_eval:]
  kind = d.kind
  if to_pairs is not None:
    train_records, eval_records, kind = to_pairs(train_records), to_pairs(eval_records), "pairwise"
  # A row (train.seq_len tokens) holds whole comparisons; each response must also fit the model.
  tokenize = functools.partial(
      tokenize_comparisons,
      kind=kind,
      tokenizer=tokenizer,
      max_len=min(t.seq_len, model_cfg.max_seq_len),
      max_total=t.seq_len,
      max_responses=num_responses,
      overflow=d.prompt_overflow,
      share_prompt=config.reward.share_prompt,
  )
  train_cmp, stats = tokenize(train_records, source=d.source)
  eval_cmp, eval_stats = tokenize(eval_records, source=d.eval_source or d.source)
  if not train_cmp or not eval_cmp:
    raise ValueError(
        f"no {kind} comparisons left after tokenisation (train {stats}, eval "
        f"{eval_stats}); raise config.train.seq_len"
    )
  _log.info("%s data: train %s, eval %s", kind, stats, eval_stats)
  return Comparisons(train_records, eval_records, train_cmp, eval_cmp, stats, eval_stats)


def response_logit_budget(
    config: ml_collections.ConfigDict, train_cmp: list, eval_cmp: list
) -> int:
  """The logit budget of every batch of a run (one compiled step): the LM head runs on the
  response tokens only (data/preference.py `logit_budget_for`). DPO, KTO, and reward models
  with the LM regulariser."""
  return logit_budget_for([*train_cmp, *eval_cmp], config.train.seq_len, config.reward.share_prompt)


def comparison_iterators(
    config: ml_collections.ConfigDict,
    train: list,
    held_out: list,
    num_responses: int,
    *,
    logit_budget: int | None = None,
) -> tuple[data.BatchIterator, data.BatchIterator]:
  """(train batches: shuffled by `config.seed`, rows packed with up to
  `config.reward.comparisons_per_row` comparisons when `config.data.packing`; held-out batches:
  in order, one comparison per row) of `config.train.batch_size` rows of `seq_len` tokens, each
  comparison's prompt held once with `config.reward.share_prompt`. Shared by reward models and
  DPO. logit_budget: batches list the response tokens (`data.preference.logit_budget_for` of
  both sets), so a policy's LM head runs on those only (DPO, KTO)."""
  d, t = config.data, config.train
  per_row = config.reward.comparisons_per_row if d.packing else 1
  batching = comparison_batching(
      t.batch_size,
      t.seq_len,
      per_row,
      num_responses,
      share_prompt=config.reward.share_prompt,
      logit_budget=logit_budget,
  )
  return common.batch_iterators(config, train, held_out, batching)


def check_config(config: ml_collections.ConfigDict):
  """The margin table of `config.reward.margins`, after checking the reward block against the
  data kind; ConfigError naming the field otherwise. Nothing is loaded."""
  kind, r = config.data.kind, config.reward
  if kind not in ("pairwise", "ranking"):
    raise ConfigError(
        f"config.data.kind={kind!r}: a reward model trains on 'pairwise' or 'ranking' records"
    )
  margins = reward_losses.margin_table(r.margins)
  if r.soft_labels and kind != "pairwise":
    raise ConfigError(
        "config.reward.soft_labels=True reads the 'soft_label' of pairwise records; "
        f"config.data.kind is {kind!r}"
    )
  if kind == "ranking" and any(margins):
    raise ConfigError(
        "config.reward.margins applies to pairwise data (Llama 2); rankings have no "
        "preference levels: set config.reward.margins='none'"
    )
  if r.lm_coef < 0:
    raise ConfigError(f"config.reward.lm_coef={r.lm_coef} must be >= 0")
  if r.lm_coef and r.share_prompt:
    raise ConfigError(
        "config.reward.lm_coef > 0 reads the next-token loss along each row, which "
        "rows with shared prompts break at every response start: set "
        "config.reward.share_prompt=False"
    )
  return margins


@registry.register("reward", policy=False, blocks=("reward",))
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = common.start_run(config, workdir)
  d, t, r = config.data, config.train, config.reward
  kind, margins = d.kind, check_config(config)
  tokenizer_dir = d.tokenizer or (
      config.init_from and checkpoint.read_export_metadata(config.init_from).get("tokenizer")
  )
  if not tokenizer_dir:
    raise ConfigError("config.data.tokenizer is empty and config.init_from names no tokenizer")
  tokenizer = data.load_tokenizer(tokenizer_dir)

  num_responses = 2 if kind == "pairwise" else r.max_responses
  model_cfg = common.model_config(config, vocab_size=len(tokenizer), head="scalar")
  comparisons = load_comparisons(config, tokenizer, model_cfg, num_responses)
  train_records, eval_records = comparisons.train_records, comparisons.eval_records
  train_cmp, eval_cmp, stats, eval_stats = (
      comparisons.train,
      comparisons.eval,
      comparisons.stats,
      comparisons.eval_stats,
  )
  if any(margins):
    _require_margins(train_records, d.source)
  if r.soft_labels:
    _require_field(
        train_records,
        d.source,
        "soft_label",
        "config.reward.soft_labels=True trains on each pair's P(chosen better)",
    )

  make_loss = functools.partial(
      make_reward_loss_fn,
      kind=kind,
      margins=margins,
      center_coef=r.center_coef,
      soft_labels=r.soft_labels,
      lm_coef=r.lm_coef,
  )
  extra = functools.partial(lm_head_params, config, model_cfg, mesh) if r.lm_coef else None
  setup = common.setup_training(config, mesh, model_cfg, make_loss, extra_params=extra)
  # The LM regulariser reads the responses' logits only: batches list those tokens.
  budget = response_logit_budget(config, train_cmp, eval_cmp) if r.lm_coef else None
  batches, eval_iter = comparison_iterators(
      config, train_cmp, eval_cmp, num_responses, logit_budget=budget
  )
  evaluate = common.make_evaluate(make_loss(setup.graphdef), setup, eval_iter, t.eval_batches)

  state = common.train_loop(
      config,
      workdir,
      setup,
      batches,
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
      setup,
      state,
      model_cfg,
      eval_records,
      eval_cmp,
      num_responses,
      margins,
      tokenizer_dir,
      data_stats={"train": stats, "eval": eval_stats},
  )


def finish(
    config: ml_collections.ConfigDict,
    workdir: str,
    setup,
    state,
    model_cfg: ModelConfig,
    eval_records: list[dict],
    eval_cmp: list,
    num_responses: int,
    margins,
    tokenizer_dir: str,
    *,
    data_stats: dict,
) -> dict:
  """After training: the held-out report (accuracy by margin level and family, or Kendall tau),
  the scores' statistics (PPO whitens by them), the export, WORKDIR/eval.json and the table."""
  t, kind = config.train, config.data.kind
  params = model_params(state.params)
  rm = RewardModel(setup.graphdef, params, model_cfg, setup.mesh, {})
  scores = score_comparisons(rm, eval_cmp, t.seq_len, num_responses, t.batch_size)
  kept = [eval_records[c.index] for c in eval_cmp]
  result_report = report(kind, kept, scores)
  flat = np.concatenate(scores)
  rm.stats = {"mean": float(flat.mean()), "std": float(flat.std()), "n": int(flat.size)}
  common.export_model(
      config,
      os.path.join(workdir, "export"),
      params,
      model_cfg,
      tokenizer=os.path.abspath(tokenizer_dir),
      step=int(state.step),
      reward={"kind": kind, "margins": list(margins), "stats": rm.stats},
  )
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(
        {"report": result_report, "stats": rm.stats, "data": data_stats},
        f,
        indent=1,
    )
  if jax.process_index() == 0:
    print(f"\nReward model on {len(kept)} held-out {kind} records:")
    print(
        format_table(
            reward_metrics.report_rows(result_report, os.path.basename(workdir.rstrip("/")))
        )
    )
  overall = result_report["overall"]
  return {
      "step": int(state.step),
      **{f"eval/{k}": v for k, v in overall.items() if v is not None},
      "reward_mean": rm.stats["mean"],
      "reward_std": rm.stats["std"],
  }
