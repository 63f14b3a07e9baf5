"""The package's shape: its modules import each other without cycles."""

import ast
import pathlib

import rlhf_jax

PACKAGE = pathlib.Path(rlhf_jax.__file__).parent


def module_files() -> dict[str, pathlib.Path]:
  files = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    files[name] = path
  return files


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports (at any depth of its code, lazy imports included:
  a cycle through a function-level import is still a design cycle). Importing `a.b.c` also runs
  `a.b`'s `__init__`, so that is an edge too, except into a package the importer is itself in
  (a package's `__init__` importing its modules, which import each other, is no cycle)."""
  files = module_files()
  graph = {name: set() for name in files}

  def add(src: str, target: str) -> None:
    parts = target.split(".")
    for i in range(2, len(parts) + 1):
      name = ".".join(parts[:i])
      if name in files and name != src and not src.startswith(name + "."):
        graph[src].add(name)

  for name, path in files.items():
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        for alias in node.names:
          add(name, alias.name)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          prefix = package.split(".")[: len(package.split(".")) - node.level + 1]
          base = ".".join(prefix + ([base] if base else []))
        for alias in node.names:
          full = f"{base}.{alias.name}"
          add(name, full if full in files else base)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_import_graph_has_no_cycles():
  graph = import_graph()
  assert len(graph) > 80 and graph["rlhf_jax.run"], "the walk found the package's modules"
  assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
