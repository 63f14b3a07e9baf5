"""Reward-model training: the loss on packed comparison batches is the plain pairwise / ranking loss
of per-sequence scores, a step is the same on every mesh, an LM export becomes a scalar-head model
with its backbone intact, and the driver learns an easy preference and exports what PPO needs.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/algorithms/test_reward.py.
"""

import functools
import json

import jax
import numpy as np
import pytest

from rlhf_jax import scoring, sharding
from rlhf_jax.algorithms import common, reward
from rlhf_jax.configs.base import base_config
from rlhf_jax.data import BatchIterator
from rlhf_jax.data.preference import (
    comparison_batching,
    logit_budget_for,
    pack_comparisons,
    tokenize_comparisons,
)
from rlhf_jax.losses.reward import margin_table
from rlhf_jax.models import ModelConfig, abstract_model
from rlhf_jax.train import checkpoint, metrics
from tests.helpers.preference import (
    TINY,
    WORDS,
    alone_scores,
    assert_metrics_close,
    export_lm,
    learnable_pairs,
    pair_records,
    rm_config,
    write_jsonl,
)

# ---------------------------------------------------------------- sharding


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory, words_tokenizer_dir):
  path = tmp_path_factory.mktemp("lm") / "export"
  export_lm(path, words_tokenizer_dir)
  return path


def train_config(init_from, accum_steps=1):
  c = base_config()
  c.init_from = str(init_from)  # the LM export, its head swapped for a scalar one
  c.model.vocab_size = 0
  # SGD: a plain function of the gradients, so the comparison is of the sharded loss and its
  # gradients, not of Adam's g / sqrt(v) blowing rounding noise on near-zero gradients up to ~lr.
  c.optim.update(name="sgd", lr=0.5, warmup_steps=0, grad_clip_norm=1.0)
  c.train.update(steps=2, batch_size=8, accum_steps=accum_steps)
  return c


@pytest.fixture(scope="module")
def sharding_batches(words_tokenizer):
  records = pair_records(40, seed=1)
  for i, record in enumerate(records[::3]):  # uneven lengths: rows hold 2 or 3 comparisons
    record["chosen"] += ", " + ", ".join(WORDS[: i % 6 + 3])
  comparisons, _ = tokenize_comparisons(records, "pairwise", words_tokenizer, max_len=64)
  batches = BatchIterator(
      comparisons,
      batch_size=8,
      seq_len=192,
      seed=0,
      packing=True,
      batching=comparison_batching(8, 192, 3, 2),
  )
  return [next(batches) for _ in range(2)]


def two_steps(init_from, batches, mesh_shape, accum_steps=1):
  config = train_config(init_from, accum_steps)
  n = int(np.prod(mesh_shape))
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:n])
  model_cfg = common.model_config(config, vocab_size=384, head="scalar")
  make_loss = functools.partial(
      reward.make_reward_loss_fn, kind="pairwise", margins=margin_table("small"), center_coef=0.01
  )
  setup = common.setup_training(config, mesh, model_cfg, make_loss)
  state, metrics = setup.state, []
  for batch in batches:
    state, step_metrics = setup.step(state, sharding.put_batch(batch, mesh))
    metrics.append(jax.device_get(step_metrics))
  return jax.device_get(state.params), metrics


@pytest.mark.slow  # compiles several train steps: keeps the fast set under 5 minutes
def test_sharded_steps_equal_unsharded(lm_export, sharding_batches):
  """2 steps on one device == 2 steps on a (data 2, fsdp 2, tensor 2) mesh in 2 micro-batches each
  (weighted by their number of pairs, which packing makes unequal)."""
  ref_params, ref_metrics = two_steps(lm_export, sharding_batches, (1, 1, 1))
  params, metrics = two_steps(lm_export, sharding_batches, (2, 2, 2), accum_steps=2)
  assert "score" in params and "lm_head" not in params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), params, ref_params)
  for got, expected in zip(metrics, ref_metrics):
    assert_metrics_close(got, expected)
  assert metrics[0]["loss"] != metrics[1]["loss"]  # the first step changed the params
  micro = [batch["valid"][i::2, :, 1].sum() for batch in sharding_batches for i in range(2)]
  assert len(set(micro)) > 1, micro  # the micro-batches really hold different numbers of pairs


