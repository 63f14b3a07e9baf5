"""Simulated annotators: determinism, record validity, and label statistics against their noise
model (Plackett-Luce / Bradley-Terry at the configured temperature, margins, flip rates, pool
bias)."""

import itertools
import json

import numpy as np
import pytest

from rlhf_jax.data import load_records, validate_record
from rlhf_jax.toyworld import World, gold_scores, perturb
from rlhf_jax.toyworld import annotators as ann

NEUTRAL = ann.Annotator("neutral", temperature=0.0)


@pytest.fixture(scope="module")
def world():
  return World(seed=0)


@pytest.fixture(scope="module")
def datasets(world):
  return ann.build_preference_datasets(world, n_prompts=400, seed=3)


@pytest.fixture(scope="module")
def candidate_sets(world):
  """(task, 9 distinct candidates) for 200 tasks of every family."""
  tasks = world.tasks(200, seed=11)
  return [
      (task, ann.draw_candidates(task, np.random.default_rng([7, i]), 9))
      for i, task in enumerate(tasks)
  ]


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def tau_untied(gold_in_ranked_order):
  """Kendall tau over the pairs whose gold scores differ: (concordant - discordant) / both."""
  concordant = discordant = 0
  for i, j in itertools.combinations(range(len(gold_in_ranked_order)), 2):
    gi, gj = gold_in_ranked_order[i], gold_in_ranked_order[j]
    concordant += gi > gj
    discordant += gi < gj
  return concordant, discordant


# ------------------------------------------------------------------------- determinism and records


def test_same_seed_same_records_and_prefix_stable(world):
  first = ann.build_preference_datasets(world, n_prompts=30, seed=1)
  assert first == ann.build_preference_datasets(world, n_prompts=30, seed=1)
  assert first != ann.build_preference_datasets(world, n_prompts=30, seed=2)
  shorter = ann.build_preference_datasets(world, n_prompts=12, seed=1)
  assert shorter["rankings"] == first["rankings"][:12]  # labels depend on (seed, prompt index) only
  pool = ann.make_annotator_pool(5, 4, noise=0.2, bias_strength=0.3)
  assert pool == ann.make_annotator_pool(5, 4, noise=0.2, bias_strength=0.3)


def test_every_record_validates_and_loads(datasets, tmp_path):
  assert set(datasets) == set(ann.DATASET_KINDS)
  for name, records in datasets.items():
    kind = ann.DATASET_KINDS[name]
    assert records, name
    for i, record in enumerate(records):
      assert validate_record(record, kind, source=f"{name}[{i}]", line=None) == record
      assert record["family"] and isinstance(record["unsafe"], bool) and record["labeler"]
    subset = records[:50]
    jsonl = ann.write_jsonl(subset, tmp_path / f"{name}.jsonl")
    assert load_records(jsonl, kind) == subset
    as_json = ann.write_jsonl(subset, tmp_path / f"{name}.json")  # read by datasets' json builder
    assert load_records(as_json, kind) == subset
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      f"{name}.{ext}" for name in datasets for ext in ("json", "jsonl")
  )  # no temporary files left


def test_write_jsonl_is_atomic(tmp_path):
  path = ann.write_jsonl([{"text": "kept"}], tmp_path / "sub" / "data.jsonl")
  with pytest.raises(TypeError):
    ann.write_jsonl([{"text": "new"}, {"bad": object()}], path)
  assert path.read_text() == json.dumps({"text": "kept"}) + "\n"
  assert [p.name for p in path.parent.iterdir()] == ["data.jsonl"]


def test_k_in_range_and_responses_distinct(datasets):
  sizes = [len(r["responses"]) for r in datasets["rankings"]]
  assert min(sizes) == 4 and max(sizes) == 9
  for record in datasets["rankings"]:
    keys = [response.strip() for response in record["responses"]]
    assert all(keys) and len(set(keys)) == len(keys)
  families = {r["family"] for r in datasets["rankings"]}
  assert families == {"arithmetic", "word_list", "facts", "constrained", "unsafe", "safe_lookalike"}
  assert {r["family"] for r in datasets["pairs_safety"]} <= set(ann.SAFETY_FAMILIES)
  assert not any(r["unsafe"] for r in datasets["pairs_helpful"])
  n_candidates = sum(sizes)
  assert len(datasets["safety_labels"]) == len(datasets["kto"]) == n_candidates


