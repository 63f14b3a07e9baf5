"""Hindsight Instruction Relabeling (HIR, Zhang et al. 2023): no reward model, no RL.

Round r (r = 1..rounds) alternates the paper's two phases:

  online sampling   the next `prompts_per_round` toy-world tasks of `config.data.source` (fresh
                    ones every round), `samples_per_prompt` responses each from the current
                    policy at `temperature` (the jitted sampler of `rejection_sampling.best_of_k`);
  relabeling        each response gets the instruction it actually follows
                    (`toyworld/relabel.py`): a constrained task's prompt is rewritten to the
                    constraints the response met; other families have no instruction to
                    relabel and keep theirs. The scripted feedback (gold) then decides: a sample
                    is kept when it *follows* its new instruction -- every constraint met and gold
                    combined >= `min_gold` -- so wrong content (a wrong sum, a compliance with a
                    harmful request) is dropped rather than relabeled;
  offline training  `config.train.steps` steps from the current policy on the kept pairs with
                    `losses.hir.hir_loss`: NLL of y under its relabeled instruction x*, a
                    contrastive term preferring x* over up to `negatives` instructions that y
                    does *not* follow, and an entropy bonus.

Negatives of a kept output y (fixed count per example, padded, so nothing recompiles): first the
instructions of its own group (the original prompt, the other samples' relabelings) that y does
not follow -- hard negatives differing in a constraint -- then tasks of the same family from
other prompts of the round that y does not follow ("What is 3 + 4?" for "35").

WORKDIR/round_<r>/: relabeled.jsonl (prompt = x*, completion, original_prompt, negatives, family,
gold, relabeled), checkpoints/, metrics.jsonl, export/; WORKDIR/rounds.json: per round the
fraction of samples that already followed their original instruction, the kept and relabeled
counts and the mean gold of the samples; WORKDIR/export: the last round's policy. A rerun skips
finished rounds and resumes an interrupted one from its checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Sequence

import jax
import ml_collections
import numpy as np

from rlhf_jax import data
from rlhf_jax.algorithms import common, registry
from rlhf_jax.algorithms.ppo import load_prompts
from rlhf_jax.algorithms.rejection_sampling import best_of_k
from rlhf_jax.data import files
from rlhf_jax.data.sft import logit_budget_for
from rlhf_jax.errors import ConfigError
from rlhf_jax.losses.hir import hir_loss
from rlhf_jax.losses.sft import target_logits
from rlhf_jax.toyworld import annotators
from rlhf_jax.toyworld import constraints as cons
from rlhf_jax.toyworld import world as world_lib
from rlhf_jax.toyworld.relabel import relabel
from rlhf_jax.train import checkpoint, metrics

_log = logging.getLogger(__name__)
TASK_FIELDS = ("family", "answer", "info")  # what the scripted feedback (gold) reads


# --- relabeling -----------------------------------------------------------------------------------


def follows(task: dict, response: str, *, min_gold: float) -> bool:
  """The scripted feedback: `response` meets every constraint of `task` and scores gold combined
  >= min_gold under it."""
  constraints = task["info"].get("constraints") or []
  return (
      bool(response.strip())
      and all(cons.check_constraints(response, constraints))
      and world_lib.gold_scores(task, response)["combined"] >= min_gold
  )


def relabel_round(
    groups: Sequence[tuple[dict, list[str]]], *, min_gold: float, negatives: int, seed: int
) -> tuple[list[dict], dict]:
  """groups: (task, its sampled responses) -> (training records, summary).

  A record per kept sample: {"prompt": relabeled instruction, "completion", "original_prompt",
  "negatives": up to `negatives` prompts the completion does not follow (module docstring),
  "family", "gold" (combined, under the relabeled instruction), "relabeled": prompt changed}.
  summary: samples, original_satisfied (fraction following their original instruction), kept,
  relabeled, sample_gold (mean gold combined under the original instruction), mean negatives.
  Deterministic in `seed`.
  """
  rng = np.random.default_rng(seed)
  by_family: dict[str, list[dict]] = {}
  for task, _ in groups:
    by_family.setdefault(task["family"], []).append(task)
  records, satisfied, sample_gold, count = [], 0, [], 0
  for task, responses in groups:
    kept = []
    for response in responses:
      count += 1
      sample_gold.append(world_lib.gold_scores(task, response)["combined"])
      satisfied += follows(task, response, min_gold=min_gold)
      new = relabel(task, response)
      if new is not None and follows(new, response, min_gold=min_gold):
        kept.append((new, response))
    group_tasks = [task] + [new for new, _ in kept]
    for new, response in kept:
      chosen, seen = [], {new["prompt"]}

      def offer(candidate):
        if candidate["prompt"] not in seen and not follows(candidate, response, min_gold=min_gold):
          chosen.append(candidate["prompt"])
        seen.add(candidate["prompt"])

      for candidate in group_tasks:
        if len(chosen) < negatives:
          offer(candidate)
      pool = by_family[task["family"]]
      tries = 0
      while len(chosen) < negatives and tries < 4 * negatives and len(pool) > 1:
        offer(pool[int(rng.integers(len(pool)))])
        tries += 1
      records.append(
          {
              "prompt": new["prompt"],
              "completion": response,
              "original_prompt": task["prompt"],
              "negatives": chosen,
              "family": task["family"],
              "gold": world_lib.gold_scores(new, response)["combined"],
              "relabeled": new["prompt"] != task["prompt"],
          }
      )
  summary = {
      "samples": count,
      "original_satisfied": satisfied / max(count, 1),
      "kept": len(records),
      "relabeled": sum(r["relabeled"] for r in records),
      "sample_gold": float(np.mean(sample_gold)) if sample_gold else None,
      "negatives": float(np.mean([len(r["negatives"]) for r in records] or [0.0])),
  }
  return records, summary


# --- data -----------------------------------------------------------------------------------------


class HirExample(NamedTuple):
  """One output under several instructions: `sequences[0]` = (x*, y), then (x_j, y) negatives."""

  sequences: list[data.Example]


def tokenize_records(
    records: Sequence[dict], tokenizer, *, seq_len: int, negatives: int
) -> tuple[list[HirExample], dict]:
  """relabel_round records -> (examples, stats): each (instruction, completion) tokenised as the
  SFT example of data/sft.py (the response's tokens are the same under every instruction). An
  example whose own sequence exceeds seq_len is dropped, a negative that does not fit is left out;
  at most `negatives` are kept. stats = {"examples", "dropped", "negatives_dropped"}."""
  flat = [
      {"prompt": p, "completion": r["completion"]}
      for r in records
      for p in [r["prompt"], *r["negatives"][:negatives]]
  ]
  tokenized, _ = data.tokenize_sft(flat, tokenizer, max_len=1 << 30, prompt_overflow="error")
  examples, dropped, negatives_dropped, i = [], 0, 0, 0
  for record in records:
    n = 1 + len(record["negatives"][:negatives])
    group, i = tokenized[i : i + n], i + n
    if len(group[0].tokens) > seq_len:
      dropped += 1
      continue
    fits = [e for e in group[1:] if len(e.tokens) <= seq_len]
    negatives_dropped += n - 1 - len(fits)
    examples.append(HirExample([group[0], *fits]))
  return examples, {
      "examples": len(examples),
      "dropped": dropped,
      "negatives_dropped": negatives_dropped,
  }


def hir_batch(
    examples: Sequence[HirExample], seq_len: int, slots: int, logit_budget: int | None = None
) -> dict[str, np.ndarray]:
  """[B, slots, seq_len] tokens / loss_mask / segment_ids / positions (each slot one SFT row,
  data.pad_batch) and valid [B, slots] bool; unused slots are all padding. logit_budget=M: each
  slot also lists its response tokens for the LM head (logit_index / logit_target / logit_mask
  [B, slots, M], data/sft.py), M from `data.sft.logit_budget_for` of every sequence."""
  # The fields (and dtypes) of data.pad_batch's rows, with a [B, slots] leading shape.
  fields = data.pad_batch([], seq_len, logit_budget)
  batch = {k: np.zeros((len(examples), slots) + v.shape[1:], v.dtype) for k, v in fields.items()}
  batch["valid"] = np.zeros((len(examples), slots), np.bool_)
  for row, example in enumerate(examples):
    rows = data.pad_batch(example.sequences[:slots], seq_len, logit_budget)
    n = len(rows["tokens"])
    for key, value in rows.items():
      batch[key][row, :n] = value
    batch["valid"][row, :n] = True
  return batch


def hir_batching(seq_len: int, slots: int, logit_budget: int | None = None) -> data.loader.Batching:
  return data.loader.Batching(
      pad=lambda examples: hir_batch(examples, seq_len, slots, logit_budget),
      pack=None,
      length=lambda e: max(len(s.tokens) for s in e.sequences),
  )


def make_hir_loss_fn(graphdef, cfg: ml_collections.ConfigDict):
  """loss_fn(params, batch, rng) on hir_batch batches: one forward pass over all B x G rows; with
  a response-token list (hir_batch's logit_budget) the LM head runs on the M listed slots only,
  for the same loss (its sums and means run over the masked tokens either way)."""

  def loss_fn(params, batch, rng):
    del rng
    b, g, _ = batch["tokens"].shape
    rows = {k: v.reshape((b * g,) + v.shape[2:]) for k, v in batch.items() if k != "valid"}
    logits, targets, mask = target_logits(graphdef, params, rows)  # [B G, N, V], [B G, N] x 2
    n = targets.shape[1]
    return hir_loss(
        logits.reshape(b, g, n, -1),
        targets.reshape(b, g, n),
        mask.reshape(b, g, n),
        batch["valid"],
        contrastive_coef=cfg.contrastive_coef,
        entropy_coef=cfg.entropy_coef,
    )

  return loss_fn


# --- driver ---------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the field for a bad `config.hir` (before anything loads)."""
  h = config.hir
  for name in (
      "rounds",
      "prompts_per_round",
      "samples_per_prompt",
      "batch_prompts",
      "max_prompt_len",
      "max_new_tokens",
  ):
    if not isinstance(h[name], int) or h[name] < 1:
      raise ConfigError(f"config.hir.{name}={h[name]!r}: must be a positive integer")
  if not isinstance(h.negatives, int) or h.negatives < 0:
    raise ConfigError(
        f"config.hir.negatives={h.negatives!r}: must be an integer >= 0 (0: no " "contrastive term)"
    )
  if not h.temperature > 0:
    raise ConfigError(f"config.hir.temperature={h.temperature!r}: must be > 0 (sampling)")
  for name in ("contrastive_coef", "entropy_coef"):
    if h[name] < 0:
      raise ConfigError(f"config.hir.{name}={h[name]!r}: must be >= 0")
  if not 0.0 <= h.min_gold <= 1.0:
    raise ConfigError(f"config.hir.min_gold={h.min_gold!r}: gold scores lie in [0, 1]")
  if not config.init_from:
    raise ConfigError("config.init_from is empty: HIR starts from a policy export (e.g. SFT's)")


def load_tasks(source: str, needed: int) -> list[dict]:
  """`needed` toy-world task records of `source`; ValueError naming the file and line of one that
  the scripted feedback cannot judge, or if there are too few."""
  tasks = load_prompts(source)
  for line, task in enumerate(tasks, 1):
    missing = [k for k in TASK_FIELDS if k not in task]
    if missing or not isinstance(task["prompt"], str):
      raise ValueError(
          f"{source} line {line}: HIR needs toy-world task records (a string "
          f"'prompt' and {', '.join(TASK_FIELDS)}; missing {missing}): the toy "
          "world's gold functions are its feedback"
      )
  if len(tasks) < needed:
    raise ConfigError(
        f"config.hir: {len(tasks)} prompts in {source} < rounds x prompts_per_round "
        f"= {needed}; every round samples fresh prompts"
    )
  return tasks[:needed]


@registry.register("hir", policy=True, blocks=("hir",))
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  check_config(config)
  mesh = common.start_run(config, workdir)
  h, t = config.hir, config.train
  tasks = load_tasks(config.data.source, h.rounds * h.prompts_per_round)
  tokenizer_dir = config.data.tokenizer or checkpoint.read_export_metadata(config.init_from).get(
      "tokenizer"
  )
  tokenizer = data.load_tokenizer(tokenizer_dir)
  for line, task in enumerate(tasks, 1):
    length = len(data.encode_prompt(tokenizer, task["prompt"]))
    if length > h.max_prompt_len:
      raise ValueError(
          f"{config.data.source} line {line}: the prompt has {length} tokens > "
          f"config.hir.max_prompt_len={h.max_prompt_len}; raise it"
      )
  summary_path = os.path.join(workdir, "rounds.json")
  summary = files.read_json(summary_path, fix=files.REWRITE) if os.path.exists(summary_path) else []
  policy_export = config.init_from
  for r in range(1, h.rounds + 1):
    round_dir = os.path.join(workdir, f"round_{r}")
    records_path = os.path.join(round_dir, "relabeled.jsonl")
    export = os.path.join(round_dir, "export")
    if os.path.exists(export):
      policy_export = export
      continue
    if not os.path.exists(records_path):
      round_tasks = tasks[(r - 1) * h.prompts_per_round : r * h.prompts_per_round]
      row = collect_round(config, mesh, tokenizer, round_tasks, policy_export, r, records_path)
      summary = [s for s in summary if s["round"] != r] + [{"round": r, **row}]
      metrics.write_json(summary, summary_path)
      _log.info("HIR round %d: %s", r, row)
    round_cfg = ml_collections.ConfigDict(config.to_dict())
    round_cfg.init_from = policy_export
    step = train_round(round_cfg, mesh, tokenizer, tokenizer_dir, records_path, round_dir, r)
    if step < t.steps:  # stopped early (stop_after_steps): the rerun finishes
      return {"stopped_in_round": r, "step": step}
    policy_export = export
  checkpoint.copy_export(policy_export, os.path.join(workdir, "export"))
  return {
      "rounds": h.rounds,
      **{
          f"round_{s['round']}/{k}": v
          for s in summary
          for k, v in s.items()
          if k != "round" and v is not None
      },
  }


def collect_round(
    config: ml_collections.ConfigDict,
    mesh,
    tokenizer,
    tasks: list[dict],
    policy_export: str,
    r: int,
    records_path: str,
) -> dict:
  """Round `r`'s online sampling and relabeling: `samples_per_prompt` responses of the policy to
  each task, relabeled by the world's checkers; writes `records_path`. -> the round's summary."""
  h = config.hir
  policy = common.load_policy(policy_export, mesh)
  samples = best_of_k(
      policy.params,
      policy.sampler,
      {},
      None,
      tokenizer,
      tasks,
      k=h.samples_per_prompt,
      temperature=h.temperature,
      max_new_tokens=h.max_new_tokens,
      max_prompt_len=h.max_prompt_len,
      batch_prompts=h.batch_prompts,
      rng=jax.random.key(config.seed + r),
  )
  records, row = relabel_round(
      [(s["record"], s["texts"]) for s in samples],
      min_gold=h.min_gold,
      negatives=h.negatives,
      seed=config.seed + r,
  )
  if not records:
    raise ValueError(
        f"HIR round {r}: no sample followed any instruction (min_gold="
        f"{h.min_gold}); lower config.hir.min_gold or sample more"
    )
  annotators.write_jsonl(records, records_path)
  return row


def train_round(
    round_cfg: ml_collections.ConfigDict,
    mesh,
    tokenizer,
    tokenizer_dir: str,
    records_path: str,
    round_dir: str,
    r: int,
) -> int:
  """Round `r`'s offline training on its relabeled records, from `round_cfg.init_from`, resuming in
  `round_dir`; exports ROUND_DIR/export when all `train.steps` are done. -> the step reached."""
  h, t = round_cfg.hir, round_cfg.train
  records = metrics.read_jsonl(records_path)
  examples, stats = tokenize_records(records, tokenizer, seq_len=t.seq_len, negatives=h.negatives)
  _log.info("HIR round %d data: %s", r, stats)
  common.write_config(round_cfg, round_dir)
  model_cfg = common.model_config(round_cfg, vocab_size=len(tokenizer))
  setup = common.setup_training(
      round_cfg, mesh, model_cfg, lambda graphdef: make_hir_loss_fn(graphdef, h)
  )
  # The LM head on the response tokens only (the instructions are no targets).
  budget = logit_budget_for([s for e in examples for s in e.sequences], t.seq_len)
  batches = data.BatchIterator(
      examples,
      batch_size=t.batch_size,
      seq_len=t.seq_len,
      seed=round_cfg.seed + r,
      packing=False,
      batching=hir_batching(t.seq_len, 1 + h.negatives, budget if budget < t.seq_len else None),
  )
  state = common.train_loop(
      round_cfg,
      round_dir,
      setup,
      batches,
      data_state=batches.state,
      restore_data=batches.restore,
      count_tokens=data.num_tokens,
  )
  if int(state.step) >= t.steps:
    common.export_model(
        round_cfg,
        os.path.join(round_dir, "export"),
        state.params,
        model_cfg,
        tokenizer=os.path.abspath(tokenizer_dir),
        step=int(state.step),
    )
  return int(state.step)
