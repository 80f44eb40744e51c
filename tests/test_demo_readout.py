"""analyses/demo_readout.py: attention at the answer position split by what the image tokens show, on planted
attention and the world's ground truth."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from sinkscope import world

_path = Path(__file__).resolve().parents[1] / "analyses" / "demo_readout.py"
_spec = importlib.util.spec_from_file_location("_demo_readout", _path)
readout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readout)


def _two_object_scene() -> world.Scene:
    for i in range(2000):
        s = world.scene("test", i)
        if len(s.objects) == 2 and s.objects[0].shape != s.objects[1].shape and s.objects[0].color != s.objects[1].color:
            return s
    raise AssertionError("no such scene")


def test_the_asked_and_the_named_object_come_from_the_scene():
    s = _two_object_scene()
    a, b = s.objects
    assert readout.asked_and_named(s, "color", a.category, a.color) == (0, [])
    assert readout.asked_and_named(s, "color", a.category, b.color) == (0, [1])
    assert readout.asked_and_named(s, "position", b.category, a.position_words) == (1, [0])
    assert readout.asked_and_named(s, "color", b.category, "chartreuse") == (1, [])


def test_planted_attention_is_split_by_patch_owner():
    s = _two_object_scene()
    owner = s.patch_owner.reshape(-1)
    attention = np.zeros(owner.size)
    attention[owner == 1] = 0.3 / (owner == 1).sum()  # the named object
    attention[owner == 0] = 0.1 / (owner == 0).sum()  # the asked object
    attention[owner == -1] = 0.2 / (owner == -1).sum()
    m = readout.attention_masses(attention, owner, asked=0, named=[1])
    assert np.isclose(m["asked"], 0.1) and np.isclose(m["named"], 0.3) and np.isclose(m["background"], 0.2)
    assert np.isclose(m["other_objects"], 0.0) and np.isclose(m["image"], 0.6)
    assert np.isclose(m["asked_share"], 0.25) and np.isclose(m["named_share"], 0.75)
    assert np.isclose(m["asked_token_share"], (owner == 0).sum() / (owner >= 0).sum())
    assert np.isclose(m["asked_selectivity"], 0.25 / m["asked_token_share"])
    assert np.isclose(m["named_selectivity"], 0.75 / m["named_token_share"])
    # uniform attention over the image gives each object its token share
    uniform = readout.attention_masses(np.full(owner.size, 1 / owner.size), owner, asked=0, named=[])
    assert np.isclose(uniform["asked_share"], uniform["asked_token_share"]) and np.isnan(uniform["named_share"])
    assert np.isclose(uniform["asked_selectivity"], 1.0)


def test_the_summary_reports_the_most_selective_layer_of_right_answers():
    rows = []
    for layer, share in enumerate([0.3, 0.9, 0.4]):
        for k in range(4):
            rows.append({"task": "position", "outcome": "correct", "layer": layer, "asked_share": share,
                         "named_share": np.nan, "asked_token_share": 0.3, "named_token_share": np.nan,
                         "asked_selectivity": share / 0.3, "named_selectivity": np.nan, "image": 0.5})
            rows.append({"task": "position", "outcome": "binding error", "layer": layer, "asked_share": 0.2,
                         "named_share": 0.7, "asked_token_share": 0.4, "named_token_share": 0.35,
                         "asked_selectivity": 0.5, "named_selectivity": 2.0, "image": 0.5})
    table = pd.DataFrame(readout.summarize(pd.DataFrame(rows)))
    lines = readout.summary_lines(table)
    assert len(lines) == 1 and lines[0].startswith("position: at layer 1 ")
    assert "asked object 3.00 [3.00, 3.00] times uniform" in lines[0] and "(0.90 of object attention" in lines[0]
    assert "asked object 0.50 [0.50, 0.50] times uniform" in lines[0] and "name 2.00 [2.00, 2.00]" in lines[0]
    assert lines[0].endswith("0.40 and 0.35, n 4)")


def test_per_head_selectivity_finds_the_one_selective_head():
    s = _two_object_scene()
    owner = s.patch_owner.reshape(-1)
    heads = np.full((3, owner.size), 1 / owner.size)  # heads 0 and 2 uniform
    heads[1] = np.where(owner == 0, 1.0, 0.0) / (owner == 0).sum()  # head 1 looks only at object 0
    selectivity = readout.head_selectivity(heads, owner, asked=0)
    token_share = (owner == 0).sum() / (owner >= 0).sum()
    assert np.allclose(selectivity, [1.0, 1 / token_share, 1.0])
    rows = [{"task": "color", "outcome": o, "layer": 4, "head": h, "asked_selectivity": v}
            for o in ("correct", "binding error") for h, v in enumerate(selectivity)]
    line = readout.top_heads(pd.DataFrame(rows), k=1)[0]
    assert line.startswith(f"color, most selective heads for right answers (times uniform): L4.H1 {1 / token_share:.2f}")
