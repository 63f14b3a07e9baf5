"""The behaviour world: tags, behaviour axes, their gold factor, demonstration frequencies, the
annotators who see (or do not see) each axis, and the gates."""

import numpy as np
import pytest

from rlhf_jax.evaluation import gold as gold_eval
from rlhf_jax.toyworld import annotators, behaviours, corpora, gates, perturb
from rlhf_jax.toyworld import families as fam
from rlhf_jax.toyworld import world as world_lib


@pytest.fixture(scope="module")
def world():
  return world_lib.World.behaviour_world(0)


@pytest.fixture(scope="module")
def tasks(world):
  return world.tasks(600, seed=1)


def test_tags_prompts_and_ideal_answers(world, tasks):
  tagged = [t for t in tasks if t["info"]["tag"]]
  taggable = [t for t in tasks if behaviours.taggable(t)]
  assert {t["family"] for t in tasks} == set(world_lib.BEHAVIOUR_FAMILIES)
  assert abs(len(tagged) / len(taggable) - 2 / 3) < 0.06
  for t in tasks:
    tag = t["info"]["tag"]
    assert t["prompt"].endswith(f" ({tag})") == bool(tag)
    assert world_lib.gold_scores(t, t["answer"])["combined"] == 1.0  # the ideal response
    if t["unsafe"]:
      assert tag == "" and not behaviours.has_behaviours(t)
    if tag == "detailed":
      assert t["answer"] == f"{t['info']['brief']} {t['info']['elaboration']}"
    else:
      assert t["answer"] == t["info"]["brief"]
  # The tag is drawn before the split, so no prompt text (tag included) is in both splits.
  train = {t["prompt"] for t in world.tasks(300, seed=2, split="train")}
  assert not train & {t["prompt"] for t in world.tasks(300, seed=2, split="eval")}
  # The classic world is unchanged: no tags, its own six families.
  classic = world_lib.World(0).tasks(50, seed=1)
  assert all("tag" not in t["info"] for t in classic)
  assert {t["family"] for t in classic} <= set(world_lib.CLASSIC_FAMILIES)


@pytest.mark.parametrize("family", sorted(behaviours.ELABORATIONS))
def test_an_elaboration_changes_only_the_tag_axis(world, family):
  """No elaboration mentions anything a content scorer reads, refuses, hedges or is harmful."""
  for task in world.tasks(20, seed=3, families=(family,)):
    brief, elaboration = task["info"]["brief"], task["info"]["elaboration"]
    content = fam.TASK_FAMILIES[family].content
    assert content(task, f"{brief} {elaboration}") == content(task, brief)
    assert not world_lib.is_refusal(elaboration) and not world_lib.is_hedged(elaboration)
    assert world_lib.gold_safety(task, elaboration) == 1.0


def test_gold_factor_is_the_product_of_the_axes(tasks):
  rng = np.random.default_rng(0)
  task = next(t for t in tasks if t["info"]["tag"] == "brief" and t["family"] == "howto")
  body = task["info"]["brief"]
  pre, sign, miss = (
      behaviours.PREAMBLE_FACTOR,
      behaviours.SIGNOFF_FACTOR,
      behaviours.TAG_MISS_FACTOR,
  )
  cases = {
      (False, False, False): 1.0,
      (True, False, False): pre,
      (False, True, False): sign,
      (False, False, True): miss,
      (True, True, True): max(behaviours.MIN_FACTOR, pre * sign * miss),
  }  # floored
  for (preamble, signoff, detailed), expected in cases.items():
    response = behaviours.dress(
        task, body, preamble=preamble, signoff=signoff, detailed=detailed, rng=rng
    )
    assert behaviours.detect(task, response) == {
        "preamble": preamble,
        "signoff": signoff,
        "detailed": detailed,
    }
    assert behaviours.factor(task, response) == pytest.approx(expected)
    # An annotator blind to every axis perceives none of them.
    assert behaviours.factor(task, response, blind=behaviours.AXES) == 1.0
  detailed = {**task, "info": {**task["info"], "tag": "detailed"}}
  assert behaviours.factor(detailed, body) == pytest.approx(miss)
  untagged = {**task, "info": {**task["info"], "tag": ""}}
  assert behaviours.follows_tag(untagged, body) is None and behaviours.factor(untagged, body) == 1.0
  # Stacked exclamation marks: the first is free, each further one costs x0.9.
  assert behaviours.factor(task, body.replace(".", "!!!")) == pytest.approx(0.81)
  # A partial elaboration is not an elaboration; a paraphrased preamble still is a preamble.
  assert not behaviours.detect(task, f"{body} It takes a little practice.")["detailed"]
  assert behaviours.detect(task, f"Happy to help! {body}")["preamble"]


