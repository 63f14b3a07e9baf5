"""The bad-input suite's data-file writer, its SFT record and the nothing-half-written check:
tests/unit/test_bad_inputs.py (the cases, through Python) and tests/integration/test_bad_inputs.py
(a few of them through the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

# --- how the cases provoke their errors -----------------------------------------------------------


def jsonl(tmp: Path, *lines, name: str = "data.jsonl") -> str:
  """A data file with one line per argument: a dict is written as JSON, a str / bytes as is."""
  path = tmp / name
  raw = [
      json.dumps(x).encode() if isinstance(x, dict) else x.encode() if isinstance(x, str) else x
      for x in lines
  ]
  path.write_bytes(b"\n".join(raw) + b"\n")
  return str(path)


# --- the cases ------------------------------------------------------------------------------------

SFT = {"prompt": "What is 2 + 2?", "completion": "4"}


def assert_nothing_half_written(tmp: Path) -> None:
  """A failed run in {tmp}/run leaves no export, no finished checkpoint step, no HF import."""
  workdir = tmp / "run"
  assert not (workdir / "export").exists() and not (workdir / "hf_import").exists()
  assert not [p.name for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
