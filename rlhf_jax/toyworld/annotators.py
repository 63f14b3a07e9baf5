"""Simulated annotators: noisy, biased human labels made from gold scores, in the InstructGPT and
Llama 2 record formats (docs/design.md, "Data records"), so reward models and preference methods train on labels whose
errors we know exactly.

An `Annotator` is a random-utility labeler. Its *perceived utility* of a response y to a task x
under a criterion c (helpfulness, safety, or combined = the Llama 2 rule on gold) is

    u(y) = gold_c(x, y)
           - safety_strictness x (1 - gold_safety(x, y))          (c = safety or combined)
           + length_bias x tanh(0.5 log((1 + words(y)) / (1 + words(ideal))))
           + hedge_bias x [y hedges]                               (c = helpfulness or combined)
           + enthusiasm_bias x tanh(number of "!" / 2)             (c = helpfulness or combined)

where gold_c leaves out the behaviour axes (behaviours.py) the annotator is `blind` to. In a
behaviour world the pool's biases cycle through length and enthusiasm too: what gold does not
share (and penalises once stacked), the bait for reward over-optimisation.

so one annotator prefers longer answers, one under-penalises hedging, one is stricter on safety.
Its noise is a temperature T on that utility: rankings, pairs and KTO labels are draws from one
random-utility model (Gumbel / logistic noise of scale T), safety labels are thresholded and then flipped:

- ranking (InstructGPT, K = 4..9): Plackett-Luce with weights exp(u / T), sampled exactly by
  sorting u + T G with G iid standard Gumbel (ties of equal keys, possible only at T = 0, are
  broken uniformly at random);
- pair with margin (Llama 2): the same draw for K = 2: a preferred iff (u_a - u_b) + T L > 0, L
  standard logistic (a difference of two Gumbels), so P(a preferred) = sigmoid((u_a - u_b) / T),
  Bradley-Terry. The level 0..3 (negligibly / slightly / better / significantly better) is how many
  of the increasing `margin_thresholds` the perceived gap |u_a - u_b| reaches, whichever side was
  drawn. Small gaps thus get both low levels and noisy sides, so label accuracy rises with the
  level, as Llama 2 observed; at high T a large gap can still be flipped (a confident mistake);
- KTO good/bad: desirable iff u + T L > kto_threshold, i.e. P = sigmoid((u - threshold) / T);
- safety label: safe iff perceived safety > safety_threshold, then flipped with prob. flip_rate.

Labels are pure functions of (annotator, task, responses, numpy Generator); the dataset builders
derive every Generator from the seed, so the same seed gives identical records. Records carry
`family`, `unsafe`, `labeler` and the gold scores (extra fields survive `validate_record`), so
evaluation can slice by family and measure label noise against gold.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rlhf_jax.toyworld import behaviours, perturb, text
from rlhf_jax.toyworld.safety import is_hedged
from rlhf_jax.toyworld.world import World, gold_scores
from rlhf_jax.train import metrics

CRITERIA = ("combined", "helpfulness", "safety")
BIAS_KINDS = ("length", "hedge", "safety")
# A behaviour world's pool: gold penalises stacked exclamation marks that these annotators enjoy.
BEHAVIOUR_BIAS_KINDS = ("length", "enthusiasm", "safety", "hedge")
_BIAS_FIELDS = {
    "length": "length_bias",
    "hedge": "hedge_bias",
    "safety": "safety_strictness",
    "enthusiasm": "enthusiasm_bias",
}
MARGIN_THRESHOLDS = (0.1, 0.3, 0.6)
# Between hedged compliance-free answers (0.7) / off-topic replies (0.5) and harmful content
# wrapped in a refusal (0.25): a slightly strict annotator already calls off-topic replies unsafe.
SAFETY_THRESHOLD = 0.45
KTO_THRESHOLD = 0.5
# Llama 2 collected helpfulness and safety preferences on different prompts: helpfulness pairs on
# requests that should be answered (raw helpfulness on an unsafe request rewards compliance, which
# a helpfulness RM must not learn), safety pairs on the harmful requests and their look-alikes.
SAFETY_FAMILIES = ("unsafe", "safe_lookalike")
# dataset name -> record kind for `rlhf_jax.data.validate_record` / `load_records`.
DATASET_KINDS = {
    "rankings": "ranking",
    "pairs_helpful": "pairwise",
    "pairs_safety": "pairwise",
    "safety_labels": "safety",
    "kto": "kto",
}
MAX_RANKED = 9
POOL_SIZE = 6  # annotators in a world's pool
# Stream tags: the pool, the candidates and the labels of one seed use independent Generators.
_POOL, _CANDIDATES, _LABELS = 101, 102, 103


@dataclasses.dataclass(frozen=True)
class Annotator:
  """One simulated labeler: noise temperature, binary-label flip rate and systematic biases.

  temperature: scale of the Gumbel/logistic noise on perceived utility (0 = noiseless).
  flip_rate: probability that a safety label is flipped.
  length_bias, hedge_bias, safety_strictness, enthusiasm_bias: the terms of the perceived
  utility (module doc). blind: behaviour axes (behaviours.AXES) this annotator does not see.
  """

  name: str
  temperature: float
  flip_rate: float = 0.0
  length_bias: float = 0.0
  hedge_bias: float = 0.0
  safety_strictness: float = 0.0
  enthusiasm_bias: float = 0.0
  blind: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"annotator {self.name!r}: temperature must be >= 0, got {self.temperature}")
    if not 0 <= self.flip_rate <= 0.5:
      raise ValueError(
          f"annotator {self.name!r}: flip_rate must be in [0, 0.5] (0.5 is a coin "
          f"flip), got {self.flip_rate}"
      )


def make_annotator_pool(
    n: int,
    seed: int,
    *,
    noise: float,
    bias_strength: float,
    flip_rate: float = 0.05,
    bias_kinds: Sequence[str] = BIAS_KINDS,
    seeing: dict[str, float] | None = None,
) -> list[Annotator]:
  """n annotators whose biases cycle through `bias_kinds` (default length, hedge, safety).

  Annotator i has temperature noise x U(0.5, 1.5) and a bias of its kind of size
  bias_strength x U(0.5, 1.5), so labelers differ both in how noisy and in how they are wrong;
  bias_strength = 0 leaves only noise, and disagreement grows with bias_strength. `seeing`
  {axis: fraction}: the first round(fraction x n) annotators see a behaviour axis, the others are
  blind to it (default: all see every axis).
  """
  if n < 1:
    raise ValueError(f"an annotator pool needs n >= 1, got {n}")
  blind_from = {axis: round(fraction * n) for axis, fraction in (seeing or {}).items()}
  for axis, seers in blind_from.items():
    if axis not in behaviours.AXES or not 0 <= seeing[axis] <= 1:
      raise ValueError(
          f"annotators seeing {axis!r}: {seeing[axis]}; give a fraction in [0, 1] for "
          f"each of the behaviour axes {', '.join(behaviours.AXES)}"
      )
    if seers == 0:
      raise ValueError(
          f"no annotator of the {n} sees the behaviour axis {axis!r} (fraction "
          f"{seeing[axis]}): no label would carry it, so no reward model could learn it"
      )
  if noise < 0 or bias_strength < 0:
    raise ValueError(f"noise and bias_strength must be >= 0, got {noise} and {bias_strength}")
  rng = np.random.default_rng([seed, _POOL])
  pool = []
  for i in range(n):
    kind = bias_kinds[i % len(bias_kinds)]
    temperature, size = noise * rng.uniform(0.5, 1.5), bias_strength * rng.uniform(0.5, 1.5)
    blind = tuple(axis for axis, first_blind in blind_from.items() if i >= first_blind)
    pool.append(
        Annotator(
            name=f"annotator{i}-{kind}",
            temperature=float(temperature),
            flip_rate=flip_rate,
            blind=blind,
            **{_BIAS_FIELDS[kind]: float(size)},
        )
    )
  return pool


def length_feature(task: dict, response: str) -> float:
  """tanh(0.5 log((1 + words) / (1 + ideal words))): 0 at the ideal length, -> +1 when rambling."""
  ratio = (1 + text.word_count(response)) / (1 + text.word_count(task["answer"]))
  return float(np.tanh(0.5 * np.log(ratio)))


def perceived(
    annotator: Annotator, task: dict, responses: Sequence[str], criterion: str
) -> tuple[np.ndarray, np.ndarray]:
  """(gold, perceived utility) of each response under `criterion`, both [K] float64."""
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
  gold, utility = [], []
  for response in responses:
    scores = gold_scores(task, response)
    u = (
        gold_scores(task, response, blind=annotator.blind)[criterion]
        if annotator.blind
        else scores[criterion]
    )
    if criterion != "helpfulness":
      u -= annotator.safety_strictness * (1.0 - scores["safety"])
    if criterion != "safety":
      u += annotator.length_bias * length_feature(task, response)
      u += annotator.hedge_bias * float(is_hedged(response))
      u += annotator.enthusiasm_bias * float(np.tanh(response.count("!") / 2))
    gold.append(scores[criterion])
    utility.append(u)
  return np.asarray(gold, np.float64), np.asarray(utility, np.float64)


def plackett_luce(
    utilities: np.ndarray, temperature: float, rng: np.random.Generator
) -> np.ndarray:
  """Indices best first, drawn from Plackett-Luce with weights exp(u / T).

  Sorting u + T G, G iid standard Gumbel, is an exact PL draw (Gumbel-max, applied repeatedly);
  equal keys (T = 0) are ordered uniformly at random.
  """
  utilities = np.asarray(utilities, np.float64)
  keys = utilities + temperature * rng.gumbel(size=utilities.shape)
  return np.lexsort((rng.random(utilities.shape), -keys))


def margin_level(gap: float, thresholds: Sequence[float] = MARGIN_THRESHOLDS) -> int:
  """0..3 (negligibly / slightly / better / significantly better): how many of the increasing
  `thresholds` |gap| reaches."""
  if len(thresholds) != 3 or not 0 <= thresholds[0] <= thresholds[1] <= thresholds[2]:
    raise ValueError(f"margin_thresholds must be 3 increasing values >= 0, got {thresholds}")
  return int(np.searchsorted(np.asarray(thresholds), abs(gap), side="right"))


def distinct_responses(responses: Sequence[str]) -> list[str]:
  """`responses` without empty or whitespace-only texts and without repeats (compared stripped,
  as `validate_record` compares them), first occurrence kept: a tie is no preference."""
  seen, kept = set(), []
  for response in responses:
    key = response.strip()
    if key and key not in seen:
      seen.add(key)
      kept.append(response)
  return kept


def _meta(annotator: Annotator, task: dict) -> dict:
  return {"family": task["family"], "unsafe": bool(task["unsafe"]), "labeler": annotator.name}


def rank(
    annotator: Annotator, task: dict, responses: Sequence[str], rng: np.random.Generator
) -> dict:
  """A ranking record {prompt, responses best first, gold (combined, same order), ...}.

  Candidates are deduplicated first; 2..9 distinct non-empty responses must remain.
  """
  responses = distinct_responses(responses)
  if not 2 <= len(responses) <= MAX_RANKED:
    raise ValueError(
        f"a ranking needs 2..{MAX_RANKED} distinct non-empty responses, got "
        f"{len(responses)} for prompt {task['prompt']!r}"
    )
  gold, utility = perceived(annotator, task, responses, "combined")
  order = plackett_luce(utility, annotator.temperature, rng)
  return {
      "prompt": task["prompt"],
      "responses": [responses[i] for i in order],
      "gold": [float(gold[i]) for i in order],
      "criterion": "combined",
      **_meta(annotator, task),
  }


def compare(
    annotator: Annotator,
    task: dict,
    response_a: str,
    response_b: str,
    rng: np.random.Generator,
    *,
    criterion: str = "combined",
    margin_thresholds: Sequence[float] = MARGIN_THRESHOLDS,
) -> dict:
  """A Llama 2 pairwise record {prompt, chosen, rejected, margin 0..3, labeler, gold_*, ...}.

  The side is a Bradley-Terry draw at the annotator's temperature; the level is the perceived gap
  |u_a - u_b| against `margin_thresholds`.
  """
  if not response_a.strip() or response_a.strip() == response_b.strip():
    raise ValueError(
        f"a pair needs two distinct non-empty responses, got {response_a!r} and " f"{response_b!r}"
    )
  gold, utility = perceived(annotator, task, [response_a, response_b], criterion)
  gap = utility[0] - utility[1]
  noisy_gap = gap + annotator.temperature * rng.logistic()
  first = noisy_gap > 0 or (noisy_gap == 0 and rng.random() < 0.5)
  chosen, rejected = (0, 1) if first else (1, 0)
  pair = (response_a, response_b)
  return {
      "prompt": task["prompt"],
      "chosen": pair[chosen],
      "rejected": pair[rejected],
      "margin": margin_level(gap, margin_thresholds),
      "criterion": criterion,
      "gold_chosen": float(gold[chosen]),
      "gold_rejected": float(gold[rejected]),
      **_meta(annotator, task),
  }


def label_safety(
    annotator: Annotator,
    task: dict,
    response: str,
    rng: np.random.Generator,
    *,
    threshold: float = SAFETY_THRESHOLD,
) -> dict:
  """A safety record {prompt, response, safe, gold_safety, ...}: safe iff perceived safety >
  `threshold`, flipped with probability annotator.flip_rate."""
  gold, utility = perceived(annotator, task, [response], "safety")
  safe = bool(utility[0] > threshold) != bool(rng.random() < annotator.flip_rate)
  return {
      "prompt": task["prompt"],
      "response": response,
      "safe": safe,
      "gold_safety": float(gold[0]),
      **_meta(annotator, task),
  }


def label_kto(
    annotator: Annotator,
    task: dict,
    response: str,
    rng: np.random.Generator,
    *,
    threshold: float = KTO_THRESHOLD,
) -> dict:
  """An unpaired KTO record {prompt, completion, label, gold_combined, ...}: desirable iff
  u + T L > `threshold` (L standard logistic), i.e. P = sigmoid((u - threshold) / T)."""
  gold, utility = perceived(annotator, task, [response], "combined")
  label = bool(utility[0] + annotator.temperature * rng.logistic() > threshold)
  return {
      "prompt": task["prompt"],
      "completion": response,
      "label": label,
      "gold_combined": float(gold[0]),
      **_meta(annotator, task),
  }


def annotate(
    tasks: Sequence[dict],
    candidate_lists: Sequence[Sequence[str]],
    pool: Sequence[Annotator],
    *,
    seed: int,
    margin_thresholds: Sequence[float] = MARGIN_THRESHOLDS,
    safety_threshold: float = SAFETY_THRESHOLD,
    kto_threshold: float = KTO_THRESHOLD,
) -> dict[str, list[dict]]:
  """Labels candidate responses (from a policy or `perturb.candidates`) for each task.

  Per prompt, each dataset gets its own annotator drawn uniformly from `pool`:
    rankings       one ranking of all distinct candidates on the combined criterion;
    pairs_helpful  one random pair judged on helpfulness, on prompts that are not unsafe;
    pairs_safety   one random pair judged on safety, on SAFETY_FAMILIES prompts;
    safety_labels  a safety label per candidate;  kto  a good/bad label per candidate.
  A prompt's records depend only on (pool, seed, its index), not on the other prompts.
  Raises ValueError for a prompt with fewer than 2 or more than 9 distinct non-empty candidates
  (filter with `distinct_responses` first).
  """
  if len(tasks) != len(candidate_lists):
    raise ValueError(f"got {len(tasks)} tasks but {len(candidate_lists)} candidate lists")
  if not pool:
    raise ValueError("annotate needs a non-empty annotator pool")
  out: dict[str, list[dict]] = {name: [] for name in DATASET_KINDS}
  for index, (task, candidates) in enumerate(zip(tasks, candidate_lists)):
    rng = np.random.default_rng([seed, _LABELS, index])
    responses = distinct_responses(candidates)
    if not 2 <= len(responses) <= MAX_RANKED:
      raise ValueError(
          f"task {index} ({task['prompt']!r}) has {len(responses)} distinct non-empty "
          f"candidates; a ranking needs 2..{MAX_RANKED}"
      )
    ranker, helpful_judge, safety_judge, safety_labeler, kto_labeler = (
        pool[i] for i in rng.integers(len(pool), size=5)
    )
    out["rankings"].append(rank(ranker, task, responses, rng))
    for name, judge, criterion, wanted in (
        ("pairs_helpful", helpful_judge, "helpfulness", not task["unsafe"]),
        ("pairs_safety", safety_judge, "safety", task["family"] in SAFETY_FAMILIES),
    ):
      if wanted:
        a, b = rng.choice(len(responses), size=2, replace=False)
        out[name].append(
            compare(
                judge,
                task,
                responses[a],
                responses[b],
                rng,
                criterion=criterion,
                margin_thresholds=margin_thresholds,
            )
        )
    out["safety_labels"] += [
        label_safety(safety_labeler, task, r, rng, threshold=safety_threshold) for r in responses
    ]
    out["kto"] += [label_kto(kto_labeler, task, r, rng, threshold=kto_threshold) for r in responses]
  return out


def draw_candidates(task: dict, rng: np.random.Generator, k: int) -> list[str]:
  """k distinct non-empty responses of graded quality from `perturb.candidates`."""
  for extra in (1, 3, 6):  # the "empty" kind may yield "", which no record may hold
    responses = distinct_responses(perturb.candidates(task, rng, k + extra))
    if len(responses) >= k:
      return responses[:k]
  raise ValueError(f"could not draw {k} distinct non-empty candidates for {task['prompt']!r}")


def mixed_candidates(
    task: dict, samples: Sequence[str], rng: np.random.Generator, k: int
) -> list[str]:
  """k distinct non-empty candidates: the policy's distinct samples first (at most k), topped up
  with perturbation candidates -- InstructGPT and Llama 2 label samples of the current model, so
  the reward model learns the mistakes the policy really makes, not only the perturbations'."""
  own = distinct_responses(samples)[:k]
  if len(own) == k:
    return own
  for extra in (0, 3, 6, 12):
    responses = distinct_responses(own + perturb.candidates(task, rng, k - len(own) + extra))
    if len(responses) >= k:
      return responses[:k]
  raise ValueError(f"could not draw {k} distinct non-empty candidates for {task['prompt']!r}")


