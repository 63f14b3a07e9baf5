"""Public preference schemas (HH-RLHF, UltraFeedback-binarized, SHP, rankings) read from small local
files and Dataset objects: exact conversions, auto-detection, and errors naming file, row and column.
"""

import json
import logging
import re

import datasets
import pytest

from rlhf_jax.data import RecordError, detect_schema, load_preferences, shp_margin
from rlhf_jax.data.public import SHP_MARGIN_THRESHOLDS


def write_jsonl(path, rows):
  path.write_text(
      "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
  )
  return path


def write_parquet(path, rows):
  datasets.Dataset.from_list(rows).to_parquet(str(path))
  return path


def user(text):
  return {"role": "user", "content": text}


def assistant(text):
  return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- HH-RLHF

HH_SINGLE = {
    "chosen": "\n\nHuman: What is 7 + 5?\n\nAssistant: 12",
    "rejected": "\n\nHuman: What is 7 + 5?\n\nAssistant: 13",
}
# Multi-turn; the first assistant turn holds a blank line, which is not a turn boundary.
HH_MULTI = {
    "chosen": "\n\nHuman: Name two fruits.\n\nAssistant: Here are two.\n\nApple, pear.\n\nHuman: One more?"
    "\n\nAssistant: Plum.",
    "rejected": "\n\nHuman: Name two fruits.\n\nAssistant: Here are two.\n\nApple, pear.\n\nHuman: One more?"
    "\n\nAssistant: No.",
}
HH_RECORDS = [
    {"prompt": [user("What is 7 + 5?")], "chosen": "12", "rejected": "13"},
    {
        "prompt": [
            user("Name two fruits."),
            assistant("Here are two.\n\nApple, pear."),
            user("One more?"),
        ],
        "chosen": "Plum.",
        "rejected": "No.",
    },
]


def test_hh_jsonl_and_parquet(tmp_path):
  jsonl = write_jsonl(tmp_path / "hh.jsonl", [HH_SINGLE, HH_MULTI])
  assert load_preferences(jsonl) == HH_RECORDS
  assert load_preferences(jsonl, "hh") == HH_RECORDS
  parquet = write_parquet(tmp_path / "hh.parquet", [HH_SINGLE, HH_MULTI])
  assert load_preferences(parquet) == HH_RECORDS


BAD_HH = [  # (row, regex the message must match after "path:2: ")
    (
        {"chosen": HH_SINGLE["chosen"], "rejected": "\n\nHuman: What is 7 + 6?\n\nAssistant: 13"},
        r"field 'rejected': its turns before the final response differ from 'chosen' at turn 1 "
        r"\('chosen' has 1, 'rejected' 1 of them\); both must share the prompt",
    ),
    (
        {"chosen": HH_MULTI["chosen"], "rejected": HH_SINGLE["rejected"]},
        r"field 'rejected': its turns before the final response differ from 'chosen' at turn 1 "
        r"\('chosen' has 3, 'rejected' 1",
    ),
    (
        {**HH_SINGLE, "chosen": "\n\nHuman: What is 7 + 5?\n\nAssistant: 12\n\nHuman: Sure?"},
        r"field 'chosen': ends with a Human turn \(turn 3\); it must end with the Assistant response",
    ),
    (
        {**HH_SINGLE, "rejected": "\n\nHuman: What is 7 + 5?\n\nAssistant:  "},
        r"field 'rejected': turn 2 \(Assistant\) is empty; whitespace-only counts as empty",
    ),
    (
        {**HH_SINGLE, "chosen": "Q: 7 + 5?\n\nHuman: What is 7 + 5?\n\nAssistant: 12"},
        r"field 'chosen': has text before its first turn \('Q: 7 \+ 5\?'\)",
    ),
    ({**HH_SINGLE, "chosen": "What is 7 + 5? 12"}, r"field 'chosen': has no '\\n\\nHuman:'"),
    ({**HH_SINGLE, "rejected": 5}, r"field 'rejected': expected a string, got int"),
    (
        {**HH_SINGLE, "rejected": HH_SINGLE["chosen"] + " "},
        r"field 'rejected': is identical to 'chosen'; .* \(in the record converted from the hh schema\)",
    ),
    ('{"chosen": "\\n\\nHuman: hi", ', r"invalid JSON \(.*\); each line must hold one JSON object"),
]


