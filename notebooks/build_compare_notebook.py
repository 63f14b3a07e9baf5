"""Writes compare_alignment_methods.ipynb from the cells below, so the notebook's source is
reviewable Python: unexecuted, or executed top to bottom against a comparison workdir (nbclient,
outputs saved in the notebook):

  .venv/bin/python notebooks/build_compare_notebook.py                        # cells only
  .venv/bin/python notebooks/build_compare_notebook.py --execute runs/compare  # and outputs

(tests/integration/evaluation/test_compare.py runs it on a reduced workdir)."""

import os

import nbformat

CELLS = [
    (
        "markdown",
        """# Alignment methods compared on the toy world

Every method starts from the same SFT model and is scored by the toy world's **gold** reward on the same
1,024 held-out tasks, 4 samples each (`rlhf_jax/toyworld`): gold helpfulness, gold safety, their combination, the win rate
against the start policy, the KL to it, response length and wall-clock. Budgets are stated in
`experiments/toy_compare.py`.

Run the comparison first (stages already trained in the workdir are reused):

    python -m rlhf_jax.run --config=experiments/toy_compare.py --workdir=runs/compare

then set `RLHF_COMPARE_WORKDIR` (default `runs/compare`) and run this notebook top to bottom.""",
    ),
    (
        "code",
        """import json
import os

import pandas as pd
from IPython.display import Image, display

from rlhf_jax.evaluation import compare
from rlhf_jax.train import metrics

ROOT = os.path.abspath(os.path.join(os.getcwd(), "..")) if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
WORKDIR = os.environ.get("RLHF_COMPARE_WORKDIR", os.path.join(ROOT, "runs", "compare"))
print("workdir:", WORKDIR)""",
    ),
    (
        "markdown",
        """## The table

One row per trained policy; the `sft @ T=...` rows are the SFT model sampled at lower temperatures
(no reward model, no training): the baseline a method must beat *at equal KL*. `delta` is gold combined
minus SFT's, `delta_se` its paired standard error over prompts (every policy is sampled several times
on each held-out prompt; the temperature rows pair with SFT's own samples at T = 1).
`minutes` is the method's own stage, `minutes_total` adds the stages it needed (reward models, judge,
AI feedback).""",
    ),
    (
        "code",
        """rows = compare.method_rows(WORKDIR)
table = pd.DataFrame(rows)
table["minutes"] = table["seconds"] / 60
table["minutes_total"] = table["seconds_with_inputs"] / 60
columns = ["method", "algorithm", "helpfulness", "safety", "combined", "delta_combined", "delta_se",
           "win_rate", "kl", "length", "refusal_unsafe", "minutes", "minutes_total"]
table[columns].round(3).rename(columns={"delta_combined": "delta"})""",
    ),
    ("markdown", "## Gold against KL"),
    (
        "code",
        """png = compare.plot_methods(rows, os.path.join(WORKDIR, "eval", "methods.png"))
display(Image(png))""",
    ),
    ("markdown", "## By task family (gold combined)"),
    (
        "code",
        """with open(os.path.join(WORKDIR, "eval", "gold.json")) as f:
    gold = json.load(f)
families = pd.DataFrame({stage: {family: s["combined"] for family, s in result["families"].items()}
                         for stage, result in gold.items() if stage != "pretrain"})
families.round(3)""",
    ),
    (
        "markdown",
        """## Online methods during training

Held-out gold against KL at each evaluation of the runs that log one (PPO, GRPO, RLOO with
`ppo.eval_every`).""",
    ),
    (
        "code",
        """import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 4))
for stage in gold:
    path = os.path.join(WORKDIR, stage, "metrics.jsonl")
    rows = metrics.read_jsonl(path) if os.path.exists(path) else []
    evals = [r for r in rows if r.get("eval/kl") is not None and "eval/combined" in r]  # gold rows
    if evals:
        ax.plot([r["eval/kl"] for r in evals], [r["eval/combined"] for r in evals], "-o", markersize=3, label=stage)
ax.set_xlabel("KL to the start policy")
ax.set_ylabel("gold combined (held-out)")
if ax.lines:
    ax.legend()
plt.show()""",
    ),
    ("markdown", "## AI feedback: the judge's agreement with gold (RLAIF, RL-CAI stages)"),
    (
        "code",
        """agreement = {}
for stage in sorted(os.listdir(WORKDIR)):
    path = os.path.join(WORKDIR, stage, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
        if "judge" in summary and "pairs" in summary:  # an ai_feedback stage
            pairs = summary["pairs"]
            agreement[stage] = {"pairs": pairs["pairs"], "gold_decided": pairs["gold_decided"],
                                **(pairs["overall"] or {})}
pd.DataFrame(agreement).T if agreement else "no AI-feedback stage in this workdir\"""",
    ),
    (
        "markdown",
        """The judge read two ways on the world's held-out gold-labelled comparisons (`judge_mode`):
RLAIF's pairwise comparison prompt (one order, and position-swapped) and single-answer grades
(pointwise: log p(no problems); score: the expected 0-9 grade), which no order changes.""",
    ),
    (
        "code",
        """path = os.path.join(WORKDIR, "eval", "judge.json")
if os.path.exists(path):
    with open(path) as f:
        judged = json.load(f)
    modes = {"pairwise": judged["overall"], **{m: judged[m]["overall"] for m in ("pointwise", "score") if m in judged}}
    display(pd.DataFrame(modes).T.round(3))
else:
    print("no judge evaluation in this workdir")""",
    ),
]


def build() -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  for kind, source in CELLS:
    nb.cells.append(
        nbformat.v4.new_markdown_cell(source)
        if kind == "markdown"
        else nbformat.v4.new_code_cell(source)
    )
  return nb


def execute(nb: nbformat.NotebookNode, workdir: str) -> nbformat.NotebookNode:
  """Runs `nb` top to bottom (in notebooks/) against the comparison `workdir`; returns it."""
  from nbclient import NotebookClient

  previous = os.environ.get("RLHF_COMPARE_WORKDIR")
  os.environ["RLHF_COMPARE_WORKDIR"] = os.path.abspath(workdir)
  try:
    NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(__file__))}},
    ).execute()
  finally:
    if previous is None:
      del os.environ["RLHF_COMPARE_WORKDIR"]
    else:
      os.environ["RLHF_COMPARE_WORKDIR"] = previous
  return nb


if __name__ == "__main__":
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--execute",
      metavar="WORKDIR",
      default="",
      help="also run the notebook against this comparison workdir",
  )
  args = parser.parse_args()
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_alignment_methods.ipynb")
  notebook = build()
  if args.execute:
    notebook = execute(notebook, args.execute)
  nbformat.write(notebook, path)
  print(path)
