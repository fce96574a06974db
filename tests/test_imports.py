"""The dependency direction of DESIGN.md, and an import smoke test.

``bilevel`` and ``kernels`` depend on nothing of ours; ``models`` and
``graphs`` may use ``kernels`` and ``bilevel``; ``experiments`` may use all.
Inside ``experiments`` the platform (every module outside ``tasks/`` and
``benchmarks/``) imports no task and no benchmark, and the tasks import no
benchmark: benchmarks sit on tasks, tasks on the platform.
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


# experiments/<room>/ may not import the modules named here.
EXPERIMENTS_FORBIDDEN = {
    "platform": ("experiments.tasks", "experiments.benchmarks"),
    "tasks": ("experiments.benchmarks",),
}


def _imported_modules(path: pathlib.Path) -> set[str]:
  """Dotted names an import may bind: ``from a import b`` gives a, a.b."""
  tree = ast.parse(path.read_text(), filename=str(path))
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _experiments_room(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT / "experiments").parts
  return parts[0] if parts[0] in ("tasks", "benchmarks") else "platform"


@pytest.mark.parametrize("room", sorted(EXPERIMENTS_FORBIDDEN))
def test_experiments_platform_below_tasks(room):
  forbidden = EXPERIMENTS_FORBIDDEN[room]
  violations = {}
  for path in sorted((ROOT / "experiments").rglob("*.py")):
    if _experiments_room(path) != room:
      continue
    bad = sorted(m for m in _imported_modules(path)
                 if any(m == f or m.startswith(f + ".") for f in forbidden))
    if bad:
      violations[str(path.relative_to(ROOT))] = bad
  assert not violations, f"experiments {room} may not import: {violations}"


def test_rule_catches_a_violation(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from experiments import train\nimport models.mlp\n")
  assert _imported_packages(bad) == {"experiments", "models"}
  task = tmp_path / "task.py"
  task.write_text("from experiments import tasks\n"
                  "from experiments.tasks import svm\n")
  assert {"experiments.tasks", "experiments.tasks.svm"} <= _imported_modules(
      task)


@pytest.mark.parametrize("package", OURS)
def test_package_imports(package):
  module = importlib.import_module(package)
  assert module.__file__ == str(ROOT / package / "__init__.py"), (
      f"{package} resolved to {module.__path__}, not the package")
  for name in getattr(module, "__all__", ()):
    assert hasattr(module, name), f"{package}.__all__ names missing {name}"