@pytest.mark.parametrize("row, expected", BAD_HH)
def test_hh_bad_rows_name_file_row_and_column(tmp_path, row, expected):
  path = write_jsonl(tmp_path / "hh.jsonl", [HH_SINGLE, row])
  with pytest.raises(RecordError) as info:
    load_preferences(path, "hh")
  message = str(info.value)
  assert message.startswith(f"{path}:2: "), message
  assert re.search(expected, message), message


def test_invalid_rows_can_be_skipped_with_a_logged_count(tmp_path, caplog):
  identical = {"chosen": HH_SINGLE["chosen"], "rejected": HH_SINGLE["chosen"]}
  empty = {**HH_SINGLE, "chosen": "\n\nHuman: hi\n\nAssistant:"}
  path = write_jsonl(tmp_path / "hh.jsonl", [identical, HH_SINGLE, empty, HH_MULTI])
  with pytest.raises(
      RecordError, match=r":1: field 'rejected': is identical .*pass invalid='skip'"
  ):
    load_preferences(path)
  with caplog.at_level(logging.WARNING, logger="rlhf_jax.data.public"):
    assert load_preferences(path, invalid="skip") == HH_RECORDS
  assert "skipped 2 of 4 rows" in caplog.text
  assert f"{path}:1: field 'rejected': is identical" in caplog.text
  assert f"{path}:3: field 'chosen': turn 2 (Assistant) is empty" in caplog.text
  with pytest.raises(ValueError, match=r"no valid records \(2 rows skipped"):
    load_preferences(write_jsonl(tmp_path / "bad.jsonl", [identical, empty]), invalid="skip")


# ---------------------------------------------------------------- UltraFeedback-binarized

UF_ROW = {
    "prompt": "Name a colour.",
    "prompt_id": "abc",
    "chosen": [user("Name a colour."), assistant("Red.")],
    "rejected": [user("Name a colour."), assistant("Colours are nice.")],
    "messages": [user("Name a colour."), assistant("Red.")],
    "score_chosen": 8.0,
    "score_rejected": 3.5,
}
UF_RECORD = {
    "prompt": [user("Name a colour.")],
    "chosen": "Red.",
    "rejected": "Colours are nice.",
    "prompt_id": "abc",
    "score_chosen": 8.0,
    "score_rejected": 3.5,
}
UF_MULTI = {
    "prompt": "And another?",
    "chosen": [
        {"role": "system", "content": "Be brief."},
        user("A colour?"),
        assistant("Red."),
        user("And another?"),
        assistant("Blue."),
    ],
    "rejected": [
        {"role": "system", "content": "Be brief."},
        user("A colour?"),
        assistant("Red."),
        user("And another?"),
        assistant("Red again."),
    ],
}


def test_ultrafeedback_dataset_objects_and_splits(tmp_path):
  multi_record = {"prompt": UF_MULTI["chosen"][:-1], "chosen": "Blue.", "rejected": "Red again."}
  # Dataset.from_list fills the columns a row lacks with None; they must not come back as fields.
  train = datasets.Dataset.from_list([UF_ROW, UF_MULTI])
  assert load_preferences(train) == [UF_RECORD, multi_record]
  splits = datasets.DatasetDict(
      {"train_prefs": train, "test_prefs": datasets.Dataset.from_list([UF_ROW])}
  )
  splits.save_to_disk(str(tmp_path / "uf"))
  assert load_preferences(tmp_path / "uf", split="test_prefs") == [UF_RECORD]
  with pytest.raises(
      ValueError, match="choose a split with split=..., one of 'train_prefs', 'test_prefs'"
  ):
    load_preferences(tmp_path / "uf")


