"""The documentation's links and repository paths point at files that exist.

Checks README.md and every Markdown file under docs/: each relative link or image target exists
(relative to the file's directory), each backticked repository path exists (relative to the
repository root), README stays short, and no page refers to internal notes outside the repository.
"""

import re
from pathlib import Path

import pytest

from tests.helpers import ROOT_PATH

ROOT = ROOT_PATH
README = ROOT / "README.md"
MAX_README_LINES = 260

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
# An inline code span may wrap onto the next line, but not across a blank line.
CODE_SPAN = re.compile(r"`((?:[^`\n]|\n(?![ \t]*\n))+)`")
# [text](target) and ![alt](target); an optional "title" after the target is allowed.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PATH_PREFIXES = ("rlhf_jax/", "experiments/", "tests/", "scripts/", "notebooks/", "docs/")
# A path-like token inside a code span: no spaces, quotes, brackets or separators around it.
PATH_TOKEN = re.compile(
    r"(?<![\w./-])((?:" + "|".join(re.escape(p) for p in PATH_PREFIXES) + r")[^\s`'\"()\[\],;:=]*)"
)
FORBIDDEN = ("shared/", "ALGORITHMS.md", "DESIGN.md", "STYLE.md")


def markdown_files() -> list[Path]:
  return [README] + sorted((ROOT / "docs").rglob("*.md"))


def ids(paths: list[Path]) -> list[str]:
  return [str(p.relative_to(ROOT)) for p in paths]


def without_code(text: str) -> str:
  """The text with fenced code blocks and inline code spans removed (links there are not links)."""
  return CODE_SPAN.sub("", FENCE.sub("", text))


def link_targets(text: str) -> list[str]:
  """The relative file targets of a page's links and images, without their #anchors."""
  targets = []
  for target in LINK.findall(without_code(text)):
    if re.match(r"(https?|mailto):", target) or target.startswith("#"):
      continue
    targets.append(target.split("#", 1)[0])
  return targets


def repo_paths(text: str) -> list[str]:
  """Repository paths named in inline code spans (not in fenced blocks), e.g. `rlhf_jax/run.py`."""
  paths = []
  for span in CODE_SPAN.findall(FENCE.sub("", text)):
    for path in PATH_TOKEN.findall(span):
      if any(c in path for c in "*<{"):
        continue
      paths.append(path.rstrip("."))
  return paths


def test_link_parser():
  text = (
      "See [a](docs/a.md#x), ![img](b.png), [web](https://x.org), [top](#here) and "
      '[t](c.md "title").\n```\n[not](a/link.md)\n```\nand `[code](d.md)`'
  )
  assert link_targets(text) == ["docs/a.md", "b.png", "c.md"]


def test_path_parser():
  text = (
      "`rlhf_jax/run.py`, `--config=experiments/toy_dpo.py:core`, `docs/bench/*.jsonl`,"
      " `experiments/llama3_1b_{sft,rm}.py`, `WORKDIR/rlhf_jax/x.py`, `runs/x`\n"
      "```\nexperiments/in_a_block.py\n```"
  )
  assert repo_paths(text) == ["rlhf_jax/run.py", "experiments/toy_dpo.py"]


@pytest.mark.parametrize("page", markdown_files(), ids=ids(markdown_files()))
def test_links_resolve(page: Path):
  text = page.read_text()
  missing = [t for t in link_targets(text) if not (page.parent / t).exists()]
  assert not missing, f"{page.relative_to(ROOT)}: links to missing files: {missing}"


@pytest.mark.parametrize("page", markdown_files(), ids=ids(markdown_files()))
def test_repo_paths_exist(page: Path):
  text = page.read_text()
  missing = sorted({p for p in repo_paths(text) if not (ROOT / p).exists()})
  assert not missing, f"{page.relative_to(ROOT)}: names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", markdown_files(), ids=ids(markdown_files()))
def test_no_internal_notes(page: Path):
  text = page.read_text()
  found = [word for word in FORBIDDEN if word in text]
  assert not found, f"{page.relative_to(ROOT)} mentions {found}"


def test_readme_is_short():
  lines = len(README.read_text().splitlines())
  assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"
