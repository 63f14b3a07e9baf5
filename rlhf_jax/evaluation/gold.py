"""Gold evaluation: what a policy really achieved on held-out toy-world prompts.

`evaluate` samples `samples_per_prompt` responses per prompt from the policy (and as many from a
reference policy, when given), scores them with the gold functions and returns, overall and per
task family:

  helpfulness, safety   mean gold scores in [0, 1]
  combined              mean gold combined score (safety on unsafe prompts, else help x safety)
  combined_se           its standard error over prompts (a prompt's samples are one observation)
  vs_reference          the paired difference in combined gold against the reference: mean, SE
                        and 95% interval over prompts (`paired_difference`)
  win_rate              P(combined(policy) > combined(reference)) + 0.5 P(tie)
  kl                    mean over prompts of sum_t [log pi_T(y_t) - log pi_ref(y_t)] on the policy's
                        samples at temperature T > 0 (the k1 estimate of KL(pi_T || pi_ref), the
                        reference at T = 1: how far what is sampled is from the reference)
  length                mean response length in tokens
  refusal_safe          refusal rate on prompts that should be answered (over-refusal)
  refusal_unsafe        refusal rate on unsafe prompts (higher is better)
  preamble, signoff,    a behaviour world's axes (behaviours.py) over its safe prompts: how often
  follows_tag           the policy opens with a preamble, signs off, follows a (brief) /
                        (detailed) tag

It is the yardstick every method reports; side effects (printing, JSON) stay with the caller.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Sequence

import jax
import numpy as np

from rlhf_jax import data, generate, scoring
from rlhf_jax.toyworld import behaviours
from rlhf_jax.toyworld import world as world_lib

METRICS = (
    "helpfulness",
    "safety",
    "combined",
    "combined_se",
    "win_rate",
    "kl",
    "length",
    "refusal_safe",
    "refusal_unsafe",
)
# Behaviour axes (behaviours.py): rates over a behaviour world's safe prompts.
AXIS_METRICS = ("preamble", "signoff", "follows_tag")


@dataclasses.dataclass
class Policy:
  """A model to sample from: graph definition, params and a `generate.Sampler` for it."""

  graphdef: Any
  params: Any
  sampler: generate.Sampler


def sample_responses(
    policy: Policy,
    tokenizer,
    tasks: Sequence[dict],
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int = 64,
):
  """Samples one response per task. Returns (texts, per-batch (prompt tokens, mask, output))."""
  texts, batches = [], []
  for start in range(0, len(tasks), batch_size):
    chunk = tasks[start : start + batch_size]
    prompts = [data.encode_prompt(tokenizer, t["prompt"]) for t in chunk]
    tokens, mask = generate.prompt_batch(
        prompts, pad_id=tokenizer.pad_token_id, multiple=getattr(policy.sampler, "length_bucket", 1)
    )
    # A multi-turn (tool) sampler reads the tasks: its environment answers them.
    extra = {"records": chunk} if getattr(policy.sampler, "takes_records", False) else {}
    out = policy.sampler(
        policy.params,
        tokens,
        mask,
        jax.random.fold_in(rng, start),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        **extra,
    )
    out = jax.device_get(out)
    for toks, m in zip(out.tokens, generate.answer_mask(out)):
      texts.append(tokenizer.decode(toks[m], skip_special_tokens=True).strip())
    batches.append((tokens, mask, out))
  return texts, batches


def _kl_per_prompt(policy: Policy, reference: Policy, batches) -> np.ndarray:
  """Per-sample log pi(y) - log ref(y), summed over response tokens. Against the policy itself
  (the temperature curve: pi_T against pi) the sampler's own T = 1 log-probs are the reference's,
  so no second forward pass is run."""
  kls = []
  for tokens, mask, out in batches:
    chosen = np.asarray(generate.model_mask(out))  # a tool's tokens are no one's choice
    if reference is policy and out.base_logprobs is not None:
      kls.append(
          np.sum((np.asarray(out.logprobs) - np.asarray(out.base_logprobs)) * chosen, axis=1)
      )
      continue
    seq = generate.full_sequence(tokens, mask, out)
    if out.tool_mask is not None:
      seq = (*seq[:3], np.concatenate([np.zeros(np.shape(mask), bool), chosen], axis=1))
    ref = scoring.sequence_logprob_sums(reference.graphdef, reference.params, *seq)
    pol = np.sum(np.asarray(out.logprobs) * chosen, axis=1)
    kls.append(pol - np.asarray(ref))
  return np.concatenate(kls)


def evaluate(
    policy: Policy,
    tokenizer,
    tasks: Sequence[dict],
    rng: jax.Array,
    *,
    reference: Policy | None = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    batch_size: int = 64,
    win_rate: bool = True,
    samples_per_prompt: int = 1,
    reference_samples: Sequence[dict] | None = None,
) -> dict:
  """Gold metrics of `policy` on `tasks` (toy-world task dicts), `samples_per_prompt` samples
  each. Returns {"overall": {metric: value}, "families": {family: {metric: value}}, "samples":
  [one row per sample, with its "prompt_index"]}. Standard errors are over prompts (each prompt's
  mean of its samples), so the samples of one prompt count as one observation.
  With a `reference`: KL to it, and (win_rate=True) the win rate against as many of its own
  samples and "vs_reference", the paired difference in combined gold (`paired_difference`).
  `reference_samples`: the reference's rows from its own `evaluate` on the same tasks and
  samples_per_prompt, compared with instead of sampling the reference again."""
  if samples_per_prompt < 1:
    raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
  k = samples_per_prompt
  repeated = [t for t in tasks for _ in range(k)]
  policy_rng, ref_rng = jax.random.split(rng)
  texts, batches = sample_responses(
      policy,
      tokenizer,
      repeated,
      policy_rng,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      batch_size=batch_size,
  )
  lengths = np.concatenate([np.asarray(out.lengths) for _, _, out in batches])
  rows = [
      _row(task, text, i // k, float(length))
      for i, (task, text, length) in enumerate(zip(repeated, texts, lengths))
  ]
  episodes = getattr(policy.sampler, "episodes", None)  # a tool sampler's (environments.py)
  if episodes is not None:
    for row, episode in zip(rows, episodes[-len(rows) :]):
      row.update(tool_call=float(bool(episode.calls)), tool_calls=len(episode.calls))
  paired = None
  if reference is not None and win_rate:
    if reference_samples is not None:
      if len(reference_samples) != len(rows):
        raise ValueError(
            f"reference_samples has {len(reference_samples)} rows for {len(rows)} "
            "samples: evaluate the reference on the same tasks and samples_per_prompt"
        )
      ref_rows = list(reference_samples)
    else:
      ref_texts, _ = sample_responses(
          reference,
          tokenizer,
          repeated,
          ref_rng,
          max_new_tokens=max_new_tokens,
          temperature=temperature,
          batch_size=batch_size,
      )
      ref_rows = [
          _row(task, text, i // k, 0.0) for i, (task, text) in enumerate(zip(repeated, ref_texts))
      ]
    for row, ref in zip(rows, ref_rows):
      mine, theirs = row["combined"], ref["combined"]
      row["win_rate"] = 1.0 if mine > theirs else 0.5 if mine == theirs else 0.0
      row["reference_combined"] = theirs
    paired = paired_difference(rows, ref_rows)
  if reference is not None:
    if temperature > 0:  # the sampler's log-probs are pi_T's, the distribution sampled from
      for row, kl in zip(rows, _kl_per_prompt(policy, reference, batches)):
        row["kl"] = float(kl)
  overall = summarise(rows)
  if paired is not None:
    overall["vs_reference"] = paired
  return {
      "overall": overall,
      "families": {f: summarise(r) for f, r in _by_family(rows).items()},
      "samples": rows,
  }


def _row(task: dict, text: str, prompt_index: int, length: float) -> dict:
  """One sample's gold scores, refusal and behaviour axes (None where an axis does not apply)."""
  gold = world_lib.gold_scores(task, text)
  row = {
      "prompt_index": prompt_index,
      "family": task["family"],
      "unsafe": bool(task["unsafe"]),
      "prompt": task["prompt"],
      "response": text,
      **gold,
      "length": length,
      "refusal": float(world_lib.is_refusal(text)),
  }
  if behaviours.has_behaviours(task):
    seen = behaviours.detect(task, text)
    row.update(preamble=float(seen["preamble"]), signoff=float(seen["signoff"]))
    follows = behaviours.follows_tag(task, text, seen=seen)
    if follows is not None:
      row["follows_tag"] = float(follows)
  return row


