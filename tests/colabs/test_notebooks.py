"""Every notebook in colabs/ runs top to bottom, headless, on a CPU."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS, "colabs/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{path.name}: commit notebooks without outputs")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_top_to_bottom(path, tmp_path):
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(
      notebook, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
