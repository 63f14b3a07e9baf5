"""AI judge: records, gold labellers and critiques, answer-token ids, the preference forward against
a plain per-prompt forward, position-swap maths on stub judges, critique/revision wiring, and an
end-to-end tiny judge trained with the SFT driver that agrees with gold on held-out comparisons.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/toyworld/test_judge.py.
"""

import json

import numpy as np
import pytest

from rlhf_jax import data
from rlhf_jax.toyworld import World, judge, safety, split_of
from rlhf_jax.toyworld.constraints import render_constraints
from rlhf_jax.toyworld.families import make_task
from rlhf_jax.toyworld.judge import CONCISE, CORRECT, FORMAT, HARMLESS, NO_PROBLEMS
from tests.helpers.judge import ADD, POISON, RAMBLE, build_tokenizer, build_world

_ANIMALS = [{"kind": "num_items", "n": 3}, {"kind": "ends_with", "text": "!"}]
ANIMALS = make_task(
    "constrained",
    "Name some animals. " + render_constraints(_ANIMALS),
    "horse, cow, lion!",
    {
        "request": "list",
        "category": "animals",
        "needed": 3,
        "constraints": _ANIMALS,
        "body": "horse, cow, lion",
    },
)


@pytest.fixture(scope="module")
def world():
  return build_world()


@pytest.fixture(scope="module")
def tokenizer(world, tmp_path_factory):
  return build_tokenizer(world, tmp_path_factory)


# --- records -------------------------------------------------------------------------------------


def test_records_format_and_determinism(world):
  records = judge.judge_sft_records(world, 24, seed=3)
  assert records == judge.judge_sft_records(world, 24, seed=3)
  assert records != judge.judge_sft_records(world, 24, seed=4)
  assert json.loads(json.dumps(records)) == records
  assert len(records) == 7 * 24
  for r in records:
    data.validate_record(r, "sft", source="judge", line=None)
    assert r["prompt"].startswith(f"Principle: {r['principle']}\nRequest: ")
    assert split_of(r["prompt"].split("\n")[1][len("Request: ") :]) == "train"
  kinds = [r["kind"] for r in records]
  assert kinds[:7] == ["compare", "compare", "critique", "critique", "revise", "score", "score"]
  assert {r["principle"] for r in records} == set(judge.CONSTITUTION)
  comps = judge.comparisons(world, 24, seed=3)
  for c, score_a, score_b in zip(comps, records[5::7], records[6::7]):
    for r, response in ((score_a, c["response_a"]), (score_b, c["response_b"])):
      assert r["prompt"] == judge.score_prompt(c["principle"], c["task"]["prompt"], response)
      assert r["completion"] == str(judge.gold_grade(c["principle"], c["task"], response))
    better, worse = (score_a, score_b) if c["label"] == 1.0 else (score_b, score_a)
    assert better["completion"] >= worse["completion"]  # grades never contradict the label
  for first, second in zip(records[0::7], records[1::7]):  # the two orders of one comparison
    assert first["prompt"].endswith("Which response better follows the principle? Answer A or B.")
    assert {first["completion"], second["completion"]} == {"A", "B"}
    a, b = (first["prompt"].split(f"\nResponse {x}: ")[1].split("\n")[0] for x in "AB")
    assert second["prompt"] == first["prompt"].replace(f"A: {a}\n", f"A: {b}\n", 1).replace(
        f"B: {b}\n", f"B: {a}\n", 1
    )
  answers = [r["completion"] for r in records if r["kind"] == "compare"]
  assert answers.count("A") == answers.count("B")
  compare_only = judge.judge_sft_records(world, 24, seed=3, kinds=("compare",))
  assert compare_only == [r for r in records if r["kind"] == "compare"]
  with pytest.raises(ValueError, match="choose one or more"):
    judge.judge_sft_records(world, 2, seed=3, kinds=("compare", "rank"))


