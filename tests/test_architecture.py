"""The package's layering, as docs/architecture.md states it: every module of ``resnet_jax`` belongs to one
group, and imports (at the top or inside functions) only modules of its own group or of the groups its row
of the table names. The library never imports its tools (``experiments``, ``benchmarks``, ``train``), and
PyTorch only inside functions (it is a reference for parity, never a runtime dependency)."""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "resnet_jax")
DOC = os.path.join(ROOT, "docs", "architecture.md")
TOOLS = ("experiments", "benchmarks", "train", "configs", "tests")


def read_groups(text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
  """``({module: group}, {group: groups it may import})`` from the doc's ``| group | modules | may import |``
  table; a module named in two rows is an error."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*group\s*\|\s*modules\s*\|\s*may import", line))
  group_of: dict[str, str] = {}
  allowed: dict[str, set[str]] = {}
  for line in lines[start + 2 :]:
    if not line.startswith("|"):
      break
    group, modules, may = (cell.strip() for cell in line.strip().strip("|").split("|"))
    allowed[group] = {g.strip() for g in may.split(",") if g.strip()}
    for module in re.findall(r"`([A-Za-z_0-9]+)`", modules):
      assert module not in group_of, f"{module} is in two groups: {group_of[module]} and {group}"
      group_of[module] = group
  unknown = {g for gs in allowed.values() for g in gs} - set(allowed)
  assert not unknown, f"the table names groups that have no row: {sorted(unknown)}"
  return group_of, allowed


def imports(path: str) -> list[tuple[str, int, bool]]:
  """``(imported module, line, at top level)`` for every import in the file; ``from resnet_jax import x``
  counts as ``resnet_jax.x``."""
  tree = ast.parse(open(path).read(), path)
  top = {id(node) for node in tree.body}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      assert node.level == 0, f"{path}:{node.lineno}: relative import; the package uses absolute imports"
      if node.module == "resnet_jax":
        out += [(f"resnet_jax.{alias.name}", node.lineno, id(node) in top) for alias in node.names]
      else:
        out.append((node.module, node.lineno, id(node) in top))
  return out


def package_modules() -> list[str]:
  return sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py"))


def test_every_module_is_in_exactly_one_group_of_the_doc():
  group_of, _ = read_groups(open(DOC).read())
  modules = package_modules()
  missing = [m for m in modules if m not in group_of]
  stale = [m for m in group_of if m not in modules]
  assert not missing, f"modules in no group of docs/architecture.md: {missing}"
  assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"


def violations(module: str, path: str, group_of: dict[str, str], allowed: dict[str, set[str]]) -> list[str]:
  """What ``module`` (at ``path``) imports that the layering forbids, one message per import."""
  group = group_of[module]
  out = []
  for name, line, at_top in imports(path):
    parts = name.split(".")
    if parts[0] == "resnet_jax" and len(parts) > 1:
      other = group_of.get(parts[1])
      if other is None:
        out.append(f"{path}:{line} imports {name}, which is in no group")
      elif other != group and other not in allowed[group]:
        may = ", ".join(sorted(allowed[group])) or "nothing else"
        out.append(f"{path}:{line}: {module} ({group}) imports {parts[1]} ({other}); {group} may import {may}")
    if parts[0] in TOOLS:
      out.append(f"{path}:{line}: the library imports the tool {name}")
    if parts[0] in ("torch", "torchvision", "tensorflow") and at_top:
      out.append(f"{path}:{line}: {name} imported at the top of the library (only inside functions)")
  return out


@pytest.mark.parametrize("module", package_modules())
def test_a_module_imports_only_the_groups_its_group_may_import(module):
  group_of, allowed = read_groups(open(DOC).read())
  assert violations(module, os.path.join(PACKAGE, f"{module}.py"), group_of, allowed) == []


def test_the_layering_check_catches_a_forbidden_import(tmp_path):
  """The checker itself: a seed module importing the training group, or torch at the top, is refused."""
  doc = "| group | modules | may import |\n|---|---|---|\n| base | `errors` | |\n| seed | `unit` | base |\n"
  assert read_groups(doc) == ({"errors": "base", "unit": "seed"}, {"base": set(), "seed": {"base"}})
  bad = tmp_path / "unit.py"
  bad.write_text("from resnet_jax import errors\n\ndef f():\n  from resnet_jax import train_loop\n")
  found = violations("unit", str(bad), *read_groups(doc))
  assert len(found) == 1 and found[0].endswith("unit.py:4 imports resnet_jax.train_loop, which is in no group")
  found = violations("unit", str(bad), *read_groups(doc + "| training | `train_loop` | base |\n"))
  assert len(found) == 1 and found[0].endswith("unit (seed) imports train_loop (training); seed may import base")
  assert violations("unit", str(bad), *read_groups(doc + "| training | `train_loop` | base, seed |\n")) != []
  top_torch = tmp_path / "top.py"
  top_torch.write_text("import torch\n\ndef f():\n  import torch\n")
  assert [m.split(": ", 1)[1] for m in violations("errors", str(top_torch), *read_groups(doc))] == [
    "torch imported at the top of the library (only inside functions)"
  ]
  with pytest.raises(AssertionError, match="no row"):
    read_groups(doc + "| tools | `x` | training |\n")
  with pytest.raises(AssertionError, match="two groups"):
    read_groups(doc + "| tools | `unit` | base |\n")
