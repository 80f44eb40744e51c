"""The notebooks (notebooks/*.ipynb, paired with their jupytext percent scripts) are stored
without outputs, match their scripts, and run end to end in a Jupyter kernel (nbclient) on the
embedded `organism` model (tiny and fast, with planted sinks); users run them on `demo`.

Regenerate a notebook after editing its script: `jupytext --to ipynb notebooks/NAME.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ASSETS = ROOT / "sinkscope" / "models" / "embedded" / "assets"
# what each notebook must print when it ran on the test model
EXPECT = {
    "01_explore_sinks.ipynb": ["sink dims", "discovered"],
    "02_quickstart.ipynb": ["sink dims: [", "visual sink tokens"],
    "03_bring_your_own_model.ipynb": ["loaded from", "sink dims", "index.md"],
    "04_ablations.ipynb": ["knockout", "answer"],
    "05_heads_and_var.ipynb": ["VAR: sink dims", "heads VAR edited", "VAR changed"],
}


def _code(nb) -> list[str]:
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_stored_without_outputs_and_paired(path):
    nbformat = pytest.importorskip("nbformat", reason="pip install -e .[test] (nbformat)")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear outputs before committing"
    script = path.with_suffix(".py")
    assert script.exists(), f"{path.name} has no paired jupytext script {script.name}"
    jupytext = pytest.importorskip("jupytext", reason="pip install -e .[test] (jupytext)")
    assert _code(jupytext.read(script)) == _code(nb), (
        f"{path.name} differs from {script.name}; run `jupytext --to ipynb {script.relative_to(ROOT)}`")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="pip install -e .[test] (nbformat)")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e .[test] (nbclient, ipykernel)")
    if not all((ASSETS / name / "config.json").exists() for name in ("tiny", "organism")):
        pytest.skip("embedded models not built")
    monkeypatch.setenv("SINKSCOPE_NOTEBOOK_MODEL", "organism")
    monkeypatch.setenv("SINKSCOPE_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if o.get("output_type") == "stream")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors
    for needle in EXPECT.get(path.name, []):
        assert needle in text, f"{path.name}: {needle!r} not in its output:\n{text[-2000:]}"
