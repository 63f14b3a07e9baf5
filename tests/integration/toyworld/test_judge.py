"""AI judge: records, gold labellers and critiques, answer-token ids, the preference forward against
a plain per-prompt forward, position-swap maths on stub judges, critique/revision wiring, and an
end-to-end tiny judge trained with the SFT driver that agrees with gold on held-out comparisons.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/toyworld/test_judge.py.
"""

import functools
import json

import jax
import numpy as np
import pytest

from rlhf_jax import data, generate
from rlhf_jax.algorithms import sft
from rlhf_jax.configs.base import base_config
from rlhf_jax.models import ModelConfig, abstract_model, apply, create_model, split_model
from rlhf_jax.toyworld import corpora, judge
from rlhf_jax.toyworld.judge import CONCISE, CORRECT, HARMLESS
from rlhf_jax.train import checkpoint
from tests.helpers.judge import ADD, POISON, RAMBLE, build_tokenizer, build_world


@pytest.fixture(scope="module")
def world():
  return build_world()


@pytest.fixture(scope="module")
def tokenizer(world, tmp_path_factory):
  return build_tokenizer(world, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
  cfg = ModelConfig(
      vocab_size=384, num_layers=2, embed_dim=32, num_heads=2, mlp_dim=64, max_seq_len=512
  )
  graphdef, params = split_model(create_model(cfg, 0))
  return cfg, graphdef, params


def _plain_p_first(graphdef, params, tokenizer, prompt):
  """p(A) from an unpadded, unbucketed forward over one prompt."""
  ids = np.asarray(data.encode_prompt(tokenizer, prompt), np.int32)[None]
  logits, _ = apply(graphdef, params, ids, np.arange(ids.shape[1])[None], np.ones_like(ids))
  pair = np.asarray(logits[0, -1])[list(judge.answer_token_ids(tokenizer))]
  return float(np.exp(pair[0]) / np.exp(pair).sum())


@pytest.mark.slow
def test_preferences_match_plain_forward_and_swap(tiny_model, tokenizer, world):
  _, graphdef, params = tiny_model
  comps = judge.comparisons(world, 5, seed=2, principles=(HARMLESS,), split="eval")
  items = [(c["task"], c["response_a"], c["response_b"]) for c in comps]
  single = judge.judge_preferences(
      graphdef, params, tokenizer, items, principle=HARMLESS, swap=False, batch_size=32
  )
  expected = [
      _plain_p_first(
          graphdef, params, tokenizer, judge.comparison_prompt(HARMLESS, t["prompt"], a, b)
      )
      for t, a, b in items
  ]
  np.testing.assert_allclose(single, expected, atol=1e-5)
  assert np.ptp(single) > 1e-4  # rows really differ: no row reads another row's prompt

  debiased = judge.judge_preferences(graphdef, params, tokenizer, items, principle=HARMLESS)
  reverse = judge.judge_preferences(
      graphdef, params, tokenizer, [(t, b, a) for t, a, b in items], principle=HARMLESS
  )
  np.testing.assert_allclose(debiased + reverse, 1.0, atol=1e-6)  # swapping is antisymmetric
  p_ba = judge.judge_preferences(
      graphdef, params, tokenizer, [(t, b, a) for t, a, b in items], principle=HARMLESS, swap=False
  )
  np.testing.assert_allclose(debiased, (single + 1 - p_ba) / 2, atol=1e-6)

  # Another batch size in the same row and length buckets reuses the compiled forward.
  compiled = judge._next_token_logprobs._cache_size()
  longest = max(
      items,
      key=lambda i: len(
          data.encode_prompt(tokenizer, judge.comparison_prompt(HARMLESS, i[0]["prompt"], *i[1:]))
      ),
  )
  judge.judge_preferences(
      graphdef, params, tokenizer, [longest, items[0]], principle=HARMLESS, swap=False
  )
  assert judge._next_token_logprobs._cache_size() == compiled
  with pytest.raises(ValueError, match="multiple of 32"):
    judge.judge_preferences(graphdef, params, tokenizer, items, principle=HARMLESS, batch_size=20)


def _plain_logp(graphdef, params, tokenizer, prompt, token):
  """log p(token) after one prompt from an unpadded, unbucketed forward."""
  ids = np.asarray(data.encode_prompt(tokenizer, prompt), np.int32)[None]
  logits, _ = apply(graphdef, params, ids, np.arange(ids.shape[1])[None], np.ones_like(ids))
  last = np.asarray(logits[0, -1], np.float64)
  return float(last[token] - np.log(np.exp(last - last.max()).sum()) - last.max())


@pytest.mark.slow
def test_pointwise_preferences_are_bradley_terry_on_single_answer_grades(
    tiny_model, tokenizer, world
):
  """Each response's grade is log p("No problems." first) after its critique prompt (as an
  unbatched forward computes it); p(a over b) = sigmoid(grade_a - grade_b), the same in either
  order; a response repeated across items is graded once, and the same text under two different
  requests is graded under each."""
  _, graphdef, params = tiny_model
  comps = judge.comparisons(world, 5, seed=2, principles=(CORRECT,), split="eval")
  items = [(c["task"], c["response_a"], c["response_b"]) for c in comps]
  token = judge.no_problems_token_id(tokenizer)
  assert judge.NO_PROBLEMS.startswith(tokenizer.decode([token]).strip())
  grades = judge.judge_scores(
      graphdef, params, tokenizer, [(t, r) for t, a, b in items for r in (a, b)], principle=CORRECT
  )
  expected = [
      _plain_logp(
          graphdef, params, tokenizer, judge.critique_prompt(CORRECT, t["prompt"], r), token
      )
      for t, a, b in items
      for r in (a, b)
  ]
  np.testing.assert_allclose(grades, expected, atol=1e-4)
  p = judge.judge_preferences(
      graphdef, params, tokenizer, items, principle=CORRECT, mode="pointwise"
  )
  np.testing.assert_allclose(p, 1 / (1 + np.exp(-(grades[0::2] - grades[1::2]))), atol=1e-6)
  reverse = judge.judge_preferences(
      graphdef,
      params,
      tokenizer,
      [(t, b, a) for t, a, b in items],
      principle=CORRECT,
      mode="pointwise",
      swap=False,
  )
  np.testing.assert_allclose(p + reverse, 1.0, atol=1e-9)  # no position to be biased by
  other = dict(items[1][0], prompt=items[0][0]["prompt"] + " Please.")
  both = judge.judge_preferences(
      graphdef,
      params,
      tokenizer,
      [items[0], (other, items[0][1], items[0][2])],
      principle=CORRECT,
      mode="pointwise",
  )
  assert both[0] == pytest.approx(p[0]) and both[1] != pytest.approx(p[0], abs=1e-7)
  with pytest.raises(ValueError, match="judge mode"):
    judge.judge_preferences(graphdef, params, tokenizer, items, principle=CORRECT, mode="both")


@pytest.mark.slow
def test_score_mode_grades_are_expected_digits(tiny_model, tokenizer, world):
  """mode "score": each response's grade is sum_k k p(k) over the ten grade tokens after its score
  prompt, renormalised over them (as an unbatched forward computes it); p(a over b) =
  sigmoid(grade_a - grade_b), the same in either order."""
  _, graphdef, params = tiny_model
  comps = judge.comparisons(world, 5, seed=2, principles=(CORRECT,), split="eval")
  items = [(c["task"], c["response_a"], c["response_b"]) for c in comps]
  tokens = judge.answer_token_ids(tokenizer, judge.GRADES)
  graded = [(t, r) for t, a, b in items for r in (a, b)]
  grades = judge.judge_scores(graphdef, params, tokenizer, graded, principle=CORRECT, mode="score")
  expected = []
  for t, r in graded:
    prompt = judge.score_prompt(CORRECT, t["prompt"], r)
    p = np.exp([_plain_logp(graphdef, params, tokenizer, prompt, k) for k in tokens])
    expected.append(float(p @ np.arange(10) / p.sum()))
  np.testing.assert_allclose(grades, expected, atol=1e-4)
  assert np.all((grades >= 0) & (grades <= 9))
  p = judge.judge_preferences(graphdef, params, tokenizer, items, principle=CORRECT, mode="score")
  np.testing.assert_allclose(p, 1 / (1 + np.exp(-(grades[0::2] - grades[1::2]))), atol=1e-6)
  reverse = judge.judge_preferences(
      graphdef, params, tokenizer, [(t, b, a) for t, a, b in items], principle=CORRECT, mode="score"
  )
  np.testing.assert_allclose(p + reverse, 1.0, atol=1e-9)
  with pytest.raises(ValueError, match="grading mode 'pairwise'"):
    judge.judge_scores(graphdef, params, tokenizer, graded, principle=CORRECT, mode="pairwise")


# --- critique and revision ------------------------------------------------------------------------


class ScriptedSampler:
  """Stands in for `generate.Sampler`: records the prompts it is given and answers every row of
  its n-th call with replies[n]."""

  def __init__(self, tokenizer, replies):
    self.tokenizer, self.replies, self.prompts = tokenizer, replies, []

  def __call__(self, params, tokens, mask, rng, *, max_new_tokens, temperature, eos_id, pad_id):
    self.prompts.append([self.tokenizer.decode(t[m]) for t, m in zip(tokens, mask)])
    reply = self.tokenizer(self.replies[len(self.prompts) - 1], add_special_tokens=False)[
        "input_ids"
    ]
    out = np.tile(np.asarray(reply + [eos_id], np.int32), (len(tokens), 1))
    ones = np.ones(out.shape, bool)
    return generate.GenerateOutput(out, np.zeros(out.shape, np.float32), ones, ones.sum(1))


@pytest.mark.slow
def test_critique_then_revision_sees_the_critique(tokenizer, tiny_model):
  items = [(ADD, RAMBLE), (POISON, "No.")]
  sampler = ScriptedSampler(tokenizer, ["It rambles.", "12"])
  out = judge.critique_and_revise(
      sampler, None, tokenizer, items, jax.random.key(0), principle=CONCISE
  )
  assert out == [{"critique": "It rambles.", "revision": "12"}] * 2
  critique_prompts, revision_prompts = sampler.prompts
  assert "Critique the response under the principle." in critique_prompts[0]
  for (task, response), prompt in zip(items, revision_prompts):
    assert f"Request: {task['prompt']}\nResponse: {response}\nCritique: It rambles.\n" in prompt

  cfg, graphdef, params = tiny_model  # the real sampler: shapes and decoding line up
  real = judge.critique_and_revise(
      generate.Sampler(graphdef, cfg),
      params,
      tokenizer,
      items,
      jax.random.key(0),
      principle=CONCISE,
      max_new_tokens=4,
  )
  assert len(real) == 2 and all(isinstance(r["critique"], str) for r in real)


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_trained_tiny_judge_agrees_with_gold(world, tmp_path):
  """A tiny judge trained from scratch with the SFT driver on the comparison records of two
  principles beats chance on held-out comparisons after swapping (~0.8 measured)."""
  principles = (HARMLESS, CONCISE)
  # From scratch in 200 steps a tiny model learns comparisons only when they are all it sees.
  records = judge.judge_sft_records(world, 600, seed=0, principles=principles, kinds=("compare",))
  with open(tmp_path / "judge.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  tokenizer = data.train_tokenizer(
      corpora.tokenizer_texts(world) + judge.tokenizer_texts(world), 1024, tmp_path / "tokenizer"
  )
  c = base_config()
  c.model.update(
      vocab_size=0,
      num_layers=2,
      embed_dim=64,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=192,
      max_seq_len=256,
  )
  c.optim.update(lr=3e-3, warmup_steps=20, weight_decay=0.01)
  c.train.update(
      steps=200,
      batch_size=16,
      seq_len=256,
      log_every=50,
      eval_every=200,
      eval_batches=1,
      checkpoint_every=200,
      async_checkpoint=False,
  )
  c.data.update(
      source=str(tmp_path / "judge.jsonl"),
      tokenizer=str(tmp_path / "tokenizer"),
      packing=True,
      eval_fraction=0.02,
  )
  c.sample.num_examples = 0
  sft.train(c, str(tmp_path / "judge"))

  params, meta = checkpoint.load_params(tmp_path / "judge" / "export")
  graphdef, _, _ = abstract_model(ModelConfig.from_dict(meta["model"]))
  held_out = judge.comparisons(world, 128, seed=0, principles=principles, split="eval")
  prefer = functools.partial(judge.judge_preferences, graphdef, params, tokenizer, swap=False)
  result = judge.judge_agreement(prefer, held_out)
  overall = result["overall"]
  print("tiny judge vs gold:", json.dumps(overall))
  assert overall["agreement_swapped"] > 0.6, result
  assert 0.3 < overall["position_bias"] < 0.7, result
  for principle in principles:
    assert result["principles"][principle]["agreement_swapped"] > 0.55, result
