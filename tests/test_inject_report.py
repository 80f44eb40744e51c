"""The causal steps of `sinkscope report` (inject, remove) on the planted organism: they run, write their
run folders and add findings with their n; the planted visual sinks are recovered as ground truth."""

from __future__ import annotations

import warnings

import pandas as pd

from sinkscope.analyses.report import STEPS, ReportConfig, run_report


def test_inject_and_remove_steps_in_the_report(organism_adapter, tmp_path):
    assert "inject" in STEPS and "remove" in STEPS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run_report(tmp_path / "report", ReportConfig(model="organism", limit=4, steps=("scan", "inject", "remove"),
                                                           viewer_samples=1), adapter=organism_adapter, log=lambda m: None)
    findings = pd.read_csv(out / "findings.csv")
    assert {"inject", "remove"} <= set(findings["step"])
    inject = findings[findings["step"] == "inject"]
    sink_scale = inject[inject["name"].str.startswith("scale at which an injected background")]["value"]
    assert len(sink_scale) == 1 and sink_scale.iloc[0] <= 1.0  # PLANTED: the organism's heads key on its sink dims
    removed = pd.read_csv(out / "remove" / "remove.csv")
    n = removed[(removed["metric"] == "n_removed") & (removed["target"] == "visual_sinks")]["value"]
    assert (n == 4).all()  # the four planted sink patches
    assert (out / "inject" / "dose_response.png").exists() and "inject/dose_response.png" in (out / "index.md").read_text()
