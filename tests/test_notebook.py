"""The quickstart notebook runs top to bottom on the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "p(revision better)" in outputs and "sha256:" in outputs
    assert "# Run report: tiny" in outputs and "## Preference model" in outputs
    assert outputs.count("per-principle") == 4  # K = 2 principles x 2 orders