def prompt_means(rows: Sequence[dict], metric: str = "combined") -> dict[int, float]:
  """{prompt index: mean of `metric` over that prompt's samples} (rows lacking it are skipped)."""
  groups = defaultdict(list)
  for i, row in enumerate(rows):
    if row.get(metric) is not None:
      groups[row.get("prompt_index", i)].append(row[metric])
  return {p: float(np.mean(v)) for p, v in groups.items()}


def mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
  """(mean, standard error of the mean) of independent observations; SE None below two."""
  values = np.asarray(values, np.float64)
  if not values.size:
    return None, None
  se = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else None
  return float(values.mean()), se


def paired_difference(
    rows: Sequence[dict], reference_rows: Sequence[dict], metric: str = "combined"
) -> dict:
  """Paired difference of `metric` between two evaluations of the same prompts: {"diff" (mean
  over prompts of the difference of their per-prompt means), "se", "ci95": [lo, hi] (normal
  approximation), "prompts"}. Prompts are matched by "prompt_index"; both must cover the same."""
  a, b = prompt_means(rows, metric), prompt_means(reference_rows, metric)
  if set(a) != set(b):
    raise ValueError(
        f"paired_difference: the two evaluations cover different prompts ({len(a)} "
        f"and {len(b)}, {len(set(a) ^ set(b))} unmatched)"
    )
  diff, se = mean_se([a[p] - b[p] for p in sorted(a)])
  ci = [diff - 1.96 * se, diff + 1.96 * se] if se is not None else None
  return {"diff": diff, "se": se, "ci95": ci, "prompts": len(a)}


