"""Data records: load JSONL files or HF `datasets`, validate every record, return plain dicts.

Kinds and their fields (docs/design.md, "Data records"):

    text      text
    sft       prompt, completion  -- or messages: [{role: system|user|assistant|tool, content}, ...]
    pairwise  prompt, chosen, rejected, optional margin (int 0..3), optional labeler, optional
              soft_label (float in [0, 1]: P(chosen better), e.g. an AI judge's; RLAIF)
    ranking   prompt, responses (2..9 distinct strings, best first)
    kto       prompt, completion, label (bool: true = desirable)
    safety    prompt, response, safe (bool)

`prompt` is a string or, for multi-turn contexts, a list of chat messages. An `sft` messages record
must end with an assistant turn (the text the model learns to write). A "tool" message holds a tool's
result, which the assistant's previous turn called for (toyworld/tools.py); it renders only with a
chat template that allows the role (`data.tokenizer.TOOL_CHAT_TEMPLATE`).

Texts (prompts, completions, responses, message contents) must be non-empty; whitespace-only counts as
empty. The two responses of a pair, and the responses of a ranking, must differ (compared without
surrounding whitespace): a tie gives a pair with no preference in it. A ranking has 2..9 responses:
K-choose-2 needs two, and InstructGPT ranked K = 4..9; more than 9 (over 36 pairs from one prompt)
is refused so that one prompt cannot dominate a batch -- split such a ranking.

Normalisation: known fields are type-checked (an integral float margin such as 2.0 becomes 2),
messages keep only `role` and `content`, optional fields that are absent or None are left out
(HF datasets fill a column missing from a row with None), and unknown fields are kept unchanged
as metadata (e.g. `family`, `answer`, `id`).

Every problem raises `RecordError` naming `source:line: field 'name'`, what is wrong and the fix.
For HF datasets, `line` is the 1-based row number; records already in memory are named `records[i]`.
"""

from __future__ import annotations

import difflib
import json
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from rlhf_jax.errors import ConfigError, ConfigPathError

ROLES = ("system", "user", "assistant", "tool")
MAX_MARGIN = 3
MIN_RANKED, MAX_RANKED = 2, 9
# Local files that `datasets.load_dataset` reads with a packaged builder (no hub access).
_DATASETS_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}


class RecordError(ValueError):
  """A record that does not match its kind; the message says where, what and how to fix it."""

  def __init__(self, source: str, line: int | None, field: str | None, problem: str):
    """`line` None: `source` alone names the place (e.g. 'records[3]' for an in-memory list)."""
    self.source, self.line, self.field, self.problem = source, line, field, problem
    where = source if line is None else f"{source}:{line}"
    super().__init__(f"{where}: field '{field}': {problem}" if field else f"{where}: {problem}")

  def __reduce__(self):  # multiprocessing (e.g. datasets.map) pickles errors via these args
    return RecordError, (self.source, self.line, self.field, self.problem)


class _Invalid(Exception):
  """A field check failed; `subfield` refines the field name, e.g. '[2].role'."""

  def __init__(self, problem: str, subfield: str = ""):
    super().__init__(problem)
    self.problem, self.subfield = problem, subfield