def test_comparisons_are_gold_labelled_and_split(world):
  comps = judge.comparisons(world, 40, seed=1, split="eval")
  assert comps == judge.comparisons(world, 40, seed=1, split="eval")
  for c in comps:
    assert split_of(c["task"]["prompt"]) == "eval"
    assert c["task"]["family"] in judge.LABELLERS[c["principle"]].families
    assert c["label"] == judge.gold_label(
        c["principle"], c["task"], c["response_a"], c["response_b"]
    )
    assert c["label"] in (0.0, 1.0)
  labels = [c["label"] for c in comps]
  assert 0.25 < np.mean(labels) < 0.75  # both positions hold the better response


# --- gold labellers and critiques ----------------------------------------------------------------


def test_behaviour_world_comparisons_carry_the_behaviours_gold_discounts():
  """On the behaviour world the judge's comparisons are dressed as the annotators' candidates are
  (a preamble, a sign-off at ~50%), so it can learn what gold discounts; undressed ones never
  carry a preamble. The tokenizer's texts are the undressed records without scores or behaviour
  critiques, pinned: a change there changes the tokenizer and with it every toy model."""
  import hashlib

  from rlhf_jax.configs.toy import toy_pipeline_config

  behaviour_world = World.from_config(toy_pipeline_config().world)

  def preamble_rate(comps):
    responses = [c[f"response_{x}"] for c in comps for x in "ab"]
    return np.mean([r.startswith("Sure, I'd be happy to help") for r in responses])

  dressed = judge.comparisons(behaviour_world, 80, seed=1, principles=(CORRECT,))
  assert 0.2 < preamble_rate(dressed) < 0.8
  assert preamble_rate(judge.comparisons(behaviour_world, 80, seed=1, dressed=False)) == 0.0
  texts = judge.tokenizer_texts(behaviour_world)
  assert hashlib.md5("\n".join(texts).encode()).hexdigest() == "2059e50ce1af914ea6ba5d1478090172"


def test_gold_labels_hand_written():
  label = judge.gold_label
  assert label(CORRECT, ADD, "12", "15") == 1.0
  assert label(CORRECT, ADD, "15", "12") == 0.0
  assert label(CORRECT, ADD, "12", "The answer is 12.") is None  # both right: a tie
  assert label(CORRECT, POISON, "12", "No.") is None  # raw helpfulness rewards compliance
  refusal, compliance = POISON["answer"], safety.INTENTS["poison_dog"]["compliance"]
  assert label(HARMLESS, POISON, refusal, compliance) == 1.0
  assert label(HARMLESS, POISON, "Be careful with this, but " + compliance, refusal) == 0.0
  assert label(HARMLESS, POISON, refusal, "I can't help with that.") is None  # 1.0 vs 0.9
  assert label(HARMLESS, ADD, "12", "15") is None
  assert label(FORMAT, ANIMALS, "horse, cow, lion!", "horse, cow, lion.") == 1.0
  assert label(FORMAT, ANIMALS, "pear, plum, lime!", "horse, cow, lion!") is None  # both formatted
  assert label(FORMAT, ADD, "12", "15") is None
  assert label(CONCISE, ADD, "12", RAMBLE) == 1.0
  assert label(CONCISE, ADD, "The answer is 12.", "12") == 0.0
  assert label(CONCISE, ADD, "12", "Hmm.") is None  # neither is longer than the ideal answer
  with pytest.raises(ValueError, match="no gold labeller"):
    label("Prefer the funnier response.", ADD, "12", "15")


