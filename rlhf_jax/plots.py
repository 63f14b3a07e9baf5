"""Plots written to workdirs (matplotlib, no display needed).

`plot_gold_vs_kl` draws reward over-optimisation (Gao et al. 2022): for each PPO run, the proxy
reward (what the reward model says) and the gold reward (what the toy world says) against the KL
to the reference. With a weak KL penalty the proxy keeps rising while gold peaks and falls.
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


def plot_gold_vs_kl(runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike, *,
                    final: Mapping[str, Mapping] | None = None,
                    best_of_n: Mapping | None = None, window: int = 5,
                    prefix: str = "ppo/") -> str:
  """Proxy and gold reward against KL, one line per run; writes a PNG to `path` and returns it.

  runs: {label: per-iteration metric rows with "<prefix>kl", "<prefix>reward",
  "<prefix>gold_helpfulness", "<prefix>gold_combined"} (a PPO run's metrics.jsonl); each series is
  smoothed with a trailing moving average of `window` iterations (the per-iteration gold is
  measured on that iteration's prompts only). final: {label: {"kl", "helpfulness", "combined"}}
  from the held-out gold evaluation, drawn as markers at the run's final KL. best_of_n:
  {"label", "kl" [..], "helpfulness" [..], "combined" [..]}, the gold of best-of-n sampling under
  the same reward (a dashed line: the over-optimisation curve without RL).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  panels = (("reward", "proxy reward (reward model, whitened)"),
            ("gold_helpfulness", "gold helpfulness"), ("gold_combined", "gold combined (h x s)"))
  for i, (label, rows) in enumerate(runs.items()):
    rows = [r for r in rows if f"{prefix}kl" in r]
    if not rows:
      continue
    color = f"C{i}"
    kl = smooth([r[f"{prefix}kl"] for r in rows], window)
    for ax, (key, _) in zip(axes, panels):
      ax.plot(kl, smooth([r[f"{prefix}{key}"] for r in rows], window), color=color, label=label)
    point = (final or {}).get(label)
    if point and point.get("kl") is not None:
      for ax, key in ((axes[1], "helpfulness"), (axes[2], "combined")):
        ax.scatter([point["kl"]], [point[key]], color=color, marker="*", s=140, zorder=3,
                   edgecolors="black")
  if best_of_n:
    for ax, key in ((axes[1], "helpfulness"), (axes[2], "combined")):
      ax.plot(best_of_n["kl"], best_of_n[key], "k--o", markersize=4, label=best_of_n["label"])
    axes[1].legend(fontsize=8)
  for ax, (_, title) in zip(axes, panels):
    ax.set_xlabel("KL(policy || reference), nats per response")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  if final:
    axes[1].annotate("* held-out gold evaluation", xy=(0.02, 0.02), xycoords="axes fraction",
                     fontsize=8)
  fig.suptitle(f"Reward over-optimisation: proxy vs gold reward against KL "
               f"(moving average of {window} iterations)")
  fig.tight_layout()
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


__all__ = ["smooth", "plot_gold_vs_kl"]
