"""The bad-input suite through the command line: a few of tests/unit/test_bad_inputs.py's mistakes,
made with the real CLI (`python -m rlhf_jax.run`) in a fresh process, print one `error: ...` line
and no traceback, and leave nothing half-written (no `export/`, no finished checkpoint step)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, xla_flags
from tests.helpers.bad_inputs import SFT, assert_nothing_half_written, jsonl

# --- the same mistakes through the command line ---------------------------------------------------


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
  env = {
      **os.environ,
      "XLA_FLAGS": xla_flags(8),
      "JAX_PLATFORMS": "cpu",
  }
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "rlhf_jax.run",
          "--config=experiments/toy_sft.py",
          f"--workdir={tmp / 'run'}",
          *args,
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )


@pytest.mark.parametrize(
    "args, says, workdir_made",
    [
        # An override naming no config field is refused before anything runs, with the closest keys.
        (
            ("--config.train.stpes=5",),
            (
                "error: --config.train.stpes is not a field",
                "Did you mean train.steps",
                "The fields of config.train are",
            ),
            False,
        ),
        # A misspelled algorithm: one line, and no workdir is created.
        (
            ("--config.algorithm=dpoo",),
            ("error: config.algorithm='dpoo' is not known (did you mean " "'dpo'?)",),
            False,
        ),
        # A broken record: file:line: field, and no export or checkpoint.
        (
            ("--config.data.source={tmp}/data.jsonl", "--config.data.tokenizer={tmp}"),
            ("error: {tmp}/data.jsonl:2: field 'completion': missing",),
            True,
        ),
    ],
    ids=["unknown_override_key", "unknown_algorithm", "bad_record"],
)
def test_cli_prints_one_error_line_and_no_traceback(tmp_path, args, says, workdir_made):
  jsonl(tmp_path, SFT, {"prompt": "Hi"})
  result = cli(tmp_path, *[a.format(tmp=tmp_path) for a in args])
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr
  errors_shown = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors_shown) == 1, result.stderr  # one line (log lines may come before it)
  for fragment in says:
    assert fragment.format(tmp=tmp_path) in errors_shown[0], result.stderr
  assert (tmp_path / "run").exists() == workdir_made
  assert_nothing_half_written(tmp_path)


def test_debug_flag_shows_the_traceback_of_a_user_error(tmp_path):
  """`--debug`: the same user error, with its traceback (for a bug report); without it, one line."""
  shown = cli(tmp_path, "--config.algorithm=dpoo", "--debug")
  assert shown.returncode != 0 and "Traceback" in shown.stderr
  assert "ConfigError: config.algorithm='dpoo' is not known" in shown.stderr
