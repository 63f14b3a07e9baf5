"""The pipeline tests' experiment loader
(tests/{unit,integration}/algorithms/test_pipeline.py)."""

import os

from tests.helpers import ROOT


def experiment_config(name: str):
  import importlib.util

  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "experiments", f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
