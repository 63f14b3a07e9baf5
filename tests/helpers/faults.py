"""How the reliability tests damage a file, as a disk error, an interrupted copy or a stray write
would: tests/unit/train/test_checkpoint.py, tests/integration/train/test_reliability.py and
test_fault_table.py."""

from pathlib import Path

HOW = ("truncate", "delete", "overwrite")


def damage(path: Path, how: str) -> None:
  """Cuts `path` to a third of its size ("truncate"), deletes it ("delete"), or flips the bits of
  up to 4 KiB in its middle ("overwrite": same size, so the file still reads; only its bytes are
  wrong, and never the same as before)."""
  data = path.read_bytes()
  if how == "truncate":
    path.write_bytes(data[: len(data) // 3])
  elif how == "delete":
    path.unlink()
  elif how == "overwrite":
    n, start = min(4096, len(data)), max(0, len(data) // 2 - 2048)
    path.write_bytes(
        data[:start] + bytes(b ^ 0x5A for b in data[start : start + n]) + data[start + n :]
    )
  else:
    raise ValueError(f"how={how!r}; expected one of {HOW}")


def largest_file(folder: Path) -> Path:
  """The largest file under `folder` (a checkpoint's or an export's array data)."""
  return max((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
