"""The shipped demo (SmolLM2-135M LLaVA) against its model card: numbers re-measured within noise."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from sinkscope.models.embedded import smolvlm

CARD = smolvlm.ASSETS / "card.json"
N_QUESTIONS = 40


@pytest.fixture(scope="module")
def card() -> dict:
    if not CARD.exists() or not (smolvlm.ASSETS / smolvlm.TRAINED_FILE).exists():
        pytest.skip(f"{CARD} is not written yet (python -m scripts.demo_card)")
    return json.loads(CARD.read_text())


@pytest.fixture(scope="module")
def demo(card):
    from sinkscope.models import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load("demo")


def test_demo_is_a_llava_on_the_pretrained_llm(demo):
    assert demo.family == "llava" and type(demo.model).__name__ == "LlavaForConditionalGeneration"
    assert (demo.num_layers, demo.hidden_size, demo.num_heads, demo.num_kv_heads) == (30, 576, 9, 3)


@pytest.mark.parametrize("task", ["pope-random", "count", "color", "position"])
def test_accuracy_matches_the_card(demo, card, task):
    from sinkscope.eval.accuracy import generate_answers, score_samples
    from sinkscope.eval.tasks import load_samples

    expected = float(card["accuracy"][task])
    samples = load_samples(f"demo:{task}", N_QUESTIONS)
    answers = generate_answers(demo, samples, max_new_tokens=4, batch_size=20)
    got = float(score_samples(samples, answers)["correct"].mean())
    p = min(max(expected, 1 / N_QUESTIONS), 1 - 1 / N_QUESTIONS)
    se = math.sqrt(p * (1 - p) / N_QUESTIONS)
    assert abs(got - expected) <= 3 * se + 1e-9, f"{task}: {got:.3f} on {N_QUESTIONS}, card {expected:.3f}"


def test_scan_rediscovers_the_cards_sink_dims_and_magnitudes(demo, card, tmp_path):
    """A short scan finds the card's sink dims by discovery, and its per-layer top1/median within noise."""
    import pandas as pd

    from sinkscope.analyses.scan import ScanConfig, run_scan

    run_scan(str(tmp_path), ScanConfig(model="demo", data="demo", limit=8, batch_size=8, calibration=8),
             adapter=demo, figures=False, log=lambda m: None)
    dims = json.loads((tmp_path / "sink_dims.json").read_text())
    assert dims["method"] != "pinned" and dims["dims"] == card["sink_dims"]["dims"]
    mags = pd.read_csv(tmp_path / "layer_magnitudes.csv").set_index("layer")
    for row in card["layers"]:
        ratio = mags.loc[row["layer"], "top1_over_median"]
        assert 0.5 * row["top1_over_median"] <= ratio <= 2.0 * row["top1_over_median"], row["layer"]


def test_unseen_scenes_answer_as_well_as_the_card_says(demo, card):
    """Held-out: POPE-adversarial on test scenes from 1,000,000 on (never evaluated elsewhere) agrees with the
    card's test-split accuracy within noise (3 SE of the two proportions' difference)."""
    from sinkscope import world
    from sinkscope.eval.accuracy import generate_answers
    from sinkscope.eval.pope import parse_yes_no
    from sinkscope.eval.tasks import Sample

    expected, n_card = float(card["accuracy"]["pope-adversarial"]), int(card["accuracy_n"]["pope-adversarial"])
    qs = world.pope_questions("test", "adversarial", N_QUESTIONS // 2, start=1_000_000)
    samples = [Sample(f"heldout-{i}", q.question, None, q.answer, task="existence-adversarial",
                      _image=world.scene("test", q.scene_index).pil()) for i, q in enumerate(qs)]
    answers = generate_answers(demo, samples, max_new_tokens=4, batch_size=20)
    got = sum(parse_yes_no(a) == s.answer for a, s in zip(answers, samples)) / len(samples)
    p = min(max(expected, 1 / N_QUESTIONS), 1 - 1 / N_QUESTIONS)
    se = math.sqrt(p * (1 - p) * (1 / N_QUESTIONS + 1 / n_card))
    assert abs(got - expected) <= 3 * se + 1e-9, f"held-out {got:.3f} on {len(samples)}, card {expected:.3f}"