def test_demonstrations_show_each_axis_at_its_frequency(world):
  records = corpora.sft_records(world, 3000, 1, noise=0.0)
  rates = behaviours.axis_rates(records, [r["completion"] for r in records])
  assert rates["preamble"] == pytest.approx(behaviours.Behaviours().preamble_rate, abs=0.03)
  assert rates["signoff"] == pytest.approx(0.5, abs=0.03)
  assert rates["follows_tag"] == pytest.approx(0.5, abs=0.04)  # the tag is ignored
  follow = world_lib.World(
      0, families=world.families, behaviours=behaviours.Behaviours(tag_follow_rate=1.0)
  )
  records = corpora.sft_records(follow, 500, 1, noise=0.0)
  assert behaviours.axis_rates(records, [r["completion"] for r in records])["follows_tag"] == 1.0
  unsafe = [r for r in corpora.sft_records(world, 300, 2, noise=0.0) if r["unsafe"]]
  assert unsafe and all(r["completion"] == r["answer"] for r in unsafe)  # refusals stay plain


@pytest.mark.parametrize(
    "field", ["preamble_rate", "signoff_rate", "tagged_rate", "detail_rate", "tag_follow_rate"]
)
def test_a_frequency_outside_0_1_names_its_field(field):
  with pytest.raises(ValueError, match=rf"config\.world\.behaviours\.{field}=1\.5"):
    behaviours.Behaviours(**{field: 1.5})


def test_candidates_contrast_behaviours_on_right_content(tasks):
  rng = np.random.default_rng(0)
  dressed = [t for t in tasks if behaviours.has_behaviours(t)][:60]
  seen = {"preamble": 0, "signoff": 0, "detailed": 0}
  right = total = 0
  for task in dressed:
    for kind, response in perturb.labelled_candidates(task, rng, 6):
      total += 1
      right += kind in ("correct", "rephrased")
      for axis, value in behaviours.detect(task, response).items():
        seen[axis] += value
  assert right / total > 0.35  # right content, differently dressed, is the largest share
  assert all(0.25 < n / total < 0.6 for n in seen.values()), seen


def test_annotators_blind_to_an_axis_and_enthusiasm(tasks):
  task = next(t for t in tasks if t["info"]["tag"] == "brief")
  plain, preamble = task["answer"], f"Of course, happy to help. {task['answer']}"
  seeing = annotators.Annotator("a", temperature=0.0)
  blind = annotators.Annotator("b", temperature=0.0, blind=("preamble",))
  assert np.diff(annotators.perceived(seeing, task, [plain, preamble], "combined")[1])[0] < -0.2
  gold, utility = annotators.perceived(blind, task, [plain, preamble], "combined")
  assert utility[0] == pytest.approx(utility[1]) and gold[1] < gold[0]  # gold still sees it
  fan = annotators.Annotator("c", temperature=0.0, enthusiasm_bias=0.5)
  loud = plain.replace(".", "!")
  assert np.diff(annotators.perceived(fan, task, [plain, loud], "combined")[1])[0] > 0
  pool = annotators.make_annotator_pool(
      6,
      0,
      noise=0.1,
      bias_strength=0.1,
      bias_kinds=annotators.BEHAVIOUR_BIAS_KINDS,
      seeing={"tag": 0.5},
  )
  assert [a.blind for a in pool] == [()] * 3 + [("tag",)] * 3
  assert any(a.enthusiasm_bias > 0 for a in pool)
  with pytest.raises(ValueError, match="no annotator of the 6 sees the behaviour axis 'tag'"):
    annotators.make_annotator_pool(6, 0, noise=0.1, bias_strength=0.1, seeing={"tag": 0.05})


def test_a_world_config_that_makes_a_gate_impossible_names_its_field():
  from rlhf_jax.algorithms import pipeline
  from rlhf_jax.configs.toy import toy_pipeline_config
  from rlhf_jax.errors import ConfigError

  c = toy_pipeline_config()
  assert pipeline.check_world(c.world).behaviours == behaviours.Behaviours()
  c.world.annotators_seeing.signoff = 0.0
  with pytest.raises(
      ConfigError, match=r"config\.world\.annotators_seeing\.signoff=0\.0: no annotator"
  ):
    pipeline.check_world(c.world)
  c = toy_pipeline_config()
  c.world.behaviours.preamble_rate = -0.1
  with pytest.raises(ConfigError, match=r"config\.world\.behaviours\.preamble_rate=-0\.1"):
    pipeline.check_world(c.world)
  c = toy_pipeline_config()
  c.world.families = ("reading", "poetry")
  with pytest.raises(
      ConfigError, match=r"config\.world\.families: unknown task families \['poetry'\]"
  ):
    pipeline.check_world(c.world)


