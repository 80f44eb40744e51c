"""The embedded models ('demo', 'organism') shipped in sinkscope/models/embedded/assets, when present.

For each: `sinkscope.models.load(name)` works offline; greedy generation is deterministic; held-out
accuracy on a small sample of 'pope-random' and 'count' questions is within binomial noise (3
standard errors) of the numbers in the model's card.json. Skipped while an asset is absent (and
the accuracy check while its card.json is).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent.parent / "sinkscope" / "models" / "embedded" / "assets"
N_QUESTIONS = 40
TASKS = ("pope-random", "count")


def _asset(name: str) -> Path:
    path = ASSETS / name
    if not (path / "config.json").exists():
        pytest.skip(f"the embedded model {name!r} is not built yet ({path} has no config.json)")
    return path


@pytest.fixture(scope="module", params=["tiny", "organism"])
def embedded(request):
    """(name, adapter), loaded with the hub switched off."""
    from sinkscope.models import load
    from sinkscope.models.registry import embedded_path

    name = request.param
    path = _asset(name)
    assert embedded_path(name) == path.resolve()
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = load(name)
    finally:
        mp.undo()
    return name, adapter


def test_loads_offline(embedded):
    name, adapter = embedded
    assert adapter.family == "llava" and adapter.name == name
    assert adapter.processor is not None and adapter.text_attention == "eager"
    assert not adapter.model.training
    from sinkscope import world

    batch = adapter.prepare(["how many objects are there ?"], [world.scene("test", 0).pil()])
    tok = adapter.processor.tokenizer
    ids = batch["input_ids"][0]
    assert ids[0] == tok.bos_token_id and int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == 64
    if name == "organism":
        truth = json.loads((ASSETS / name / "ground_truth.json").read_text())
        assert "PLANTED" in truth["note"]


def test_generation_is_deterministic(embedded):
    from sinkscope.eval.accuracy import generate_answers
    from sinkscope.eval.tasks import load_samples

    _, adapter = embedded
    samples = load_samples("demo:mixed", 8)
    first = generate_answers(adapter, samples, max_new_tokens=4, batch_size=4)
    second = generate_answers(adapter, samples, max_new_tokens=4, batch_size=8)
    assert first == second
    assert len(first) == 8 and all(isinstance(a, str) for a in first)


def _standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n questions; p kept off 0 and 1 so a
    card at 100% still tolerates a single miss in a small sample."""
    p = min(max(p, 1.0 / n), 1.0 - 1.0 / n)
    return math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("task", TASKS)
def test_accuracy_matches_the_card(embedded, task):
    from sinkscope.eval.accuracy import generate_answers, score_samples
    from sinkscope.eval.tasks import load_samples

    name, _ = embedded
    card_path = ASSETS / name / "card.json"
    if not card_path.exists():
        pytest.skip(f"{card_path} is not written yet (python -m scripts.card)")
    card = json.loads(card_path.read_text())
    if task not in card.get("accuracy", {}):
        pytest.skip(f"{card_path} has no accuracy for {task!r}")
    expected = float(card["accuracy"][task])
    _, adapter = embedded
    samples = load_samples(f"demo:{task}", N_QUESTIONS)
    assert len(samples) == N_QUESTIONS
    answers = generate_answers(adapter, samples, max_new_tokens=4, batch_size=N_QUESTIONS)
    got = float(score_samples(samples, answers)["correct"].mean())
    # the card measured the first n_card questions of the same sequence; ours are its first 40, so
    # the sampling noise of the difference is below that of 40 questions alone
    se = _standard_error(expected, N_QUESTIONS)
    assert abs(got - expected) <= 3 * se + 1e-9, (
        f"{name} {task}: accuracy {got:.3f} on {N_QUESTIONS} questions, card says {expected:.3f} "
        f"(3 SE = {3 * se:.3f})")