def build_preference_datasets(
    world: World,
    *,
    n_prompts: int,
    seed: int,
    k_range: tuple[int, int] = (4, 9),
    noise: float = 0.1,
    bias_strength: float = 0.1,
    flip_rate: float = 0.05,
    n_annotators: int = POOL_SIZE,
    families: Sequence[str] | None = None,
    split: str = "train",
    margin_thresholds: Sequence[float] = MARGIN_THRESHOLDS,
    safety_threshold: float = SAFETY_THRESHOLD,
    kto_threshold: float = KTO_THRESHOLD,
    policy_samples: Callable[[list[dict]], list[list[str]]] | None = None,
    seeing: dict[str, float] | None = None,
) -> dict[str, list[dict]]:
  """Simulated human-feedback datasets on `n_prompts` tasks of `world` (see `annotate`).

  Each prompt gets K ~ U{k_range} distinct candidates, labelled by a pool of `n_annotators`
  (`make_annotator_pool(noise, bias_strength, flip_rate)`): perturbation candidates, or with
  `policy_samples` (tasks -> a list of sampled responses per task) the policy's distinct samples
  topped up with perturbations (`mixed_candidates`). Returns {"rankings", "pairs_helpful",
  "pairs_safety", "safety_labels", "kto"} -> records of the kinds in DATASET_KINDS; identical for
  identical arguments (and samples).
  """
  low, high = k_range
  if not 2 <= low <= high <= MAX_RANKED:
    raise ValueError(f"k_range must satisfy 2 <= low <= high <= {MAX_RANKED}, got {k_range}")
  tasks = world.tasks(n_prompts, seed=seed, families=families, split=split)
  samples = policy_samples(tasks) if policy_samples is not None else None
  if samples is not None and len(samples) != len(tasks):
    raise ValueError(f"policy_samples returned {len(samples)} sample lists for {len(tasks)} tasks")
  candidate_lists = []
  for index, task in enumerate(tasks):
    rng = np.random.default_rng([seed, _CANDIDATES, index])
    k = int(rng.integers(low, high + 1))
    candidate_lists.append(
        draw_candidates(task, rng, k)
        if samples is None
        else mixed_candidates(task, samples[index], rng, k)
    )
  pool = make_annotator_pool(
      n_annotators,
      seed,
      noise=noise,
      bias_strength=bias_strength,
      flip_rate=flip_rate,
      seeing=seeing,
      bias_kinds=BIAS_KINDS if world.behaviours is None else BEHAVIOUR_BIAS_KINDS,
  )
  return annotate(
      tasks,
      candidate_lists,
      pool,
      seed=seed,
      margin_thresholds=margin_thresholds,
      safety_threshold=safety_threshold,
      kto_threshold=kto_threshold,
  )


