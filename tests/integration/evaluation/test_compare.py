"""The method comparison: rows read from a workdir's gold evaluation, temperature baseline and stage
records; the plot; the comparison experiment's stages; and the notebook, executed top to bottom.
(tests/integration/algorithms/test_pipeline.py also executes the notebook on a workdir trained at
reduced sizes.)

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/evaluation/test_compare.py.
"""

import os

import pytest

from tests.helpers.compare import (
    build_workdir,
    execute_notebook,
    outputs_text,
)


@pytest.fixture
def workdir(tmp_path):
  return build_workdir(tmp_path)


@pytest.mark.slow  # starts a kernel: ~10 s
def test_notebook_runs_top_to_bottom_on_a_workdir(workdir, tmp_path):
  nb = execute_notebook(workdir, tmp_path)
  text = outputs_text(nb)
  for expected in ("grpo", "dpo", "sft @ T=0.7", "agreement_swapped", "0.75"):
    assert expected in text, expected
  assert any("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))
  assert os.path.exists(workdir / "eval" / "methods.png")
