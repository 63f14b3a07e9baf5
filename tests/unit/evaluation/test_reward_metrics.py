"""preference_report, ranking_report and report_rows against hand-computed cases."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from rlhf_jax.evaluation.reward_metrics import preference_report, ranking_report, report_rows


def _pair(**fields):
  return {"prompt": "p", "chosen": "a", "rejected": "b", **fields}


def _ranking(k, **fields):
  return {"prompt": "p", "responses": [f"r{i}" for i in range(k)], **fields}


# ----------------------------------------------------------------------------- pairwise


def test_accuracy_margin_and_slices():
  records = [
      _pair(margin=2, family="facts"),
      _pair(margin=0, family="math"),
      _pair(margin=2, family="facts"),
      _pair(margin=1.0),  # an integral float level becomes "1"; no family
  ]
  chosen = np.array([1.0, 0.0, 3.0, 2.0])
  rejected = np.array([0.0, 1.0, 1.0, 1.5])  # diffs +1, -1, +2, +0.5: 3 of 4 right
  report = preference_report(records, chosen, rejected)
  assert report["overall"] == {
      "n": 4,
      "accuracy": 0.75,
      "gold_accuracy": None,
      "gold_n": 0,
      "mean_margin": pytest.approx(0.625),
  }
  assert list(report["by_margin"]) == ["0", "1", "2"]
  assert report["by_margin"]["0"]["accuracy"] == 0.0
  assert report["by_margin"]["2"] == {
      "n": 2,
      "accuracy": 1.0,
      "gold_accuracy": None,
      "gold_n": 0,
      "mean_margin": 1.5,
  }
  assert list(report["by_family"]) == ["facts", "math"]
  assert report["by_family"]["facts"]["n"] == 2
  assert report["by_family"]["math"]["mean_margin"] == -1.0


def test_margin_keys_sort_numerically_and_absent_fields_give_empty_slices():
  records = [_pair(margin=m) for m in (3, 10, 1)] + [_pair(margin=None)]
  report = preference_report(records, np.ones(4), np.zeros(4))
  assert list(report["by_margin"]) == ["1", "3", "10"]
  assert report["by_family"] == {}
  assert preference_report([_pair()], [1.0], [0.0])["by_margin"] == {}


def test_ties_count_half():
  report = preference_report([_pair(), _pair()], [1.0, 2.0], [1.0, 1.0])
  assert report["overall"]["accuracy"] == 0.75


def test_gold_accuracy_skips_equal_gold_and_follows_gold_not_label():
  records = [
      _pair(gold_chosen=1.0, gold_rejected=0.0),  # RM +: right
      _pair(gold_chosen=0.0, gold_rejected=1.0),  # label disagrees with gold; RM + is wrong by gold
      _pair(gold_chosen=0.5, gold_rejected=0.5 + 1e-9),  # gold tie: skipped
      _pair(gold_chosen=2.0, gold_rejected=1.0),  # RM tie: half
      _pair(),  # no gold
      _pair(gold_chosen=1.0),  # only one side: no gold
  ]
  chosen = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
  rejected = [0.0, 0.0, 5.0, 1.0, 0.0, 0.0]
  row = preference_report(records, chosen, rejected)["overall"]
  assert row["gold_n"] == 3
  assert row["gold_accuracy"] == pytest.approx(1.5 / 3)
  assert row["accuracy"] == pytest.approx((1 + 1 + 0 + 0.5 + 1 + 1) / 6)


def test_gold_accuracy_none_when_all_gold_equal():
  row = preference_report([_pair(gold_chosen=1.0, gold_rejected=1.0)], [1.0], [0.0])["overall"]
  assert row["gold_n"] == 0 and row["gold_accuracy"] is None


def test_preference_validation():
  with pytest.raises(ValueError, match=r"len\(rejected_scores\) = 2 but len\(records\) = 3"):
    preference_report([_pair()] * 3, np.zeros(3), np.zeros(2))
  with pytest.raises(ValueError, match=r"len\(chosen_scores\) = 4 but len\(records\) = 3"):
    preference_report([_pair()] * 3, np.zeros(4), np.zeros(3))
  with pytest.raises(ValueError, match=r"chosen_scores\[1\] is nan"):
    preference_report([_pair()] * 2, [0.0, float("nan")], [0.0, 0.0])
  with pytest.raises(ValueError, match="1-D"):
    preference_report([_pair()] * 2, np.zeros((2, 1)), np.zeros(2))
  with pytest.raises(ValueError, match=r"records\[1\]: margin"):
    preference_report([_pair(), _pair(margin=1.5)], [0.0, 0.0], [0.0, 0.0])
  with pytest.raises(ValueError, match="no records"):
    preference_report([], [], [])


# ----------------------------------------------------------------------------- rankings


def _brute_tau(x, y):
  """(concordant - discordant) / pairs, valid for untied x and y."""
  total = 0
  for i, j in itertools.combinations(range(len(x)), 2):
    total += np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
  return total / (len(x) * (len(x) - 1) / 2)


def test_kendall_tau_matches_brute_force():
  rng = np.random.default_rng(0)
  records, scores, want_labels, want_gold = [], [], [], []
  for k in (2, 3, 5, 9):
    score, gold = rng.normal(size=k), rng.normal(size=k)
    records.append(_ranking(k, gold=list(gold)))
    scores.append(score)
    want_labels.append(_brute_tau(score, -np.arange(k)))
    want_gold.append(_brute_tau(score, gold))
  row = ranking_report(records, scores)["overall"]
  assert row["n"] == 4
  assert row["kendall_tau_labels"] == pytest.approx(np.mean(want_labels))
  assert row["kendall_tau_gold"] == pytest.approx(np.mean(want_gold))
  # Untied scores: pair accuracy = (1 + tau) / 2 per prompt.
  assert row["pair_accuracy_labels"] == pytest.approx(np.mean((1 + np.array(want_labels)) / 2))


def test_perfect_and_reversed_rankings():
  records = [_ranking(4, gold=[4.0, 3.0, 2.0, 1.0])]
  perfect = ranking_report(records, [np.array([9.0, 5.0, 1.0, -3.0])])["overall"]
  assert perfect == {
      "n": 1,
      "kendall_tau_labels": 1.0,
      "kendall_tau_gold": 1.0,
      "top1_gold": 1.0,
      "pair_accuracy_labels": 1.0,
  }
  reversed_ = ranking_report(records, [np.array([-3.0, 1.0, 5.0, 9.0])])["overall"]
  assert reversed_ == {
      "n": 1,
      "kendall_tau_labels": -1.0,
      "kendall_tau_gold": -1.0,
      "top1_gold": 0.0,
      "pair_accuracy_labels": 0.0,
  }


def test_constant_gold_and_constant_scores_are_skipped():
  records = [
      _ranking(3, gold=[1.0, 1.0, 1.0], family="b"),
      _ranking(3, gold=[3.0, 2.0, 1.0], family="a"),
  ]
  report = ranking_report(records, [np.array([3.0, 2.0, 1.0]), np.array([1.0, 3.0, 2.0])])
  row = report["overall"]
  # Prompt 1's tau against gold is nan (constant gold): only prompt 2 counts, tau = -1/3.
  assert row["kendall_tau_gold"] == pytest.approx(-1 / 3)
  # Constant gold: every response is gold-best, so the top pick counts.
  assert row["top1_gold"] == 0.5
  assert report["by_family"]["b"]["kendall_tau_gold"] is None
  assert list(report["by_family"]) == ["a", "b"]
  flat = ranking_report([_ranking(3)], [np.zeros(3)])["overall"]
  assert flat == {
      "n": 1,
      "kendall_tau_labels": None,
      "kendall_tau_gold": None,
      "top1_gold": None,
      "pair_accuracy_labels": 0.5,
  }


def test_top1_gold_ties():
  records = [
      _ranking(3, gold=[1.0, 5.0, 5.0]),
      _ranking(3, gold=[1.0, 5.0, 2.0]),
      _ranking(3, gold=[1.0, 5.0, 2.0]),
  ]
  scores = [
      np.array([0.0, 0.0, 1.0]),  # a gold-best among tied gold: hit
      np.array([0.0, 1.0, 1.0]),  # RM tie between best and not best: half
      np.array([1.0, 0.0, 0.0]),
  ]  # miss
  assert ranking_report(records, scores)["overall"]["top1_gold"] == pytest.approx(0.5)


def test_ranking_validation():
  with pytest.raises(ValueError, match=r"len\(scores\) = 1 but len\(records\) = 2"):
    ranking_report([_ranking(2), _ranking(2)], [np.zeros(2)])
  with pytest.raises(ValueError, match=r"scores\[1\] has 2 scores but records\[1\] has 3"):
    ranking_report([_ranking(2), _ranking(3)], [np.zeros(2), np.zeros(2)])
  with pytest.raises(ValueError, match=r"records\[0\] has 2 gold values for 3 responses"):
    ranking_report([_ranking(3, gold=[1.0, 2.0])], [np.zeros(3)])
  with pytest.raises(ValueError, match=r"records\[0\]: responses"):
    ranking_report([{"prompt": "p"}], [np.zeros(2)])


# ----------------------------------------------------------------------------- rows


def test_report_rows():
  records = [_pair(margin=1, family="facts"), _pair(margin=3, family="facts"), _pair(margin=1)]
  report = preference_report(records, [1.0, 0.0, 1.0], [0.0, 1.0, 0.0])
  rows = report_rows(report, "rm")
  assert [row["slice"] for row in rows] == ["all", "margin=1", "margin=3", "family=facts"]
  assert rows[0] == {
      "model": "rm",
      "slice": "all",
      "n": 3,
      "accuracy": 0.667,
      "gold_accuracy": None,
      "gold_n": 0,
      "mean_margin": 0.333,
  }
  assert all(type(row["n"]) is int for row in rows)
  json.dumps(rows, allow_nan=False)

  ranking_rows = report_rows(
      ranking_report([_ranking(3, family="x")], [np.array([3.0, 1.0, 2.0])]), "rm"
  )
  assert [row["slice"] for row in ranking_rows] == ["all", "family=x"]
  assert ranking_rows[0]["kendall_tau_labels"] == 0.333
