"""Reading the files a user hands us: a damaged one (cut short by an interrupted download or copy,
garbled, empty, a directory where a file belongs) is one line naming the path and what to do, never
a parser's traceback.

  with reading(path, fix="download it again"):
    tensors = safe_open(path, ...)

Every reader of a user's file goes through these (data sets, tokenizers, HF config.json and
weights, params exports; checkpoints fall back to an older step instead, `train.checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf_jax.errors import ConfigError, ConfigPathError, DamagedFileError

__all__ = ["REWRITE", "DamagedFileError", "check_file", "complaint", "read_json", "reading"]

# The fix for a damaged file that a run wrote into its workdir (a stage's summary, a cache stamp).
REWRITE = "delete it and rerun: the stage that wrote it writes it again"


@contextlib.contextmanager
def reading(path: str | os.PathLike, *, fix: str) -> Iterator[None]:
  """Turns any error raised while the block reads `path` into one DamagedFileError line: the
  path, the reader's own complaint (first line, shortened) and `fix`. User errors already raised
  by our own code pass through."""
  try:
    yield
  except (ConfigError, KeyboardInterrupt):
    raise
  except Exception as e:  # noqa: BLE001 -- parsers raise anything for a damaged file
    raise DamagedFileError(
        f"{path} cannot be read ({complaint(e)}): it may be cut short or damaged; {fix}"
    ) from e


def complaint(e: BaseException) -> str:
  """'<type>: <first line of its message>' (at most 200 characters of it): what a reader said
  about a damaged file, for a one-line message."""
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def read_json(path: str | os.PathLike, *, fix: str) -> Any:
  """json.load of `path`; a missing file, a directory, or invalid JSON (an empty file, a cut-short
  download) is one line naming the path, where the JSON breaks, and `fix`."""
  path = Path(path)
  check_file(path)
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise DamagedFileError(
        f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): it may be cut "
        f"short or damaged; {fix}"
    ) from None
  except UnicodeDecodeError as e:
    raise DamagedFileError(f"{path} is not UTF-8 text ({e.reason}): {fix}") from None


def check_file(path: str | os.PathLike, what: str = "file") -> None:
  """`path` exists and is a regular file (not a directory)."""
  path = Path(path)
  if not path.exists():
    raise ConfigPathError(f"{path}: no such {what}")
  if path.is_dir():
    raise ConfigError(f"{path} is a directory, not a {what}; point at the file inside it")
