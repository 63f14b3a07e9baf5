"""Gates: the checks that say whether a world can show feedback winning, before any RL is trusted.

A world in which nothing beats the SFT model sampled at a lower temperature cannot compare
alignment methods (the earlier world's lesson, docs/toyworld.md). `check` turns the pipeline's
evaluation into PASS / FAIL lines, each with the figures it was decided on:

  temperature   the SFT model's gold does not rise as the temperature falls: every paired
                difference combined(T) - combined(T = 1) is <= 0 (sharpening buys nothing)
  oracle        gold's own best of 4 SFT samples beats the mean sample by >= 0.15 (the samples
                hold headroom that a perfect reward would find)
  reward        the combined reward model orders one prompt's samples like gold: within-prompt
                correlation >= 0.6 on the behaviour prompts
  precision     every paired standard error of the evaluation is <= 0.01

A gate whose inputs were not measured (no reward stage, no temperature curve) is reported as
"NOT RUN" with what it needs, never silently skipped. Pure: the caller prints and writes.
"""

from __future__ import annotations

from typing import Sequence

ORACLE_N, ORACLE_GAIN = 4, 0.15
MIN_CORR = 0.6
MAX_SE = 0.01


def _gate(name: str, passed: bool | None, figures: str, needs: str = "") -> dict:
  status = "NOT RUN" if passed is None else "PASS" if passed else "FAIL"
  return {"gate": name, "status": status, "figures": figures if passed is not None else needs}


def temperature_gate(curve: dict | None) -> dict:
  if not curve or len(curve.get("vs_t1", [])) < 2:
    return _gate("temperature", None, "", "config.eval.temperatures with T = 1 and lower ones")
  rows = [(t, d) for t, d in zip(curve["temperature"], curve["vs_t1"]) if t < 1.0]
  figures = "; ".join(
      f"T={t:g}: {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
      if d["ci95"]
      else f"T={t:g}: {d['diff']:+.3f}"
      for t, d in rows
  )
  return _gate("temperature", all(d["diff"] <= 0 for _, d in rows), figures)


def oracle_gate(best_of_n: dict | None) -> dict:
  needs = f"a reward stage and config.eval.best_of_n including {ORACLE_N}"
  if not best_of_n or ORACLE_N not in best_of_n.get("n", ()) or "oracle_curve" not in best_of_n:
    return _gate("oracle", None, "", needs)
  i = best_of_n["n"].index(ORACLE_N)
  mean, best = best_of_n["mean"]["combined"], best_of_n["oracle_curve"]["combined"][i]
  return _gate(
      "oracle",
      best - mean >= ORACLE_GAIN,
      f"gold best of {ORACLE_N} {best:.3f} - mean sample {mean:.3f} = {best - mean:+.3f} "
      f"(needs >= {ORACLE_GAIN})",
  )


def reward_gate(best_of_n: dict | None, reward_name: str | None) -> dict:
  curve = (best_of_n or {}).get(reward_name or "", {})
  corr = curve.get("within_prompt_corr", {}).get("behaviour")
  if corr is None:
    return _gate("reward", None, "", "a combined reward's best-of-n report on a behaviour world")
  return _gate(
      "reward",
      corr >= MIN_CORR,
      f"{reward_name}: within-prompt correlation with gold {corr:.3f} on behaviour "
      f"prompts (needs >= {MIN_CORR})",
  )


def precision_gate(paired: Sequence[tuple[str, dict]]) -> dict:
  ses = [(name, d["se"]) for name, d in paired if d and d.get("se") is not None]
  if not ses:
    return _gate("precision", None, "", "an evaluation with a reference or a temperature curve")
  worst = max(ses, key=lambda x: x[1])
  return _gate(
      "precision",
      worst[1] <= MAX_SE,
      f"largest paired SE {worst[1]:.4f} ({worst[0]}; needs <= {MAX_SE}) over {len(ses)} "
      "comparisons",
  )


def check(
    *, curve: dict | None, best_of_n: dict | None, reward_name: str | None, gold: dict | None
) -> list[dict]:
  """The four gates (module docstring) from the temperature curve, the best-of-n report, the
  name of the combined reward in it, and the gold results {stage: evaluate(...)}."""
  paired = [
      (f"{stage} vs its start", r["overall"].get("vs_reference"))
      for stage, r in (gold or {}).items()
  ]
  if curve:
    paired += [
        (f"T={t:g} vs T=1", d)
        for t, d in zip(curve["temperature"], curve.get("vs_t1", []))
        if t != 1.0
    ]
  return [
      temperature_gate(curve),
      oracle_gate(best_of_n),
      reward_gate(best_of_n, reward_name),
      precision_gate(paired),
  ]
