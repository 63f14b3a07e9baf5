"""Language-model training driver: SFT (`config.data.kind="sft"`, prompt tokens masked) and
pretraining (`kind="text"`, every token a target; `config.algorithm="pretrain"`) share it.

data -> tokenizer -> sharded training -> params export.

WORKDIR after a run: config.json, tokenizer/ (toy data), checkpoints/, metrics.jsonl, tb/,
export/ (params + {"model": ..., "tokenizer": ...}, what later stages initialise from),
samples.json (generations before/after training with their scores).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from rlhf_jax import data, generate
from rlhf_jax.algorithms import common, registry
from rlhf_jax.data.sft import logit_budget_for
from rlhf_jax.data.text import tokenize_text
from rlhf_jax.errors import ConfigError
from rlhf_jax.losses.sft import make_sft_loss_fn
from rlhf_jax.toyworld import instructions
from rlhf_jax.train import checkpoint
from rlhf_jax.train.metrics import format_table

_log = logging.getLogger(__name__)


class Records(NamedTuple):
  """Records of one split, and where each came from ('FILE:LINE'; None for the toy world's)."""

  records: list[dict]
  where: list[str] | None


def load_tokenizer_and_records(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[Any, Records, Records]:
  """(tokenizer, train records, eval records) for `config.data`."""
  d = config.data
  if d.source == "toy":
    families = list(d.toy_families) or None
    records = instructions.generate_sft_records(d.toy_num_records, config.seed, families)
    where = None
  else:
    records, where = data.load_located_records(d.source, d.kind, split=d.split or None)
  if d.eval_source:
    train = Records(records, where)
    evals = Records(*data.load_located_records(d.eval_source, d.kind, split=d.split or None))
  else:
    n_eval = max(1, int(len(records) * d.eval_fraction))
    if n_eval >= len(records):
      raise ConfigError(
          f"config.data.eval_fraction={d.eval_fraction} holds out all {len(records)} records of "
          f"config.data.source={d.source!r} for evaluation, leaving none to train on; lower it, "
          "add records, or give held-out records in config.data.eval_source"
      )
    train = Records(records[:-n_eval], where and where[:-n_eval])
    evals = Records(records[-n_eval:], where and where[-n_eval:])

  if d.tokenizer:
    tokenizer = data.load_tokenizer(d.tokenizer)
  elif d.source == "toy":
    tok_dir = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):  # a resumed run keeps its tokenizer
      tokenizer = data.load_tokenizer(tok_dir)
    else:
      tokenizer = data.train_tokenizer(
          instructions.corpus_texts(records), d.tokenizer_vocab_size, tok_dir
      )
  else:
    raise ConfigError("config.data.tokenizer is empty: give a tokenizer directory for non-toy data")
  return tokenizer, train, evals


def tokenizer_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.tokenizer or os.path.abspath(os.path.join(workdir, "tokenizer"))


def prompt_of(record: dict) -> str | list[dict]:
  """What to sample from for an SFT record: its `prompt`, or a chat (`messages`) record's turns
  before its last assistant turn."""
  if "prompt" in record:
    return record["prompt"]
  messages = record["messages"]
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  return messages[:last]


def sample_prompts(records: list, tokenizer, config) -> list[dict]:
  """The first `config.sample.num_examples` records whose prompt the data policy keeps (shorter
  than `config.train.seq_len` tokens, as `tokenize_sft` requires), for the before / after table:
  an over-long or huge prompt is passed over, never sampled."""
  chosen, limit = [], config.train.seq_len
  for r in records:
    if len(chosen) >= config.sample.num_examples:
      break
    prompt = prompt_of(r)
    text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
    if len(text) > 64 * limit:  # far more characters than tokens fit: not worth tokenising
      continue
    if len(data.encode_prompt(tokenizer, prompt)) < limit:
      chosen.append(r)
  return chosen


def sample_table(sampler, params, tokenizer, records, config, rng) -> list[dict]:
  """Generates for `records` and scores toy records (exact match). Returns rows for a table."""
  if not records:
    return []
  prompts = [data.encode_prompt(tokenizer, prompt_of(r)) for r in records]
  tokens, mask = generate.prompt_batch(prompts, pad_id=tokenizer.pad_token_id)
  s = config.sample
  out = sampler(
      params,
      tokens,
      mask,
      rng,
      max_new_tokens=s.max_new_tokens,
      temperature=s.temperature,
      top_k=s.top_k,
      top_p=s.top_p,
      eos_id=tokenizer.eos_token_id,
      pad_id=tokenizer.pad_token_id,
  )
  out_tokens, out_mask = jax.device_get((out.tokens, out.mask))
  rows = []
  for r, toks, m in zip(records, out_tokens, out_mask):
    text = tokenizer.decode(toks[m.astype(bool)], skip_special_tokens=True).strip()
    prompt = prompt_of(r)
    row = {"prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"], "response": text}
    if config.data.source == "toy":  # a toy-world task: scored (a user's `family` is metadata)
      row["reference"] = r["completion"]
      row["correct"] = instructions.score(r, text)
    rows.append(row)
  return rows


