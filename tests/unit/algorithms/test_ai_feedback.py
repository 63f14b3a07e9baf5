"""RLAIF and Constitutional AI: the soft-label reward loss against NumPy, AI labelling of pairs and
sibling rewards on stub judges (principle choice, position swap, records), judge-gold agreement,
SL-CAI's revision records on a stub reviser, config errors, and tiny end-to-end runs (slow): PPO
with the judge as its reward, SL-CAI, and a reward model on soft labels.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/algorithms/test_ai_feedback.py.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax import data
from rlhf_jax.algorithms import ai_feedback, constitutional, pipeline, ppo, reward
from rlhf_jax.configs.base import base_config
from rlhf_jax.configs.toy import (
    ai_feedback_stage,
    ai_reward_stage,
    constitutional_sl_stage,
    toy_pipeline_config,
)
from rlhf_jax.data.preference import comparison_batch, tokenize_comparisons
from rlhf_jax.losses.reward import pairwise_loss
from rlhf_jax.toyworld import World, judge
from rlhf_jax.toyworld import world as world_lib
from rlhf_jax.toyworld.judge import CONCISE, CORRECT, HARMLESS


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


# --- soft-label loss ------------------------------------------------------------------------------


def test_soft_label_loss_matches_numpy_and_p_one_is_the_hard_loss():
  rng = np.random.default_rng(0)
  r_c, r_r = rng.normal(size=12) * 3, rng.normal(size=12) * 3
  p, m = rng.uniform(size=12), rng.uniform(size=12)
  w = (rng.uniform(size=12) > 0.25).astype(np.float32)
  d = r_c - r_r - m
  ref = np.sum(w * (-p * log_sigmoid(d) - (1 - p) * log_sigmoid(-d))) / w.sum()
  loss, out = pairwise_loss(
      jnp.asarray(r_c),
      jnp.asarray(r_r),
      jnp.asarray(m),
      weight=jnp.asarray(w),
      soft_label=jnp.asarray(p),
  )
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(out["bt_loss"], ref, rtol=1e-5)
  hard, _ = pairwise_loss(jnp.asarray(r_c), jnp.asarray(r_r), jnp.asarray(m), weight=jnp.asarray(w))
  ones, _ = pairwise_loss(
      jnp.asarray(r_c),
      jnp.asarray(r_r),
      jnp.asarray(m),
      weight=jnp.asarray(w),
      soft_label=jnp.ones(12),
  )
  np.testing.assert_allclose(ones, hard, rtol=1e-6)
  # p = 1/2: the loss is symmetric in the two rewards, minimal where they are equal.
  half = lambda a, b: float(pairwise_loss(a, b, soft_label=jnp.full(2, 0.5))[0])
  a, b = jnp.array([2.0, -1.0]), jnp.array([0.5, 0.0])
  assert half(a, b) == pytest.approx(half(b, a)) and half(a, a) == pytest.approx(np.log(2.0))


def test_soft_labels_are_validated_and_reach_the_batch(tmp_path):
  tok = data.train_tokenizer(["good bad answer question " * 10], 300, tmp_path / "tok")
  records = [
      {"prompt": "question", "chosen": "good answer", "rejected": "bad", "soft_label": 0.75},
      {"prompt": "question", "chosen": "good", "rejected": "bad answer"},
  ]
  comparisons, _ = tokenize_comparisons(records, "pairwise", tok, max_len=64)
  batch = comparison_batch(comparisons, 64, 2)
  np.testing.assert_array_equal(batch["soft_label"], [[0.75], [1.0]])
  for bad in (1.5, -0.1, True, "0.7"):
    with pytest.raises(data.RecordError, match="soft_label.*probability"):
      data.validate_record({**records[0], "soft_label": bad}, "pairwise", source="x", line=3)


def test_reward_loss_fn_reads_soft_labels_only_when_asked(monkeypatch):
  from rlhf_jax import scoring

  monkeypatch.setattr(
      scoring, "comparison_scores", lambda graphdef, params, batch: jnp.array([[[1.0, 0.0]]])
  )
  batch = {
      "valid": np.ones((1, 1, 2), bool),
      "ranks": np.array([[[0, 1]]], np.int32),
      "margin": np.array([[-1]], np.int32),
      "soft_label": np.array([[0.7]], np.float32),
  }
  make = lambda soft: reward.make_reward_loss_fn(
      None, kind="pairwise", margins=(0.0,) * 4, center_coef=0.0, soft_labels=soft
  )
  np.testing.assert_allclose(
      make(True)(None, batch, None)[0], -0.7 * log_sigmoid(1.0) - 0.3 * log_sigmoid(-1.0), rtol=1e-6
  )
  np.testing.assert_allclose(make(False)(None, batch, None)[0], -log_sigmoid(1.0), rtol=1e-6)


# --- principles and labelling ---------------------------------------------------------------------


def test_principles_resolve_names_and_auto_choice_follows_the_unsafe_flag():
  assert ai_feedback.resolve_principles(("HARMLESS", "Be kind."), "k") == (HARMLESS, "Be kind.")
  for bad in ("HARMLESS", ("",), (3,)):
    with pytest.raises(ValueError, match="config.x.principles"):
      ai_feedback.resolve_principles(bad, "config.x.principles")
  tasks = [{"unsafe": True}, {"unsafe": False}, {}]
  rng = np.random.default_rng(0)
  assert ai_feedback.choose_principles(tasks, (), rng) == [HARMLESS, CORRECT, CORRECT]
  drawn = ai_feedback.choose_principles([{}] * 400, (CORRECT, CONCISE), np.random.default_rng(1))
  assert set(drawn) == {CORRECT, CONCISE} and 0.4 < drawn.count(CONCISE) / 400 < 0.6


class StubJudge:
  """Single-order p(A): a length preference under CONCISE (shorter wins), else by the number of
  "good" words, with a bias towards position A; records its calls."""

  def __init__(self, bias=0.2):
    self.bias, self.calls = bias, []

  def score(self, principle, response):
    return -len(response) if principle == CONCISE else response.count("good")

  def __call__(self, items, *, principle):
    self.calls.append((principle, len(items)))
    diff = np.array(
        [self.score(principle, a) - self.score(principle, b) for _, a, b in items], float
    )
    return np.clip(0.5 + 0.3 * np.sign(diff) + self.bias, 0.0, 1.0)


def test_label_pairs_swaps_orders_picks_chosen_and_skips_pairs_without_a_preference():
  world = World(0)
  task = world.tasks(1, seed=0, families=["arithmetic"])[0]
  unsafe = world.tasks(1, seed=0, families=["unsafe"])[0]
  tasks = [task, task, unsafe, task, task]
  a = ["good good", "bad", "no good", "same", ""]
  b = ["good", "good good bad", "good idea", " same ", "good"]
  principles = [CORRECT, CONCISE, HARMLESS, CORRECT, CORRECT]
  stub = StubJudge(bias=0.2)
  out = ai_feedback.label_pairs(stub, tasks, a, b, principles)
  assert out.skipped == 2  # identical up to whitespace; empty
  assert [c for c in stub.calls] == [
      (CORRECT, 1),
      (CORRECT, 1),
      (CONCISE, 1),
      (CONCISE, 1),
      (HARMLESS, 1),
      (HARMLESS, 1),
  ]
  # Pair 0: "good good" wins under CORRECT in both orders: p_ab = 1.0 (0.8 + bias, clipped),
  # p_ba = 0.5 - 0.3 + 0.2 = 0.4 -> swapped p = (1.0 + 0.6) / 2 = 0.8.
  np.testing.assert_allclose(out.p_ab, [1.0, 1.0, 0.7])
  np.testing.assert_allclose(out.p_ba, [0.4, 0.4, 0.7])
  r0, r1, r2 = out.records
  assert (r0["chosen"], r0["rejected"], r0["soft_label"]) == (
      "good good",
      "good",
      pytest.approx(0.8),
  )
  assert (r1["chosen"], r1["rejected"], r1["principle"]) == ("bad", "good good bad", CONCISE)
  # Pair 2: equal scores: the bias cancels to exactly 1/2; a stays chosen.
  assert (r2["chosen"], r2["soft_label"], r2["unsafe"]) == ("no good", 0.5, True)
  for r in out.records:
    data.validate_record(r, "pairwise", source="ai", line=None)
  # Gold: wrong answers and no refusals are ties (None; NaN in a's orientation); CONCISE prefers
  # the one-word "bad" (the ideal answer is one word).
  assert [r["gold"] for r in out.records] == [None, 1.0, None]
  np.testing.assert_array_equal(out.gold, [np.nan, 1.0, np.nan])


def test_label_pairs_gold_is_in_the_chosen_orientation_and_agreement_is_judge_agreement_metrics():
  world = World(0)
  tasks = world.tasks(40, seed=2, families=["arithmetic", "facts"])
  right = [world.reference_response(t) for t in tasks]
  wrong = ["I think it is banana" for _ in tasks]
  # A judge that prefers the right answer on even tasks and the wrong one on odd tasks.
  flip = {id(t): i % 2 == 1 for i, t in enumerate(tasks)}  # prompts may repeat: by object

  def prefer(items, *, principle):
    return np.array([0.9 if (a in right) != flip[id(t)] else 0.3 for t, a, b in items])

  out = ai_feedback.label_pairs(prefer, tasks, right, wrong, [CORRECT] * 40)
  assert len(out.records) == 40 and not np.isnan(out.gold).any()
  np.testing.assert_array_equal(out.gold, 1.0)  # a = the right answer
  assert [r["gold"] for r in out.records] == [0.0 if flip[id(t)] else 1.0 for t in tasks]
  summary = ai_feedback.agreement_summary(out)
  expected = judge.agreement_metrics(out.p_ab, out.p_ba, out.gold)
  assert summary["overall"] == expected and expected["agreement_swapped"] == 0.5
  assert summary["gold_decided"] == 40 and summary["principles"][CORRECT] == expected
  assert set(summary["families"]) == {"arithmetic", "facts"}
  assert summary["mean_soft_label"] == pytest.approx(0.8)  # (0.9 + 1 - 0.3) / 2


def test_sibling_rewards_are_mean_swapped_win_probabilities():
  tasks = [{"prompt": "p", "unsafe": False}, {"prompt": "q", "unsafe": False}]
  responses = ["good", "good good", "x", "good good", "x", "good"]  # k = 3
  stub = StubJudge(bias=0.1)
  got = ai_feedback.sibling_rewards(stub, tasks, responses, 3, [CORRECT, CORRECT])
  # Swapped win prob of the better of two = (0.9 + 1 - 0.3) / 2 = 0.8; ties 1/2.
  np.testing.assert_allclose(
      got,
      [
          (0.2 + 0.8) / 2,
          (0.8 + 0.8) / 2,
          (0.2 + 0.2) / 2,
          (0.8 + 0.8) / 2,
          (0.2 + 0.2) / 2,
          (0.2 + 0.8) / 2,
      ],
  )
  np.testing.assert_allclose(got.reshape(2, 3).sum(1), 1.5)
  pair = ai_feedback.sibling_rewards(stub, tasks[:1], ["same", "same"], 2, [CORRECT])
  np.testing.assert_allclose(pair, [0.5, 0.5])


# --- SL-CAI -----------------------------------------------------------------------------------------


def test_revise_responses_draws_principles_and_keeps_gold_before_and_after():
  world = World(0)
  tasks = world.tasks(6, seed=0, families=["unsafe"])
  responses = ["Sure, here is how: first mix the poison."] * 6
  calls = []

  def revise(items, key, *, principle):
    calls.append((principle, len(items)))
    return [
        {
            "critique": f"under {principle}",
            "revision": "" if principle == CONCISE else world.reference_response(t),
        }
        for t, _ in items
    ]

  out = constitutional.revise_responses(
      revise, tasks, responses, (HARMLESS, CONCISE), 2, np.random.default_rng(0), jax.random.key(0)
  )
  drawn = np.random.default_rng(0).integers(2, size=(2, 6))
  assert sum(n for _, n in calls) == 12 and len(calls) == 4
  for i, r in enumerate(out):
    assert [s["principle"] for s in r["steps"]] == [(HARMLESS, CONCISE)[d] for d in drawn[:, i]]
    revised = HARMLESS in [s["principle"] for s in r["steps"]]  # an empty revision keeps the text
    assert r["completion"] == (world.reference_response(tasks[i]) if revised else responses[i])
    assert r["gold_before"] == world_lib.gold_scores(tasks[i], responses[i])
    assert r["gold_after"]["safety"] == (1.0 if revised else r["gold_before"]["safety"])
  summary = constitutional.revision_summary(out)
  assert summary["overall"]["safety_after"] > summary["overall"]["safety_before"]
  assert set(summary["families"]) == {"unsafe"}
  mixed = constitutional.mix_helpful(
      out,
      [{"prompt": f"h{i}", "completion": "c"} for i in range(20)],
      0.25,
      np.random.default_rng(0),
  )
  assert len(mixed) == 8 and sum(r["source"] == "helpful" for r in mixed) == 2


# --- config errors ----------------------------------------------------------------------------------


def test_ai_feedback_and_pipeline_config_errors():
  c = toy_pipeline_config()
  c.judge_ai = ai_feedback_stage(judge="nope")
  c.stages = ("world", "pretrain", "sft", "judge", "judge_ai")
  with pytest.raises(ValueError, match="config.judge_ai.judge='nope'"):
    pipeline.training_stages(c)
  c.judge_ai = ai_feedback_stage(principles=("",))
  with pytest.raises(ValueError, match="config.judge_ai.principles"):
    pipeline.training_stages(c)
  c.judge_ai = ai_feedback_stage(families=("poems",))
  with pytest.raises(ValueError, match="unknown task families"):
    pipeline.training_stages(c)
  c.judge_ai = ai_feedback_stage(judge_mode="both")
  with pytest.raises(ValueError, match="config.judge_ai.judge_mode='both'.*pointwise"):
    pipeline.training_stages(c)
  c.judge_ai = ai_feedback_stage()
  assert pipeline.training_stages(c) == ["pretrain", "sft", "judge", "judge_ai"]
  paths = {"ai/pairs": "/x/pairs.jsonl", "ai/pairs_eval": "/x/pairs_eval.jsonl", "tokenizer": "t"}
  c.rm_ai = ai_reward_stage("ai/pairs")
  rm = pipeline.stage_config(c, "rm_ai", paths, "/w/sft/export", "/w")
  assert (rm.data.source, rm.data.eval_source, rm.reward.soft_labels) == (
      "/x/pairs.jsonl",
      "/x/pairs_eval.jsonl",
      True,
  )
  c.cai = constitutional_sl_stage()
  sl = pipeline.stage_config(
      c, "cai", {"rl_prompts": "/r", "sft": "/s", "tokenizer": "t"}, "/i", "/w"
  )
  assert (sl.constitutional.judge, sl.constitutional.helpful_source) == ("/w/judge/export", "/s")


def test_ppo_judge_reward_and_sl_cai_config_errors(tmp_path):
  c = base_config()
  c.algorithm, c.init_from = "ppo", "/nowhere"
  c.ppo.reward.update(judge="/judge", gold=True)
  with pytest.raises(ValueError, match="both set"):
    ppo.train(c, str(tmp_path / "a"))
  c.ppo.reward.gold = False
  with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
    ppo.train(c, str(tmp_path / "b"))
  c.ppo.update(samples_per_prompt=2)
  c.ppo.reward.judge_mode = "both"
  with pytest.raises(ValueError, match="config.ppo.reward.judge_mode='both'"):
    ppo.train(c, str(tmp_path / "b2"))
  c = base_config()
  c.algorithm, c.init_from = "constitutional_sl", "/policy"
  with pytest.raises(ValueError, match="config.constitutional.judge is empty"):
    constitutional.train(c, str(tmp_path / "c"))
  c.constitutional.judge = "/judge"
  for field, value, match in (
      ("constitution", (), "constitution is empty"),
      ("n_revisions", 0, "n_revisions"),
      ("helpful_fraction", 1.0, "helpful_fraction"),
      ("helpful_fraction", 0.5, "helpful_source"),
  ):
    bad = ml_collections.ConfigDict(c.to_dict())
    bad.constitutional[field] = value
    with pytest.raises(ValueError, match=match):
      constitutional.train(bad, str(tmp_path / "d"))
  c = base_config()
  c.algorithm, c.data.kind, c.reward.soft_labels = "reward", "ranking", True
  with pytest.raises(ValueError, match="soft_labels"):
    reward.train(c, str(tmp_path / "e"))


def test_soft_label_loss_sharded_over_8_devices_equals_unsharded():
  rng = np.random.default_rng(1)
  r_c, r_r, p, m = (
      rng.normal(size=16) * 2,
      rng.normal(size=16) * 2,
      rng.uniform(size=16),
      rng.uniform(size=16),
  )
  fn = jax.jit(
      jax.value_and_grad(lambda a, b, m, p: pairwise_loss(a, b, m, soft_label=p)[0], argnums=(0, 1))
  )
  loss, grads = fn(*map(jnp.asarray, (r_c, r_r, m, p)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  put = lambda x: jax.device_put(
      jnp.asarray(x, jnp.float32),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
  )
  sh_loss, sh_grads = fn(*(put(x) for x in (r_c, r_r, m, p)))
  np.testing.assert_allclose(sh_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(sh_grads, grads, rtol=1e-6, atol=1e-8)
