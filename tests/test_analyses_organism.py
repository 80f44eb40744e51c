"""On the organism (planted sink mechanism, ground_truth.json) every analysis recovers the truth.

- heads: the planted sink heads rank first by attention to visual sinks;
- contributions: planted visual sinks write far less than non-sinks (values drained) although
  they receive more attention;
- location: the share of visual sinks on background equals the share of the planted patches
  that are background in these scenes (counted from the world's masks), enrichment > 1 with a CI;
- through the CLI, each command writes index.md stating the result with its CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sinkscope.analyses.contributions import ContributionsConfig, run_contributions
from sinkscope.analyses.heads import HeadsConfig, run_heads
from sinkscope.analyses.location import LocationConfig, run_location
from sinkscope.eval.tasks import load_samples

ASSET = Path(__file__).resolve().parent.parent / "sinkscope" / "models" / "embedded" / "assets" / "organism"
LIMIT = 8


from conftest import quiet as _quiet  # noqa: E402


@pytest.fixture(scope="module")
def organism(organism_adapter):
    truth = json.loads((ASSET / "ground_truth.json").read_text())
    return organism_adapter, truth


def _kw(**over):
    kw = dict(model="organism", data="demo", limit=LIMIT, n_boot=200, calibration=8)
    kw.update(over)
    return kw


def test_planted_heads_rank_first(organism, tmp_path):
    adapter, truth = organism
    folder = _quiet(run_heads, str(tmp_path / "h"), HeadsConfig(**_kw()), adapter=adapter, log=lambda m: None,
                    figures=False)
    heads = pd.read_csv(folder.path / "head_scores.csv")
    planted = {tuple(h) for h in truth["sink_heads"]}
    top = heads.nsmallest(len(planted), "rank_visual_sink_attention")
    assert {(int(l), int(h)) for l, h in zip(top["layer"], top["head"])} == planted
    # and by a margin: the weakest planted head's CI lies above the strongest other head's
    others = heads[~heads.apply(lambda r: (int(r["layer"]), int(r["head"])) in planted, axis=1)]
    assert top["visual_sink_attention_ci_low"].min() > others["visual_sink_attention_ci_high"].max()
    corr = pd.read_csv(folder.path / "phi_attention_correlation.csv")
    assert corr.iloc[0][["spearman", "ci_low", "ci_high"]].notna().all()
    assert (folder.path / "attention_maps.csv").exists() and "top head L" in (folder.path / "index.md").read_text()


def test_planted_sinks_contribute_far_less_than_non_sinks(organism, tmp_path):
    adapter, truth = organism
    folder = _quiet(run_contributions, str(tmp_path / "c"), ContributionsConfig(**_kw()), adapter=adapter,
                    log=lambda m: None, figures=False)
    table = pd.read_csv(folder.path / "contributions.csv").set_index(["layers", "measure"])
    c = table.loc[(">= 2", "contribution")]
    a = table.loc[(">= 2", "attention")]
    assert c["ci_high"] < 0.01, c  # at least 100x less written ...
    assert a["ci_low"] > 1.0, a  # ... although sinks get more attention per token than non-sinks
    early = pd.read_csv(folder.path / "contributions_per_sample.csv")
    assert not (early[early["layer"] < truth["massive_from_layer"]]["token_class"] == "visual_sink").any()


def test_location_finds_the_planted_background_enrichment(organism, tmp_path):
    adapter, truth = organism
    folder = _quiet(run_location, str(tmp_path / "l"), LocationConfig(**_kw(limit=16)), adapter=adapter,
                    log=lambda m: None, figures=False)
    pooled = pd.read_csv(folder.path / "location.csv").iloc[0]
    samples = load_samples("demo", 16)
    masks = np.array([s.meta["background_patches"] for s in samples])  # [sample, 64]
    expected_share = masks[:, truth["sink_patches"]].mean()
    expected_base = masks.mean()
    assert pooled["n_sinks"] == len(samples) * len(truth["sink_patches"]) * (6 - truth["massive_from_layer"])
    assert pooled["sink_background_share"] == pytest.approx(expected_share)
    assert pooled["background_base_rate"] == pytest.approx(expected_base)
    assert pooled["enrichment"] == pytest.approx(expected_share / expected_base)
    assert pooled["ci_low"] > 1.0


@pytest.mark.parametrize("command", ["heads", "contributions", "location", "vit-sinks"])
def test_cli_writes_index_with_ci(command, tmp_path, organism):
    from typer.testing import CliRunner

    from sinkscope.cli import app

    out = tmp_path / command
    result = _quiet(CliRunner().invoke, app, [command, "--model", "organism", "--out", str(out), "--limit", "4",
                                              "--n-boot", "50"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    text = (out / "index.md").read_text()
    assert "PLANTED MECHANISM" in text and ("95% CI" in text or "none found" in text.lower() or "no high-norm" in text)
    assert json.loads((out / "run.json").read_text())["finished"]