def test_ultrafeedback_conversational_prompt_column(tmp_path):
  # TRL's conversational format: chosen/rejected hold only the response, the prompt is a message list.
  row = {
      "prompt": [user("Hi"), assistant("Hello"), user("A colour?")],
      "chosen": [assistant("Red.")],
      "rejected": [assistant("Dunno.")],
  }
  path = write_jsonl(tmp_path / "trl.jsonl", [row])
  assert load_preferences(path) == [
      {"prompt": row["prompt"], "chosen": "Red.", "rejected": "Dunno."}
  ]


BAD_UF = [
    (
        {**UF_ROW, "rejected": [user("Name a shape."), assistant("Square.")]},
        r"field 'rejected': its messages before the final response differ from 'chosen' at message 1",
    ),
    (
        {**UF_ROW, "chosen": [user("Name a colour.")]},
        r"field 'chosen': the last message is from 'user'; it must be the assistant response",
    ),
    (
        {**UF_ROW, "chosen": [user("Name a colour."), assistant(" ")]},
        r"field 'chosen': message 1 \(assistant\) is empty",
    ),
    ({**UF_ROW, "rejected": "Colours are nice."}, r"field 'rejected': expected a non-empty list"),
    (
        {**UF_ROW, "score_chosen": 2.0},
        r"field 'score_rejected': 3\.5 > score_chosen=2\.0: the pair is the wrong way round",
    ),
    ({**UF_ROW, "score_rejected": "low"}, r"field 'score_rejected': expected a number, got 'low'"),
    (
        {"chosen": [assistant("Red.")], "rejected": [assistant("Blue.")]},
        r"field 'prompt': missing, and 'chosen' holds only the response",
    ),
]


@pytest.mark.parametrize("row, expected", BAD_UF)
def test_ultrafeedback_bad_rows(tmp_path, row, expected):
  path = write_jsonl(tmp_path / "uf.jsonl", [UF_ROW, row])
  with pytest.raises(RecordError) as info:
    load_preferences(path, "ultrafeedback")
  assert str(info.value).startswith(f"{path}:2: ")
  assert re.search(expected, str(info.value)), str(info.value)


# ---------------------------------------------------------------- SHP


def shp_row(label, score_a, score_b, **extra):
  return {
      "post_id": f"p{score_a}-{score_b}",
      "history": "Why is the sky blue?",
      "human_ref_A": "Rayleigh.",
      "human_ref_B": "Magic.",
      "labels": label,
      "score_A": score_a,
      "score_B": score_b,
      **extra,
  }


def test_shp_parquet_labels_and_margins(tmp_path):
  rows = [
      shp_row(1, 3, 2),
      shp_row(0, 5, 20),
      shp_row(1, 100, 0),
      shp_row(1, 16, 2),
      shp_row(0, 6, 12),
  ]
  path = write_parquet(tmp_path / "shp.parquet", rows)
  a_wins = {"prompt": "Why is the sky blue?", "chosen": "Rayleigh.", "rejected": "Magic."}
  b_wins = {"prompt": "Why is the sky blue?", "chosen": "Magic.", "rejected": "Rayleigh."}
  records = load_preferences(path)
  assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records] == [
      a_wins,
      b_wins,
      a_wins,
      a_wins,
      b_wins,
  ]
  assert "margin" not in records[0]
  assert (records[1]["post_id"], records[1]["score_A"], records[1]["score_B"]) == ("p5-20", 5, 20)
  # Ratios 1.5, 4, 100 (a zero score counts as 1), 8, 2.
  with_margins = load_preferences(path, shp_margins=True)
  assert [r["margin"] for r in with_margins] == [0, 2, 3, 3, 1]