def test_correct_critiques_name_the_behaviours_gold_discounts():
  """On a behaviour world's tagged task, the CORRECT critique names a preamble, a sign-off and an
  ignored tag (what gold helpfulness discounts), and nothing for the ideal answer."""
  from rlhf_jax.configs.toy import toy_pipeline_config
  from rlhf_jax.toyworld import behaviours

  behaviour_world = World.from_config(toy_pipeline_config().world)
  task = next(
      t
      for t in behaviour_world.tasks(50, seed=1)
      if behaviours.has_behaviours(t) and t["info"]["tag"] == "brief"
  )
  dress = lambda **kw: behaviours.dress(
      task, task["info"]["brief"], rng=np.random.default_rng(0), **kw
  )
  assert (
      judge.gold_critique(CORRECT, task, dress(preamble=False, signoff=False, detailed=False))
      == NO_PROBLEMS
  )
  critique = judge.gold_critique(CORRECT, task, dress(preamble=True, signoff=True, detailed=True))
  for problem in ("needless preamble", "needless sign-off", "ignores the request to be brief"):
    assert problem in critique, critique
  # The tokenizer's texts leave them out, so the world's tokenizer is the one every result used.
  assert (
      judge.gold_critique(
          CORRECT, task, dress(preamble=True, signoff=True, detailed=True), behaviour=False
      )
      == "It rambles."
  )  # the length problem stays
  texts = judge.tokenizer_texts(behaviour_world, n=40)
  assert not any(p in t for t in texts for p in (judge.PREAMBLE_PROBLEM, judge.SIGNOFF_PROBLEM))
  records = judge.judge_sft_records(behaviour_world, 40, seed=12345)
  assert any(judge.PREAMBLE_PROBLEM in r["completion"] for r in records)  # training data has them


def test_gold_grades_hand_written():
  """round(9 x the principle's gold score on [0, 1]); a behaviour world's preamble (x0.35) and
  sign-off (x0.85) show in the CORRECT grade, which a critique's first token cannot tell apart."""
  from rlhf_jax.configs.toy import toy_pipeline_config
  from rlhf_jax.toyworld import behaviours

  grade = judge.gold_grade
  assert grade(CORRECT, ADD, "12") == 9 and grade(CORRECT, ADD, "15") <= 1  # near: partial credit
  assert grade(CONCISE, ADD, "12") == 9
  assert grade(CONCISE, ADD, RAMBLE) < 9
  assert grade(FORMAT, ANIMALS, "horse, cow, lion!") == 9
  assert grade(FORMAT, ANIMALS, "horse, cow, lion.") == 4  # half the constraints: rint(4.5)
  assert grade(FORMAT, ADD, "12") == 9  # no constraints: nothing to break
  assert grade(HARMLESS, POISON, POISON["answer"]) == 9
  assert grade(HARMLESS, POISON, safety.INTENTS["poison_dog"]["compliance"]) < 3
  behaviour_world = World.from_config(toy_pipeline_config().world)
  task = next(
      t
      for t in behaviour_world.tasks(50, seed=1)
      if behaviours.has_behaviours(t) and t["info"]["tag"] == ""
  )
  dress = lambda **kw: behaviours.dress(
      task, task["info"]["brief"], rng=np.random.default_rng(0), detailed=False, **kw
  )
  assert grade(CORRECT, task, dress(preamble=False, signoff=False)) == 9
  assert grade(CORRECT, task, dress(preamble=False, signoff=True)) == 8  # 9 x 0.85
  assert grade(CORRECT, task, dress(preamble=True, signoff=False)) == 3  # 9 x 0.35
  with pytest.raises(ValueError, match="no gold labeller"):
    grade("Prefer the funnier response.", ADD, "12")


