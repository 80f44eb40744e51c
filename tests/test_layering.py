"""Imports point one way: the order is declared once, in `sinkscope.layers.LAYERS`, and read from there.

Every module of the package is parsed (ast, nothing is imported); every import it makes (module level or
inside a function, absolute or relative) must go to its own layer or a layer below, and the import graph
between modules has no cycle. The package never imports the programs of scripts/. ARCHITECTURE.md lists
the same layers in the same order.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from sinkscope.layers import LAYERS, layer_of, rank

PACKAGE = Path(__file__).resolve().parent.parent / "sinkscope"
ARCHITECTURE = PACKAGE.parent / "ARCHITECTURE.md"


def imported_modules(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved against the package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(package.parent).with_suffix("").parts
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


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (an imported name resolves to the module that defines it)."""
    files = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    graph = {}
    for mod, path in files.items():
        targets = set()
        for imp in imported_modules(path, package):
            if imp == "sinkscope":  # `from sinkscope import x` names sinkscope.x; the root alone is no edge
                continue
            parts = imp.split(".")
            while parts and ".".join(parts) not in files:
                parts.pop()
            if parts and ".".join(parts) != "sinkscope" and ".".join(parts) != mod:
                targets.add(".".join(parts))
        # `from sinkscope.models import llava` imports the package only as llava's parent: no edge of its own
        graph[mod] = {t for t in targets if not (files[t].name == "__init__.py" and any(u.startswith(t + ".") for u in targets))}
    return graph


def violations(package: Path) -> list[str]:
    bad = []
    graph = import_graph(package)
    for mod in sorted(graph):
        if layer_of(mod) is None:
            bad.append(f"{mod} is in no layer: add it to sinkscope/layers.py LAYERS")
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            lm, lt = layer_of(mod), layer_of(t)
            if lm and lt and rank(lt) > rank(lm):
                bad.append(f"{mod} ({lm}) imports {t} ({lt}), a layer above")
    for path in sorted(package.rglob("*.py")):
        for imp in imported_modules(path, package):
            if imp == "scripts" or imp.startswith("scripts."):
                bad.append(f"{module_name(path, package)} imports {imp}: the library never imports scripts/")
    bad += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_import_goes_down_the_declared_layers_and_none_cycles():
    assert violations(PACKAGE) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "sinkscope"
    for name, text in files.items():
        f = pkg / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return pkg


@pytest.mark.parametrize("files, expected", [
    ({"measures/__init__.py": "", "measures/x.py": "from sinkscope.models.base import PAD\n",
      "models/__init__.py": "", "models/base.py": ""}, "sinkscope.measures.x (measures) imports sinkscope.models.base"),
    ({"eval/__init__.py": "", "eval/x.py": "def f():\n    from sinkscope.analyses.scan import run_scan\n",
      "analyses/__init__.py": "", "analyses/scan.py": ""}, "sinkscope.eval.x (eval) imports sinkscope.analyses.scan"),
    ({"measures/__init__.py": "", "measures/x.py": "from ..models import base\n",
      "models/__init__.py": "", "models/base.py": ""}, "sinkscope.measures.x (measures) imports sinkscope.models.base"),
    ({"eval/__init__.py": "", "eval/a.py": "def f():\n    import sinkscope.eval.b\n",
      "eval/b.py": "from sinkscope.eval import a\n"}, "import cycle: sinkscope.eval.a -> sinkscope.eval.b -> sinkscope.eval.a"),
    ({"newthing.py": ""}, "sinkscope.newthing is in no layer"),
    ({"eval/__init__.py": "", "eval/a.py": "from scripts import train_tiny\n"}, "the library never imports scripts/"),
])
def test_the_checker_is_not_vacuous(tmp_path, files, expected):
    """Upward imports (module level, inside functions, relative), cycles inside a layer, undeclared modules
    and imports of scripts/ are all seen."""
    found = violations(_write(tmp_path, files))
    assert any(expected in v for v in found), found


def test_architecture_md_lists_the_declared_layers_in_order():
    """ARCHITECTURE.md's layer table (bottom row = first layer) names the layers of LAYERS, in the same order."""
    rows = re.findall(r"^\|\s*`?([a-z]+)`?\s*\|", ARCHITECTURE.read_text(), flags=re.M)
    documented = [r for r in rows if r not in ("layer",)]
    assert list(reversed(documented)) == [name for name, _ in LAYERS]


def test_old_imports_of_token_kinds_still_work():
    import sinkscope.kinds as kinds
    from sinkscope.models import TokenKinds, token_kinds_from_ids
    from sinkscope.models.base import KIND_NAMES

    assert TokenKinds is kinds.TokenKinds and token_kinds_from_ids is kinds.token_kinds_from_ids
    assert KIND_NAMES is kinds.KIND_NAMES
