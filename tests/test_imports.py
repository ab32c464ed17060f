"""The package's import graph: layered, no cycles (top-level and function-local imports alike),
and the library never imports the research studies."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kat_jax"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
  """Dotted module name -> file, packages by their __init__.py."""
  out = {}
  for f in root.rglob("*.py"):
    parts = f.relative_to(root.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
  return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
  """Module -> the package modules it imports anywhere in its file. `from pkg import name`
  points at pkg.name when that is a module, else at pkg (its __init__ runs)."""
  graph = {name: set() for name in mods}
  for name, path in mods.items():
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's package
          pkg = name.split(".") if is_pkg else name.split(".")[:-1]
          pkg = pkg[:len(pkg) - node.level + 1]
          base = ".".join(pkg + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                   for a in node.names]
      else:
        continue
      graph[name] |= {t for t in targets if t in mods and t != name}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
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
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_cycles():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
  assert cycles(graph) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
  found = cycles(import_graph(modules()))
  assert found == [], f"import cycles in kat_jax: {found}"


def test_the_library_never_imports_the_studies():
  graph = import_graph(modules())
  bad = {m: sorted(t for t in ts if t.startswith("kat_jax.studies"))
         for m, ts in graph.items() if not m.startswith("kat_jax.studies")}
  assert not any(bad.values()), {m: t for m, t in bad.items() if t}


def test_the_graph_sees_function_local_imports(tmp_path):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  from pkg.a import g\n  from . import c\n")
  (pkg / "c.py").write_text("")
  graph = import_graph(modules(pkg))
  assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a", "pkg.c"}
  assert cycles(graph) == [["pkg.a", "pkg.b"]]
