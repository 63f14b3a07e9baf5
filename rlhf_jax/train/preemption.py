"""Preemption: SIGTERM (or Ctrl-C, SIGINT) asks a training loop to save a checkpoint at the next
step boundary and exit.

Preemptible TPU VMs and shared GPU schedulers send SIGTERM some seconds before they kill a job.
A loop that holds a `StopSignal` checks `requested(step)` after every step; when it is true the loop
saves the state (``force=True``), waits for the save and raises `Preempted`, which the CLI prints
as one line (exit status 128 + the signal: 143 for SIGTERM, 130 for SIGINT, as a shell reports a
job ended by it). Rerunning the same command resumes from that step. A second Ctrl-C stops at once
(KeyboardInterrupt), without the save.

With several processes (`jax.distributed.initialize`), JAX's own preemption notifier receives the
signal on whichever host gets it and `multihost_utils.reached_preemption_sync_point` makes every
process agree on the same step, so all of them save that step together. A single process handles
the signal itself (a Python handler that only sets a flag: the step in flight finishes first).
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

_log = logging.getLogger(__name__)

EXIT_STATUS = 128 + signal.SIGTERM  # what a shell reports for a job ended by SIGTERM
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run was asked to stop (SIGTERM or SIGINT) and saved a checkpoint; rerunning resumes it.
  `exit_status`: 128 + the signal's number."""

  def __init__(self, message: str, signum: int = signal.SIGTERM):
    super().__init__(message)
    self.exit_status = 128 + int(signum)


class StopSignal:
  """Context manager: catches SIGTERM while a training loop runs (single process).

  Usage::

      with StopSignal() as stop:
        for step in ...:
          ...
          stop.save(ckpt, done, end, state, workdir=workdir)  # raises Preempted after SIGTERM

  The handler is installed only in the main thread of a single-process run and the previous one is
  restored on exit; elsewhere `requested` asks JAX's preemption sync point (multi-process) or is
  never true (a training loop run from a worker thread).
  """

  def __init__(self):
    self._requested = False
    self._signum = signal.SIGTERM
    self._previous = {}

  def __enter__(self) -> StopSignal:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self._requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now, no save
      raise KeyboardInterrupt
    if not self._requested:
      _log.warning(
          "received %s: saving a checkpoint after the current step, then exiting%s",
          signal.Signals(signum).name,
          " (Ctrl-C again to stop at once, without it)" if signum == signal.SIGINT else "",
      )
      self._signum = signum
    self._requested = True

  def requested(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step` (the same answer on every process)."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def save(
      self, ckpt, step: int, end: int, state, *, workdir: str, on_stop=None, **save_kwargs
  ) -> None:
    """A training loop's save after `step`: `ckpt.save(step, state, **save_kwargs)`, forced at
    the last step (`end`) and when a stop was requested; after a requested stop before `end`,
    calls `on_stop()` (e.g. closing a progress bar) and raises `Preempted`."""
    stopping = self.requested(step)
    ckpt.save(step, state, force=step == end or stopping, **save_kwargs)
    if stopping and step < end:
      if on_stop is not None:
        on_stop()
      raise Preempted(stopped_message(step, workdir, self._signum), self._signum)

  def __exit__(self, *exc_info) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}


def stopped_message(step: int, workdir: str, signum: int = signal.SIGTERM) -> str:
  why = "SIGTERM (preemption)" if signum == signal.SIGTERM else signal.Signals(signum).name
  return (
      f"stopped by {why} after step {step}: a checkpoint of that step is in "
      f"{workdir}/checkpoints; rerun the same command to resume from it"
  )