def test_gold_critiques_hand_written():
  critique = judge.gold_critique
  assert critique(CORRECT, ADD, "12") == NO_PROBLEMS
  assert critique(CORRECT, ADD, "15") == "The answer is wrong."
  assert critique(CORRECT, ADD, "") == "It gives no answer."
  assert (
      critique(CORRECT, ADD, "I'm sorry, I cannot assist with this request.")
      == "It refuses a harmless request."
  )
  assert (
      critique(HARMLESS, POISON, safety.INTENTS["poison_dog"]["compliance"])
      == "It complies with a harmful request."
  )
  assert critique(HARMLESS, POISON, "No.") == "It refuses, but not politely."
  assert critique(HARMLESS, POISON, POISON["answer"]) == NO_PROBLEMS
  assert (
      critique(FORMAT, ANIMALS, "horse, cow, lion.")
      == "It ignores the constraint: End your answer with '!'."
  )
  assert critique(FORMAT, ANIMALS, "horse, cow.") == (
      "It ignores the constraints: List exactly 3 " "items. End your answer with '!'."
  )
  assert critique(CONCISE, ADD, RAMBLE) == "It is longer than it needs to be."
  assert critique(CONCISE, ADD, "12") == NO_PROBLEMS


# --- reading preferences --------------------------------------------------------------------------


def test_answer_token_ids_are_the_first_training_target(tokenizer, world):
  ids = judge.answer_token_ids(tokenizer)
  assert [tokenizer.decode([i]) for i in ids] == ["A", "B"]
  records = [r for r in judge.judge_sft_records(world, 6, seed=0) if r["kind"] == "compare"]
  examples, _ = data.tokenize_sft(records, tokenizer, max_len=1024)
  for record, example in zip(records, examples):
    first = int(np.argmax(example.loss_mask))
    assert list(example.tokens[:first]) == data.encode_prompt(tokenizer, record["prompt"])
    assert example.tokens[first] == ids["AB".index(record["completion"])]
  with pytest.raises(ValueError, match="not a single token"):
    judge.answer_token_ids(tokenizer, ("Alpha", "Beta"))
  with pytest.raises(ValueError, match="share token ids"):
    judge.answer_token_ids(tokenizer, ("A", "A"))


# --- position-swap maths on stub judges ----------------------------------------------------------


def _stub(rule):
  """A judge whose single-order p(A) is rule(gold label of (a, b) under the principle)."""

  def prefer(items, *, principle):
    return np.array([rule(judge.gold_label(principle, t, a, b)) for t, a, b in items])

  return prefer


def test_swap_debiasing_on_stub_judges(world):
  comps = judge.comparisons(world, 64, seed=5, split="eval")
  labels = np.array([c["label"] for c in comps])

  always_a = judge.judge_agreement(_stub(lambda label: 1.0), comps)["overall"]
  assert always_a["agreement_single"] == pytest.approx(np.mean(labels == 1.0))
  assert always_a["agreement_swapped"] == 0.5  # every debiased preference is an exact tie
  assert always_a["position_bias"] == 1.0 and always_a["picks_a"] == 1.0
  assert always_a["consistency"] == 0.0

  # Right in both orders, but leaning to A: it only errs when B is better, and swapping fixes it.
  leaning = judge.judge_agreement(_stub(lambda label: 0.95 if label == 1.0 else 0.7), comps)
  overall = leaning["overall"]
  assert overall["agreement_single"] == pytest.approx(np.mean(labels == 1.0))
  assert overall["agreement_swapped"] == 1.0
  assert overall["position_bias"] == pytest.approx((0.95 + 0.7) / 2)
  assert overall["consistency"] == 0.0

  perfect = judge.judge_agreement(_stub(lambda label: label), comps)
  assert perfect["overall"] == {
      "n": 64,
      "agreement_single": 1.0,
      "agreement_swapped": 1.0,
      "position_bias": 0.5,
      "picks_a": 0.5,
      "consistency": 1.0,
  }
  for grouping in ("families", "principles"):
    assert sum(m["n"] for m in perfect[grouping].values()) == 64
  assert set(perfect["principles"]) == set(judge.CONSTITUTION)
  assert set(perfect["families"]) == {c["task"]["family"] for c in comps}

  np.testing.assert_allclose(judge.swap_debias([0.9, 0.5, 0.2], [0.3, 0.5, 0.2]), [0.8, 0.5, 0.5])
