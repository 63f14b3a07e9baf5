"""Readers for public preference data sets: rows of a known schema -> our `pairwise` / `ranking` records.

`load_preferences(path_or_dataset, schema="auto")` reads what `load_records` reads (JSONL, JSON, CSV,
parquet, a `save_to_disk` directory, a `datasets.Dataset`/`DatasetDict`; it never downloads), converts
each row and validates the result as a record (records.py). Schemas (`SCHEMAS`):

    hh             chosen, rejected: whole dialogues "\\n\\nHuman: ...\\n\\nAssistant: ..." (Anthropic
                   HH-RLHF). prompt = every turn before the final Assistant turn, as chat messages
                   (Human -> user, Assistant -> assistant); chosen/rejected = the final Assistant turns.
                   The two dialogues must agree on every earlier turn.
    ultrafeedback  chosen, rejected: chat message lists, optional prompt, optional score_chosen and
                   score_rejected (UltraFeedback-binarized; also TRL's conversational format). The last
                   message of each list is the assistant response; the earlier ones are the prompt, and
                   must agree between the two lists. When the lists hold only the response, the
                   `prompt` column (a string or messages) is the prompt.
    shp            history, human_ref_A, human_ref_B, labels (1: A preferred, 0: B), optional score_A
                   and score_B (Stanford Human Preferences). prompt = history. With
                   `shp_margins=True` the upvote ratio sets `margin` (see `shp_margin`).
    pairwise       prompt, chosen, rejected as strings, optional margin: our own format.
    ranking        prompt, responses (best first): our own format.
    ranked         prompt, completions, and ranks (lower is better, e.g. 1 = best) or scores (higher
                   is better): sorted into a best-first `ranking` record; tied ranks or scores are an
                   error, since a best-first list cannot express a tie.

`schema="auto"` picks the schema from the first row's columns (`detect_schema`). Columns a schema does
not consume are kept as metadata (e.g. prompt_id, post_id, score_chosen), except names that are fields
of another record kind (such as UltraFeedback's `messages`), which would make a record ambiguous.

Errors are `RecordError`s naming the file (or data set), the line or 1-based row and the source
column. With `invalid="skip"` a bad row is dropped instead, and the drops are counted and logged
with the first few reasons: public data sets hold a few broken rows (HH-RLHF has pairs whose
two responses are identical or empty) that a user cannot fix.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import re
from typing import Any, Callable, NamedTuple

from rlhf_jax.data.records import KINDS, RecordError, read_rows, validate_record

_log = logging.getLogger(__name__)

# SHP upvote ratio (preferred / other) -> margin: below 2 is 0 (negligibly better), [2, 4) 1
# (slightly), [4, 8) 2 (better), 8 or more 3 (significantly better). Ratio 2 is the SHP authors'
# suggested minimum for training, so the pairs they would drop land at margin 0.
SHP_MARGIN_THRESHOLDS = (2.0, 4.0, 8.0)
_RECORD_FIELDS = {name for schemas in KINDS.values() for schema in schemas for name in schema}
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class _Bad(Exception):
  """A row does not fit its schema: `column` names the source column."""

  def __init__(self, column: str | None, problem: str):
    super().__init__(problem)
    self.column, self.problem = column, problem


def _string(row: dict, column: str) -> str:
  value = row.get(column)
  if not isinstance(value, str):
    raise _Bad(
        column, "missing" if value is None else f"expected a string, got {type(value).__name__}"
    )
  if not value.strip():
    raise _Bad(column, "is empty; whitespace-only counts as empty")
  return value


def _number(row: dict, column: str) -> float | None:
  value = row.get(column)
  if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
    raise _Bad(column, f"expected a number, got {value!r}")
  return value


# ---------------------------------------------------------------- hh


def _hh_turns(dialogue: str, column: str = "chosen") -> list[dict]:
  """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{'role': 'user', 'content': 'a'}, {'role': 'assistant', ...}].

  Contents are stripped of surrounding whitespace; they may contain blank lines.
  """
  parts = _HH_TURN.split(dialogue)  # [before, role, content, role, content, ...]
  if len(parts) < 3:
    raise _Bad(column, "has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns; not an HH-style dialogue")
  if parts[0].strip():
    raise _Bad(
        column,
        f"has text before its first turn ({parts[0].strip()[:40]!r}); it must start "
        "with '\\n\\nHuman:'",
    )
  turns = []
  for number, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2]), start=1):
    if not content.strip():
      raise _Bad(column, f"turn {number} ({speaker}) is empty; whitespace-only counts as empty")
    turns.append({"role": _HH_ROLES[speaker], "content": content.strip()})
  if turns[-1]["role"] != "assistant":
    raise _Bad(
        column,
        f"ends with a Human turn (turn {len(turns)}); it must end with the Assistant " "response",
    )
  return turns


def _first_difference(a: list[dict], b: list[dict]) -> int:
  """1-based index of the first differing turn (or len + 1 when one is a prefix of the other)."""
  for number, (x, y) in enumerate(zip(a, b), start=1):
    if x != y:
      return number
  return min(len(a), len(b)) + 1


def _shared_context(chosen: list[dict], rejected: list[dict], unit: str) -> list[dict]:
  if chosen[:-1] != rejected[:-1]:
    at = _first_difference(chosen[:-1], rejected[:-1])
    raise _Bad(
        "rejected",
        f"its {unit}s before the final response differ from 'chosen' at {unit} {at} "
        f"('chosen' has {len(chosen) - 1}, 'rejected' {len(rejected) - 1} of them); "
        "both must share the prompt and differ only in the last response",
    )
  return chosen[:-1]


def _from_hh(row: dict) -> dict:
  chosen = _hh_turns(_string(row, "chosen"), "chosen")
  rejected = _hh_turns(_string(row, "rejected"), "rejected")
  context = _shared_context(chosen, rejected, "turn")
  if not context:
    raise _Bad("chosen", "has only an Assistant turn; the prompt (a Human turn) is missing")
  return {"prompt": context, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


# ---------------------------------------------------------------- ultrafeedback


def _message_list(row: dict, column: str) -> list[dict]:
  value = row.get(column)
  if not isinstance(value, list) or not value:
    raise _Bad(
        column, f"expected a non-empty list of {{'role', 'content'}} messages, got {value!r:.60}"
    )
  for i, message in enumerate(value):
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
      raise _Bad(column, f"message {i} is not a {{'role', 'content'}} object with string content")
    if not message["content"].strip():
      raise _Bad(
          column,
          f"message {i} ({message.get('role')}) is empty; whitespace-only counts " "as empty",
      )
  if value[-1].get("role") != "assistant":
    raise _Bad(
        column,
        f"the last message is from {value[-1].get('role')!r}; it must be the assistant " "response",
    )
  return [{"role": m.get("role"), "content": m["content"]} for m in value]


def _from_ultrafeedback(row: dict) -> dict:
  chosen, rejected = _message_list(row, "chosen"), _message_list(row, "rejected")
  context = _shared_context(chosen, rejected, "message")
  if not context:  # TRL's conversational format: the prompt column holds the context
    context = row.get("prompt")
    if context is None:
      raise _Bad("prompt", "missing, and 'chosen' holds only the response; give the prompt")
  score_chosen, score_rejected = _number(row, "score_chosen"), _number(row, "score_rejected")
  if score_chosen is not None and score_rejected is not None and score_chosen < score_rejected:
    raise _Bad(
        "score_rejected",
        f"{score_rejected} > score_chosen={score_chosen}: the pair is the wrong " "way round",
    )
  return {"prompt": context, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


# ---------------------------------------------------------------- shp


def shp_margin(preferred_score: float, other_score: float) -> int:
  """Margin level 0..3 from SHP upvotes: ratio = max(preferred, 1) / max(other, 1), cut at
  SHP_MARGIN_THRESHOLDS (scores below 1 count as 1, so the ratio is finite and >= 1)."""
  ratio = max(preferred_score, 1) / max(other_score, 1)
  return sum(ratio >= threshold for threshold in SHP_MARGIN_THRESHOLDS)


def _from_shp(row: dict, *, margins: bool = False) -> dict:
  prompt, ref_a, ref_b = (
      _string(row, "history"),
      _string(row, "human_ref_A"),
      _string(row, "human_ref_B"),
  )
  label = row.get("labels")
  if isinstance(label, bool) or label not in (0, 1):
    raise _Bad("labels", f"expected 1 (human_ref_A preferred) or 0 (human_ref_B), got {label!r}")
  score_a, score_b = _number(row, "score_A"), _number(row, "score_B")
  record = {
      "prompt": prompt,
      "chosen": ref_a if label else ref_b,
      "rejected": ref_b if label else ref_a,
  }
  if score_a is not None and score_b is not None:
    preferred, other = (score_a, score_b) if label else (score_b, score_a)
    if preferred < other:
      raise _Bad(
          "labels",
          f"labels={label} prefers the lower-scored reply (score_A={score_a}, "
          f"score_B={score_b})",
      )
    if margins:
      record["margin"] = shp_margin(preferred, other)
  elif margins:
    raise _Bad(
        "score_A" if score_a is None else "score_B", "missing; shp_margins=True needs both scores"
    )
  return record


# ---------------------------------------------------------------- rankings and our own formats


def _from_ranked(row: dict) -> dict:
  completions = row.get("completions")
  if not isinstance(completions, list):
    raise _Bad("completions", f"expected a list of strings, got {completions!r:.60}")
  has_ranks = row.get("ranks") is not None
  column = "ranks" if has_ranks else "scores"
  keys = row.get(column)
  if keys is None:
    raise _Bad("ranks", "missing; give ranks (lower is better) or scores (higher is better)")
  if not isinstance(keys, list) or len(keys) != len(completions):
    raise _Bad(
        column,
        f"expected a list of {len(completions)} numbers (one per completion), " f"got {keys!r:.60}",
    )
  if any(isinstance(k, bool) or not isinstance(k, numbers.Real) for k in keys):
    raise _Bad(column, f"expected numbers, got {keys!r:.60}")
  # Checked here, before sorting, so that errors give the indices of the file's own list.
  for i, completion in enumerate(completions):
    if not isinstance(completion, str):
      raise _Bad("completions", f"completion {i} is not a string: {completion!r:.40}")
    if not completion.strip():
      raise _Bad("completions", f"completion {i} is empty; whitespace-only counts as empty")
  texts = [completion.strip() for completion in completions]
  for text in texts:
    same = [j for j, other in enumerate(texts) if other == text]
    if len(same) > 1:
      raise _Bad(
          "completions",
          f"completions {same} are identical ({text!r:.40}); a ranking orders "
          "distinct responses, so keep one of them",
      )
  for key in keys:
    tied = [i for i, other in enumerate(keys) if other == key]
    if len(tied) > 1:
      raise _Bad(
          column,
          f"completions {tied} are tied at {key}; a best-first ranking cannot hold a "
          "tie: drop all but one of them or break the tie",
      )
  order = sorted(range(len(keys)), key=lambda i: keys[i], reverse=not has_ranks)
  return {"prompt": row.get("prompt"), "responses": [completions[i] for i in order]}


def _identity(row: dict) -> dict:
  return dict(row)


class Schema(NamedTuple):
  kind: str  # record kind produced: "pairwise" or "ranking"
  columns: tuple[str, ...]  # required columns, for detection and error messages
  convert: Callable[[dict], dict]  # row -> record (unvalidated); raises _Bad
  consumed: tuple[str, ...]  # columns turned into record fields (not kept as metadata)


SCHEMAS: dict[str, Schema] = {
    "hh": Schema("pairwise", ("chosen", "rejected"), _from_hh, ("chosen", "rejected")),
    "ultrafeedback": Schema(
        "pairwise",
        ("chosen", "rejected"),
        _from_ultrafeedback,
        ("prompt", "chosen", "rejected", "messages"),
    ),
    "shp": Schema(
        "pairwise",
        ("history", "human_ref_A", "human_ref_B", "labels"),
        _from_shp,
        ("history", "human_ref_A", "human_ref_B", "labels"),
    ),
    "pairwise": Schema("pairwise", ("prompt", "chosen", "rejected"), _identity, ()),
    "ranking": Schema("ranking", ("prompt", "responses"), _identity, ()),
    "ranked": Schema(
        "ranking",
        ("prompt", "completions", "ranks|scores"),
        _from_ranked,
        ("prompt", "completions", "ranks", "scores"),
    ),
}


def detect_schema(row: dict) -> str:
  """The schema name for a row (by its columns; chosen as a string vs a message list tells hh and
  pairwise from ultrafeedback). Raises ValueError listing the known schemas when none fits."""
  columns = set(row) if isinstance(row, dict) else set()
  if {"history", "human_ref_A", "human_ref_B", "labels"} <= columns:
    return "shp"
  if {"chosen", "rejected"} <= columns:
    if isinstance(row["chosen"], list):
      return "ultrafeedback"
    return "pairwise" if "prompt" in columns else "hh"
  if {"prompt", "responses"} <= columns:
    return "ranking"
  if {"prompt", "completions"} <= columns and columns & {"ranks", "scores"}:
    return "ranked"
  known = "; ".join(f"{name}: {', '.join(schema.columns)}" for name, schema in SCHEMAS.items())
  raise ValueError(
      f"no known preference schema has columns {sorted(columns)}; known schemas (required columns): "
      f"{known}. Rename the columns or pass schema=..."
  )


def load_preferences(
    path_or_dataset: Any,
    schema: str = "auto",
    *,
    split: str | None = None,
    shp_margins: bool = False,
    invalid: str = "error",
) -> list[dict]:
  """Reads a public preference data set into validated `pairwise` or `ranking` records.

  `schema`: one of SCHEMAS or "auto" (from the first row's columns). `split`: as in `load_records`.
  `shp_margins`: for SHP rows, set `margin` from the upvote ratio (`shp_margin`).
  `invalid`: "error" raises `RecordError` at the first bad row; "skip" drops bad rows, counting
  and logging them (a ValueError still if every row is bad).
  """
  if schema != "auto" and schema not in SCHEMAS:
    raise ValueError(f"unknown schema {schema!r}; expected 'auto' or one of {', '.join(SCHEMAS)}")
  if invalid not in ("error", "skip"):
    raise ValueError(f"invalid={invalid!r}; expected 'error' or 'skip'")
  numbered_rows, source = read_rows(path_or_dataset, split=split)
  numbered_rows = iter(numbered_rows)
  first = next(numbered_rows, None)
  if first is None:
    raise ValueError(f"{source}: no records found")
  if schema == "auto":
    try:
      schema = detect_schema(first[1])
    except ValueError as err:
      raise ValueError(f"{source}:{first[0]}: {err}") from None
  spec = SCHEMAS[schema]
  convert = (
      (lambda row: _from_shp(row, margins=True))
      if schema == "shp" and shp_margins
      else spec.convert
  )

  records, skipped = [], []
  for line, row in itertools.chain([first], numbered_rows):
    try:
      records.append(_convert_row(row, schema, spec, convert, source, line))
    except RecordError as err:
      if invalid == "error":
        raise RecordError(
            err.source,
            err.line,
            err.field,
            err.problem + "; or pass invalid='skip' "
            "to load_preferences to drop bad rows with a count",
        ) from None
      skipped.append(err)
  if skipped:
    examples = "; ".join(str(err) for err in skipped[:3])
    _log.warning(
        "load_preferences(%s, schema=%r): skipped %d of %d rows, e.g. %s",
        source,
        schema,
        len(skipped),
        len(records) + len(skipped),
        examples,
    )
  if not records:
    raise ValueError(f"{source}: no valid records ({len(skipped)} rows skipped, e.g. {skipped[0]})")
  return records


def _convert_row(
    row: Any, schema: str, spec: Schema, convert: Callable, source: str, line: int
) -> dict:
  if not isinstance(row, dict):
    raise RecordError(
        source, line, None, f"expected an object with columns {', '.join(spec.columns)}"
    )
  try:
    record = convert(row)
  except _Bad as bad:
    raise RecordError(source, line, bad.column, bad.problem) from None
  for column, value in row.items():
    if column not in spec.consumed and column not in _RECORD_FIELDS and value is not None:
      record[column] = value
  try:
    return validate_record(record, spec.kind, source=source, line=line)
  except RecordError as err:
    if schema not in ("pairwise", "ranking"):
      err.problem += f" (in the record converted from the {schema} schema)"
    raise RecordError(source, line, err.field, err.problem) from None
