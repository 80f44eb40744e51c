"""The demo card states which competence targets (issue 13) are met and by how much each missed one falls short."""

import pandas as pd

from scripts.smolvlm_card import target_gaps


def test_target_gaps_names_met_and_missed_targets_with_their_distance():
    table = pd.DataFrame([
        {"task": "pope-random", "accuracy": 0.90, "yes_ratio": 0.50, "chair_i": float("nan")},
        {"task": "pope-adversarial", "accuracy": 0.80, "yes_ratio": 0.70, "chair_i": float("nan")},
        {"task": "count", "accuracy": 0.96, "yes_ratio": float("nan"), "chair_i": float("nan")},
        {"task": "caption", "accuracy": 0.0, "yes_ratio": float("nan"), "chair_i": 0.25},
    ])
    text = target_gaps(table)
    met, missed = text.split("**Missed**")
    assert "pope-random accuracy 0.9" in met and "count accuracy 0.96" in met and "pope-random yes-ratio 0.5" in met
    assert "pope-adversarial accuracy 0.8 (0.02 short of 0.82)" in missed
    assert "caption CHAIR_i 0.25 (0.1 above 0.15)" in missed
    assert "pope-adversarial yes-ratio 0.7 (outside 0.4-0.6)" in missed
    assert "position" not in text  # a task the table lacks is not judged


def test_the_error_analysis_appears_in_the_card_as_measured():
    from scripts.smolvlm_card import _extra_sections

    lines = ["color: accuracy 0.83 [0.77, 0.88] (n 170)", "caption: hallucinated objects 71"]
    text = "".join(_extra_sections({"errors": {"lines": lines}, "errors_text": "All are binding errors."}))
    assert "## What its errors are" in text and "All are binding errors." in text
    assert all(f"- {line}\n" in text for line in lines)
    assert "What its errors are" not in "".join(_extra_sections({}))  # not measured: no section


def test_the_readout_appears_in_the_card_with_its_figure(tmp_path):
    from scripts.smolvlm_card import _extra_sections

    lines = ["position: at layer 22 right answers attend to the asked object 2.28 [2.05, 2.52] times uniform"]
    text = "".join(_extra_sections({"readout": {"lines": lines, "figure": "x/readout.png"}, "readout_text": "Selects."}))
    assert "## Where the answer position looks" in text and "Selects." in text and f"- {lines[0]}\n" in text
    assert "(readout.png)" in text
    assert "readout.png" not in "".join(_extra_sections({"readout": {"lines": lines}}))  # no figure given: none shown
    assert "Where the answer" not in "".join(_extra_sections({}))


def test_the_probe_appears_in_the_card_with_its_figure():
    from scripts.smolvlm_card import _extra_sections

    lines = ["owner's shape read linearly from the image tokens: vision features 0.977, LLM input 0.95"]
    text = "".join(_extra_sections({"probe": {"lines": lines, "figure": "probes.png"}, "probe_text": "Carries."}))
    assert "## What its image tokens carry" in text and "Carries." in text and f"- {lines[0]}\n" in text
    assert "(probes.png)" in text
    assert "probes.png" not in "".join(_extra_sections({"probe": {"lines": lines}}))
    assert "image tokens carry" not in "".join(_extra_sections({}))
