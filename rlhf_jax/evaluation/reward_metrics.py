"""Reward-model evaluation on held-out preference data, in plain NumPy (no JAX, no jit).

Score the held-out records with any reward model first, then:

    report = preference_report(pairs, chosen_scores, rejected_scores)
    report = ranking_report(rankings, [scores_of_record_i, ...])
    print(format_table(report_rows(report, "rm-1.3b")))   # rlhf_jax.train.metrics.format_table

Pairwise records are {prompt, chosen, rejected, optional margin (int 0..3), optional family,
optional gold_chosen / gold_rejected (the simulator's true quality of each response)}. Ranking
records are {prompt, responses (best first, the annotator's order), optional gold (floats in the
same order), optional family}. These are the records `rlhf_jax.toyworld.annotators` writes.

Conventions shared by every metric:
  * A tie in the reward model's scores counts as half right (what a coin flip between the two
    would score on average); exact float equality is a tie.
  * Gold values closer than `GOLD_TIE_TOL` are equal: such a pair has no gold ordering.
  * A record whose field is absent or None does not have it (HF datasets fill missing columns
    with None); a record with only one of gold_chosen / gold_rejected has no gold.
  * Every value in a report is a Python int, float or None, so a report is JSON-serialisable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import kendalltau

GOLD_TIE_TOL = 1e-6


def _scores(name: str, values: Any) -> np.ndarray:
  """`values` as a finite float64 vector, or a ValueError naming `name`."""
  array = np.asarray(values, dtype=np.float64)
  if array.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array of scores, got shape {array.shape}")
  if not np.all(np.isfinite(array)):
    bad = int(np.flatnonzero(~np.isfinite(array))[0])
    raise ValueError(f"{name}[{bad}] is {array[bad]}; scores must be finite")
  return array


def _check_length(name: str, length: int, n_records: int) -> None:
  if length != n_records:
    raise ValueError(
        f"len({name}) = {length} but len(records) = {n_records}; "
        f"give one entry per record, in the same order"
    )


def _win(diff: np.ndarray) -> np.ndarray:
  """1 where diff > 0, 0.5 where diff == 0, 0 where diff < 0."""
  return (np.sign(diff) + 1.0) / 2.0


def _mean(values: Sequence[float] | np.ndarray) -> float | None:
  return float(np.mean(values)) if len(values) else None


def _slices(records: Sequence[Mapping], field: str) -> dict[str, np.ndarray]:
  """{str(value): indices of the records with that `field` value}, records without it left out."""
  groups: dict[str, list[int]] = {}
  for index, record in enumerate(records):
    value = record.get(field)
    if value is None:
      continue
    if field == "margin":
      if (
          isinstance(value, bool)
          or not isinstance(value, (int, float, np.number))
          or not float(value).is_integer()
      ):
        raise ValueError(f"records[{index}]: margin must be an integer level 0..3, got {value!r}")
      value = int(value)
    groups.setdefault(str(value), []).append(index)
  key = (lambda k: int(k)) if field == "margin" else (lambda k: k)
  return {k: np.asarray(groups[k], dtype=np.int64) for k in sorted(groups, key=key)}


# ----------------------------------------------------------------------------- pairwise


def _preference_row(diff: np.ndarray, gold_diff: np.ndarray) -> dict:
  """One row from score differences (chosen - rejected) and gold differences (nan: no gold)."""
  ordered = np.abs(gold_diff) > GOLD_TIE_TOL  # False for nan too
  gold_wins = _win(diff[ordered] * np.sign(gold_diff[ordered]))
  return {
      "n": int(diff.size),
      "accuracy": _mean(_win(diff)),
      "gold_accuracy": _mean(gold_wins),
      "gold_n": int(ordered.sum()),
      "mean_margin": _mean(diff),
  }


def preference_report(records: Sequence[Mapping], chosen_scores: Any, rejected_scores: Any) -> dict:
  """How often a reward model prefers the chosen response, overall and per slice.

  Args:
    records: N pairwise records (see the module docstring); only margin, family and gold_* are
      read, so the texts need not be present.
    chosen_scores: [N] reward of records[i]["chosen"].
    rejected_scores: [N] reward of records[i]["rejected"].

  Returns:
    {"overall": row, "by_margin": {"0": row, ...}, "by_family": {"facts": row, ...}}.
    by_margin (keys sorted numerically) holds only records with a margin, by_family (keys sorted
    alphabetically) only records with a family; either is {} when no record has the field. A row is
      n              number of records in the slice;
      accuracy       fraction with chosen score > rejected score, ties counted 0.5;
      gold_accuracy  the same against the gold ordering, over the gold_n pairs whose gold values
                     differ by more than GOLD_TIE_TOL: right when the score difference has the
                     sign of gold_chosen - gold_rejected (so a label the annotator got wrong is
                     still judged by gold); None when gold_n is 0;
      gold_n         number of those pairs;
      mean_margin    mean of chosen - rejected scores.

  Raises:
    ValueError: if the three inputs differ in length (naming which), scores are not 1-D finite
      numbers, there are no records, or a margin is not an integer.
  """
  chosen = _scores("chosen_scores", chosen_scores)
  rejected = _scores("rejected_scores", rejected_scores)
  _check_length("chosen_scores", chosen.size, len(records))
  _check_length("rejected_scores", rejected.size, len(records))
  if not records:
    raise ValueError("no records to evaluate")
  gold_diff = np.full(len(records), np.nan)
  for index, record in enumerate(records):
    gold_c, gold_r = record.get("gold_chosen"), record.get("gold_rejected")
    if gold_c is not None and gold_r is not None:
      gold_diff[index] = float(gold_c) - float(gold_r)
      if not np.isfinite(gold_diff[index]):
        raise ValueError(
            f"records[{index}]: gold_chosen {gold_c!r} / gold_rejected {gold_r!r} "
            f"must be finite"
        )
  diff = chosen - rejected

  def rows(field: str) -> dict[str, dict]:
    return {
        key: _preference_row(diff[idx], gold_diff[idx])
        for key, idx in _slices(records, field).items()
    }

  return {
      "overall": _preference_row(diff, gold_diff),
      "by_margin": rows("margin"),
      "by_family": rows("family"),
  }


# ----------------------------------------------------------------------------- rankings


def _tau(x: np.ndarray, y: np.ndarray) -> float:
  """Kendall tau-b; nan when undefined (either side constant)."""
  return float(kendalltau(x, y).statistic)


def _prompt_metrics(scores: np.ndarray, gold: np.ndarray | None) -> dict[str, float]:
  """Per-prompt metrics; nan marks a metric that is undefined or has no gold for this prompt."""
  k = scores.size
  upper_i, upper_j = np.triu_indices(k, 1)
  out = {
      # Annotator order as values, response 0 highest: k-1, k-2, ..., 0.
      "kendall_tau_labels": _tau(scores, np.arange(k, 0, -1, dtype=np.float64)),
      "pair_accuracy_labels": float(np.mean(_win(scores[upper_i] - scores[upper_j]))),
      "kendall_tau_gold": np.nan,
      "top1_gold": np.nan,
  }
  if gold is not None:
    out["kendall_tau_gold"] = _tau(scores, gold)
    # Ties in the RM's top score: the expected hit rate of picking one of them at random.
    rm_top = scores == scores.max()
    gold_top = gold >= gold.max() - GOLD_TIE_TOL
    out["top1_gold"] = float(np.mean(gold_top[rm_top]))
  return out


def _ranking_row(per_prompt: list[dict[str, float]]) -> dict:
  row: dict[str, Any] = {"n": len(per_prompt)}
  for metric in ("kendall_tau_labels", "kendall_tau_gold", "top1_gold", "pair_accuracy_labels"):
    values = np.asarray([m[metric] for m in per_prompt])
    row[metric] = _mean(values[~np.isnan(values)])
  return row


def ranking_report(records: Sequence[Mapping], scores: Sequence[Any]) -> dict:
  """How well a reward model's scores reproduce ranked responses, overall and per family.

  Args:
    records: N ranking records (see the module docstring); responses is read for its length,
      gold and family when present.
    scores: N score vectors; scores[i] has one reward per records[i]["responses"], same order.

  Returns:
    {"overall": row, "by_family": {"facts": row, ...}} (by_family sorted alphabetically, only
    records with a family, {} when none has one). Every metric is a mean over prompts, so each
    prompt weighs the same whatever its number of responses. A row is
      n                     number of prompts;
      kendall_tau_labels    Kendall tau-b between the scores and the annotator's order (response
                            0 best); prompts where the scores are all equal are skipped (tau-b
                            is undefined there);
      kendall_tau_gold      tau-b between the scores and gold, skipping prompts where gold or the
                            scores are constant; None when no prompt is left;
      top1_gold             fraction of prompts with gold whose top-scored response has the
                            highest gold (within GOLD_TIE_TOL: any of several best counts; a tie
                            for the top score counts the fraction of tied responses that are
                            gold-best); None without gold;
      pair_accuracy_labels  fraction of the annotator's pairs (i < j: i ranked above j) the
                            scores order the same way, ties counted 0.5.

  Raises:
    ValueError: if len(scores) != len(records), scores[i] or a gold list does not match the
      length of records[i]["responses"] (naming i), a record has no responses list, values are
      not finite, or there are no records.
  """
  _check_length("scores", len(scores), len(records))
  if not records:
    raise ValueError("no records to evaluate")
  per_prompt = []
  for index, record in enumerate(records):
    responses = record.get("responses")
    if not isinstance(responses, Sequence) or isinstance(responses, str) or len(responses) < 2:
      raise ValueError(
          f"records[{index}]: responses must be a list of at least 2 responses, "
          f"got {responses!r}"
      )
    record_scores = _scores(f"scores[{index}]", scores[index])
    if record_scores.size != len(responses):
      raise ValueError(
          f"scores[{index}] has {record_scores.size} scores but records[{index}] "
          f"has {len(responses)} responses"
      )
    gold = record.get("gold")
    if gold is not None:
      gold = _scores(f"records[{index}]['gold']", gold)
      if gold.size != len(responses):
        raise ValueError(
            f"records[{index}] has {gold.size} gold values for " f"{len(responses)} responses"
        )
    per_prompt.append(_prompt_metrics(record_scores, gold))
  return {
      "overall": _ranking_row(per_prompt),
      "by_family": {
          key: _ranking_row([per_prompt[i] for i in idx])
          for key, idx in _slices(records, "family").items()
      },
  }


# ----------------------------------------------------------------------------- tables


def report_rows(report: Mapping[str, Any], name: str) -> list[dict]:
  """`report` (from `preference_report` or `ranking_report`) as flat table rows.

  One row for "all", then one per margin ("margin=2") and per family ("family=facts"), in the
  report's order: {"model": name, "slice": ..., **row} with floats rounded to 3 decimals (ints
  and None unchanged). Print with `rlhf_jax.train.metrics.format_table`, or dump as JSON; rows of
  several models concatenate into one table.
  """

  def flat(slice_name: str, row: Mapping[str, Any]) -> dict:
    values = {
        key: round(float(v), 3) if isinstance(v, (float, np.floating)) else v
        for key, v in row.items()
    }
    return {"model": name, "slice": slice_name, **values}

  rows = [flat("all", report["overall"])]
  for field, prefix in (("by_margin", "margin"), ("by_family", "family")):
    rows += [flat(f"{prefix}={key}", row) for key, row in report.get(field, {}).items()]
  return rows
