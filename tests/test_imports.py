"""The dependency direction of DESIGN.md, and an import smoke test.

``bilevel`` and ``kernels`` depend on nothing of ours; ``models`` and
``graphs`` may use ``kernels`` and ``bilevel``; ``experiments`` may use all.
"""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
OURS = ("bilevel", "kernels", "models", "graphs", "experiments")
ALLOWED = {
    "bilevel": set(),
    "kernels": set(),
    "models": {"kernels", "bilevel"},
    "graphs": {"kernels", "bilevel"},
    "experiments": {"bilevel", "kernels", "models", "graphs"},
}


def _imported_packages(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text(), filename=str(path))
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module.split(".")[0])
  return names & set(OURS)


@pytest.mark.parametrize("package", OURS)
def test_dependency_direction(package):
  violations = {}
  for path in sorted((ROOT / package).rglob("*.py")):
    bad = _imported_packages(path) - ALLOWED[package] - {package}
    if bad:
      violations[str(path.relative_to(ROOT))] = sorted(bad)
  assert not violations, f"{package} may not import these: {violations}"


def test_rule_catches_a_violation(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from experiments import train\nimport models.mlp\n")
  assert _imported_packages(bad) == {"experiments", "models"}


@pytest.mark.parametrize("package", OURS)
def test_package_imports(package):
  module = importlib.import_module(package)
  assert module.__file__ == str(ROOT / package / "__init__.py"), (
      f"{package} resolved to {module.__path__}, not the package")
  for name in getattr(module, "__all__", ()):
    assert hasattr(module, name), f"{package}.__all__ names missing {name}"