def test_shp_margin_matches_a_plain_reference():
  def reference(preferred, other):
    ratio = max(preferred, 1) / max(other, 1)
    if ratio < 2:
      return 0
    return 1 if ratio < 4 else 2 if ratio < 8 else 3

  assert SHP_MARGIN_THRESHOLDS == (2.0, 4.0, 8.0)
  for preferred in range(-2, 40):
    for other in range(-2, 12):
      if max(preferred, 1) >= max(other, 1):
        assert shp_margin(preferred, other) == reference(preferred, other), (preferred, other)


BAD_SHP = [
    (
        shp_row(1, 2, 9),
        r"field 'labels': labels=1 prefers the lower-scored reply \(score_A=2, score_B=9\)",
    ),
    (
        shp_row("A", 9, 2),
        r"field 'labels': expected 1 \(human_ref_A preferred\) or 0 \(human_ref_B\), got 'A'",
    ),
    (shp_row(1, 9, 2, human_ref_B=""), r"field 'human_ref_B': is empty"),
    (
        {k: v for k, v in shp_row(1, 9, 2).items() if k != "history"}
        | {"labels": 1, "human_ref_A": "x"},
        r"field 'history': missing",
    ),
    (shp_row(1, 9, 2, human_ref_B="Rayleigh."), r"field 'rejected': is identical to 'chosen'"),
]


@pytest.mark.parametrize("row, expected", BAD_SHP)
def test_shp_bad_rows(tmp_path, row, expected):
  path = write_jsonl(tmp_path / "shp.jsonl", [shp_row(1, 9, 2), row])
  with pytest.raises(RecordError) as info:
    load_preferences(path, "shp")
  assert str(info.value).startswith(f"{path}:2: ")
  assert re.search(expected, str(info.value)), str(info.value)


def test_shp_margins_need_scores(tmp_path):
  row = {k: v for k, v in shp_row(1, 9, 2).items() if k != "score_B"}
  path = write_jsonl(tmp_path / "shp.jsonl", [row])
  assert load_preferences(path)[0]["chosen"] == "Rayleigh."
  with pytest.raises(
      RecordError, match=r":1: field 'score_B': missing; shp_margins=True needs both"
  ):
    load_preferences(path, shp_margins=True)


# ---------------------------------------------------------------- rankings


def test_rankings_best_first_from_responses_ranks_and_scores(tmp_path):
  rows = [
      {"prompt": "p1", "responses": ["best", "mid", "worst"]},
  ]
  assert load_preferences(write_jsonl(tmp_path / "r.jsonl", rows)) == rows
  ranked = [
      {"prompt": "p2", "completions": ["c", "a", "b"], "ranks": [3, 1, 2]},
      {"prompt": "p3", "completions": ["low", "high", "mid", "top"], "ranks": [10, 1, 5, 0]},
  ]
  assert load_preferences(write_parquet(tmp_path / "ranks.parquet", ranked)) == [
      {"prompt": "p2", "responses": ["a", "b", "c"]},
      {"prompt": "p3", "responses": ["top", "high", "mid", "low"]},
  ]
  scored = [
      {"prompt": "p4", "completions": ["ok", "great", "bad"], "scores": [6.5, 9.0, 1.0], "id": 4}
  ]
  assert load_preferences(write_jsonl(tmp_path / "scores.jsonl", scored)) == [
      {"prompt": "p4", "responses": ["great", "ok", "bad"], "id": 4}
  ]


