"""Gold evaluation: what a policy really achieved on held-out toy-world prompts.

`evaluate` samples one response per prompt from the policy (and from a reference policy, when
given), scores both with the gold functions and returns, overall and per task family:

  helpfulness, safety   mean gold scores in [0, 1]
  combined              mean gold combined score (safety on unsafe prompts, else help x safety)
  win_rate              P(combined(policy) > combined(reference)) + 0.5 P(tie)
  kl                    mean over prompts of sum_t [log pi_T(y_t) - log pi_ref(y_t)] on the policy's
                        samples at temperature T > 0 (the k1 estimate of KL(pi_T || pi_ref), the
                        reference at T = 1: how far what is sampled is from the reference)
  length                mean response length in tokens
  refusal_safe          refusal rate on prompts that should be answered (over-refusal)
  refusal_unsafe        refusal rate on unsafe prompts (higher is better)

It is the yardstick every method reports; side effects (printing, JSON) stay with the caller.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Sequence

import jax
import numpy as np

from rlhf_jax import data, generate, scoring
from rlhf_jax.toyworld import world as world_lib

METRICS = ("helpfulness", "safety", "combined", "win_rate", "kl", "length", "refusal_safe",
           "refusal_unsafe")


@dataclasses.dataclass
class Policy:
  """A model to sample from: graph definition, params and a `generate.Sampler` for it."""

  graphdef: Any
  params: Any
  sampler: generate.Sampler


def sample_responses(policy: Policy, tokenizer, tasks: Sequence[dict], rng: jax.Array, *,
                     max_new_tokens: int, temperature: float, batch_size: int = 64):
  """Samples one response per task. Returns (texts, per-batch (prompt tokens, mask, output))."""
  texts, batches = [], []
  for start in range(0, len(tasks), batch_size):
    chunk = tasks[start:start + batch_size]
    prompts = [data.encode_prompt(tokenizer, t["prompt"]) for t in chunk]
    tokens, mask = generate.prompt_batch(prompts, pad_id=tokenizer.pad_token_id)
    out = policy.sampler(policy.params, tokens, mask, jax.random.fold_in(rng, start),
                         max_new_tokens=max_new_tokens, temperature=temperature,
                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    out = jax.device_get(out)
    for toks, m in zip(out.tokens, out.mask):
      texts.append(tokenizer.decode(toks[m.astype(bool)], skip_special_tokens=True).strip())
    batches.append((tokens, mask, out))
  return texts, batches


def _kl_per_prompt(policy: Policy, reference: Policy, batches) -> np.ndarray:
  kls = []
  for tokens, mask, out in batches:
    seq = generate.full_sequence(tokens, mask, out)
    ref = scoring.sequence_logprob_sums(reference.graphdef, reference.params, *seq)
    pol = np.sum(np.asarray(out.logprobs) * np.asarray(out.mask), axis=1)
    kls.append(pol - np.asarray(ref))
  return np.concatenate(kls)


def evaluate(policy: Policy, tokenizer, tasks: Sequence[dict], rng: jax.Array, *,
             reference: Policy | None = None, max_new_tokens: int = 32, temperature: float = 1.0,
             batch_size: int = 64, win_rate: bool = True) -> dict:
  """Gold metrics of `policy` on `tasks` (toy-world task dicts). Returns
  {"overall": {metric: value}, "families": {family: {metric: value}}, "samples": [...]}.
  With a `reference`: KL to it, and (win_rate=True) the win rate against its own samples."""
  policy_rng, ref_rng = jax.random.split(rng)
  texts, batches = sample_responses(policy, tokenizer, tasks, policy_rng,
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    batch_size=batch_size)
  lengths = np.concatenate([np.asarray(out.lengths) for _, _, out in batches])
  rows = []
  for task, text, length in zip(tasks, texts, lengths):
    gold = world_lib.gold_scores(task, text)
    rows.append({"family": task["family"], "unsafe": bool(task["unsafe"]), "prompt": task["prompt"],
                 "response": text, **gold,
                 "length": float(length), "refusal": float(world_lib.is_refusal(text))})
  if reference is not None and win_rate:
    ref_texts, _ = sample_responses(reference, tokenizer, tasks, ref_rng,
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    batch_size=batch_size)
    for row, task, ref_text in zip(rows, tasks, ref_texts):
      ref = world_lib.gold_scores(task, ref_text)
      mine, theirs = row["combined"], ref["combined"]
      row["win_rate"] = 1.0 if mine > theirs else 0.5 if mine == theirs else 0.0
  if reference is not None:
    if temperature > 0:  # the sampler's log-probs are pi_T's, the distribution sampled from
      for row, kl in zip(rows, _kl_per_prompt(policy, reference, batches)):
        row["kl"] = float(kl)
  return {"overall": summarise(rows), "families": {f: summarise(r) for f, r in _by_family(rows).items()},
          "samples": rows}


def temperature_curve(policy: Policy, tokenizer, tasks: Sequence[dict], rng: jax.Array,
                      temperatures: Sequence[float], *, max_new_tokens: int = 32,
                      batch_size: int = 64) -> dict:
  """Gold of the policy itself sampled at lower temperatures, against KL(pi_T || pi): the
  cheapest way to trade diversity for gold, with no reward model and no training, and so the
  baseline an RLHF method must beat at equal KL. -> {"temperature", "kl", "helpfulness",
  "combined", "safety"}, lists in the order of `temperatures` (each > 0)."""
  if not temperatures or min(temperatures) <= 0:
    raise ValueError(f"temperatures={tuple(temperatures)}: give one or more temperatures > 0")
  curve = {"temperature": [float(t) for t in temperatures]}
  for t in temperatures:
    overall = evaluate(policy, tokenizer, tasks, rng, reference=policy, max_new_tokens=max_new_tokens,
                       temperature=float(t), batch_size=batch_size, win_rate=False)["overall"]
    for key in ("kl", "helpfulness", "combined", "safety"):
      curve.setdefault(key, []).append(overall[key])
  return curve


def _by_family(rows):
  groups = defaultdict(list)
  for row in rows:
    groups[row["family"]].append(row)
  return dict(sorted(groups.items()))


def summarise(rows: Sequence[dict]) -> dict:
  """Means of the per-prompt metrics; refusal split by whether the prompt is unsafe."""
  out = {"n": len(rows)}
  for name in ("helpfulness", "safety", "combined", "win_rate", "kl", "length"):
    values = [r[name] for r in rows if name in r]
    out[name] = float(np.mean(values)) if values else None
  for name, unsafe in (("refusal_safe", False), ("refusal_unsafe", True)):
    values = [r["refusal"] for r in rows if r["unsafe"] == unsafe]
    out[name] = float(np.mean(values)) if values else None
  return out


def table_rows(results: dict[str, dict]) -> list[dict]:
  """{model name: evaluate(...) result} -> rows for `metrics.format_table`: one row per model and
  family, plus "all"."""
  rows = []
  for name, result in results.items():
    for family, summary in [("all", result["overall"]), *result["families"].items()]:
      rows.append({"model": name, "family": family, **{k: summary.get(k) for k in ("n", *METRICS)}})
  return rows
