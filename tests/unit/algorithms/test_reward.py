"""Reward-model training: the loss on packed comparison batches is the plain pairwise / ranking loss
of per-sequence scores, a step is the same on every mesh, an LM export becomes a scalar-head model
with its backbone intact, and the driver learns an easy preference and exports what PPO needs.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/algorithms/test_reward.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import scoring, sharding
from rlhf_jax.algorithms import common, reward
from rlhf_jax.configs.base import base_config
from rlhf_jax.data import RecordError
from rlhf_jax.data.preference import (
    pack_comparisons,
    tokenize_comparisons,
)
from rlhf_jax.losses.reward import margin_table, pairwise_loss, ranking_loss
from rlhf_jax.models import ModelConfig, abstract_model, create_model, split_model
from tests.helpers.preference import (
    TINY,
    alone_scores,
    assert_metrics_close,
    export_lm,
    learnable_pairs,
    pair_records,
    ranking_records,
    rm_config,
    write_jsonl,
)

# ---------------------------------------------------------------- loss


@pytest.fixture(scope="module")
def scalar_model():
  cfg = ModelConfig(**TINY, head="scalar", scalar_head_init_std=1.0)  # O(1) scores
  return split_model(create_model(cfg, 0))


SETTINGS = [("none", 0.0), ("small", 0.0), ("large", 0.01), ((0.0, 1.5, 0.5, 2.0), 0.0)]


def test_pairwise_loss_on_packed_batch_equals_direct_computation(words_tokenizer, scalar_model):
  graphdef, params = scalar_model
  comparisons, _ = tokenize_comparisons(pair_records(20), "pairwise", words_tokenizer, max_len=64)
  batch, count = pack_comparisons(comparisons, seq_len=192, rows=12, per_row=4, num_responses=2)
  assert count == len(comparisons) == 20
  assert not batch["valid"].all()  # unused comparison slots are in the batch and must not count
  tables = [margin_table(margins) for margins, _ in SETTINGS]
  loss_fns = [
      reward.make_reward_loss_fn(graphdef, kind="pairwise", margins=table, center_coef=center_coef)
      for table, (_, center_coef) in zip(tables, SETTINGS)
  ]
  # All settings in one compilation.
  results = jax.jit(lambda p, b: [fn(p, b, None) for fn in loss_fns])(params, batch)

  scores = alone_scores(graphdef, params, [s for c in comparisons for s in c.sequences])
  chosen, rejected = jnp.asarray(scores[0::2]), jnp.asarray(scores[1::2])
  levels = np.array([c.margin for c in comparisons])
  assert set(levels.tolist()) == {-1, 0, 1, 2, 3}
  for (margins, center_coef), table, (loss, got) in zip(SETTINGS, tables, results):
    margin = (
        None
        if margins == "none"
        else jnp.asarray([table[level] if level >= 0 else 0.0 for level in levels], jnp.float32)
    )  # no level: no margin
    ref_loss, ref_metrics = pairwise_loss(chosen, rejected, margin, center_coef=center_coef)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=1e-5, err_msg=str(margins))
    assert_metrics_close(got, ref_metrics)
    assert float(got["loss_weight"]) == 20
  assert 0.0 < float(results[0][1]["accuracy"]) < 1.0  # random scores: both kinds of pairs present
  assert len({round(float(loss), 6) for loss, _ in results}) == len(SETTINGS)  # the settings matter


def test_a_pair_without_a_level_gets_no_margin(monkeypatch):
  # One pair scored (1.0, 0.0), without a preference level; the scores stand in for a model's.
  monkeypatch.setattr(
      scoring, "comparison_scores", lambda graphdef, params, batch: jnp.array([[[1.0, 0.0]]])
  )
  batch = {
      "valid": np.ones((1, 1, 2), bool),
      "ranks": np.array([[[0, 1]]], np.int32),
      "margin": np.array([[-1]], np.int32),
  }
  loss, _ = reward.make_reward_loss_fn(
      None, kind="pairwise", margins=(0.5, 1.0, 2.0, 3.0), center_coef=0.0
  )(None, batch, None)
  np.testing.assert_allclose(loss, -np.log(1 / (1 + np.exp(-1.0))), rtol=1e-6)  # no margin


def test_ranking_loss_on_packed_batch_equals_direct_computation(words_tokenizer, scalar_model):
  graphdef, params = scalar_model
  comparisons, _ = tokenize_comparisons(
      ranking_records(12), "ranking", words_tokenizer, max_len=64, max_responses=4
  )
  assert {len(c.sequences) for c in comparisons} == {2, 3, 4}
  batch, count = pack_comparisons(comparisons, seq_len=192, rows=12, per_row=3, num_responses=4)
  assert count == len(comparisons)
  loss_fn = reward.make_reward_loss_fn(
      graphdef, kind="ranking", margins=margin_table("none"), center_coef=0.01
  )
  loss, metrics = jax.jit(loss_fn)(params, batch, jax.random.key(0))

  flat = alone_scores(graphdef, params, [s for c in comparisons for s in c.sequences])
  scores, ranks, valid = (
      np.zeros((12, 4), np.float32),
      np.full((12, 4), 4, np.int32),
      np.zeros((12, 4), bool),
  )
  start = 0
  for i, c in enumerate(comparisons):
    k = len(c.sequences)
    scores[i, :k], ranks[i, :k], valid[i, :k] = flat[start : start + k], c.ranks, True
    start += k
  ref_loss, ref_metrics = ranking_loss(
      jnp.asarray(scores), jnp.asarray(ranks), jnp.asarray(valid), center_coef=0.01
  )
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=1e-5)
  assert_metrics_close(metrics, ref_metrics)
  assert float(metrics["num_pairs"]) == sum(
      len(c.sequences) * (len(c.sequences) - 1) // 2 for c in comparisons
  )


def test_initial_params_swap_the_lm_head_for_a_scalar_head(tmp_path):
  lm = export_lm(tmp_path / "lm")
  assert "lm_head" in lm and "score" not in lm
  config = base_config()
  config.init_from = str(tmp_path / "lm")
  config.model.update(vocab_size=0)  # the export's architecture wins
  model_cfg = common.model_config(config, vocab_size=300, head="scalar")
  assert model_cfg.head == "scalar" and model_cfg.embed_dim == 64 and model_cfg.vocab_size == 384
  mesh = sharding.make_mesh((2, 2, 2))
  _, abstract, axes = abstract_model(model_cfg)
  psh = sharding.param_shardings(abstract, axes, mesh)
  params = common.initial_params(config, model_cfg, mesh, psh)

  assert set(params) == set(lm) - {"lm_head"} | {"score"}
  assert params["score"].shape == (64,)
  std = float(np.std(np.asarray(params["score"])))
  assert 0 < std < 3 * model_cfg.scalar_head_init_std  # small: initial rewards ~0
  backbone = {k: v for k, v in params.items() if k != "score"}
  jax.tree.map(
      np.testing.assert_array_equal,
      jax.device_get(backbone),
      {k: v for k, v in lm.items() if k != "lm_head"},
  )
  shardings_match = jax.tree.map(lambda p, s: p.sharding.is_equivalent_to(s, p.ndim), params, psh)
  assert all(jax.tree.leaves(shardings_match))


def test_driver_rejects_sft_data(tmp_path, words_tokenizer_dir):
  config = rm_config(tmp_path, words_tokenizer_dir, "toy")
  config.data.kind = "sft"
  with pytest.raises(
      ValueError,
      match=r"config\.data\.kind='sft': a reward model trains on 'pairwise' or "
      r"'ranking' records",
  ):
    reward.train(config, str(tmp_path / "rm"))


def test_driver_rejects_margins_on_rankings(tmp_path, words_tokenizer_dir):
  source = write_jsonl(tmp_path / "ranked.jsonl", ranking_records(8))
  config = rm_config(tmp_path, words_tokenizer_dir, source, kind="ranking")
  config.reward.margins = "small"
  with pytest.raises(
      ValueError, match=r"margins applies to pairwise data .* set config\.reward\.margins='none'"
  ):
    reward.train(config, str(tmp_path / "rm"))


def test_driver_needs_a_margin_on_every_pair_for_the_margin_loss(tmp_path, words_tokenizer_dir):
  export_lm(tmp_path / "lm", words_tokenizer_dir)
  records = learnable_pairs(12)
  del records[3]["margin"]
  source = write_jsonl(tmp_path / "pairs.jsonl", records)
  config = rm_config(tmp_path, words_tokenizer_dir, source)
  with pytest.raises(RecordError) as info:
    reward.train(config, str(tmp_path / "rm"))
  assert info.value.field == "margin"
  assert str(info.value).startswith(f"{source}[3]: field 'margin': missing")
  assert "config.reward.margins='none'" in str(info.value)


def test_chosen_response_mask_marks_the_best_responses_tokens(words_tokenizer):
  comparisons, _ = tokenize_comparisons(ranking_records(6), "ranking", words_tokenizer, max_len=64)
  batch, count = pack_comparisons(comparisons, seq_len=256, rows=3, per_row=3, num_responses=4)
  assert count == 6
  mask = np.asarray(reward.chosen_response_mask(batch, 256))
  expected = np.zeros_like(mask)
  for r, p, k in zip(*np.nonzero(batch["valid"] & (batch["ranks"] == 0))):
    expected[r, batch["response_start"][r, p, k] : batch["score_index"][r, p, k] + 1] = True
  np.testing.assert_array_equal(mask, expected)
  assert mask.sum() == sum(len(c.sequences[0]) - c.prompt_len for c in comparisons)


def test_lm_regulariser_needs_an_lm_export(tmp_path, words_tokenizer_dir):
  config = rm_config(tmp_path, words_tokenizer_dir, "unused")
  config.reward.lm_coef = 0.1
  config.init_from = ""
  model_cfg = ModelConfig(**TINY, head="scalar")
  with pytest.raises(
      Exception, match=r"lm_coef > 0 keeps the LM head of config\.init_from, which is empty"
  ):
    reward.lm_head_params(config, model_cfg, sharding.make_mesh((2, 2, 2)))