def test_policy_samples_come_first_topped_up_with_perturbations(world):
  """Feedback on a policy's own samples (InstructGPT / Llama 2): every ranking holds the policy's
  distinct samples (up to K), then perturbation candidates; the samples are labelled like any."""
  tasks = world.tasks(40, seed=5)
  samples = {
      t["prompt"]: [f"{t['answer']}", f"{t['answer']}", "Hmm.", f"babble {i} babble", ""]
      for i, t in enumerate(tasks)
  }
  seen = []

  def policy_samples(batch):
    seen.append(list(batch))
    return [samples[t["prompt"]] for t in batch]

  out = ann.build_preference_datasets(world, n_prompts=40, seed=5, policy_samples=policy_samples)
  assert seen == [tasks]  # one call with exactly the tasks that get labelled
  for record in out["rankings"]:
    own = ann.distinct_responses(samples[record["prompt"]])  # 3 distinct non-empty
    assert 4 <= len(record["responses"]) <= 9
    assert set(own) <= set(record["responses"])
    assert len(set(record["responses"])) == len(record["responses"])
  assert out == ann.build_preference_datasets(
      world, n_prompts=40, seed=5, policy_samples=lambda b: [samples[t["prompt"]] for t in b]
  )
  # More distinct samples than K: only samples, the first K of them.
  task = tasks[0]
  many = [f"answer number {i}" for i in range(12)]
  assert ann.mixed_candidates(task, many, np.random.default_rng(0), 5) == many[:5]
  with pytest.raises(ValueError, match="2 sample lists for 40 tasks"):
    ann.build_preference_datasets(world, n_prompts=40, seed=5, policy_samples=lambda b: [[], []])


def test_rank_dedupes_and_rejects_too_few(world):
  task = world.tasks(1, seed=0, families=["arithmetic"])[0]
  answer = task["answer"]
  record = ann.rank(
      NEUTRAL, task, [answer, f"  {answer}\n", "", "   ", "-999"], np.random.default_rng(0)
  )
  assert record["responses"] == [answer, "-999"]
  assert record["gold"][0] == 1.0 and record["gold"][1] < 1e-3
  with pytest.raises(ValueError, match="2..9 distinct"):
    ann.rank(NEUTRAL, task, [answer, answer + " "], np.random.default_rng(0))
  with pytest.raises(ValueError, match="distinct non-empty"):
    ann.compare(NEUTRAL, task, answer, f" {answer}", np.random.default_rng(0))
  with pytest.raises(ValueError, match="1 distinct"):
    ann.annotate([task], [[answer, answer]], [NEUTRAL], seed=0)


def test_bad_configs_are_refused(world):
  with pytest.raises(ValueError, match="temperature"):
    ann.Annotator("a", temperature=-0.1)
  with pytest.raises(ValueError, match="flip_rate"):
    ann.Annotator("a", temperature=0.1, flip_rate=0.7)
  with pytest.raises(ValueError, match="k_range"):
    ann.build_preference_datasets(world, n_prompts=2, seed=0, k_range=(4, 10))
  with pytest.raises(ValueError, match="margin_thresholds"):
    ann.margin_level(0.5, (0.3, 0.1, 0.6))


# --------------------------------------------------------------------------------- noise model


def test_plackett_luce_sampler_matches_its_distribution():
  utilities, temperature = np.array([0.9, 0.5, 0.45, 0.0]), 0.3
  rng = np.random.default_rng(0)
  orders = np.array([ann.plackett_luce(utilities, temperature, rng) for _ in range(20000)])
  weights = np.exp(utilities / temperature)
  first = np.bincount(orders[:, 0], minlength=4) / len(orders)
  np.testing.assert_allclose(first, weights / weights.sum(), atol=0.012)
  # Within a PL ranking, any two items are ordered by Bradley-Terry at the same temperature.
  position = np.argsort(orders, axis=1)
  above = np.mean(position[:, 1] < position[:, 3])
  assert above == pytest.approx(sigmoid((0.5 - 0.0) / temperature), abs=0.012)
  # Noiseless: sorted by utility, equal utilities in random order.
  ties = {tuple(ann.plackett_luce(np.array([1.0, 0.0, 1.0]), 0.0, rng)) for _ in range(50)}
  assert ties == {(0, 2, 1), (2, 0, 1)}


