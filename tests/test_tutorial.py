"""docs/tutorial.ipynb runs from top to bottom (nbclient, a fresh kernel, the bundled model), and its
results render as heatmaps in the notebook (``_repr_html_``)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"


@pytest.mark.smollm2
def test_tutorial_runs(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # a fresh kernel of the project's venv (its python3 kernelspec), working in a scratch folder
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / "tutorial-executed.ipynb")  # kept for a look when this fails
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, [(e.ename, e.evalue) for e in errors]
    print("top_k:", next(o["data"]["text/plain"] for c in code if "top_k" in c.source for o in c.outputs
                         if o.output_type == "execute_result"))
    htmls = [o["data"]["text/html"] for o in outputs if o.output_type == "execute_result" and "text/html" in o["data"]]
    assert len(htmls) == 2  # the head grid and the residual grid, drawn inline
    assert htmls[0].count("<td class=pt-c") == 12 * 9 and "head[23].h3" in htmls[0]
    top = next(o["data"]["text/plain"] for c in code if "top_k" in c.source
               for o in c.outputs if o.output_type == "execute_result")
    assert "Site(kind='head', layer=23, unit=3" in top  # the name mover the markdown promises
    names = next(o["data"]["text/plain"] for c in code if "write_report" in c.source for o in c.outputs
                 if o.output_type == "execute_result")
    assert "report.html" in names
