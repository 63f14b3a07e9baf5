"""The method comparison: rows read from a workdir's gold evaluation, temperature baseline and stage
records; the plot; the comparison experiment's stages; and the notebook, executed top to bottom.
(tests/integration/algorithms/test_pipeline.py also executes the notebook on a workdir trained at
reduced sizes.)

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/evaluation/test_compare.py.
"""

import os

import numpy as np
import pytest

from rlhf_jax.algorithms import pipeline
from rlhf_jax.evaluation import compare
from tests.helpers import ROOT
from tests.helpers.compare import NOTEBOOK, build_workdir


@pytest.fixture
def workdir(tmp_path):
  return build_workdir(tmp_path)


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
      lambda s: config[s].iterations
      * config[s].prompts_per_iteration
      * config[s].samples_per_prompt
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
  rs, rest = config.rejection_sampling, config.rest
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