def _show(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _text(value: Any) -> str:
  if not isinstance(value, str):
    raise _Invalid(f"expected a string, got {_show(value)}")
  if not value.strip():
    raise _Invalid("is empty; fill in the text or remove the record")
  return value


def _messages(value: Any) -> list[dict]:
  if not isinstance(value, list) or not value:
    raise _Invalid(
        f"expected a non-empty list of {{'role': ..., 'content': ...}} messages, got {_show(value)}"
    )
  messages = []
  for i, message in enumerate(value):
    if not isinstance(message, dict):
      raise _Invalid(f"expected a {{'role', 'content'}} object, got {_show(message)}", f"[{i}]")
    role = message.get("role")
    if role not in ROLES:
      raise _Invalid(f"expected one of {', '.join(ROLES)}, got {_show(role)}", f"[{i}].role")
    try:
      content = _text(message.get("content"))
    except _Invalid as err:
      raise _Invalid(err.problem, f"[{i}].content") from None
    messages.append({"role": role, "content": content})
  return messages


def _chat(value: Any) -> list[dict]:
  messages = _messages(value)
  if messages[-1]["role"] != "assistant":
    raise _Invalid(
        f"the last message is from '{messages[-1]['role']}'; an sft conversation must end with "
        "an assistant turn (drop the trailing turns or use kind 'text')"
    )
  return messages


def _prompt(value: Any) -> str | list[dict]:
  if isinstance(value, list):
    return _messages(value)
  if not isinstance(value, str):
    raise _Invalid(f"expected a string or a list of chat messages, got {_show(value)}")
  return _text(value)


def _margin(value: Any) -> int:
  # JSON writers (pandas) sometimes emit integers as 2.0; those are unambiguous.
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise _Invalid(f"expected an integer 0..{MAX_MARGIN}, got {_show(value)}")
  if not 0 <= value <= MAX_MARGIN:
    raise _Invalid(
        f"expected an integer 0..{MAX_MARGIN} (0 negligibly ... 3 significantly better), got {value}"
    )
  return int(value)


def _probability(value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
    raise _Invalid(f"expected a probability in [0, 1] (P(chosen better)), got {_show(value)}")
  return float(value)


def _flag(value: Any) -> bool:
  if not isinstance(value, bool):
    raise _Invalid(f"expected a boolean (JSON true/false), got {_show(value)}")
  return value


def _responses(value: Any) -> list[str]:
  if not isinstance(value, list):
    raise _Invalid(f"expected a list of {MIN_RANKED}..{MAX_RANKED} strings, got {_show(value)}")
  if len(value) < MIN_RANKED:
    raise _Invalid(
        f"expected {MIN_RANKED}..{MAX_RANKED} responses (best first), got {len(value)}; "
        "K-choose-2 needs at least 2 responses to make a pair"
    )
  if len(value) > MAX_RANKED:
    raise _Invalid(
        f"expected {MIN_RANKED}..{MAX_RANKED} responses (best first), got {len(value)}; more would "
        f"give over {MAX_RANKED * (MAX_RANKED - 1) // 2} pairs from one prompt: split the ranking"
    )
  responses = []
  for i, response in enumerate(value):
    try:
      responses.append(_text(response))
    except _Invalid as err:
      raise _Invalid(err.problem, f"[{i}]") from None
  keys = [response.strip() for response in responses]
  for key in keys:
    same = [j for j, other in enumerate(keys) if other == key]
    if len(same) > 1:
      raise _Invalid(
          f"responses {same} are identical ({_show(key)}); a ranking orders distinct responses, "
          "so keep one of them"
      )
  return responses


# kind -> alternative schemas; each schema maps field -> (check, required).
_Schema = dict[str, tuple[Callable[[Any], Any], bool]]
KINDS: dict[str, tuple[_Schema, ...]] = {
    "text": ({"text": (_text, True)},),
    "sft": (
        {"prompt": (_prompt, True), "completion": (_text, True)},
        {"messages": (_chat, True)},
    ),
    "pairwise": (
        {
            "prompt": (_prompt, True),
            "chosen": (_text, True),
            "rejected": (_text, True),
            "margin": (_margin, False),
            "labeler": (_text, False),
            "soft_label": (_probability, False),
        },
    ),
    "ranking": ({"prompt": (_prompt, True), "responses": (_responses, True)},),
    "kto": ({"prompt": (_prompt, True), "completion": (_text, True), "label": (_flag, True)},),
    "safety": ({"prompt": (_prompt, True), "response": (_text, True), "safe": (_flag, True)},),
}


def _distinct_pair(record: dict) -> tuple[str, str] | None:
  if record["chosen"].strip() == record["rejected"].strip():
    return "rejected", "is identical to 'chosen'; a preference pair needs two different responses"
  return None


# kind -> check of the normalised record across fields: None, or (field, problem).
_RECORD_CHECKS: dict[str, Callable[[dict], tuple[str, str] | None]] = {"pairwise": _distinct_pair}


def _describe(kind: str) -> str:
  def fields(schema: _Schema) -> str:
    return ", ".join(
        name if required else f"optional {name}" for name, (_, required) in schema.items()
    )

  return " or ".join(f"({fields(schema)})" for schema in KINDS[kind])


def _pick_schema(record: dict, kind: str, source: str, line: int | None) -> _Schema:
  """The schema whose fields the record uses; sft is the only kind with alternatives."""
  present = [s for s in KINDS[kind] if any(record.get(name) is not None for name in s)]
  if len(present) > 1:
    raise RecordError(
        source,
        line,
        None,
        f"a record of kind '{kind}' has either {_describe(kind)}, not both; keep one form",
    )
  return present[0] if present else KINDS[kind][0]


def validate_record(record: Any, kind: str, *, source: str, line: int | None) -> dict:
  """Checks one record of `kind` and returns it normalised (see module docstring).

  `source` and `line` only locate errors, e.g. source='data/train.jsonl', line=17, or
  source='records[3]', line=None for a record that has no file.
  """
  if kind not in KINDS:
    raise ConfigError(
        f"unknown record kind {kind!r} (config.data.kind); expected one of {', '.join(KINDS)}"
    )
  if not isinstance(record, dict):
    raise RecordError(
        source,
        line,
        None,
        f"expected a JSON object with fields {_describe(kind)}, got {_show(record)}",
    )
  schema = _pick_schema(record, kind, source, line)
  result = {key: value for key, value in record.items() if key not in schema}
  for name, (check, required) in schema.items():
    value = record.get(name)
    if value is None:
      if required:
        raise RecordError(source, line, name, _missing(record, name, kind))
      continue
    try:
      result[name] = check(value)
    except _Invalid as err:
      raise RecordError(source, line, name + err.subfield, err.problem) from None
  problem = _RECORD_CHECKS[kind](result) if kind in _RECORD_CHECKS else None
  if problem is not None:
    raise RecordError(source, line, *problem)
  return result


def _missing(record: dict, name: str, kind: str) -> str:
  problem = f"missing; a record of kind '{kind}' (config.data.kind) needs {_describe(kind)}"
  typo = difflib.get_close_matches(name, [str(key) for key in record], n=1, cutoff=0.75)
  if typo:
    return problem + f" (found '{typo[0]}': rename it to '{name}'?)"
  other = _kind_of(record)
  if other is not None and other != kind:
    return (
        problem + f"; it has the fields of a '{other}' record: if the file holds those, set "
        f"config.data.kind='{other}' and an algorithm that trains on them"
    )
  return problem


def _kind_of(record: dict) -> str | None:
  """The kind whose required fields `record` has, the one needing most fields first; None if
  none."""
  candidates = [
      (sum(required for _, required in schema.values()), kind)
      for kind, schemas in KINDS.items()
      for schema in schemas
      if all(record.get(n) is not None for n, (_, required) in schema.items() if required)
  ]
  return max(candidates)[1] if candidates else None


def load_records(path_or_dataset: Any, kind: str, *, split: str | None = None) -> list[dict]:
  """Loads and validates all records of `kind`; returns plain dicts.

  `path_or_dataset` is one of:
    - a `.jsonl` file, one JSON object per line (blank lines skipped; errors give the line);
    - a `.json` (JSON array or JSON lines), `.csv` or `.parquet` file, read with
      `datasets.load_dataset(builder, data_files=path, split=split or 'train')`;
    - a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
    - a `datasets.Dataset` or `datasets.DatasetDict` object (e.g. from `load_dataset(name)`;
      this function itself never downloads).
  `split` selects a split of a DatasetDict (optional when it has exactly one).
  """
  return load_located_records(path_or_dataset, kind, split=split)[0]


def load_located_records(
    path_or_dataset: Any, kind: str, *, split: str | None = None
) -> tuple[list[dict], list[str]]:
  """`load_records`, and where each record is ('data/train.jsonl:17'; a dataset's 1-based row
  number after its name), for messages about a record found wrong later (e.g. too long)."""
  numbered_rows, source = read_rows(path_or_dataset, split=split)
  return _validate_all(numbered_rows, kind, source)


def read_rows(
    path_or_dataset: Any, *, split: str | None = None
) -> tuple[Iterable[tuple[int, Any]], str]:
  """(iterable of (line or 1-based row number, raw row), source name) for what `load_records`
  accepts; rows are not validated. Malformed JSONL raises `RecordError` while iterating."""
  if not isinstance(path_or_dataset, (str, os.PathLike)):
    rows, source = _select_split(path_or_dataset, split, _dataset_name(path_or_dataset))
    return enumerate(rows, start=1), source
  path = Path(path_or_dataset)
  source = str(path_or_dataset)
  if not path.exists():
    raise ConfigPathError(
        f"{source}: no such file or directory; point config.data.source (or eval_source) at an "
        "existing file"
    )
  if path.is_dir() and path.suffix in (".jsonl", *_DATASETS_BUILDERS):
    raise ConfigError(
        f"{source} is a directory, not a {path.suffix} file; point config.data.source at the file"
    )
  if path.suffix in _DATASETS_BUILDERS and path.is_file() and path.stat().st_size == 0:
    raise RecordError(source, None, None, "no records found (the file is empty)")
  if path.suffix == ".jsonl":
    if split is not None:
      raise ConfigError(
          f"{source}: split={split!r} (config.data.split) applies to HF datasets only, not to "
          ".jsonl files; set it to ''"
      )
    return _read_jsonl(path, source), source
  if not path.is_dir() and path.suffix not in _DATASETS_BUILDERS:
    raise ConfigError(
        f"{source}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv, .parquet "
        "or a directory written by datasets' save_to_disk"
    )
  import datasets  # imported here: it costs ~1.5 s and JSONL loading does not need it

  if path.is_dir():
    rows, source = _select_split(datasets.load_from_disk(str(path)), split, source)
  else:
    builder = _DATASETS_BUILDERS[path.suffix]
    rows = datasets.load_dataset(builder, data_files=str(path), split=split or "train")
  return enumerate(rows, start=1), source


def _dataset_name(dataset: Any) -> str:
  info = getattr(dataset, "info", None)
  name = getattr(info, "dataset_name", None) if info is not None else None
  return name or f"<{type(dataset).__name__}>"


def _select_split(dataset: Any, split: str | None, source: str) -> tuple[Any, str]:
  """(rows of the chosen split, source name); a plain Dataset is its own single split."""
  if not hasattr(dataset, "keys"):  # datasets.Dataset
    if split is not None:
      raise ConfigError(
          f"{source}: split={split!r} (config.data.split) given, but this is a single Dataset "
          "without splits; set it to ''"
      )
    return dataset, source
  splits = list(dataset.keys())
  if split is None and len(splits) == 1:
    split = splits[0]
  if split not in splits:
    raise ConfigError(
        f"{source}: choose a split with split=..., one of {', '.join(map(repr, splits))} "
        "(config.data.split)"
    )
  return dataset[split], f"{source}[{split}]"


def _read_jsonl(path: Path, source: str) -> Iterable[tuple[int, Any]]:
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as err:
        problem = f"not UTF-8 ({err.reason}); re-encode the file as UTF-8"
        raise RecordError(source, line_number, None, problem) from None
      if not text.strip():
        continue
      try:
        yield line_number, json.loads(text)
      except json.JSONDecodeError as err:
        raise RecordError(
            source,
            line_number,
            None,
            f"invalid JSON ({err.msg} at column {err.colno}); each line must hold one JSON object",
        ) from None


def _validate_all(
    numbered_rows: Iterable[tuple[int, Any]], kind: str, source: str
) -> tuple[list[dict], list[str]]:
  records, where = [], []
  for line, row in numbered_rows:
    records.append(validate_record(row, kind, source=source, line=line))
    where.append(f"{source}:{line}")
  if not records:
    raise RecordError(
        source,
        None,
        None,
        "no records found (the file is empty or has only blank lines); "
        "point the config at a file with one record per line",
    )
  return records, where
