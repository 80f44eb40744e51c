"""Every runnable script in analyses/, scripts/ and benchmarks/ imports cleanly.

These scripts are run by hand (the demo's card, held-out and image-use measurements, the benchmarks), so a refactor of
the package can break one without any other test noticing: an import of a renamed function is caught here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for folder in ("analyses", "scripts", "benchmarks") for p in (ROOT / folder).glob("*.py")
                 if p.name != "__init__.py")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_imports(path):
    spec = importlib.util.spec_from_file_location(f"_script_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)  # runs the module's top level, not its __main__ block
    finally:
        sys.modules.pop(spec.name, None)
    if "if __name__ == \"__main__\":" in path.read_text():
        assert callable(getattr(module, "main", None)) or hasattr(module, "app"), f"{path.name}: nothing to run"
