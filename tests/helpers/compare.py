"""The method comparison's fake workdir, its JSON writer, and the notebook runner:
tests/{unit,integration}/evaluation/test_compare.py; the notebook runner also serves
tests/integration/algorithms/test_pipeline.py."""

import json
import os

from tests.helpers import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "compare_alignment_methods.ipynb")


def overall(combined, **kw):
  return {
      "n": 4,
      "helpfulness": combined - 0.1,
      "safety": 0.9,
      "combined": combined,
      "win_rate": kw.get("win_rate", 0.5),
      "kl": kw.get("kl", 0.0),
      "length": 10.0,
      "refusal_safe": 0.0,
      "refusal_unsafe": 0.5,
  }


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def build_workdir(tmp_path):
  """A comparison workdir as the pipeline leaves it: SFT, two methods (one with inputs), the
  reward model they read, a temperature curve and one PPO-style metrics log."""
  families = {"facts": overall(0.5), "unsafe": overall(0.9)}
  gold = {
      "pretrain": {"overall": overall(0.2, win_rate=None, kl=None), "families": families},
      "sft": {
          "overall": overall(0.55, win_rate=0.7, kl=3.0),
          "families": families,
          "reference": "pretrain",
      },
      "dpo": {
          "overall": overall(0.57, win_rate=0.52, kl=0.2),
          "families": families,
          "reference": "sft",
      },
      "grpo": {
          "overall": overall(0.6, win_rate=0.55, kl=0.5),
          "families": families,
          "reference": "sft",
      },
  }
  write_json(tmp_path / "eval" / "gold.json", gold)
  write_json(
      tmp_path / "eval" / "temperature.json",
      {
          "policy": "sft",
          "temperature": [1.0, 0.7],
          "kl": [0.0, 0.24],
          "helpfulness": [0.46, 0.52],
          "combined": [0.55, 0.62],
          "safety": [0.98, 0.99],
      },
  )
  write_json(tmp_path / "sft" / "stage.json", {"algorithm": "sft", "seconds": 60.0, "inputs": []})
  write_json(tmp_path / "dpo" / "stage.json", {"algorithm": "dpo", "seconds": 120.0, "inputs": []})
  write_json(
      tmp_path / "grpo" / "stage.json",
      {"algorithm": "grpo", "seconds": 300.0, "inputs": ["rm_helpful"]},
  )
  write_json(tmp_path / "rm_helpful" / "stage.json", {"algorithm": "reward", "seconds": 90.0})
  with open(tmp_path / "grpo" / "metrics.jsonl", "w") as f:
    for step, (kl, c) in enumerate([(0.0, 0.55), (0.3, 0.58), (0.5, 0.6)]):
      f.write(json.dumps({"step": step * 10, "eval/kl": kl, "eval/combined": c}) + "\n")
  with open(
      tmp_path / "dpo" / "metrics.jsonl", "w"
  ) as f:  # an "eval/kl" that is not gold's (KTO's z0)
    f.write(json.dumps({"step": 10, "eval/kl": 0.1, "eval/loss": 0.5}) + "\n")
  write_json(
      tmp_path / "ai_feedback" / "summary.json",
      {
          "policy": "p",
          "judge": "j",
          "pairs": {
              "pairs": 10,
              "skipped": 1,
              "gold_decided": 8,
              "overall": {"agreement_swapped": 0.75},
          },
      },
  )
  return tmp_path


def execute_notebook(workdir, tmp_path):
  """Runs the notebook top to bottom against `workdir`; returns the executed notebook."""
  import nbformat
  from nbclient import NotebookClient

  nb = nbformat.read(NOTEBOOK, as_version=4)
  os.environ["RLHF_COMPARE_WORKDIR"] = str(workdir)
  try:
    NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}},
    ).execute()
  finally:
    del os.environ["RLHF_COMPARE_WORKDIR"]
  return nb


def outputs_text(nb) -> str:
  text = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      text.append(out.get("text", ""))
      text.append(out.get("data", {}).get("text/plain", ""))
  return "\n".join(text)