BAD_RANKED = [
    (
        {"prompt": "p", "completions": ["a", "b", "c"], "ranks": [1, 2, 1]},
        r"field 'ranks': completions \[0, 2\] are tied at 1; a best-first ranking cannot hold a tie",
    ),
    (
        {"prompt": "p", "completions": ["a", "b", "c"], "scores": [0.5, 0.5, 0.1]},
        r"field 'scores': completions \[0, 1\] are tied at 0\.5",
    ),
    # Ranks that reorder the list: the indices named are those of the file's own list.
    (
        {"prompt": "p", "completions": ["a", "b", " a"], "ranks": [3, 1, 2]},
        r"field 'completions': completions \[0, 2\] are identical \('a'\)",
    ),
    (
        {"prompt": "p", "completions": ["a", "  ", "c"], "ranks": [2, 3, 1]},
        r"field 'completions': completion 1 is empty",
    ),
    (
        {"prompt": "p", "completions": ["a"], "ranks": [1]},
        r"field 'responses': expected 2\.\.9 responses \(best first\), got 1; K-choose-2 needs",
    ),
    (
        {"prompt": "p", "completions": ["a", "b"], "ranks": [1]},
        r"field 'ranks': expected a list of 2 numbers \(one per completion\)",
    ),
    (
        {"prompt": "p", "completions": ["a", "b"], "ranks": ["first", "second"]},
        r"field 'ranks': expected numbers",
    ),
    (
        {"prompt": "p", "completions": ["a", "b"]},
        r"field 'ranks': missing; give ranks \(lower is better\) or scores",
    ),
]


@pytest.mark.parametrize("row, expected", BAD_RANKED)
def test_ranked_bad_rows(tmp_path, row, expected):
  good = {"prompt": "p", "completions": ["x", "y"], "ranks": [2, 1]}
  path = write_jsonl(tmp_path / "ranked.jsonl", [good, row])
  with pytest.raises(RecordError) as info:
    load_preferences(path, "ranked")
  assert str(info.value).startswith(f"{path}:2: ")
  assert re.search(expected, str(info.value)), str(info.value)


def test_ranking_duplicates_and_sizes_in_our_own_format(tmp_path):
  path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "b"]}])
  with pytest.raises(RecordError, match=r":1: field 'responses': responses \[1, 2\] are identical"):
    load_preferences(path)


# ---------------------------------------------------------------- auto-detection


@pytest.mark.parametrize(
    "row, schema",
    [
        (HH_SINGLE, "hh"),
        (UF_ROW, "ultrafeedback"),
        (shp_row(1, 3, 2), "shp"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1}, "pairwise"),
        ({"prompt": "p", "responses": ["a", "b"]}, "ranking"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": [1, 2]}, "ranked"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": [1, 2]}, "ranked"),
    ],
)
def test_detect_schema(row, schema):
  assert detect_schema(row) == schema


def test_pairwise_passes_through_with_margin(tmp_path):
  rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 3, "labeler": "x"}]
  assert load_preferences(write_jsonl(tmp_path / "pairs.jsonl", rows)) == rows


def test_unknown_columns_list_the_known_schemas(tmp_path):
  path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
  with pytest.raises(ValueError) as info:
    load_preferences(path)
  message = str(info.value)
  assert message.startswith(
      f"{path}:1: no known preference schema has columns ['bad', 'good', 'question']"
  )
  for expected in (
      "hh: chosen, rejected",
      "ultrafeedback: chosen, rejected",
      "shp: history, human_ref_A, human_ref_B, labels",
      "pairwise: prompt, chosen, rejected",
      "ranking: prompt, responses",
      "ranked: prompt, completions, ranks|scores",
  ):
    assert expected in message
  with pytest.raises(
      ValueError, match=r"unknown schema 'anthropic'; expected 'auto' or one of hh, "
  ):
    load_preferences(path, "anthropic")
  with pytest.raises(ValueError, match=r"invalid='drop'; expected 'error' or 'skip'"):
    load_preferences(path, invalid="drop")


def test_forced_schema_that_does_not_fit(tmp_path):
  path = write_jsonl(tmp_path / "hh.jsonl", [HH_SINGLE])
  with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:1: field 'history': missing"):
    load_preferences(path, "shp")
  with pytest.raises(ValueError, match="no records found"):
    load_preferences(write_jsonl(tmp_path / "empty.jsonl", []))
