"""The package's import graph: no cycles, and the layering the README states.

Walks the ASTs of every module of `omnitrain_jax` (tests excluded), counting
imports inside functions too, so that a lazy import cannot hide a cycle.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "omnitrain_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
          if not p.name.endswith("_test.py")}


def _imports(path: pathlib.Path, modules) -> set[str]:
  """Package modules `path` imports (a `from x import y` of a submodule y
  counts as y; of a name, as x)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
               else node.module for a in node.names]
    else:
      continue
    out.update(n for n in names if n in modules)
  return out


def _graph():
  modules = _modules()
  return {name: _imports(path, modules) - {name}
          for name, path in modules.items()}


def _find_cycle(graph):
  """One cycle as a list of modules, or None (iterative DFS)."""
  state = {}
  for root in sorted(graph):
    if root in state:
      continue
    stack = [(root, iter(sorted(graph[root])))]
    path, state[root] = [root], "open"
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        stack.pop()
        path.pop()
        state[node] = "done"
      elif state.get(child) == "open":
        return path[path.index(child):] + [child]
      elif child not in state:
        state[child] = "open"
        path.append(child)
        stack.append((child, iter(sorted(graph[child]))))
  return None


def test_the_graph_is_read():
  graph = _graph()
  # A known edge of each kind: top level, from-import of a module, in a
  # function (demo.py imports the trainer inside main()).
  assert "omnitrain_jax.model_setup" in graph["omnitrain_jax.train"]
  assert "omnitrain_jax.evaluation.inference" in graph[
      "omnitrain_jax.evaluation.det_evaluator"]
  assert "omnitrain_jax.train" in graph["omnitrain_jax.demo"]


def test_find_cycle_finds_a_planted_cycle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [
      "a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
  cycle = _find_cycle(_graph())
  assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("module,forbidden", [
    # Only the entry points import the trainer.
    ("omnitrain_jax.", "omnitrain_jax.train"),
    # Evaluation receives the model's functions; it never imports training.
    ("omnitrain_jax.evaluation", "omnitrain_jax.train_step"),
    ("omnitrain_jax.evaluation", "omnitrain_jax.optim"),
    # The model package knows axis names, not meshes, data or losses.
    ("omnitrain_jax.models", "omnitrain_jax.sharding"),
    ("omnitrain_jax.models", "omnitrain_jax.losses"),
    # The vocabulary is a leaf: text, tokenizer, vocabulary.
    ("omnitrain_jax.vocab", "omnitrain_jax.data"),
])
def test_layering(module, forbidden):
  allowed = {"omnitrain_jax.main", "omnitrain_jax.demo"}
  bad = sorted(name for name, deps in _graph().items()
               if name.startswith(module) and name not in allowed
               and any(d == forbidden or d.startswith(forbidden + ".")
                       for d in deps))
  assert not bad, f"{bad} import {forbidden}"
