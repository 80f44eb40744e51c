"""The layers of sinkscope, bottom first: each module may import only from its own layer and the layers below.

This tuple is the one declaration of the import direction. tests/test_layering.py reads it and fails on
any import against it (module level or inside a function) and on any import cycle between modules;
ARCHITECTURE.md describes the same layers in the same order (a test checks that too).
A new module belongs to a layer by its name: add it to the entry that fits, or the test names it.
"""

from __future__ import annotations

# (layer name, the modules and packages in it, relative to `sinkscope`)
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("kinds", "errors", "devices", "launcher", "runconfig", "runfolder", "layers")),
    ("measures", ("measures",)),
    ("world", ("world",)),
    ("models", ("models",)),
    ("trace", ("trace", "calibration", "eager")),
    ("interventions", ("interventions",)),
    ("eval", ("eval",)),
    ("presentation", ("findings", "questions", "plots", "markdown", "viewer")),
    ("analyses", ("analyses",)),
    ("fronts", ("cli", "__init__")),
)


def layer_of(module: str) -> str | None:
    """The layer of a sinkscope module ('sinkscope.eval.pope' -> 'eval'); None when no entry claims it."""
    if module == "sinkscope":
        return "fronts"
    rel = module.removeprefix("sinkscope.")
    for name, members in LAYERS:
        if any(rel == m or rel.startswith(m + ".") for m in members):
            return name
    return None


def rank(layer: str) -> int:
    return [name for name, _ in LAYERS].index(layer)