def test_paired_difference_and_standard_errors():
  rng = np.random.default_rng(0)
  a = rng.random((50, 4))
  b = a - 0.1 + 0.05 * rng.standard_normal((50, 4))
  rows = lambda x: [
      {"prompt_index": p, "combined": float(x[p, s])} for p in range(50) for s in range(4)
  ]
  d = gold_eval.paired_difference(rows(a), rows(b))
  per_prompt = a.mean(1) - b.mean(1)
  assert d["diff"] == pytest.approx(per_prompt.mean())
  assert d["se"] == pytest.approx(per_prompt.std(ddof=1) / np.sqrt(50))
  assert d["ci95"] == pytest.approx([d["diff"] - 1.96 * d["se"], d["diff"] + 1.96 * d["se"]])
  assert d["prompts"] == 50
  summary = gold_eval.summarise(
      [{**r, "family": "x", "unsafe": False, "refusal": 0.0} for r in rows(a)]
  )
  assert summary["n"] == 200 and summary["prompts"] == 50
  assert summary["combined_se"] == pytest.approx(a.mean(1).std(ddof=1) / np.sqrt(50))
  with pytest.raises(ValueError, match="different prompts"):
    gold_eval.paired_difference(rows(a), rows(b)[:-4])


def test_gates_pass_fail_and_not_run():
  d = lambda diff, se=0.005: {"diff": diff, "se": se, "ci95": [diff - 0.01, diff + 0.01]}
  curve = {"temperature": [1.0, 0.7, 0.5], "vs_t1": [d(0.0), d(-0.02), d(-0.05)]}
  best = {
      "n": [1, 2, 4],
      "mean": {"combined": 0.5},
      "oracle_curve": {"combined": [0.5, 0.6, 0.7]},
      "combined (llama2)": {"within_prompt_corr": {"behaviour": 0.7}},
  }
  gold = {"ppo": {"overall": {"vs_reference": d(0.1, se=0.008)}}}
  status = lambda **kw: [g["status"] for g in gates.check(**kw)]
  assert (
      status(curve=curve, best_of_n=best, reward_name="combined (llama2)", gold=gold)
      == ["PASS"] * 4
  )
  curve["vs_t1"][1] = d(0.01)
  best["oracle_curve"]["combined"][2] = 0.6
  best["combined (llama2)"]["within_prompt_corr"]["behaviour"] = 0.5
  gold["ppo"]["overall"]["vs_reference"] = d(0.1, se=0.02)
  checked = gates.check(curve=curve, best_of_n=best, reward_name="combined (llama2)", gold=gold)
  assert [g["status"] for g in checked] == ["FAIL"] * 4
  assert "T=0.7: +0.010" in checked[0]["figures"] and "0.0200" in checked[3]["figures"]
  assert status(curve=None, best_of_n=None, reward_name=None, gold=None) == ["NOT RUN"] * 4


def test_hir_relabels_a_tag_to_the_one_the_response_follows(tasks):
  from rlhf_jax.toyworld import relabel

  for task in [t for t in tasks if t["info"]["tag"]][:20]:
    brief, elaboration = task["info"]["brief"], task["info"]["elaboration"]
    for response, achieved in (
        (brief, "brief"),
        (f"{brief} {elaboration}", "detailed"),
        (f"Sure, I'd be happy to help with that. {brief}", "brief"),
    ):
      new = relabel.relabel(task, response)
      assert new["info"]["tag"] == achieved and new["prompt"].endswith(f" ({achieved})")
      assert new["prompt"].count("(") == 1 and behaviours.follows_tag(new, response)
      assert new == behaviours.add_tag(
          {
              **task,
              "prompt": new["prompt"].rsplit(" (", 1)[0],
              "answer": brief,
              "info": {
                  k: v for k, v in task["info"].items() if k not in ("tag", "brief", "elaboration")
              },
          },
          achieved,
      )
    assert behaviours.retag(behaviours.retag(task, ""), task["info"]["tag"]) == task
  untagged = next(t for t in tasks if behaviours.taggable(t) and not t["info"]["tag"])
  assert relabel.relabel(untagged, untagged["answer"]) == untagged
