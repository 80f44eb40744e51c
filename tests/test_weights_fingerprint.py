"""A run records the weights it was made with; resuming it, or a report, with other weights of the same model
name is refused (a retrained checkpoint under the same name would otherwise mix two models' rows)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from sinkscope.errors import SinkscopeError


@pytest.fixture()
def tiny_adapter():
    from sinkscope.models import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load("tiny")


def _retrain(adapter) -> None:
    """Every weight of the language model's first layer changed, as any training step would."""
    with torch.no_grad():
        for param in adapter.layers[0].parameters():
            param.mul_(1.01).add_(1e-3)


def test_fingerprint_is_stable_and_follows_the_weights(tiny_adapter):
    from sinkscope.models import load

    first = tiny_adapter.weights_fingerprint()
    assert len(first) == 16 and first == tiny_adapter.weights_fingerprint()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load("tiny").weights_fingerprint() == first  # the same weights loaded again
    _retrain(tiny_adapter)
    assert tiny_adapter.weights_fingerprint() != first


def test_resuming_a_scan_with_other_weights_is_refused(tiny_adapter, tmp_path):
    from sinkscope.analyses.scan import ScanConfig, run_scan

    cfg = dict(model="tiny", data="demo", limit=2, batch_size=2, calibration=2)
    out = tmp_path / "scan"
    run_scan(str(out), ScanConfig(**cfg), adapter=tiny_adapter, figures=False, log=lambda m: None)
    recorded = json.loads((out / "run.json").read_text())["model_fingerprint"]
    assert recorded == tiny_adapter.weights_fingerprint()
    before = (out / "run.json").read_text()
    _retrain(tiny_adapter)
    with pytest.raises(SinkscopeError, match=r"other weights of this model .*--no-resume"):
        run_scan(str(out), ScanConfig(**cfg), adapter=tiny_adapter, figures=False, log=lambda m: None)
    assert (out / "run.json").read_text() == before  # nothing lost
    run_scan(str(out), ScanConfig(**cfg), adapter=tiny_adapter, resume=False, figures=False, log=lambda m: None)
    assert json.loads((out / "run.json").read_text())["model_fingerprint"] == tiny_adapter.weights_fingerprint()


def test_a_report_with_other_weights_is_refused_then_replaced_with_force(tiny_adapter, tmp_path):
    from sinkscope.analyses import report

    cfg = report.ReportConfig(model="tiny", limit=2, steps=("scan",))
    out = tmp_path / "report"
    report.run_report(out, cfg, adapter=tiny_adapter, log=lambda m: None)
    old = json.loads((out / "report.json").read_text())["model_fingerprint"]
    _retrain(tiny_adapter)
    new = tiny_adapter.weights_fingerprint()
    with pytest.raises(SinkscopeError, match=f"other weights of tiny \\(weights fingerprint {old}, now {new}\\).*--force"):
        report.run_report(out, cfg, adapter=tiny_adapter, log=lambda m: None)
    assert json.loads((out / "report.json").read_text())["model_fingerprint"] == old  # the old report is intact
    messages = []
    report.run_report(out, cfg, adapter=tiny_adapter, log=messages.append, force=True)
    assert "[scan] running" in messages  # re-run, not kept
    assert json.loads((out / "report.json").read_text())["model_fingerprint"] == new
    assert json.loads((out / "scan" / "run.json").read_text())["model_fingerprint"] == new


def test_shards_made_with_other_weights_do_not_merge(tiny_adapter, tmp_path):
    from sinkscope.analyses.merge import merge_runs
    from sinkscope.analyses.scan import ScanConfig, run_scan

    cfg = dict(model="tiny", data="demo", limit=4, batch_size=1, calibration=2)
    run_scan(str(tmp_path / "s0"), ScanConfig(**cfg, shard="0/2"), adapter=tiny_adapter, figures=False, log=lambda m: None)
    _retrain(tiny_adapter)
    run_scan(str(tmp_path / "s1"), ScanConfig(**cfg, shard="1/2"), adapter=tiny_adapter, figures=False, log=lambda m: None)
    with pytest.raises(SinkscopeError, match="different weights of the model"):
        merge_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged", figures=False, log=lambda m: None)
    assert not (tmp_path / "merged").exists()
