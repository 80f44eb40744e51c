"""analyses/demo_probe.py: linear probes of what image tokens carry, on planted features and the world's ground
truth."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sinkscope import world

pytest.importorskip("sklearn")
_path = Path(__file__).resolve().parents[1] / "analyses" / "demo_probe.py"
_spec = importlib.util.spec_from_file_location("_demo_probe", _path)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_object_patch_targets_follow_the_patch_owner():
    for i in range(20):
        s = world.scene("test", i)
        frame = probe.object_patch_targets(s)
        owner = s.patch_owner.reshape(-1)
        assert list(frame.patch) == [p for p in range(owner.size) if owner[p] >= 0]
        for row in frame.itertuples():
            o = s.objects[owner[row.patch]]
            assert world.SHAPES[row.shape] == o.shape and world.COLORS[row.colour] == o.color
            assert row.small_in_multi == (o.size == "small" and len(s.objects) > 1)


def _planted(n: int, rng, signal: float) -> tuple[np.ndarray, pd.DataFrame]:
    """Features [n, 16]: the shape one-hot times `signal` in dims 0-4, noise elsewhere; colour never planted."""
    targets = pd.DataFrame({"shape": rng.integers(0, 5, n), "colour": rng.integers(0, 6, n),
                            "small_in_multi": rng.random(n) < 0.3})
    x = rng.normal(size=(n, 16))
    x[np.arange(n), targets["shape"].to_numpy()] += signal
    return x, targets


def test_a_planted_shape_is_read_and_an_absent_colour_is_not():
    rng = np.random.default_rng(0)
    fit_x, fit_t = _planted(1500, rng, signal=4.0)
    eval_x, eval_t = _planted(600, rng, signal=4.0)
    table = probe.probe_table({"vision": fit_x, "layer 0": fit_x}, fit_t, {"vision": eval_x, "layer 0": eval_x}, eval_t)
    get = lambda target, subset="all": table[(table.site == "vision") & (table.target == target)  # noqa: E731
                                             & (table.subset == subset)].iloc[0]
    assert get("shape").accuracy > 0.95  # the planted one-hot is linearly readable
    assert get("colour").accuracy < 0.25  # six balanced classes, nothing planted: chance is 1/6
    assert get("colour", "small object, multi-object scene").n == int(eval_t.small_in_multi.sum())
    majority = eval_t.colour.eq(fit_t.colour.mode().iloc[0]).mean()
    assert get("colour").majority == pytest.approx(majority)
    lines = probe.summary_lines(table)
    assert lines[0].startswith("owner's shape") and f"{get('shape').accuracy:.3f}" in lines[0]


def test_the_probe_figure_is_written(tmp_path):
    from sinkscope import plots

    rng = np.random.default_rng(1)
    fit_x, fit_t = _planted(300, rng, signal=3.0)
    table = probe.probe_table({"vision": fit_x, "layer 0": fit_x, "layer 30": fit_x}, fit_t,
                              {"vision": fit_x, "layer 0": fit_x, "layer 30": fit_x}, fit_t)
    plots.probe_accuracies(table, tmp_path / "probes.png")
    assert (tmp_path / "probes.png").stat().st_size > 0
