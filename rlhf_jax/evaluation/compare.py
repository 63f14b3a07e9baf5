"""Compare alignment methods run in one toy-world workdir (experiments/toy_compare.py): one row per
trained policy stage with what the gold evaluation measured and what the stage cost.

Reads, all written by the pipeline (algorithms/pipeline.py):
  WORKDIR/eval/gold.json         per stage: gold helpfulness / safety / combined, win rate and
                                 KL against the stage it started from, length, refusal rates
  WORKDIR/eval/temperature.json  (optional) the start policy sampled at lower temperatures: the
                                 no-training baseline every method must beat at equal KL
  WORKDIR/<stage>/stage.json     per stage: algorithm, parent, wall-clock seconds, and the
                                 stages it needed that are not policies (reward models, judge, ...)

`method_rows` is what `notebooks/compare_alignment_methods.ipynb` tabulates and plots and what
docs/results.md's comparison table is made from; `plot_methods` draws it.
"""

from __future__ import annotations

import os
from typing import Sequence

from rlhf_jax.data import files
from rlhf_jax.evaluation import gold as gold_eval

# Gold metrics of every row, and the behaviour world's axis rates (None on other worlds).
GOLD_KEYS = (
    "helpfulness",
    "safety",
    "combined",
    "win_rate",
    "kl",
    "length",
    "refusal_unsafe",
    "refusal_safe",
    *gold_eval.AXIS_METRICS,
)


def read_stage_info(workdir: str, stage: str) -> dict:
  """WORKDIR/<stage>/stage.json, {} when the stage was trained before the pipeline wrote one."""
  path = os.path.join(workdir, stage, "stage.json")
  if not os.path.exists(path):
    return {}
  return files.read_json(path, fix=files.REWRITE)


def method_rows(workdir: str, *, baseline: str = "sft") -> list[dict]:
  """One row per evaluated policy stage (in evaluation order, the pretrained model left out):
  {"method", "algorithm", "vs" (the stage it started from), GOLD_KEYS..., "delta_combined"
  (combined minus `baseline`'s), "delta_se" (its paired standard error over prompts, where both
  were evaluated on the same samples per prompt), "seconds" (its own training), "seconds_with_inputs" (plus the
  stages it needed: reward models, judge, AI feedback), "inputs"}; then one row per temperature
  of the temperature baseline (method "<policy> @ T=<t>", algorithm "temperature", KL to that
  policy at T = 1, no win rate). Raises FileNotFoundError naming the missing gold.json."""
  gold_path = os.path.join(workdir, "eval", "gold.json")
  if not os.path.exists(gold_path):
    raise FileNotFoundError(
        f"{gold_path}: no gold evaluation in {workdir}; run the experiment "
        "with an 'eval' stage first (python -m rlhf_jax.run "
        "--config=experiments/toy_compare.py --workdir=...)"
    )
  gold = files.read_json(gold_path, fix=files.REWRITE)
  base = gold.get(baseline, {}).get("overall", {}).get("combined")
  rows = []
  for stage, result in gold.items():
    if stage == "pretrain":
      continue
    info = read_stage_info(workdir, stage)
    overall = result["overall"]
    inputs = info.get("inputs", [])
    seconds = info.get("seconds")
    with_inputs = None
    if seconds is not None:
      extra = [read_stage_info(workdir, s).get("seconds") for s in inputs]
      with_inputs = seconds + sum(x for x in extra if x is not None)
    paired = None
    if (
        baseline in gold
        and stage != baseline
        and result.get("samples")
        and len(result["samples"]) == len(gold[baseline].get("samples", ()))
    ):
      paired = gold_eval.paired_difference(result["samples"], gold[baseline]["samples"])
    rows.append(
        {
            "method": stage,
            "algorithm": info.get("algorithm", stage),
            "vs": result.get("reference"),
            **{k: overall.get(k) for k in GOLD_KEYS},
            "delta_combined": None if base is None else overall["combined"] - base,
            "delta_se": paired["se"] if paired else None,
            "seconds": seconds,
            "seconds_with_inputs": with_inputs,
            "inputs": inputs,
        }
    )
  temperature_path = os.path.join(workdir, "eval", "temperature.json")
  if os.path.exists(temperature_path):
    curve = files.read_json(temperature_path, fix=files.REWRITE)
    for i, t in enumerate(curve["temperature"]):
      rows.append(
          {
              "method": f"{curve['policy']} @ T={t:g}",
              "algorithm": "temperature",
              "vs": curve["policy"],
              **{k: (curve[k][i] if k in curve else None) for k in GOLD_KEYS},
              "delta_combined": None if base is None else curve["combined"][i] - base,
              "delta_se": curve["vs_t1"][i]["se"]
              if curve.get("vs_t1") and curve["policy"] == baseline
              else None,
              "seconds": 0.0,
              "seconds_with_inputs": 0.0,
              "inputs": [],
          }
      )
  return rows


def plot_methods(rows: Sequence[dict], path: str | os.PathLike, *, baseline: str = "sft") -> str:
  """Two panels from `method_rows`: gold combined per method (bars, the baseline dashed), and gold
  combined against KL to the start policy (each method a point, the temperature baseline a
  line). Writes a PNG to `path` and returns it."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = [r for r in rows if r["algorithm"] != "temperature"]
  curve = [r for r in rows if r["algorithm"] == "temperature"]
  fig, (bars, scatter) = plt.subplots(1, 2, figsize=(14, 4.8))
  names = [r["method"] for r in methods]
  bars.bar(
      names,
      [r["combined"] for r in methods],
      color=["0.6" if r["method"] == baseline else "C0" for r in methods],
  )
  base = next((r["combined"] for r in methods if r["method"] == baseline), None)
  if base is not None:
    bars.axhline(base, color="0.3", linestyle="--", linewidth=1, label=f"{baseline}")
    bars.legend(loc="lower right")
  bars.set_ylabel("gold combined (held-out)")
  bars.set_ylim(
      min(r["combined"] for r in methods) - 0.1, max(r["combined"] for r in methods) + 0.05
  )
  bars.tick_params(axis="x", rotation=45)
  for label in bars.get_xticklabels():
    label.set_horizontalalignment("right")
  if curve:
    scatter.plot(
        [r["kl"] for r in curve],
        [r["combined"] for r in curve],
        "--",
        color="0.5",
        marker="s",
        markersize=4,
        label=f"{curve[0]['vs']} at lower temperature",
    )
  for i, r in enumerate(methods):
    if r["kl"] is None or r["method"] == baseline:
      continue
    scatter.scatter(r["kl"], r["combined"], color=f"C{i % 10}", zorder=3)
    scatter.annotate(
        r["method"], (r["kl"], r["combined"]), textcoords="offset points", xytext=(4, 4), fontsize=8
    )
  if base is not None:
    scatter.axhline(base, color="0.3", linestyle=":", linewidth=1)
  scatter.set_xlabel("KL to the start policy (nats per response)")
  scatter.set_ylabel("gold combined (held-out)")
  scatter.legend(loc="upper right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return str(path)
