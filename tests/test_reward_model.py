"""Reward-model training: the loss on packed comparison batches is the plain pairwise / ranking loss
of per-sequence scores, a step is the same on every mesh, an LM export becomes a scalar-head model
with its backbone intact, and the driver learns an easy preference and exports what PPO needs."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import scoring, sharding
from rlhf_jax.algorithms import common, reward
from rlhf_jax.configs.base import base_config
from rlhf_jax.data import BatchIterator, RecordError
from rlhf_jax.data.preference import (
    comparison_batching,
    logit_budget_for,
    pack_comparisons,
    tokenize_comparisons,
)
from rlhf_jax.losses.reward import margin_table, pairwise_loss, ranking_loss
from rlhf_jax.models import ModelConfig, abstract_model, create_model, split_model
from rlhf_jax.train import checkpoint, metrics

TINY = dict(
    vocab_size=384,
    num_layers=2,
    embed_dim=64,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=128,
    max_seq_len=64,
)
WORDS = ["sun", "moon", "star", "red", "blue", "cat", "dog", "tree", "rain", "snow", "fish", "bird"]


def pair_records(n, seed=0):
  """Pairs with margins 0..3, some without; distinct texts so each comparison is identifiable."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    a, b = rng.choice(WORDS, size=2, replace=False)
    record = {"prompt": f"Repeat: {a}, {b} ({i})", "chosen": f"{a}, {b}", "rejected": f"{b} {i}"}
    if i % 5:
      record["margin"] = int(i % 4)
    records.append(record)
  return records


def ranking_records(n, seed=0):
  rng = np.random.default_rng(seed)
  return [
      {
          "prompt": f"Give the first word of the list: {', '.join(rng.choice(WORDS, size=3))} ({i})",
          "responses": [
              f"{w} {i}" for w in rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False)
          ],
      }
      for i in range(n)
  ]


def alone_scores(graphdef, params, sequences, width=64, rows=64):
  """last_token_scores of each sequence in a row of its own: [N] numpy (fixed shapes: one compile)."""
  tokens = np.zeros((rows, width), np.int32)
  lengths = np.zeros(rows, np.int64)
  for row, s in enumerate(sequences):
    tokens[row, : len(s)], lengths[row] = s, len(s)
  seg = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
  pos = np.where(seg > 0, np.arange(width)[None], 0)
  scores = _last_token_scores(
      graphdef, params, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos)
  )
  return np.asarray(scores)[: len(sequences)]


_last_token_scores = jax.jit(scoring.last_token_scores, static_argnums=0)


def assert_metrics_close(got, expected, atol=1e-5):
  assert set(got) == set(expected)
  for name in expected:
    np.testing.assert_allclose(
        np.asarray(got[name]), np.asarray(expected[name]), atol=atol, rtol=1e-5, err_msg=name
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


# ---------------------------------------------------------------- init from an LM export


def export_lm(path, words_tokenizer_dir=None, seed=3):
  cfg = ModelConfig(**TINY)
  _, params = split_model(create_model(cfg, seed))
  metadata = {"model": cfg.to_dict()}
  if words_tokenizer_dir is not None:
    metadata["words_tokenizer"] = str(words_tokenizer_dir)
  checkpoint.export_params(path, params, metadata=metadata)
  return params


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


# ---------------------------------------------------------------- driver


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def rm_config(tmp_path, words_tokenizer_dir, source, kind="pairwise", steps=30):
  c = base_config()
  c.algorithm = "reward"
  c.init_from = str(tmp_path / "lm")
  c.model.vocab_size = 0
  c.mesh.shape = (2, 2, 2)
  c.optim.update(lr=3e-3, warmup_steps=3)
  c.train.update(
      steps=steps,
      batch_size=8,
      seq_len=128,
      log_every=10,
      eval_every=steps,
      eval_batches=1,
      checkpoint_every=steps,
      async_checkpoint=False,
  )
  c.data.update(
      kind=kind,
      source=source,
      tokenizer=str(words_tokenizer_dir),
      eval_fraction=0.25,
      packing=True,
      prompt_overflow="skip",
  )
  c.reward.update(
      margins="small" if kind == "pairwise" else "none",
      center_coef=0.01,
      max_responses=4,
      comparisons_per_row=3,
  )
  return c


def learnable_pairs(n, seed=0):
  """Chosen responses say 'great', rejected ones 'awful'; the rest of the text is shared noise."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    a, b, c = rng.choice(WORDS, size=3, replace=False)
    filler = f"{a} {b}" if rng.random() < 0.5 else f"{b} {c}"
    records.append(
        {
            "prompt": f"Describe the {a} and the {c}.",
            "chosen": f"{filler} great",
            "rejected": f"{filler} awful",
            "margin": int(rng.integers(0, 4)),
            "family": ["sky", "animals"][i % 2],
        }
    )
  return records


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