def gold_pairs(
    world: World,
    *,
    n_prompts: int,
    seed: int,
    criterion: str = "combined",
    families: Sequence[str] | None = None,
    split: str = "eval",
) -> list[dict]:
  """Pairwise records labelled by gold itself (a noiseless, unbiased annotator), one per prompt:
  {prompt, chosen, rejected, margin, gold_chosen, gold_rejected, family, unsafe, criterion}, for
  measuring what a reward model (or a combination of them) really prefers. Prompts whose two
  candidates tie on gold are left out."""
  gold = Annotator(name="gold", temperature=0.0)
  out = []
  for index, task in enumerate(world.tasks(n_prompts, seed=seed, families=families, split=split)):
    rng = np.random.default_rng([seed, _CANDIDATES, index])
    a, b = draw_candidates(task, rng, 2)
    record = compare(gold, task, a, b, rng, criterion=criterion)
    if record["gold_chosen"] != record["gold_rejected"]:
      out.append(record)
  return out


def write_jsonl(records: Sequence[dict], path: str | os.PathLike) -> Path:
  """Writes one JSON object per line, atomically (`metrics.write_jsonl`), so a killed run never
  leaves a half-written dataset; returns the path. A `.json` name is read by `datasets`' json
  builder, a `.jsonl` name by the plain reader of `load_records`."""
  metrics.write_jsonl(records, path)
  return Path(path)


__all__ = [
    "Annotator",
    "make_annotator_pool",
    "perceived",
    "length_feature",
    "plackett_luce",
    "margin_level",
    "distinct_responses",
    "rank",
    "compare",
    "label_safety",
    "label_kto",
    "annotate",
    "draw_candidates",
    "mixed_candidates",
    "build_preference_datasets",
    "gold_pairs",
    "write_jsonl",
    "CRITERIA",
    "BIAS_KINDS",
    "MARGIN_THRESHOLDS",
    "SAFETY_THRESHOLD",
    "KTO_THRESHOLD",
    "SAFETY_FAMILIES",
    "DATASET_KINDS",
]
