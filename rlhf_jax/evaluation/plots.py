"""Plots written to workdirs (matplotlib, no display needed).

`plot_gold_vs_kl` draws reward over-optimisation (Gao et al. 2022): for each PPO run, the proxy
reward (what the reward model says) and the gold reward (what the toy world says) against the KL
to the reference. With a weak KL penalty the proxy keeps rising while gold peaks and falls.
`plot_best_of_n` draws the same for best-of-n selection against sqrt(KL). `plot_tool_use` draws how
often each task family calls a tool, and its accuracy, over a run with tools.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np


def smooth(values: Sequence[float], window: int) -> np.ndarray:
  """Trailing moving average [N] -> [N] (the first points average what exists so far)."""
  x = np.asarray(values, dtype=np.float64)
  if window <= 1 or x.size == 0:
    return x
  csum = np.cumsum(np.insert(x, 0, 0.0))
  idx = np.arange(1, x.size + 1)
  start = np.maximum(idx - window, 0)
  return (csum[idx] - csum[start]) / (idx - start)


def plot_gold_vs_kl(
    runs: Mapping[str, Sequence[Mapping]],
    path: str | os.PathLike,
    *,
    final: Mapping[str, Mapping] | None = None,
    baselines: Sequence[Mapping] = (),
    window: int = 5,
    prefix: str = "ppo/",
) -> str:
  """Proxy and gold reward against KL, one line per run; writes a PNG to `path` and returns it.

  runs: {label: metric rows of a PPO run's metrics.jsonl}. The proxy panel reads the training
  rows ("<prefix>kl", "<prefix>reward"), smoothed with a trailing moving average of `window`
  iterations. The gold panels read the held-out rows ("eval/kl", "eval/helpfulness",
  "eval/combined": the same held-out tasks at every evaluation) when the run has them, else the
  smoothed training rows ("<prefix>gold_helpfulness", "<prefix>gold_combined", measured on each
  iteration's own prompts). final: {label: {"kl", "helpfulness", "combined"}} from the pipeline's
  gold evaluation, drawn as stars. baselines: curves without RL, each {"label", "kl" [..],
  "helpfulness" [..], "combined" [..]}, drawn dashed: e.g. the gold of best-of-n sampling under
  the same reward (over-optimisation without RL) and the reference sampled at lower temperatures.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  held_out_any = False
  for i, (label, rows) in enumerate(runs.items()):
    color = f"C{i}"
    train = [r for r in rows if f"{prefix}kl" in r]
    if train:
      axes[0].plot(
          smooth([r[f"{prefix}kl"] for r in train], window),
          smooth([r[f"{prefix}reward"] for r in train], window),
          color=color,
          label=label,
      )
    held_out = [r for r in rows if "eval/kl" in r and r["eval/kl"] is not None]
    for ax, key in ((axes[1], "helpfulness"), (axes[2], "combined")):
      if held_out:
        ax.plot(
            [r["eval/kl"] for r in held_out],
            [r[f"eval/{key}"] for r in held_out],
            "-o",
            color=color,
            markersize=3,
            label=label,
        )
      elif train:
        ax.plot(
            smooth([r[f"{prefix}kl"] for r in train], window),
            smooth([r[f"{prefix}gold_{key}"] for r in train], window),
            color=color,
            label=label,
        )
    held_out_any |= bool(held_out)
    point = (final or {}).get(label)
    if point and point.get("kl") is not None:
      for ax, key in ((axes[1], "helpfulness"), (axes[2], "combined")):
        ax.scatter(
            [point["kl"]],
            [point[key]],
            color=color,
            marker="*",
            s=140,
            zorder=3,
            edgecolors="black",
        )
  for curve, (style, color) in zip(baselines, (("--o", "black"), ("--s", "gray"), ("--^", "gray"))):
    for ax, key in ((axes[1], "helpfulness"), (axes[2], "combined")):
      ax.plot(curve["kl"], curve[key], style, color=color, markersize=4, label=curve["label"])
  source = "held-out tasks" if held_out_any else f"training prompts, moving average of {window}"
  titles = (
      f"proxy reward (reward model; training prompts, moving average of {window})",
      f"gold helpfulness ({source})",
      f"gold combined, h x s ({source})",
  )
  for ax, title in zip(axes, titles):
    ax.set_xlabel("KL(policy || reference), nats per response")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  axes[2].legend(fontsize=7)
  if final:
    axes[1].annotate(
        "* final gold evaluation", xy=(0.02, 0.02), xycoords="axes fraction", fontsize=8
    )
  fig.suptitle("Reward over-optimisation: proxy vs gold reward against KL to the reference")
  return _save(fig, path)


def plot_best_of_n(report: Mapping, path: str | os.PathLike) -> str:
  """Best-of-n over-optimisation (Gao et al. 2022, their figure 1 without RL): for every reward in
  a best-of-n report (`reward_eval.best_of_n_report`), the gold combined of its pick (left) and
  its own score of its pick over n = 1 (right, the proxy), against sqrt(KL(best-of-n || policy)),
  KL = log n - (n - 1) / n; the gold oracle's best of n dashed. Writes a PNG to `path`, returns it.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  x = np.sqrt(np.asarray(report["kl"], np.float64))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  oracle = report.get("oracle_curve", {}).get("combined")
  if oracle:
    axes[0].plot(x, oracle, "--", color="black", label="(gold oracle)")
  curves = [
      (name, c)
      for name, c in report.items()
      if isinstance(c, Mapping)
      and "combined" in c
      and name not in ("mean", "oracle", "oracle_curve")
  ]
  for i, (name, c) in enumerate(curves):
    axes[0].plot(x, c["combined"], "-o", color=f"C{i}", markersize=4, label=name)
    if "proxy" in c:
      proxy = np.asarray(c["proxy"], np.float64)
      axes[1].plot(x, proxy - proxy[0], "-o", color=f"C{i}", markersize=4, label=name)
  for ax, n in ((ax, n) for ax in axes for n in report["n"]):
    ax.axvline(np.sqrt(max(np.log(n) - (n - 1) / n, 0.0)), color="gray", alpha=0.15, lw=0.8)
  axes[0].set_title(
      f"gold combined of the pick ({report.get('prompts', '?')} held-out tasks)", fontsize=9
  )
  axes[1].set_title("proxy: the reward's own score of its pick, minus n = 1", fontsize=9)
  for ax in axes:
    ax.set_xlabel(f"sqrt KL(best of n || policy); n = {', '.join(map(str, report['n']))}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("Best-of-n: gold vs proxy reward as n grows")
  return _save(fig, path)


def plot_tool_use(
    runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike, families: Sequence[str]
) -> str:
  """Tool use over training: for each run (label -> its metrics.jsonl rows), the held-out share of
  each family's samples that called a tool (left; `eval/<family>_tool_call_rate`, absent for a run
  without tools) and the family's gold helpfulness (right; `eval/<family>_helpfulness`, its
  accuracy), against the iteration. Writes a PNG to `path`, returns it."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  styles = ("-o", "--s", ":^", "-.v")
  for i, (label, rows) in enumerate(runs.items()):
    for j, family in enumerate(families):
      for ax, key in zip(axes, (f"eval/{family}_tool_call_rate", f"eval/{family}_helpfulness")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
          x, y = zip(*points)
          ax.plot(
              x, y, styles[i % len(styles)], color=f"C{j}", markersize=3, label=f"{label}: {family}"
          )
  axes[0].set_title("samples that call a tool (held-out prompts)", fontsize=9)
  axes[1].set_title("gold helpfulness of the answer (held-out prompts)", fontsize=9)
  for ax in axes:
    ax.set_xlabel("iteration")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("Tool use over training")
  return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> str:
  """Writes `fig` as a PNG to `path` (its directory created), closes it, returns the path."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


__all__ = ["smooth", "plot_gold_vs_kl", "plot_best_of_n", "plot_tool_use"]
