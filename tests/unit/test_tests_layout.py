"""The test tree's shape: test files live under tests/unit/ (quick) or tests/integration/ (end to
end, or over ~5 s on CPU), and no module under tests/ imports a test module: what tests share is in
tests/helpers/ (plain functions and constants) and tests/conftest.py (fixtures)."""

import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("unit", "integration")


def is_test_file(path: pathlib.Path) -> bool:
  return path.name.startswith("test_") or path.name.endswith("_test.py")


def python_files(root: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
  """(line, dotted name) of every module or name an import statement names, at any depth (imports
  inside functions count): `import a.b` gives a.b; `from a import b` gives a and a.b; a relative
  import is resolved against `package`, the importing module's package."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
      found.append((node.lineno, base))
      found += [
          (node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names
      ]
  return found


def imported_test_modules(source: str, package: str) -> list[str]:
  """'line: name' for each test module `source` imports: any dotted name with a `test_*` part
  (tests.x.test_y, test_y, tests.x.test_y.name)."""
  hits = []
  for line, name in imported_modules(ast.parse(source), package):
    if any(part.startswith("test_") for part in name.split(".")):
      hits.append(f"{line}: {name}")
  return hits


def test_every_test_file_is_under_unit_or_integration():
  misplaced = [
      str(p.relative_to(TESTS))
      for p in python_files(TESTS)
      if is_test_file(p) and p.relative_to(TESTS).parts[0] not in LAYERS
  ]
  assert not misplaced, f"test files outside tests/unit/ and tests/integration/: {misplaced}"


def test_no_module_under_tests_imports_a_test_module():
  found = {}
  for path in python_files(TESTS):
    rel = path.relative_to(TESTS.parent)
    package = ".".join(rel.parent.parts)  # tests.unit.losses for tests/unit/losses/test_x.py
    hits = imported_test_modules(path.read_text(), package)
    if hits:
      found[str(rel)] = hits
  assert not found, (
      "test modules imported by other modules (share through tests/helpers/ or tests/conftest.py "
      f"instead): {found}"
  )


def test_the_import_scan_catches_what_it_should():
  code = (
      "import tests.unit.test_package\n"
      "from tests.unit.losses.test_ppo import helper\n"
      "from tests.unit.losses import test_ppo\n"
      "from . import test_sibling\n"
      "from .test_sibling import helper\n"
      "def f():\n"
      "  from test_sharding import one_train_step\n"
      "from tests.helpers.ppo import TINY\n"
      "import pytest_cov\n"
      "from rlhf_jax.losses import ppo\n"
  )
  assert imported_test_modules(code, "tests.unit.losses") == [
      "1: tests.unit.test_package",
      "2: tests.unit.losses.test_ppo",
      "2: tests.unit.losses.test_ppo.helper",
      "3: tests.unit.losses.test_ppo",
      "4: tests.unit.losses.test_sibling",
      "5: tests.unit.losses.test_sibling",
      "5: tests.unit.losses.test_sibling.helper",
      "7: test_sharding",
      "7: test_sharding.one_train_step",
  ]