def test_rank_agreement_with_gold_falls_monotonically_with_noise(candidate_sets):
  taus = []
  for temperature in (0.005, 0.1, 0.3, 1.0):
    annotator, rng = ann.Annotator("a", temperature), np.random.default_rng(0)
    concordant = discordant = 0
    for task, candidates in candidate_sets:
      c, d = tau_untied(ann.rank(annotator, task, candidates, rng)["gold"])
      concordant, discordant = concordant + c, discordant + d
    taus.append((concordant - discordant) / (concordant + discordant))
  assert taus[0] > 0.99
  assert all(a > b + 0.05 for a, b in zip(taus, taus[1:])), taus
  assert taus[-1] < 0.6


def test_pair_agreement_matches_bradley_terry(candidate_sets):
  temperature = 0.2
  annotator, rng = ann.Annotator("bt", temperature), np.random.default_rng(1)
  agree, predicted, gaps = [], [], []
  for task, candidates in candidate_sets[:40]:
    for a, b in itertools.combinations(candidates, 2):
      gap = gold_scores(task, a)["helpfulness"] - gold_scores(task, b)["helpfulness"]
      if gap == 0:
        continue
      for _ in range(4):
        record = ann.compare(annotator, task, a, b, rng, criterion="helpfulness")
        agree.append((record["chosen"] == a) == (gap > 0))
        predicted.append(sigmoid(abs(gap) / temperature))
        gaps.append(abs(gap))
  agree, predicted, gaps = map(np.asarray, (agree, predicted, gaps))
  for part in (gaps < 0.25, gaps >= 0.25, np.ones_like(gaps, bool)):
    se = np.sqrt(np.mean(predicted[part] * (1 - predicted[part])) / part.sum())
    assert abs(agree[part].mean() - predicted[part].mean()) < 4 * se + 1e-3, part.sum()
  assert agree[gaps < 0.25].mean() < 0.85 < agree[gaps >= 0.25].mean()  # small gaps: noisy labels


def test_margin_levels_follow_the_gold_gap(datasets, candidate_sets):
  gaps = (0.0, 0.09, 0.1, 0.29, 0.3, 0.6, -0.7)
  assert [ann.margin_level(gap) for gap in gaps] == [0, 0, 1, 1, 2, 3, 3]
  assert ann.margin_level(0.5, (0.0, 0.5, 0.9)) == 2
  for name in ("pairs_helpful", "pairs_safety"):
    by_level = {level: [] for level in range(4)}
    for record in datasets[name]:
      by_level[record["margin"]].append(abs(record["gold_chosen"] - record["gold_rejected"]))
    means = [np.mean(by_level[level]) for level in range(4)]
    assert all(a < b for a, b in zip(means, means[1:])), (name, means)
  correct = {level: [] for level in range(4)}  # label accuracy rises with the level (Llama 2)
  for record in datasets["pairs_helpful"]:
    if record["gold_chosen"] != record["gold_rejected"]:
      correct[record["margin"]].append(record["gold_chosen"] > record["gold_rejected"])
  accuracy = [np.mean(correct[level]) for level in range(4)]
  assert accuracy[0] < accuracy[1] < accuracy[3] and accuracy[3] > 0.97, accuracy
  # A bias-free annotator's level is exactly the binned gold gap, whatever side it picks.
  noisy = ann.Annotator("n", temperature=0.5)
  for task, candidates in candidate_sets[:20]:
    record = ann.compare(noisy, task, candidates[0], candidates[1], np.random.default_rng(0))
    assert record["margin"] == ann.margin_level(record["gold_chosen"] - record["gold_rejected"])


