"""Evaluation: POPE parsing, metrics and loader, CHAIR, and the statistics (against hand computations)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sinkscope.errors import SinkscopeError
from sinkscope.eval import stats
from sinkscope.eval.chair import CaptionCounts, caption_counts, chair_from_counts, chair_scores, demo_captions
from sinkscope.eval.pope import demo_pope, load_pope, parse_yes_no, pope_metrics


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), (" yes.</s>", "yes"), ("Yes, there is a cat.", "yes"), ("YES!", "yes"),
    ("No", "no"), ("no.", "no"), ("No, there is not.", "no"), ("There is no cat in the image.", "no"),
    ("not really", "no"), ("It isn't there", "no"), ("", None), (None, None), ("a red circle", None),
    ("Yes. But no dog.", "yes"),  # only the first sentence counts (POPE's rule)
    ("<|im_start|>no<|im_end|>", "no"), ("nothing", "no"), ("yesterday", None),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_pope_metrics_hand_computed():
    preds = ["yes", "yes", "no", None, "yes", "no", "no", "yes"]
    labels = ["yes", "no", "no", "yes", "yes", "yes", "no", "yes"]
    # TP: 0,4,7 = 3; FP: 1 = 1; FN: 3 (unknown), 5 = 2; correct: 0,2,4,6,7 = 5
    m = pope_metrics(preds, labels)
    assert m.accuracy == pytest.approx(5 / 8)
    assert m.precision == pytest.approx(3 / 4)
    assert m.recall == pytest.approx(3 / 5)
    assert m.f1 == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    assert m.yes_ratio == pytest.approx(4 / 8)
    assert (m.n, m.unknown) == (8, 1)
    none = pope_metrics(["no", "no"], ["no", "no"])
    assert (none.accuracy, none.precision, none.recall, none.f1, none.yes_ratio) == (1.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(SinkscopeError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])


def _png(path, color):
    from PIL import Image

    Image.new("RGB", (8, 8), color).save(path)


def test_load_pope_format(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    _png(images / "a.jpg", (255, 0, 0))
    _png(images / "b.jpg", (0, 255, 0))
    rows = [{"question_id": 1, "image": "a.jpg", "text": "Is there a snowboard in the image?", "label": "yes"},
            {"question_id": 2, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "No"},
            {"question_id": 3, "image": "missing.jpg", "text": "Is there a car in the image?", "label": "no"},
            {"question_id": 4, "image": "b.jpg", "text": "Is there a car in the image?", "label": "yes"}]
    f = tmp_path / "coco_pope_random.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    samples = load_pope(f, image_root=images)
    assert [s.sample_id for s in samples] == ["1", "2", "4"]
    assert [s.answer for s in samples] == ["yes", "no", "yes"]
    assert samples[0].question == "Is there a snowboard in the image?" and samples[0].task == "coco_pope_random"
    assert samples[2].image().size == (8, 8)
    assert samples.skipped[0]["sample"] == "3" and "does not exist" in samples.skipped[0]["reason"]
    assert [s.sample_id for s in load_pope(f, image_root=images, limit=2)] == ["1", "2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "q", "label": "perhaps"}) + "\n")
    with pytest.raises(SinkscopeError, match=r"bad.jsonl:1 .*'yes' or 'no'"):
        load_pope(bad, image_root=images)
    bad.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "label": "yes"}) + "\n")
    with pytest.raises(SinkscopeError, match=r"lacks \['text'\]"):
        load_pope(bad, image_root=images)
    bad.write_text("{not json\n")
    with pytest.raises(SinkscopeError, match="bad.jsonl:1 is not valid JSON"):
        load_pope(bad, image_root=images)
    with pytest.raises(SinkscopeError, match="not found"):
        load_pope(tmp_path / "nope.jsonl")


def test_demo_pope_splits_balanced_and_disjoint():
    from sinkscope import world

    val, test = demo_pope("validation", "adversarial", 10), demo_pope("test", "adversarial", 10)
    assert [s.answer for s in val] == ["yes", "no"] * 5
    assert {s.sample_id for s in val}.isdisjoint({s.sample_id for s in test})
    for s in test:
        present = s.meta["category"] in world.scene("test", s.meta["scene"]).categories
        assert present == (s.answer == "yes")
    with pytest.raises(SinkscopeError, match="strategy"):
        demo_pope("test", "sneaky", 4)


def test_chair_hand_computed():
    truth = [{"red circle", "blue square"}, {"green cross"}, {"white diamond"}]
    captions = ["a large red circle at top left and a small blue square at top center .",  # 2 mentioned, 0 wrong
                "a small green cross at middle center and a large red circle at top left .",  # 2, 1 wrong
                "describe describe ."]  # nothing mentioned
    s = chair_scores(captions, truth)
    assert s.chair_i == pytest.approx(1 / 4)
    assert s.chair_s == pytest.approx(1 / 3)
    assert s.recall == pytest.approx(3 / 4)
    assert caption_counts(captions[1], truth[1]) == CaptionCounts(2, 1, 1, 1)
    assert chair_from_counts([]).n == 0
    caps = demo_captions("validation", 3)
    assert all(s.meta["objects"] and s.image() is not None for s in caps)
    assert chair_scores([s.answer for s in caps], [set(s.meta["objects"]) for s in caps]).chair_i == 0.0


def test_mcnemar_matches_a_literal_binomial():
    rng = np.random.default_rng(0)
    a, b = rng.random(60) < 0.7, rng.random(60) < 0.5
    res = stats.mcnemar_exact(a, b)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n, k = only_a + only_b, min(only_a, only_b)
    literal = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)  # two-sided exact, p = 0.5
    assert (res.only_a, res.only_b) == (only_a, only_b)
    assert res.p_value == pytest.approx(literal, rel=1e-12)
    assert stats.mcnemar_exact([True, False], [True, False]).p_value == 1.0


def test_bootstrap_ci_covers_the_truth():
    rng = np.random.default_rng(1)
    covered = 0
    for seed in range(40):
        x = rng.normal(2.0, 1.0, 80)
        lo, hi = stats.bootstrap_ci(x, n_boot=400, seed=seed)
        assert lo < x.mean() < hi
        covered += lo <= 2.0 <= hi
    assert covered >= 33  # nominal 95%: 38 of 40 expected; a loose floor against flakiness
    assert stats.bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([1.0]))
    lo, hi = stats.bootstrap_metric_ci(50, lambda idx: float(np.mean(idx < 25)), n_boot=300)
    assert lo < 0.5 < hi
    lo, hi = stats.paired_diff_ci(np.arange(30) + 1.0, np.arange(30))
    assert lo == hi == 1.0


def test_paired_tests():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, 40)
    assert stats.paired_test(x + 1.0, x) < 1e-6
    assert stats.paired_test(x, x) == 1.0
    assert stats.paired_test(x + 0.5, x, method="sign") < 1e-6
    assert 0 < stats.paired_test(x + rng.normal(0, 1, 40), x, method="t") <= 1
    with pytest.raises(ValueError, match="method"):
        stats.paired_test(x, x, method="magic")
