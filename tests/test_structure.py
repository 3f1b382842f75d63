"""The package's shape: import arrows run one way (no module circles) and no module outgrows a sitting.

Static: every moa_jax/**/*.py is parsed with `ast`, nothing is imported or compiled.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moa_jax")
MAX_LINES = 420  # ~400, with room for a docstring line or two


def _modules() -> dict[str, str]:
  """Dotted module name -> path, for every .py under moa_jax/ (a package is its __init__.py)."""
  out = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imports(module: str, path: str, known: set[str]) -> set[str]:
  """The moa_jax modules `module` imports, at module level or inside functions."""
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in known}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from . import x / from ..data import y
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for a in node.names:
        if f"{base}.{a.name}" in known:  # from moa_jax import report: the module moa_jax.report
          out.add(f"{base}.{a.name}")
        elif base in known:              # from moa_jax.study_runs import RunRef: moa_jax.study_runs
          out.add(base)
  out.discard(module)  # study.py's __main__ guard imports its own importable copy: not a circle
  return out


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(m, p, set(modules)) for m, p in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One shortest cycle per strongly connected component of more than one module (Tarjan), as a
  closed path [a, b, ..., a]."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

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
        components.append(set(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return [_shortest_cycle(graph, c, min(c)) for c in components]


def _shortest_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
  """start -> ... -> start inside the component, breadth first."""
  parent, frontier = {}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & component):
        if w == start:
          path = [v]
          while path[-1] != start:
            path.append(parent[path[-1]])
          return path[::-1] + [start]
        if w not in parent:
          parent[w] = v
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f"{start} is in a strongly connected component but no path returns to it")


def test_cycle_finder_finds_a_circle_and_passes_a_tree():
  assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
  assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
  cycle = find_cycles({"a": {"b", "c"}, "b": set(), "c": {"a"}})[0]
  assert cycle[0] == cycle[-1] == "a" and "c" in cycle


def test_import_graph_sees_function_level_and_relative_imports():
  graph = import_graph()
  assert "moa_jax.report" in graph["moa_jax.study"]                # from moa_jax import report
  assert "moa_jax.study_runs" in graph["moa_jax.report"]           # from moa_jax.study_runs import ...
  assert "moa_jax.data.prepare" in graph["moa_jax.report"]         # inside _data_key
  assert "moa_jax.data.cache" in graph["moa_jax.data.prepare"]     # from moa_jax.data import cache


def test_no_module_circles():
  cycles = find_cycles(import_graph())
  assert not cycles, "module circles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_no_module_over_the_line_limit():
  over = {os.path.relpath(p, os.path.dirname(ROOT)): n for p in _modules().values()
          if (n := sum(1 for _ in open(p))) > MAX_LINES}
  assert not over, f"modules over {MAX_LINES} lines: " + ", ".join(f"{p} ({n})" for p, n in sorted(over.items()))
