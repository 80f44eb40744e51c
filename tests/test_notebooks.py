"""The exploration notebooks (jupytext percent scripts) run end to end."""

import runpy
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.py"))
ASSETS = Path(__file__).resolve().parent.parent / "sinkscope" / "demo" / "assets"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, capsys):
    if not all((ASSETS / name / "config.json").exists() for name in ("tiny", "organism")):
        pytest.skip("embedded models not built")
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "sink dims" in out and "layer" in out
