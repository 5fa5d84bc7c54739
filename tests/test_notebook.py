"""The quickstart notebook runs top to bottom (executed with nbclient) and shows its loss curve inline."""
import base64
from pathlib import Path

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient", reason="nbclient is in the dev extra")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def code_outputs(notebook) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def test_quickstart_notebook_executes_and_plots_inline(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = code_outputs(notebook)
    text = "".join(o.get("text", "") for o in outputs)
    assert "reloaded logits identical: True" in text
    pngs = [base64.b64decode(o["data"]["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1, "the loss-curve cell must display exactly one inline image/png output"
    assert pngs[0].startswith(PNG_SIGNATURE) and len(pngs[0]) > 5_000  # a real drawn figure, not an empty stub
    last_cell = [cell for cell in notebook.cells if cell.cell_type == "code"][-1]
    assert any("image/png" in o.get("data", {}) for o in last_cell.outputs), "the plot belongs to the last cell"
    assert not any(tmp_path.rglob("*.png")), "the plot is shown inline, not written to a file"


LONG_CONTEXT = NOTEBOOK.parent / "long_context.ipynb"


def test_long_context_notebook_executes_on_a_reduced_budget_and_plots_inline(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGLM_NOTEBOOK_STEPS", "20")
    notebook = nbformat.read(LONG_CONTEXT, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = code_outputs(notebook)
    text = "".join(o.get("text", "") for o in outputs)
    assert "20,480 training tokens in" in text and "exact match" in text  # 20 steps x 16 rows x 64 tokens
    assert "held-apart PG-19 bits per byte" in text
    pngs = [base64.b64decode(o["data"]["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1 and pngs[0].startswith(PNG_SIGNATURE) and len(pngs[0]) > 5_000
    assert (tmp_path / "runs" / "long_context" / "transformer-xl" / "result.json").is_file()
