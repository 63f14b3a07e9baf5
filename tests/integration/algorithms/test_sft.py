"""End to end: the SFT driver learns, resumes bit-identically, and the runner validates overrides.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/algorithms/test_sft.py.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax.algorithms import sft
from rlhf_jax.train import checkpoint, metrics
from tests.helpers import ROOT
from tests.helpers.sft import tiny_config


@pytest.mark.slow
def test_sft_loss_falls_well_below_start(tmp_path, compilation_cache):
  config = tiny_config(steps=60)
  config.sample.num_examples = 4
  result = sft.train(config, str(tmp_path))
  logged = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  first = next(r["train/loss"] for r in logged if "train/loss" in r)
  assert first > 4.0  # ~log(vocab) at random init
  assert result["eval/loss"] < 0.5 * first, (first, result)
  assert result["step"] == 60
  # The export is what later stages initialise from.
  params, meta = checkpoint.load_params(tmp_path / "export")
  assert meta["step"] == 60 and meta["model"]["num_layers"] == 2
  assert os.path.exists(os.path.join(meta["tokenizer"], "tokenizer.json"))
  samples = (tmp_path / "samples.json").read_text()
  assert '"before"' in samples and '"after"' in samples


@pytest.mark.slow
def test_resume_gives_identical_params(tmp_path, compilation_cache):
  """N steps in one go == N/2 steps, a restart of the same command, N/2 more steps."""
  straight = tiny_config(steps=20)
  sft.train(straight, str(tmp_path / "straight"))

  interrupted = tiny_config(steps=20)
  interrupted.train.stop_after_steps = 10
  first = sft.train(interrupted, str(tmp_path / "resumed"))
  assert first["step"] == 10
  assert not (tmp_path / "resumed" / "export").exists()  # no export before the run is finished
  second = sft.train(interrupted, str(tmp_path / "resumed"))
  assert second["step"] == 20

  a, _ = checkpoint.load_params(tmp_path / "straight" / "export")
  b, _ = checkpoint.load_params(tmp_path / "resumed" / "export")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  steps = [
      r["step"]
      for r in metrics.read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
      if "train/loss" in r
  ]
  assert steps == [5, 10, 15, 20]


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "rlhf_jax.run", *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )


def test_unknown_override_lists_valid_keys(tmp_path):
  proc = _run("--config=experiments/toy_sft.py", f"--workdir={tmp_path}", "--config.train.stepz=5")
  assert proc.returncode != 0
  assert "--config.train.stepz is not a field" in proc.stderr
  assert "Did you mean train.steps" in proc.stderr
  assert "train.batch_size" in proc.stderr  # the list of valid keys


def test_bad_mesh_fails_before_training(tmp_path):
  proc = _run(
      "--config=experiments/toy_sft.py", f"--workdir={tmp_path}", "--config.mesh.shape=(3,1,1)"
  )
  assert proc.returncode != 0
  assert "error: mesh shape (3, 1, 1)" in proc.stderr and "data * fsdp * tensor =" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "checkpoints").exists()
