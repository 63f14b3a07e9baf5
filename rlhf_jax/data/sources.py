"""Data sets named in a config -> a local JSONL of our records, which every driver reads.

`config.data.source` is one of: "toy", a local file / `save_to_disk` directory of our records (read
as before), or -- with `config.data.schema` set, or a name that is not a local path -- a data set in
a public schema, local or on the Hugging Face hub:

    resolve_source("Anthropic/hh-rlhf", "pairwise", out_path, schema="hh", split="train")

converts it once into `out_path` (JSONL of `kind` records) and returns that path. A name that is not
a local path is loaded with `datasets.load_dataset(name, split=...)` (online, or the local HF cache);
nothing else here ever downloads.

Schemas: the preference schemas of `public.py` (hh, ultrafeedback, shp, pairwise, ranking, ranked,
"auto") for kinds pairwise / ranking; "messages" for sft (chat records in a `messages` column, e.g.
HuggingFaceH4/ultrachat_200k, whose rows also hold a `prompt` column that would make them ambiguous);
and kind "prompt" (PPO's prompt records): the prompts of any preference schema (the context before
the responses, as chat messages or a string), or of "messages" rows (the turns before the last
assistant turn), each distinct prompt once.

Public data sets hold broken rows a user cannot fix (HH-RLHF has identical or empty responses), so
rows that do not convert are skipped, counted and logged, as `load_preferences(invalid="skip")` does.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from rlhf_jax.data.files import read_json
from rlhf_jax.data.public import SCHEMAS, load_preferences
from rlhf_jax.data.records import RecordError, load_records, read_rows, validate_record
from rlhf_jax.errors import ConfigPathError
from rlhf_jax.train.metrics import write_json, write_jsonl

_log = logging.getLogger(__name__)

SFT_SCHEMAS = ("messages",)
PROMPT_KIND = "prompt"  # PPO's prompt records: {"prompt": string or chat messages}


def is_local(source: str) -> bool:
  return os.path.exists(source)


def needs_resolving(source: str, schema: str) -> bool:
  """Whether `source` must be converted (`resolve_source`) before a driver can read it: a public
  schema is named, or it is not "toy", not empty and not a local path (a hub name)."""
  if not source or source == "toy":
    return False
  # A path that does not exist is not a hub name: the driver's own reader reports it, after the
  # config checks that must come first.
  return bool(schema) or not (is_local(source) or _looks_like_path(source))


def _looks_like_path(source: str) -> bool:
  return source.startswith((".", "/", "~")) or source.endswith(
      (".jsonl", ".json", ".parquet", ".csv")
  )


def open_source(source: str, split: str = ""):
  """A local path as is, or a hub data set's split (`datasets.load_dataset(source, split=...)`,
  default "train")."""
  if is_local(source):
    return source
  if _looks_like_path(source):
    raise ConfigPathError(
        f"{source}: no such file or directory; point config.data.source (or eval_source) at an "
        "existing file, or name a hub data set"
    )
  import datasets  # ~1.5 s; only for hub names

  return datasets.load_dataset(source, split=split or "train")


def _local_split(source: Any, split: str) -> str | None:
  """`split` for `read_rows` of a local source (JSONL takes none), None for a loaded Dataset."""
  if not isinstance(source, str) or source.endswith(".jsonl"):
    return None
  return split or None


def _messages_records(source: Any, split: str, name: str) -> list[dict]:
  """sft records from rows with a `messages` column (other sft fields such as `prompt` dropped; the
  rest kept as metadata); trailing turns after the last assistant turn are dropped."""
  rows, where = read_rows(source, split=_local_split(source, split))
  records, skipped = [], []
  for line, row in rows:
    messages = row.get("messages") if isinstance(row, dict) else None
    if isinstance(messages, list):
      last = max(
          (
              i
              for i, m in enumerate(messages)
              if isinstance(m, dict) and m.get("role") == "assistant"
          ),
          default=-1,
      )
      messages = messages[: last + 1]
    extra = {
        k: v
        for k, v in (row.items() if isinstance(row, dict) else ())
        if k not in ("messages", "prompt", "completion") and v is not None
    }
    try:
      records.append(
          validate_record({**extra, "messages": messages}, "sft", source=where, line=line)
      )
    except RecordError as err:
      skipped.append(err)
  return _checked(records, skipped, name)


def _checked(records: list[dict], skipped: list, name: str) -> list[dict]:
  if skipped:
    _log.warning(
        "%s: skipped %d of %d rows that do not convert, e.g. %s",
        name,
        len(skipped),
        len(records) + len(skipped),
        skipped[0],
    )
  if not records:
    raise ValueError(
        f"{name}: no valid records ({len(skipped)} rows skipped"
        + (f", e.g. {skipped[0]})" if skipped else ")")
    )
  return records


def _prompts(records: list[dict], name: str) -> list[dict]:
  """Distinct prompts of sft (messages / prompt) or preference records, in order of appearance."""
  out, seen = [], set()
  for record in records:
    prompt = record["messages"][:-1] if "messages" in record else record["prompt"]
    if not prompt:
      continue
    key = json.dumps(prompt, sort_keys=True)
    if key not in seen:
      seen.add(key)
      out.append({"prompt": prompt})
  return _checked(out, [], name)


def convert(source: str, kind: str, *, schema: str = "", split: str = "") -> list[dict]:
  """Records of `kind` ("sft", "pairwise", "ranking", "kto", or "prompt") from `source` in
  `schema` ("" = our own records of `kind`)."""
  preference = (*SCHEMAS, "auto")
  allowed = {
      "pairwise": preference,
      "ranking": preference,
      "sft": SFT_SCHEMAS,
      PROMPT_KIND: (*preference, *SFT_SCHEMAS),
  }.get(kind, ())
  if schema and schema not in allowed:
    raise ValueError(
        f"config.data.schema={schema!r} does not apply to kind {kind!r}; choose one "
        f"of {allowed or 'none'}, or '' for our own records of that kind"
    )
  name = f"{source}[{split}]" if split else source
  opened = open_source(source, split)
  local_split = _local_split(opened, split)
  if schema in preference or (
      kind in ("pairwise", "ranking") and not schema and not isinstance(opened, str)
  ):  # a hub set: detect its schema
    records = load_preferences(opened, schema=schema or "auto", split=local_split, invalid="skip")
    if kind != PROMPT_KIND and ("responses" in records[0]) != (kind == "ranking"):
      got = "ranking" if "responses" in records[0] else "pairwise"
      raise ValueError(
          f"{name} (schema {schema or 'auto'!r}) holds {got} records, but "
          f"config.data.kind={kind!r}; set the kind to {got!r}"
      )
  elif schema == "messages":
    records = _messages_records(opened, split, name)
  elif kind == PROMPT_KIND:  # rows with a "prompt" column
    rows, where = read_rows(opened, split=local_split)
    records = [
        validate_record(
            {"prompt": row.get("prompt") if isinstance(row, dict) else row, "completion": "-"},
            "sft",
            source=where,
            line=line,
        )
        for line, row in rows
    ]
  else:
    records = load_records(opened, kind, split=local_split)
  return _prompts(records, name) if kind == PROMPT_KIND else records


def resolve_source(
    source: str,
    kind: str,
    out_path: str,
    *,
    schema: str = "",
    split: str = "",
    keep=None,
    keep_tag: str = "",
    force: bool = False,
) -> str:
  """`out_path` holding `source`'s `kind` records (converted once: a later call with the same
  source, kind, schema and split reuses it), or `source` unchanged when it needs no conversion
  (`needs_resolving`; `force`: convert it all the same, e.g. our own records into a JSONL).
  `keep(records) -> records` filters them before they are written (e.g. prompts that fit PPO's
  max_prompt_len); `keep_tag` names its settings, so that a change of them converts again."""
  if not (force or needs_resolving(source, schema)):
    return source
  stamp = {
      "source": source,
      "kind": kind,
      "schema": schema,
      "split": split,
      "keep": keep_tag,
      "mtime": os.path.getmtime(source) if is_local(source) else None,
  }  # a local file edited
  stamp_path = out_path + ".source.json"
  if os.path.exists(out_path) and os.path.exists(stamp_path):
    saved = read_json(stamp_path, fix=f"delete it and {out_path}: they are made again")
    if {k: saved.get(k) for k in stamp} == stamp:
      return out_path
  records = convert(source, kind, schema=schema, split=split)
  if keep is not None:
    records = keep(records)
  write_jsonl(records, out_path)
  write_json({**stamp, "records": len(records)}, stamp_path, indent=None)  # atomic too
  _log.info(
      "data %s (schema %r, split %r): %d %s records -> %s",
      source,
      schema,
      split,
      len(records),
      kind,
      out_path,
  )
  return out_path
