"""Metrics at the edge: JSONL + TensorBoard writer, a progress bar, and plain-text tables.

Nothing here runs inside jit. Only process 0 writes or prints, so every host can call the same
code. Metric values may be Python, NumPy or JAX scalars; JAX values are fetched in one
`jax.device_get` per `MetricsWriter.write` call.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, TextIO

import jax
import numpy as np
import tqdm
from tqdm.std import EMA

from rlhf_jax.errors import DamagedFileError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"

Scalar = bool | int | float


def _to_scalar(name: str, value: Any) -> Scalar:
  """Python bool/int/float from a Python, NumPy or (host-fetched) JAX scalar or size-1 array."""
  if isinstance(value, (bool, int, float)):
    return value
  array = np.asarray(value)
  if array.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):  # ml_dtypes: not np.number
    array = array.astype(np.float32)
  if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
    raise ValueError(
        f"metric {name!r} must be a numeric scalar, got {type(value).__name__} with "
        f"shape {array.shape} and dtype {array.dtype}; reduce it (e.g. .mean()) before logging"
    )
  return array.reshape(()).item()


def _json_value(value: Scalar) -> Scalar | None:
  """Non-finite floats become None (JSON null): strict JSON has no NaN/Infinity."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricsWriter:
  """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard events in ``workdir/tb``.

  Each `write` is one JSON line, ``{"step": 12, "train/loss": 0.31, ...}``, flushed at once so
  a killed run loses nothing already written. NaN and +-inf are written as ``null`` in the JSON
  (TensorBoard gets the float itself). A resumed run appends to the same file, so steps between
  the last checkpoint and the kill appear twice; readers keep the last line for a step.
  On processes other than 0 every method is a no-op and no file is opened.
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
    self._file = None
    self._tb = None
    if jax.process_index() != 0:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    self._file = open(path, "a+", encoding="utf-8")
    # A kill mid-write can leave a partial last line; start ours on a fresh one.
    if self._file.tell() > 0:
      self._file.seek(self._file.tell() - 1)
      if self._file.read(1) != "\n":
        self._file.write("\n")
    if tensorboard:
      from tensorboardX import SummaryWriter  # the import costs ~1 s; pay it only when used

      self._tb = SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_DIR))

  def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "train") -> None:
    """Records `metrics` at `step` under ``prefix/name`` (plain ``name`` if prefix is "")."""
    if self._file is None:
      return
    host_metrics = jax.device_get(dict(metrics))
    step = int(step)
    record: dict[str, Any] = {"step": step}
    for name, value in host_metrics.items():
      tag = f"{prefix}/{name}" if prefix else name
      if tag == "step":
        raise ValueError('a metric named "step" needs a prefix; "step" is the JSON key of the step')
      scalar = _to_scalar(tag, value)
      record[tag] = _json_value(scalar)
      if self._tb is not None:
        self._tb.add_scalar(tag, float(scalar), global_step=step)
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def atomic_write(path: str | os.PathLike, write: Callable[[TextIO], None]) -> None:
  """Calls `write(f)` on a temporary text file beside `path` (parent folders created), syncs it
  to disk and renames it over `path`: a kill leaves the old file or the new one, never a
  truncated one that a resumed run would fail to read. The temporary file never outlives it."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(obj: Any, path: str | os.PathLike, *, indent: int | None = 1) -> None:
  """Writes `obj` as JSON to `path` atomically (`atomic_write`)."""
  atomic_write(path, lambda f: json.dump(obj, f, indent=indent, default=str))


