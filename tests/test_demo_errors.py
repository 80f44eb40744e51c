"""analyses/demo_errors.py: binding errors told apart from the rest, on answers planted from the world's ground truth."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from sinkscope import world

_path = Path(__file__).resolve().parents[1] / "analyses" / "demo_errors.py"
_spec = importlib.util.spec_from_file_location("_demo_errors", _path)
errors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(errors)


def _scene_with(n_objects: int, distinct_colours: bool = True) -> world.Scene:
    for i in range(2000):
        s = world.scene("test", i)
        shapes = [o.shape for o in s.objects]
        colours = [o.color for o in s.objects]
        if (len(s.objects) == n_objects and len(set(shapes)) == n_objects
                and (not distinct_colours or len(set(colours)) == n_objects)):
            return s
    raise AssertionError("no such scene in the first 2000")


def test_colour_and_position_answers_are_classified_against_the_scene():
    s = _scene_with(3)
    target, other = s.objects[0], s.objects[1]
    unused = next(c for c in world.COLORS if c not in {o.color for o in s.objects})
    assert errors.classify_answer(s, "color", target.color, f" {target.color.upper()}.") == "correct"
    assert errors.classify_answer(s, "color", target.color, other.color) == "other object"
    assert errors.classify_answer(s, "color", target.color, unused) == "absent"
    assert errors.classify_answer(s, "position", target.position_words, other.position_words) == "other object"
    free = next(f"{r} {c}" for r in world.ROW_WORDS for c in world.COL_WORDS
                if f"{r} {c}" not in {o.position_words for o in s.objects})
    assert errors.classify_answer(s, "position", target.position_words, free) == "absent"


def test_a_conjunction_is_an_absent_pairing_of_present_colour_and_shape():
    s = _scene_with(2)
    a, b = s.objects
    assert errors.is_conjunction(s, f"{a.color} {b.shape}") == (f"{a.color} {b.shape}" not in s.categories)
    assert not errors.is_conjunction(s, a.category)  # present: not a hallucination at all
    unused = next(c for c in world.COLORS if c not in {o.color for o in s.objects})
    assert not errors.is_conjunction(s, f"{unused} {a.shape}")
    # chance: the absent categories that pair a present colour with a present shape, counted by hand
    colours, shapes = {o.color for o in s.objects}, {o.shape for o in s.objects}
    absent = [c for c in world.all_categories() if c not in s.categories]
    by_hand = sum(c.split()[0] in colours and c.split()[1] in shapes for c in absent) / len(absent)
    assert errors.conjunction_chance(s) == pytest.approx(by_hand)
    caption = f"a large {a.color} {b.shape} at top left and a small {unused} {a.shape} at top right and {a.category} ."
    named = errors.caption_hallucinations(s, caption)
    assert {h["category"] for h in named} == {f"{a.color} {b.shape}", f"{unused} {a.shape}"} - s.categories
    assert {h["category"]: h["conjunction"] for h in named}.get(f"{unused} {a.shape}") is False


def test_summary_rates_count_the_planted_errors():
    """Three colour questions about 2-object scenes: right, another object's colour, a colour no object has; one
    existence question on a conjunction answered yes, one on a non-conjunction answered no."""
    s = _scene_with(2)
    a, b = s.objects
    unused = next(c for c in world.COLORS if c not in {o.color for o in s.objects})
    conj = f"{a.color} {b.shape}"
    other_shape = next(sh for sh in world.SHAPES if sh not in {o.shape for o in s.objects})
    plain = f"{unused} {other_shape}"
    rows = [("color", a.color, a.color, a.category), ("color", a.color, b.color, a.category),
            ("color", a.color, unused, a.category),
            ("pope-adversarial", "no", "Yes", conj), ("pope-adversarial", "no", "no", plain)]
    frame = pd.DataFrame([{"task": t, "scene": s.index, "category": c, "question": "", "truth": truth, "answer": ans,
                           "n_objects": 2} for t, truth, ans, c in rows])
    summary = {r["task"]: r for r in errors.summarize(frame)}
    colour = summary["color"]
    assert colour["accuracy"]["rate"] == pytest.approx(1 / 3) and colour["accuracy"]["n"] == 3
    assert colour["accuracy, 1 object"]["n"] == 0 and colour["accuracy, 2-4 objects"]["n"] == 3
    assert colour["wrong answers naming another object's"]["rate"] == pytest.approx(0.5)
    small_beside_large = a.size == "small" and b.size == "large"
    assert colour["accuracy, asked object small beside a large one"]["n"] == 3 * small_beside_large
    assert colour["accuracy, other 2-4 object scenes"]["n"] == 3 * (not small_beside_large)
    pope = summary["pope-adversarial"]
    assert pope["said yes, conjunction"]["rate"] == 1.0 and pope["said yes, not a conjunction"]["rate"] == 0.0
    assert pope["false yes that are conjunctions"]["rate"] == 1.0
    assert "color: accuracy 0.33" in errors.summary_lines(errors.summarize(frame))[0]
