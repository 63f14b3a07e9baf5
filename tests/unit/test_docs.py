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


# A pointer from code or docs into a page's section: docs/toyworld.md, "Best of n to 16" (the
# quoted text starts a heading, or a paragraph's bold lead, of that page). Wrapped lines and
# comment markers are joined first.
SECTION_REF = re.compile(r"((?:docs/[\w/]+|README)\.md),\s+\"([^\"]+)\"")
SOURCE_DIRS = ("rlhf_jax", "experiments", "scripts", "notebooks", "tests")


def source_files() -> list[Path]:
  files = [
      p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*")) if p.suffix in (".py", ".ipynb")
  ]
  return [p for p in files if "__pycache__" not in p.parts]


def section_refs(text: str) -> list[tuple[str, str]]:
  """(page, quoted section) pairs named in `text`, across wrapped lines and `#` comments."""
  joined = " ".join(re.sub(r"^\s*#+\s?", "", line).strip() for line in text.splitlines())
  return SECTION_REF.findall(joined)


def section_titles(page: Path) -> list[str]:
  """A page's headings and bold paragraph leads, in words without Markdown markup."""
  text = FENCE.sub("", page.read_text())
  titles = re.findall(r"^#+\s+(.+?)\s*$", text, re.M)
  titles += re.findall(r"^(?:- )?\*\*(.+?)\*\*", text, re.M | re.S)
  return [" ".join(t.replace("`", "").split()) for t in titles]


def test_section_ref_parser():
  text = 'x (docs/toyworld.md,\n  # "Best of n\n  # to 16") and README.md, "Set-up" but not docs/a.md "x"'
  assert section_refs(text) == [("docs/toyworld.md", "Best of n to 16"), ("README.md", "Set-up")]


def test_section_references_name_sections_that_exist():
  """A docstring, comment or page that sends the reader to a section names one that exists."""
  files = [p for p in source_files() if p.name != "test_docs.py"] + markdown_files()
  broken, checked = [], 0
  for path in files:
    for page, title in section_refs(path.read_text()):
      target = ROOT / page
      title, checked = " ".join(title.replace("`", "").split()), checked + 1
      if not target.exists() or not any(t.startswith(title) for t in section_titles(target)):
        broken.append(f'{path.relative_to(ROOT)}: {page}, "{title}"')
  assert not broken, "references to missing sections:\n" + "\n".join(broken)
  assert checked >= 15  # the pattern still finds the references (18 when written)


def test_sources_do_not_mention_internal_notes():
  """Docstrings and comments point users at docs/, never at notes outside the repository."""
  found = [
      f"{p.relative_to(ROOT)}: {word}"
      for p in source_files()
      if p.name != "test_docs.py"
      for word in FORBIDDEN
      if word in p.read_text()
  ]
  assert not found, found
