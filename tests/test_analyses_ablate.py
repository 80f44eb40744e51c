"""`sinkscope ablate` (knockout). Needs sinkscope.interventions.knockout (written in parallel); the
tests that run a knockout skip until it exists. Bad input is checked without it."""

from __future__ import annotations

import importlib.util
import warnings

import pandas as pd
import pytest

from sinkscope.analyses.ablate import AblateConfig, check_layers, run_ablate
from sinkscope.errors import SinkscopeError
from sinkscope.models import adapter_for_model

HAS_KNOCKOUT = importlib.util.find_spec("sinkscope.interventions.knockout") is not None
needs_knockout = pytest.mark.skipif(not HAS_KNOCKOUT, reason="sinkscope.interventions.knockout is not written yet")


def test_knockout_layer_out_of_range_names_the_fix(tiny_llava, tmp_path):
    with pytest.raises(SinkscopeError, match=r"out of range: the model has 2 layers \(0..1\); pass --layers"):
        check_layers([0, 5], 2)
    adapter = adapter_for_model(tiny_llava.model, tiny_llava.processor, name="tiny-llava")
    with warnings.catch_warnings(), pytest.raises(SinkscopeError, match="out of range"):
        warnings.simplefilter("ignore")
        run_ablate(str(tmp_path / "a"), AblateConfig(model="tiny-llava", limit=2, calibration=2, layers=[7]),
                   adapter=adapter, log=lambda m: None)


def test_bad_conditions_and_taus():
    with pytest.raises(SinkscopeError, match="conditions"):
        AblateConfig(conditions=["visual_sinks"]).validate()
    with pytest.raises(SinkscopeError, match="taus"):
        AblateConfig(taus=[0.0]).validate()


@needs_knockout
def test_ablate_on_every_family(tiny, tmp_path):
    adapter = adapter_for_model(tiny.model, tiny.processor, name=f"tiny-{tiny.family}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = run_ablate(str(tmp_path / "a"), AblateConfig(model=adapter.name, limit=2, batch_size=2, calibration=2,
                                                              n_random=2, n_boot=20), adapter=adapter, log=lambda m: None)
    table = pd.read_csv(folder.path / "ablation.csv")
    assert {"condition", "tau", "n_tokens", "metric", "value", "ci_low", "ci_high", "p_value"} <= set(table.columns)


@needs_knockout
def test_organism_controls_are_matched(tmp_path):
    """Per sample and tau: visual_sinks knocks out exactly the planted patches; random and top-non-sink
    controls knock out the same number of image tokens."""
    import json
    from pathlib import Path

    from sinkscope.models import load

    truth = json.loads((Path(__file__).resolve().parent.parent / "sinkscope/demo/assets/organism/ground_truth.json")
                       .read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = run_ablate(str(tmp_path / "a"), AblateConfig(model="organism", limit=8, n_random=3, n_boot=100),
                            adapter=load("organism"), log=lambda m: None, figures=False)
    per = pd.read_csv(folder.path / "ablation_per_sample.csv")
    swept = per[per["condition"].isin(["visual_sinks", "random_visual", "top_nonsink"])]
    assert (swept["n_tokens"] == len(truth["sink_patches"])).all()
    assert (per[per["condition"] == "bos"]["n_tokens"] == 1).all()