def write_jsonl(records: Sequence[Mapping], path: str | os.PathLike) -> None:
  """Writes one JSON object per line (non-ASCII kept as is) to `path` atomically
  (`atomic_write`): a killed run never leaves a half-written data set."""
  atomic_write(
      path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  )


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Every record of a JSONL file, in order (``null`` stays None).

  A last line without a newline that does not parse is skipped: that is a write cut short by a
  kill. Any other bad line raises a DamagedFileError (a user error) naming the file and line.
  """
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines) and not line.endswith("\n"):
        break
      raise DamagedFileError(
          f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno}): the file was damaged; "
          "restore it, or delete it and rerun the stage that wrote it"
      ) from None
  return records


class Progress:
  """A tqdm bar for training: steps/s and ETA from tqdm, smoothed tokens/s and chosen metrics.

  On a terminal it refreshes twice a second; when stderr is not a terminal (CI logs, files) it
  prints at most one line every 30 s, so logs stay short. Disabled on processes other than 0.

  Metrics and token counts may be JAX values: they are only fetched from the device when the
  bar is about to redraw, so a step loop is not forced to synchronise every step.
  """

  def __init__(
      self,
      total_steps: int,
      initial: int = 0,
      desc: str = "train",
      *,
      show: Sequence[str] = ("loss",),
  ):
    """
    Args:
      total_steps: steps of the whole run (for the ETA).
      initial: the step the run starts from (a resumed run).
      desc: label in front of the bar.
      show: metric names shown in the postfix, when present in `update(metrics=...)`.
    """
    interactive = sys.stderr.isatty()
    self._show = tuple(show)
    self._bar = tqdm.tqdm(
        total=total_steps,
        initial=initial,
        desc=desc,
        unit="step",
        dynamic_ncols=interactive,
        mininterval=0.5 if interactive else 30.0,
        disable=jax.process_index() != 0,
    )
    self._metrics: Mapping[str, Any] = {}
    self._pending_tokens: Any = 0
    self._tokens_ema, self._seconds_ema = EMA(), EMA()
    self._last_time = time.time()

  def _postfix(self) -> str:
    """Folds tokens seen since the last redraw into the smoothed rate; formats the postfix."""
    now = time.time()
    tokens = float(jax.device_get(self._pending_tokens))
    parts = []
    if tokens and now > self._last_time:
      rate = self._tokens_ema(tokens) / self._seconds_ema(now - self._last_time)
      parts.append(f"tok/s={tqdm.tqdm.format_sizeof(rate)}")
    self._pending_tokens, self._last_time = 0, now
    shown = {k: self._metrics[k] for k in self._show if k in self._metrics}
    for name, value in jax.device_get(shown).items():
      parts.append(f"{name}={_to_scalar(name, value):.4g}")
    return ", ".join(parts)

  def update(
      self, n_steps: int = 1, *, tokens: Any = None, metrics: Mapping[str, Any] | None = None
  ):
    """Advances by `n_steps`; `tokens` trained on in them; `metrics` of the latest step."""
    if self._bar.disable:
      return
    if tokens is not None:
      self._pending_tokens = self._pending_tokens + tokens
    if metrics is not None:
      self._metrics = metrics
    # Same test tqdm applies before redrawing, so values are fetched only when shown.
    if time.time() - self._bar.last_print_t >= self._bar.mininterval:
      self._bar.set_postfix_str(self._postfix(), refresh=False)
    self._bar.update(n_steps)

  def close(self) -> None:
    """Draws the final state (with the latest metrics) and ends the bar."""
    if not self._bar.disable:
      self._bar.set_postfix_str(self._postfix(), refresh=False)
    self._bar.close()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _cell(value: Any, floatfmt: str) -> tuple[str, bool]:
  """(text, is_number) for one table cell."""
  if value is None:
    return "", False
  if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.size(value) == 1:
    value = np.asarray(value).reshape(()).item()
  if isinstance(value, bool):
    return str(value), False
  if isinstance(value, int):
    return str(value), True
  if isinstance(value, float):
    return format(value, floatfmt), True
  # One row per line: make newlines in generations visible instead of breaking the table.
  return str(value).replace("\n", "\\n"), False


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".3f"
) -> str:
  """A plain aligned text table, e.g. for gold-reward summaries or before/after generations.

  Args:
    rows: one mapping per row; a missing key or None is an empty cell.
    columns: column order; default is every key in order of first appearance.
    floatfmt: format spec for floats (ints are printed as they are).

  Returns:
    Header line, a dashed rule, then one line per row. Columns of numbers are right-aligned,
    other columns left-aligned; columns are separated by two spaces; no trailing spaces.
  """
  if columns is None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
  cells = [[_cell(row.get(column), floatfmt) for column in columns] for row in rows]
  widths, numeric = [], []
  for index, column in enumerate(columns):
    texts = [row[index] for row in cells]
    widths.append(max([len(column)] + [len(text) for text, _ in texts]))
    numeric.append(
        any(is_num for _, is_num in texts) and all(is_num or not text for text, is_num in texts)
    )

  def line(texts: Sequence[str]) -> str:
    padded = [
        text.rjust(width) if is_num else text.ljust(width)
        for text, width, is_num in zip(texts, widths, numeric, strict=True)
    ]
    return "  ".join(padded).rstrip()

  lines = [line(columns), line(["-" * width for width in widths])]
  lines += [line([text for text, _ in row]) for row in cells]
  return "\n".join(lines)