def temperature_curve(
    policy: Policy,
    tokenizer,
    tasks: Sequence[dict],
    rng: jax.Array,
    temperatures: Sequence[float],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    samples_per_prompt: int = 1,
    at_t1: dict | None = None,
) -> dict:
  """Gold of the policy itself sampled at lower temperatures, against KL(pi_T || pi): the
  cheapest way to trade diversity for gold, with no reward model and no training, and so the
  baseline an RLHF method must beat at equal KL. -> {"temperature", "kl", "helpfulness",
  "combined", "combined_se", "safety", the behaviour-axis rates, "vs_t1": the paired difference
  in combined gold against T = 1 (`paired_difference`)}, lists in the order of `temperatures`
  (each > 0). Every temperature samples with the same key (common random numbers). `at_t1`: the
  policy's own `evaluate` at T = 1 with this `rng` and samples_per_prompt (the same samples), used
  instead of sampling T = 1 again (its KL is to itself, 0)."""
  if not temperatures or min(temperatures) <= 0:
    raise ValueError(f"temperatures={tuple(temperatures)}: give one or more temperatures > 0")
  curve = {"temperature": [float(t) for t in temperatures]}
  run = lambda t: evaluate(
      policy,
      tokenizer,
      tasks,
      rng,
      reference=policy,
      max_new_tokens=max_new_tokens,
      temperature=float(t),
      batch_size=batch_size,
      win_rate=False,
      samples_per_prompt=samples_per_prompt,
  )
  if at_t1 is not None:
    at_t1 = {**at_t1, "overall": {**at_t1["overall"], "kl": 0.0}}
  results = {float(t): at_t1 if t == 1.0 and at_t1 is not None else run(t) for t in temperatures}
  base = results.get(1.0) or at_t1 or run(1.0)
  for t in temperatures:
    overall = results[float(t)]["overall"]
    for key in ("kl", "helpfulness", "combined", "combined_se", "safety", *AXIS_METRICS):
      curve.setdefault(key, []).append(overall[key])
    curve.setdefault("vs_t1", []).append(
        paired_difference(results[float(t)]["samples"], base["samples"])
    )
  return curve


def _by_family(rows):
  groups = defaultdict(list)
  for row in rows:
    groups[row["family"]].append(row)
  return dict(sorted(groups.items()))


def summarise(rows: Sequence[dict]) -> dict:
  """Means of the per-sample metrics (n samples of `prompts` prompts); the standard error of
  combined gold over prompts ("combined_se"); refusal split by whether the prompt is unsafe;
  behaviour-axis rates where the world has them (None otherwise)."""
  out = {"n": len(rows), "prompts": len({r.get("prompt_index", i) for i, r in enumerate(rows)})}
  for name in ("helpfulness", "safety", "combined", "win_rate", "kl", "length", *AXIS_METRICS):
    values = [r[name] for r in rows if r.get(name) is not None]
    out[name] = float(np.mean(values)) if values else None
  out["combined_se"] = mean_se(list(prompt_means(rows).values()))[1]
  for name, unsafe in (("refusal_safe", False), ("refusal_unsafe", True)):
    values = [r["refusal"] for r in rows if r["unsafe"] == unsafe]
    out[name] = float(np.mean(values)) if values else None
  calls = [r["tool_call"] for r in rows if "tool_call" in r]
  if calls:  # sampled with tools: the share of samples that called one
    out["tool_call_rate"] = float(np.mean(calls))
  return out


def table_rows(results: dict[str, dict]) -> list[dict]:
  """{model name: evaluate(...) result} -> rows for `metrics.format_table`: one row per model and
  family, plus "all"."""
  rows = []
  for name, result in results.items():
    for family, summary in [("all", result["overall"]), *result["families"].items()]:
      axes = [k for k in AXIS_METRICS if result["overall"].get(k) is not None]
      axes += ["tool_call_rate"] if "tool_call_rate" in result["overall"] else []
      rows.append(
          {"model": name, "family": family, **{k: summary.get(k) for k in ("n", *METRICS, *axes)}}
      )
  return rows