@pytest.mark.slow
def test_reward_driver_learns_an_easy_rule_and_exports_scores(
    tmp_path, words_tokenizer_dir, words_tokenizer
):
  export_lm(tmp_path / "lm", words_tokenizer_dir)
  records = learnable_pairs(64)
  source = write_jsonl(tmp_path / "pairs.jsonl", records)
  config = rm_config(tmp_path, words_tokenizer_dir, source)
  workdir = tmp_path / "rm"
  result = reward.train(config, str(workdir))

  report = json.loads((workdir / "eval.json").read_text())
  overall = report["report"]["overall"]
  assert overall["n"] == 16
  assert overall["accuracy"] >= 0.8, report
  assert result["eval/accuracy"] == overall["accuracy"] and result["step"] == 30
  assert set(report["report"]["by_margin"]) <= {"0", "1", "2", "3"}
  assert set(report["report"]["by_family"]) == {"sky", "animals"}
  logged = metrics.read_jsonl(workdir / "metrics.jsonl")
  train_losses = [r["train/loss"] for r in logged if "train/loss" in r]
  assert len(train_losses) == 3 and train_losses[-1] < 0.5 * train_losses[0]
  assert [r["eval/loss"] for r in logged if "eval/loss" in r][-1] < 0.3  # ln 2 = 0.69 is chance

  meta = checkpoint.read_export_metadata(workdir / "export")
  assert meta["model"]["head"] == "scalar" and meta["step"] == 30
  assert meta["reward"]["kind"] == "pairwise" and meta["reward"]["margins"] == list(
      margin_table("small")
  )
  stats = meta["reward"]["stats"]
  assert stats["std"] > 0 and stats["n"] == 32 and stats == report["stats"]

  mesh = sharding.make_mesh((8, 1, 1))
  rm = reward.load_reward_model(str(workdir / "export"), mesh)
  assert rm.stats == stats and rm.model_cfg.head == "scalar"
  held_out = records[-16:]
  kept, scores = reward.score_records(rm, words_tokenizer, held_out, "pairwise", batch_size=8)
  assert kept == held_out
  flat = np.concatenate(scores)
  np.testing.assert_allclose([flat.mean(), flat.std()], [stats["mean"], stats["std"]], atol=1e-4)
  accuracy = np.mean([s[0] > s[1] for s in scores])
  np.testing.assert_allclose(accuracy, overall["accuracy"])
  # And each score is the loaded model's score at the response's EOS, scored alone.
  comparisons, _ = tokenize_comparisons(held_out, "pairwise", words_tokenizer, max_len=64)
  alone = alone_scores(
      rm.graphdef, jax.device_get(rm.params), [s for c in comparisons for s in c.sequences]
  )
  np.testing.assert_allclose(flat, alone, atol=1e-4)
  assert result["reward_std"] == stats["std"] > 0


# ---------------------------------------------------------------- LM regulariser (reward.lm_coef)