@registry.register("sft", policy=True)
@registry.register("pretrain", policy=True, data_kind="text")
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Supervised fine-tuning on prompt/completion records (loss on the completion's tokens), or
  next-token pretraining on text records (`config.data.kind="text"`); resumable. Writes
  `export/` once `config.train.steps` are done and `samples.json` (greedy generations before and
  after); returns {"step", "eval/<metric>", ["samples/exact_match"]}."""
  mesh = common.start_run(config, workdir)
  tokenizer, train_split, eval_split = load_tokenizer_and_records(config, workdir)
  t = config.train
  train_examples, eval_examples = _tokenize(config, tokenizer, train_split, eval_split)
  model_cfg = common.model_config(config, vocab_size=len(tokenizer))
  setup = common.setup_training(config, mesh, model_cfg, make_sft_loss_fn)
  # The batches list their target tokens when the prompts leave some out: the LM head then runs
  # on those only (data/sft.py `logit_budget`; pretraining text is all targets: no list).
  batches, eval_iter = _batch_iterators(config, train_examples, eval_examples)
  evaluate = common.make_evaluate(
      make_sft_loss_fn(setup.graphdef), setup, eval_iter, t.eval_batches
  )

  sample_records = (
      sample_prompts(eval_split.records, tokenizer, config) if config.data.kind == "sft" else []
  )
  rng = jax.random.key(config.seed)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    resumed = ckpt.latest_step() is not None  # orbax's view: unfinished saves do not count
  sampler = generate.Sampler(
      setup.graphdef, model_cfg, mesh=setup.mesh, param_shardings=setup.param_shardings
  )
  before = (
      None
      if resumed
      else sample_table(sampler, setup.state.params, tokenizer, sample_records, config, rng)
  )

  state = common.train_loop(
      config,
      workdir,
      setup,
      batches,
      data_state=batches.state,
      restore_data=batches.restore,
      evaluate=evaluate,
      count_tokens=data.num_tokens,
  )

  final = evaluate(state)
  after = sample_table(sampler, state.params, tokenizer, sample_records, config, rng)
  if int(state.step) >= t.steps:
    common.export_model(
        config,
        os.path.join(workdir, "export"),
        state.params,
        model_cfg,
        tokenizer=tokenizer_path(config, workdir),
        step=int(state.step),
    )
  _write_samples(workdir, before, after)
  result = {"step": int(state.step), **{f"eval/{k}": v for k, v in final.items()}}
  if after and "correct" in after[0]:
    result["samples/exact_match"] = float(np.mean([r["correct"] for r in after]))
  return result


def _tokenize(config, tokenizer, train: Records, evals: Records) -> tuple[list, list]:
  """(train examples, eval examples) of `config.data.kind` ("sft" or "text") within
  `config.train.seq_len`; a ConfigError when none fits."""
  t = config.train

  def tokenize(split: Records):
    if config.data.kind == "text":
      return tokenize_text(split.records, tokenizer, max_len=t.seq_len)
    return data.tokenize_sft(
        split.records,
        tokenizer,
        max_len=t.seq_len,
        prompt_overflow=config.data.prompt_overflow,
        where=split.where,
        max_len_key="config.train.seq_len",
    )

  train_examples, stats = tokenize(train)
  eval_examples, _ = tokenize(evals)
  for name, examples in (("training", train_examples), ("eval", eval_examples)):
    if not examples:  # every prompt filled seq_len and was skipped
      raise ConfigError(
          f"no {name} example fits config.train.seq_len={t.seq_len} tokens; raise "
          "config.train.seq_len, or set config.data.prompt_overflow='truncate_left'"
      )
  _log.info("%s data: %s train, %d eval examples", config.data.kind, stats, len(eval_examples))
  return train_examples, eval_examples


def _batch_iterators(config, train_examples: list, eval_examples: list):
  """(training batches, eval batches): the SFT batch layout, listing target tokens when the
  prompts leave some out."""
  t = config.train
  budget = logit_budget_for([*train_examples, *eval_examples], t.seq_len)
  batching = data.sft_batching(
      t.batch_size, t.seq_len, logit_budget=budget if budget < t.seq_len else None
  )
  return common.batch_iterators(config, train_examples, eval_examples, batching)


def _write_samples(workdir: str, before: list | None, after: list) -> None:
  """samples.json, and the before / after generations printed on process 0."""
  with open(os.path.join(workdir, "samples.json"), "w") as f:
    json.dump({"before": before, "after": after}, f, indent=1)
  if jax.process_index() == 0 and after:
    if before is not None:
      print("\nGenerations before training:\n" + format_table(before))
    print("\nGenerations after training:\n" + format_table(after))
