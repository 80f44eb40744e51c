"""Import rules of design.md, checked by parsing every module's imports (ast, nothing is imported).

- measures/ import nothing from models/ (token kinds and errors come from the bottom modules
  sinkscope.kinds and sinkscope.errors);
- nothing in demo/ imports from analyses/ (a script above both composes them);
- the bottom modules (kinds, errors) import no other sinkscope module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sinkscope"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved against the package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(parts[: len(parts) - node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from sinkscope import models`
    return out


def _violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((PACKAGE / folder).rglob("*.py")) if folder else [PACKAGE / "kinds.py", PACKAGE / "errors.py"]:
        for mod in imported_modules(path):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {mod}")
    return bad


def test_measures_import_nothing_from_models():
    assert not _violations("measures", ("sinkscope.models",))


def test_demo_imports_nothing_from_analyses():
    assert not _violations("demo", ("sinkscope.analyses",))


def test_bottom_modules_import_no_other_layer():
    assert not _violations("", ("sinkscope.models", "sinkscope.measures", "sinkscope.trace", "sinkscope.analyses",
                                "sinkscope.eval", "sinkscope.interventions", "sinkscope.demo"))


@pytest.mark.parametrize("source, expected", [
    ("from sinkscope.models.base import PAD\n", "sinkscope.models.base"),
    ("import sinkscope.models\n", "sinkscope.models"),
    ("def f():\n    from sinkscope.analyses.scan import run_scan\n", "sinkscope.analyses.scan"),
    ("from ..models import base\n", "sinkscope.models"),
])
def test_the_checker_sees_imports(tmp_path, source, expected, monkeypatch):
    """The rule is not vacuous: imports at module level, inside functions and relative ones are seen."""
    pkg = tmp_path / "sinkscope" / "measures"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text(source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "sinkscope")
    assert expected in imported_modules(f)


def test_old_imports_of_token_kinds_still_work():
    import sinkscope.kinds as kinds
    from sinkscope.models import TokenKinds, token_kinds_from_ids
    from sinkscope.models.base import KIND_NAMES

    assert TokenKinds is kinds.TokenKinds and token_kinds_from_ids is kinds.token_kinds_from_ids
    assert KIND_NAMES is kinds.KIND_NAMES
