"""How the reliability tests damage a file, as a disk error, an interrupted copy or a stray write
would: tests/unit/train/test_checkpoint.py, tests/integration/train/test_reliability.py and
test_fault_table.py."""

from pathlib import Path

# What a disk error, an interrupted copy or a stray write does to a file that stays where it is.
HOW = ("truncate", "delete", "overwrite")


def damage(path: Path, how: str) -> None:
  """Damages `path`: cuts it to a third of its size ("truncate"), deletes it ("delete"), flips the
  bits of up to 4 KiB in its middle ("overwrite": same size, so the file still reads; only its
  bytes are wrong, and never the same as before), replaces it with 2 KiB of binary garbage
  ("garbage"), empties it ("empty") or puts an empty directory in its place ("dir")."""
  data = path.read_bytes() if path.is_file() else b""
  if how == "truncate":
    path.write_bytes(data[: len(data) // 3])
  elif how in ("delete", "dir"):
    path.unlink()
    if how == "dir":
      path.mkdir()
  elif how == "overwrite":
    n, start = min(4096, len(data)), max(0, len(data) // 2 - 2048)
    path.write_bytes(
        data[:start] + bytes(b ^ 0x5A for b in data[start : start + n]) + data[start + n :]
    )
  elif how in ("garbage", "empty"):
    path.write_bytes(bytes(range(256)) * 8 if how == "garbage" else b"")
  else:
    raise ValueError(f"how={how!r}; expected one of {HOW} or 'garbage', 'empty', 'dir'")


def largest_file(folder: Path) -> Path:
  """The largest file under `folder` (a checkpoint's or an export's array data)."""
  return max((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
