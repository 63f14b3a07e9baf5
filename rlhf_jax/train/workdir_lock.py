"""One run per work directory: an advisory lock on WORKDIR/.lock for as long as a run holds it.

Two runs writing one workdir interleave their checkpoint saves (one dies, the other may hang), so
`python -m rlhf_jax.run` takes this lock before its driver starts and a second run stops at once
with one line naming the holder (host, pid, start time, command). The lock is the kernel's
(`fcntl.flock`): it goes away with its process however that process ends, so a lock left by a
killed run is taken over, with a warning naming the run that left it. With several processes
(multi-host) process 0 holds it. Nested use in one process (a pipeline stage inside the pipeline's
workdir, a second `with` on the same path) is re-entrant.

On file systems without `flock` (some network mounts) the lock cannot be taken and the run goes on
with a warning. Notebook users of the drivers' Python API can take it too:

  with workdir_lock(workdir):
    sft.train(config, workdir)
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator

import jax

from rlhf_jax.train.checkpoint import WorkdirError

_log = logging.getLogger(__name__)
LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # realpath of a lock file -> how many `with` blocks hold it here


class WorkdirBusy(WorkdirError):
  """Another live run holds the work directory."""


def _holder() -> dict:
  return {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": " ".join(sys.argv)[:300],
  }


def _describe(text: str) -> str:
  try:
    h = json.loads(text)
    return f"host {h['host']}, pid {h['pid']}, started {h['started']}: {h['command']}"
  except (ValueError, KeyError, TypeError):
    return text.strip()[:200] or "unknown holder"


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds WORKDIR/.lock while the block runs; raises WorkdirBusy if a live run holds it."""
  if jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
  if path in _held:
    _held[path] += 1
    try:
      yield
    finally:
      _held[path] -= 1
    return
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    with open(path) as f:
      holder = _describe(f.read())
    os.close(fd)
    raise WorkdirBusy(
        f"{workdir} is in use by another run ({holder}); wait for it to end, stop it, or use "
        "another --workdir"
    ) from None
  except OSError as e:  # no flock on this file system
    os.close(fd)
    _log.warning("cannot lock %s (%s): nothing stops a second run in this workdir", path, e)
    yield
    return
  left = os.pread(fd, 4096, 0).decode(errors="replace")
  if left.strip():  # written by a holder that never released it: that process has ended
    _log.warning(
        "taking over the lock of %s left by a run that ended: %s", workdir, _describe(left)
    )
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(_holder()).encode(), 0)
  os.fsync(fd)
  _held[path] = 1
  try:
    yield
  finally:
    del _held[path]
    os.ftruncate(fd, 0)  # a clean release leaves an empty file: nothing to take over
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