@pytest.mark.slow
def test_lm_regulariser_adds_the_sft_loss_of_the_best_responses(
    tmp_path, words_tokenizer, words_tokenizer_dir
):
  """At the start (trunk and LM head both the export's), the regularised loss is the pairwise loss
  plus lm_coef x the LM's mean next-token loss over the chosen responses' tokens, which
  `scoring.comparison_logps` computes independently; the trained params hold the LM head beside
  the scalar head, sharded, and a step moves both."""
  lm = export_lm(tmp_path / "lm", words_tokenizer_dir)
  comparisons, _ = tokenize_comparisons(pair_records(20), "pairwise", words_tokenizer, max_len=64)
  batch, count = pack_comparisons(comparisons, seq_len=192, rows=8, per_row=4, num_responses=2)
  assert count == 20
  config = train_config(tmp_path / "lm")
  config.reward.lm_coef = 0.5
  mesh = sharding.make_mesh((2, 2, 2))
  model_cfg = common.model_config(config, vocab_size=384, head="scalar")
  make = lambda coef: functools.partial(
      reward.make_reward_loss_fn,
      kind="pairwise",
      margins=margin_table("small"),
      center_coef=0.01,
      lm_coef=coef,
  )
  setup = common.setup_training(
      config,
      mesh,
      model_cfg,
      make(0.5),
      extra_params=functools.partial(reward.lm_head_params, config, model_cfg, mesh),
  )
  params = setup.state.params
  assert set(params) == set(lm) | {"score"}  # the LM head kept under its name
  np.testing.assert_array_equal(jax.device_get(params[reward.LM_HEAD]), lm["lm_head"])
  assert params[reward.LM_HEAD].sharding.is_equivalent_to(setup.param_shardings[reward.LM_HEAD], 2)

  loss, got = jax.jit(make(0.5)(setup.graphdef))(params, batch, None)
  plain, plain_metrics = jax.jit(make(0.0)(setup.graphdef))(
      reward.model_params(params), batch, None
  )
  lm_graphdef = abstract_model(ModelConfig(**TINY))[0]
  logps, lengths = jax.jit(functools.partial(scoring.comparison_logps, lm_graphdef))(lm, batch)
  chosen = batch["valid"] & (batch["ranks"] == 0)
  nll = -float(np.sum(np.where(chosen, logps, 0))) / float(np.sum(np.where(chosen, lengths, 0)))
  assert 3.0 < nll < 8.0  # a random LM over 384 tokens: ~log 384 = 5.95
  np.testing.assert_allclose(got["lm_loss"], nll, rtol=1e-5)
  np.testing.assert_allclose(loss, plain + 0.5 * nll, rtol=1e-5)
  assert_metrics_close(
      {k: v for k, v in got.items() if k not in ("loss", "lm_loss")},
      {k: v for k, v in plain_metrics.items() if k != "loss"},
  )

  # With the batch's logit list (what the driver builds with lm_coef > 0) the LM head runs on
  # the listed response tokens only: the same loss, metrics and gradients.
  budget = logit_budget_for(comparisons, 192)
  listed, count = pack_comparisons(
      comparisons, seq_len=192, rows=8, per_row=4, num_responses=2, logit_budget=budget
  )
  assert count == 20 and budget < 192
  mask = np.asarray(reward.listed_chosen_mask(listed))
  assert mask.sum() == np.asarray(reward.chosen_response_mask(batch, 192)).sum()
  value_and_grad = lambda b: jax.jit(jax.value_and_grad(make(0.5)(setup.graphdef), has_aux=True))(
      params, b, None
  )
  (full_loss, full_metrics), full_grads = value_and_grad(batch)
  (list_loss, list_metrics), list_grads = value_and_grad(listed)
  np.testing.assert_allclose(list_loss, full_loss, rtol=1e-5)
  assert_metrics_close(list_metrics, full_metrics)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      jax.device_get(list_grads),
      jax.device_get(full_grads),
  )

  host_before = jax.device_get(params)
  state, _ = setup.step(setup.state, sharding.put_batch(batch, mesh))
  after = jax.device_get(state.params)
  for name in (reward.LM_HEAD, "score"):
    assert np.abs(after[name] - host_before[name]).max() > 0, name


@pytest.mark.slow
def test_regularised_reward_driver_learns_and_exports_a_plain_reward_model(
    tmp_path, words_tokenizer_dir
):
  export_lm(tmp_path / "lm", words_tokenizer_dir)
  records = learnable_pairs(64)
  config = rm_config(tmp_path, words_tokenizer_dir, write_jsonl(tmp_path / "pairs.jsonl", records))
  config.reward.lm_coef = 0.5
  workdir = tmp_path / "rm"
  result = reward.train(config, str(workdir))
  assert result["eval/accuracy"] >= 0.8, result
  logged = metrics.read_jsonl(workdir / "metrics.jsonl")
  lm_losses = [r["train/lm_loss"] for r in logged if "train/lm_loss" in r]
  assert (
      len(lm_losses) == 3 and lm_losses[-1] < lm_losses[0]
  )  # the LM head learns the responses too
  assert "eval/lm_loss" in logged[-1] or any("eval/lm_loss" in r for r in logged)
  # The export is a plain reward model: the LM head stays behind in the checkpoints.
  meta = checkpoint.read_export_metadata(workdir / "export")
  assert meta["model"]["head"] == "scalar"
  rm = reward.load_reward_model(str(workdir / "export"), sharding.make_mesh((8, 1, 1)))
  assert reward.LM_HEAD not in rm.params and "score" in rm.params
