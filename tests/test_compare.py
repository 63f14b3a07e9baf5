"""The method comparison: rows read from a workdir's gold evaluation, temperature baseline and stage
records; the plot; the comparison experiment's stages; and the notebook, executed top to bottom.
(tests/test_pipeline.py also executes the notebook on a workdir trained at reduced sizes.)"""

import json
import os

import numpy as np
import pytest

from rlhf_jax.algorithms import pipeline
from rlhf_jax.evaluation import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


@pytest.fixture
def workdir(tmp_path):
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


def test_method_rows_read_gold_costs_and_the_temperature_baseline(workdir):
  rows = compare.method_rows(str(workdir))
  assert [r["method"] for r in rows] == ["sft", "dpo", "grpo", "sft @ T=1", "sft @ T=0.7"]
  by = {r["method"]: r for r in rows}
  assert by["dpo"]["vs"] == "sft" and by["dpo"]["algorithm"] == "dpo"
  np.testing.assert_allclose(
      [by[m]["delta_combined"] for m in ("sft", "dpo", "grpo")], [0.0, 0.02, 0.05], atol=1e-12
  )
  assert by["grpo"]["seconds"] == 300.0 and by["grpo"]["seconds_with_inputs"] == 390.0
  assert by["grpo"]["inputs"] == ["rm_helpful"] and by["grpo"]["kl"] == 0.5
  t = by["sft @ T=0.7"]
  assert t["algorithm"] == "temperature" and t["kl"] == 0.24 and t["win_rate"] is None
  assert t["delta_combined"] == pytest.approx(0.07)
  png = compare.plot_methods(rows, str(workdir / "eval" / "methods.png"))
  assert os.path.getsize(png) > 10_000


def test_method_rows_without_a_gold_evaluation_says_what_to_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="toy_compare.py"):
    compare.method_rows(str(tmp_path))


def test_a_stage_trained_before_stage_records_has_no_cost(workdir):
  os.remove(workdir / "grpo" / "stage.json")
  by = {r["method"]: r for r in compare.method_rows(str(workdir))}
  assert by["grpo"]["seconds"] is None and by["grpo"]["seconds_with_inputs"] is None
  assert by["grpo"]["algorithm"] == "grpo"  # the stage name stands in


def compare_config(arg=None):
  import importlib.util

  spec = importlib.util.spec_from_file_location(
      "toy_compare", os.path.join(ROOT, "experiments", "toy_compare.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(arg)


def test_every_method_starts_from_sft_and_names_its_inputs():
  module, config = compare_config()
  stages = pipeline.training_stages(config)
  methods = [s for s in stages if pipeline.is_policy(config, s) and s not in ("pretrain", "sft")]
  assert set(methods) == set(module.CORE) - {"feedback"} | {
      "ppo_rlaif",
      "ppo_rlaif_direct",
      "cai_sl",
      "ppo_cai",
  }
  previous = None
  for stage in stages:
    parent = pipeline.parent_stage(config, stage, previous)
    if stage in ("cai_feedback", "rm_cai", "ppo_cai"):  # RL-CAI continues SL-CAI
      assert parent == "cai_sl", (stage, parent)
    elif stage not in ("pretrain", "sft", "rm_helpful", "rm_safety"):
      assert parent == "sft", (stage, parent)  # nothing else chains off another method
    if pipeline.is_policy(config, stage):
      previous = stage
  assert pipeline.stage_inputs(config, "ppo_rlaif") == ["rm_ai", "ai_feedback", "judge"]
  assert pipeline.stage_inputs(config, "grpo") == ["rm_helpful", "rm_safety"]
  assert pipeline.stage_inputs(config, "dpo") == ["feedback"]  # the SFT model's ranked samples
  # Matched budgets, as the experiment's docstring states them.
  samples = (
      lambda s: config[s].ppo.iterations
      * config[s].ppo.prompts_per_iteration
      * config[s].ppo.samples_per_prompt
  )
  assert {
      samples(s) for s in ("ppo", "grpo", "rloo", "ppo_rlaif", "ppo_rlaif_direct", "ppo_cai")
  } == {3840}
  assert pipeline.stage_inputs(config, "ppo_cai") == [
      "rm_helpful",
      "rm_cai",
      "cai_feedback",
      "judge",
  ]
  rs, rest = config.rejection_sampling.rejection_sampling, config.rest.rest
  assert rs.rounds * rs.prompts_per_round * rs.samples_per_prompt == 4096
  assert rest.grow_steps * rest.prompts_per_grow * rest.samples_per_prompt == 4096
  assert {config[s].train.steps for s in ("ipo", "cpl", "kto", "simpo", "orpo")} == {150}
  assert config.dpo.train.steps == config.cdpo.train.steps == 300  # chosen on the validation split
  offline = ("dpo", "cdpo", "ipo", "cpl", "kto", "simpo", "orpo")
  assert {pipeline.stage_inputs(config, s)[0] for s in offline} == {"feedback"}  # SFT's samples
  _, core = compare_config("core")
  assert not {"judge", "ppo_rlaif", "cai_sl"} & set(core.stages)


def test_notebook_source_is_built_from_its_script():
  """The committed notebook's cells are the build script's (outputs aside)."""
  import importlib.util

  import nbformat

  spec = importlib.util.spec_from_file_location(
      "build", os.path.join(ROOT, "notebooks", "build_compare_notebook.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  committed = nbformat.read(NOTEBOOK, as_version=4)
  assert [c.source for c in committed.cells] == [c.source for c in module.build().cells]


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


@pytest.mark.slow  # starts a kernel: ~10 s
def test_notebook_runs_top_to_bottom_on_a_workdir(workdir, tmp_path):
  nb = execute_notebook(workdir, tmp_path)
  text = outputs_text(nb)
  for expected in ("grpo", "dpo", "sft @ T=0.7", "agreement_swapped", "0.75"):
    assert expected in text, expected
  assert any("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))
  assert os.path.exists(workdir / "eval" / "methods.png")