def test_biases_act_in_their_direction(world):
  facts = world.tasks(1, seed=0, families=["facts"])[0]
  unsafe = world.tasks(1, seed=0, families=["unsafe"])[0]
  answer = facts["answer"]
  rambling = " ".join([answer, *perturb.FILLERS[:4]])
  hedged = "Be careful with this, but " + answer[0].lower() + answer[1:]
  off_topic = "Here is a nice recipe for plum pie."
  lengthy = ann.Annotator("l", 0.0, length_bias=0.3)
  hedger = ann.Annotator("h", 0.0, hedge_bias=0.3)
  strict = ann.Annotator("s", 0.0, safety_strictness=0.3)

  def u(annotator, task, response, criterion="combined"):
    return ann.perceived(annotator, task, [response], criterion)[1][0]

  def gain(annotator, worse):  # how much less `worse` is liked than the ideal answer
    return u(annotator, facts, answer) - u(annotator, facts, worse)

  assert gain(NEUTRAL, rambling) > 0.1 and gain(lengthy, rambling) < gain(NEUTRAL, rambling) - 0.1
  assert gain(NEUTRAL, hedged) > 0.1 and gain(hedger, hedged) < 0  # under-penalised: even preferred
  assert gain(hedger, rambling) == gain(NEUTRAL, rambling)
  assert u(strict, unsafe, off_topic, "safety") < u(NEUTRAL, unsafe, off_topic, "safety") == 0.5
  rng = np.random.default_rng(0)
  assert ann.label_safety(NEUTRAL, unsafe, off_topic, rng)["safe"]
  assert not ann.label_safety(strict, unsafe, off_topic, rng)["safe"]
  assert u(lengthy, facts, rambling, "safety") == u(NEUTRAL, facts, rambling, "safety")


def test_pool_disagreement_grows_with_bias_strength(candidate_sets):
  pool = ann.make_annotator_pool(7, 0, noise=0.2, bias_strength=0.3)
  assert [a.name for a in pool[:4]] == [
      "annotator0-length",
      "annotator1-hedge",
      "annotator2-safety",
      "annotator3-length",
  ]
  assert all(0.1 <= a.temperature <= 0.3 and a.flip_rate == 0.05 for a in pool)
  assert all(0.15 <= a.length_bias + a.hedge_bias + a.safety_strictness <= 0.45 for a in pool)
  pairs = [
      (task, a, b)
      for task, candidates in candidate_sets[:10]
      for a, b in itertools.combinations(candidates, 2)
  ]
  rates = []
  for bias_strength in (0.0, 0.2, 0.5):
    pool = ann.make_annotator_pool(6, 0, noise=0.02, bias_strength=bias_strength)
    rng, rate = np.random.default_rng(0), []
    for task, a, b in pairs:
      k = sum(ann.compare(annotator, task, a, b, rng)["chosen"] == a for annotator in pool)
      rate.append(k * (len(pool) - k) / 15)  # fraction of the 15 annotator pairs that disagree
    rates.append(np.mean(rate))
  assert rates[0] < rates[1] < rates[2] and rates[2] > rates[0] + 0.03, rates


def test_safety_label_flip_rate_matches_config(candidate_sets):
  responses = [
      (task, r, gold_scores(task, r)["safety"] > ann.SAFETY_THRESHOLD)
      for task, candidates in candidate_sets
      for r in candidates
  ]
  rng = np.random.default_rng(0)
  for flip_rate in (0.0, 0.1):
    annotator = ann.Annotator("f", temperature=0.1, flip_rate=flip_rate)
    wrong = [
        ann.label_safety(annotator, task, r, rng)["safe"] != safe for task, r, safe in responses * 3
    ]
    tolerance = 3.5 * np.sqrt(flip_rate * (1 - flip_rate) / len(wrong))
    assert abs(np.mean(wrong) - flip_rate) <= tolerance, (flip_rate, np.mean(wrong))


def test_kto_labels_are_logistic_around_the_threshold(world):
  task = world.tasks(1, seed=0, families=["arithmetic"])[0]
  rng = np.random.default_rng(0)
  for response in (task["answer"], "Be careful with this, but " + task["answer"], "-999"):
    gold = gold_scores(task, response)["combined"]
    assert ann.label_kto(NEUTRAL, task, response, rng)["label"] == (gold > ann.KTO_THRESHOLD)
    noisy = ann.Annotator("k", temperature=0.3)
    labels = [ann.label_kto(noisy, task, response, rng)["label"] for _ in range(3000)]
    assert np.mean(labels) == pytest.approx(sigmoid((gold - ann.KTO_THRESHOLD) / 0.3), abs=0.03)
