"""analyses/demo_readout_knockout.py: key sets from the world's patch owners, and the paired summary on planted
answers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sinkscope import world

_path = Path(__file__).resolve().parents[1] / "analyses" / "demo_readout_knockout.py"
_spec = importlib.util.spec_from_file_location("_demo_readout_knockout", _path)
ko = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ko)


def test_layers_parse():
    assert ko.parse_layers("20-24") == [20, 21, 22, 23, 24]
    assert ko.parse_layers("3,5-6") == [3, 5, 6]


def test_the_control_matches_the_asked_objects_count_on_other_objects():
    rng = np.random.default_rng(0)
    checked = 0
    for i in range(60):
        s = world.scene("test", i)
        if len(s.objects) < 2:
            continue
        owner = s.patch_owner.reshape(-1)
        for k in range(len(s.objects)):
            asked, control = ko.object_keys(owner, k, rng)
            assert np.array_equal(asked, owner == k)
            assert not (asked & control).any() and (owner[control] >= 0).all()  # other objects only
            others = ((owner >= 0) & (owner != k)).sum()
            assert control.sum() == min(asked.sum(), others)
            checked += 1
    assert checked > 30


def test_the_summary_pairs_each_condition_with_no_knockout_and_its_control():
    keys = [f"q{i}" for i in range(4)]
    truth = {"none": [1, 1, 1, 0], "asked, all layers": [0, 0, 1, 0], "control, all layers": [1, 1, 1, 1]}
    rows = [{"task": "position", "condition": c, "key": k, "correct": bool(v), "other_object": not v}
            for c, values in truth.items() for k, v in zip(keys, values)]
    table = ko.summarize(pd.DataFrame(rows)).set_index("condition")
    assert table.loc["none", "accuracy"] == 0.75 and table.loc["none", "change"] == 0
    assert table.loc["asked, all layers", "change"] == pytest.approx(-0.5)
    assert table.loc["asked, all layers", "vs_control"] == pytest.approx(-0.75)
    assert table.loc["control, all layers", "change"] == pytest.approx(0.25)
    line = ko.summary_lines(table.reset_index())[0]
    assert line.startswith("position: accuracy 0.75 without knockout (n 4)") and "against the control -0.75" in line
