"""One run per work directory (rlhf_jax/train/workdir_lock.py): a second process stops at once
naming the holder, a lock left by a killed process is taken over with a warning, nested use in one
process is re-entrant, and the CLI takes the lock before its driver writes anything."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rlhf_jax.train import workdir_lock as lock_lib
from rlhf_jax.train.workdir_lock import WorkdirBusy, workdir_lock
from tests.helpers import ROOT

HOLD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from rlhf_jax.train.workdir_lock import workdir_lock
    with workdir_lock({workdir!r}):
      print("held", flush=True)
      time.sleep(120)
    """)


@pytest.fixture
def holder(tmp_path):
  """A second process holding tmp_path/run's lock; killed (SIGKILL) at the end."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "-c", HOLD.format(root=ROOT, workdir=str(workdir))],
      stdout=subprocess.PIPE,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      text=True,
  )
  assert proc.stdout.readline().strip() == "held"
  yield workdir, proc
  proc.kill()
  proc.wait()


def test_a_second_process_stops_at_once_naming_the_holder(holder):
  workdir, proc = holder
  with pytest.raises(WorkdirBusy, match=rf"in use by another run \(host .*, pid {proc.pid}, "):
    with workdir_lock(workdir):
      pytest.fail("entered a held workdir")
  # The holder is killed: the kernel drops its lock, and the next run takes it over with a warning.
  proc.kill()
  proc.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(holder, caplog):
  workdir, proc = holder
  proc.kill()
  proc.wait()
  with caplog.at_level("WARNING", logger="rlhf_jax.train.workdir_lock"):
    with workdir_lock(workdir):
      held = json.loads((workdir / ".lock").read_text())
  assert f"pid {proc.pid}" in caplog.text and "left by a run that ended" in caplog.text
  assert held["pid"] == os.getpid()
  assert (workdir / ".lock").read_text() == ""  # a clean release leaves nothing to take over


def test_nested_use_in_one_process_is_reentrant(tmp_path, caplog):
  with workdir_lock(tmp_path / "run"):
    with workdir_lock(tmp_path / "run"), workdir_lock(tmp_path / "run" / "stage"):
      assert len(lock_lib._held) == 2
    assert len(lock_lib._held) == 1
  assert not lock_lib._held and "taking over" not in caplog.text


def test_the_cli_stops_before_writing_anything(holder):
  workdir, proc = holder
  run = subprocess.run(
      [
          sys.executable,
          "-m",
          "rlhf_jax.run",
          "--config=experiments/toy_sft.py",
          f"--workdir={workdir}",
      ],
      cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert run.returncode == 1
  assert (
      run.stderr.strip().splitlines()[-1].startswith(f"error: {workdir} is in use by another run")
  )
  assert f"pid {proc.pid}" in run.stderr and "Traceback" not in run.stderr
  assert sorted(p.name for p in workdir.iterdir()) == [".lock"]
