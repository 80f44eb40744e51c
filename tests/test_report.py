"""`sinkscope report`: findings first, steps kept once finished, exact resume after an interruption."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest

from sinkscope.analyses.report import ReportConfig, is_finished, run_report
from sinkscope.runfolder import RunFolder

STEPS = ("scan", "heads", "contributions", "location")
LIMIT = 8


@pytest.fixture(scope="module")
def organism():
    from sinkscope.models import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load("organism")


def _report(out: Path, adapter, steps=STEPS):
    return run_report(out, ReportConfig(model="organism", limit=LIMIT, steps=steps, viewer_samples=1),
                      adapter=adapter, log=lambda m: None)


@pytest.fixture(scope="module")
def full_report(organism, tmp_path_factory) -> Path:
    return _report(tmp_path_factory.mktemp("report") / "organism", organism)


def _tables(folder: Path) -> dict[str, pd.DataFrame]:
    return {p.relative_to(folder).as_posix(): pd.read_csv(p) for p in sorted(folder.rglob("*.csv"))}


def test_index_leads_with_findings_with_cis(full_report):
    index = (full_report / "index.md").read_text()
    assert "PLANTED" in index
    assert index.index("## Findings") < index.index("## scan")
    findings = pd.read_csv(full_report / "findings.csv")
    assert set(findings["step"]) == set(STEPS)
    with_ci = findings.dropna(subset=["ci_low", "ci_high"])
    assert len(with_ci) >= 4 and (with_ci["ci_low"] <= with_ci["value"] + 1e-9).all()
    assert (with_ci["value"] <= with_ci["ci_high"] + 1e-9).all()
    # the organism's planted truth, read back through the report: 4 visual sinks per image, background-enriched
    sinks = findings[findings["name"].str.startswith("visual sinks per image")].iloc[0]
    assert sinks["value"] == 4
    enrichment = findings[findings["name"].str.startswith("background enrichment")].iloc[0]
    assert enrichment["ci_low"] > 1
    # every finding carries its n; the header counts each step's own samples (run.json), not the config
    assert findings["n"].notna().all()
    header = next(line for line in index.splitlines() if "Samples per step" in line)
    assert all(f"{step} {LIMIT}" in header for step in STEPS)


def test_summary_answers_the_organisms_questions_first(full_report):
    """The planted organism has sink dims [1, 90] and 4 visual sinks per image that draw attention; the steps not
    run in this report leave their questions not testable here."""
    from sinkscope import questions as q

    index = (full_report / "index.md").read_text()
    assert index.index("## Summary") < index.index("## Findings")
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1].strip("*") for line in index.splitlines()
            if line.startswith("| ") and line.count(" | ") == 3}
    answers = {key: rows[text] for key, text in q.QUESTIONS.items()}
    assert answers == {"sink_dims": q.YES, "visual_sinks": q.YES, "attention": q.YES, "knockout": q.NOT_TESTABLE,
                       "var": q.NOT_TESTABLE, "patching": q.NOT_TESTABLE}
    for step in STEPS:
        assert is_finished(full_report / step)


def test_finished_steps_are_not_run_again(full_report, organism):
    before = {s: json.loads((full_report / s / "run.json").read_text())["finished"] for s in STEPS}
    _report(full_report, organism)
    after = {s: json.loads((full_report / s / "run.json").read_text())["finished"] for s in STEPS}
    assert before == after


def test_interrupted_report_resumes_to_the_same_tables(full_report, organism, tmp_path, monkeypatch):
    """Stop in the middle of the second step, re-run: every table equals the uninterrupted run's."""
    out = tmp_path / "interrupted"
    calls = {"n": 0}
    original = RunFolder.mark_done

    def stop_after_three_batches(self, sample_ids):
        original(self, sample_ids)
        calls["n"] += 1
        if calls["n"] == 3:  # scan takes 2 batches of 4; the third is the first batch of `heads`
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(RunFolder, "mark_done", stop_after_three_batches)
    with pytest.raises(KeyboardInterrupt):
        _report(out, organism)
    monkeypatch.setattr(RunFolder, "mark_done", original)
    assert is_finished(out / "scan") and not is_finished(out / "heads")
    assert not (out / "index.md").exists()  # nothing that looks like a finished report
    assert not list(out.rglob("*.tmp"))
    scan_finished = json.loads((out / "scan" / "run.json").read_text())["finished"]
    _report(out, organism)
    assert json.loads((out / "scan" / "run.json").read_text())["finished"] == scan_finished  # not re-run
    got, want = _tables(out), _tables(full_report)
    assert set(got) == set(want)
    for name, frame in want.items():
        pd.testing.assert_frame_equal(got[name], frame, check_exact=False, rtol=1e-6, obj=name)


def test_bad_config_is_refused(organism, tmp_path):
    from sinkscope.errors import SinkscopeError

    with pytest.raises(SinkscopeError, match="unknown report steps"):
        run_report(tmp_path, ReportConfig(model="organism", steps=("scan", "nope")), adapter=organism)
    with pytest.raises(SinkscopeError, match="sink-score"):
        run_report(tmp_path, ReportConfig(model="organism", sink_score="huge"), adapter=organism)


def test_a_report_calibrates_once_and_every_step_records_that_calibration(tmp_path):
    """Issue 15: one calibration per report, handed to every step; each step's run.json holds the same block."""
    import json

    from sinkscope.analyses.report import ReportConfig, run_report

    out = run_report(tmp_path / "r", ReportConfig(model="tiny", limit=2, steps=("scan", "heads", "ablate")),
                     log=lambda m: None)
    blocks = [json.loads((out / step / "run.json").read_text())["calibration"] for step in ("scan", "heads", "ablate")]
    assert blocks[0]["sink_score"] and all(b == blocks[0] for b in blocks[1:]), blocks


def test_var_questions_sets_the_var_evaluation_size_and_the_header_gives_the_command(tmp_path):
    """The committed reference report's VAR evaluation is larger than make report's; its header says how it was made."""
    from sinkscope.analyses.report import ReportConfig, run_report
    from sinkscope.errors import SinkscopeError

    with pytest.raises(SinkscopeError, match="--var-questions"):
        ReportConfig(model="tiny", var_questions=0).validate()
    out = run_report(tmp_path / "r", ReportConfig(model="tiny", limit=2, steps=("var_eval",), var_questions=3),
                     log=lambda m: None)
    answers = pd.read_csv(out / "var_eval" / "var_answers.csv")
    test = answers[answers["sample"].str.startswith("test:")]
    per_task = test[test["condition"] == "baseline"].groupby("task").size()
    assert set(per_task.index) == {"pope-random", "pope-popular", "pope-adversarial"} and (per_task == 3).all()
    index = (out / "index.md").read_text()
    assert f"Made by: `sinkscope report --model tiny --out {out} --limit 2 --var-questions 3 --steps var_eval`" in index


def test_the_report_is_one_run_config_and_every_step_gets_its_settings(organism, tmp_path):
    """Issue 15: ReportConfig is a RunConfig (one validate(), the same messages as every command); its calibration
    size, pinned sink dims and batch size reach every step's config and run.json (batch size left out: each step's
    own); the header's command names them; --layers, meaningless for a report, is refused with the fix."""
    from typer.testing import CliRunner

    from sinkscope.analyses.report import report_command
    from sinkscope.cli import app
    from sinkscope.errors import SinkscopeError
    from sinkscope.runconfig import RunConfig

    assert issubclass(ReportConfig, RunConfig)
    for bad, words in (({"calibration": 0}, "--calibration"), ({"batch_size": 0}, "--batch-size"),
                       ({"sink_dims": [-1]}, "--sink-dims"), ({"layers": [2]}, "--layers 2,3")):
        with pytest.raises(SinkscopeError, match=words):
            ReportConfig(model="organism", **bad).validate()
    ReportConfig(model="organism").validate()  # batch size None: each step's own

    steps = ("scan", "heads", "patching")
    cfg = ReportConfig(model="organism", limit=4, calibration=3, sink_dims=[1, 90], batch_size=2, steps=steps,
                       viewer_samples=1)
    out = run_report(tmp_path / "r", cfg, adapter=organism, log=lambda m: None)
    for step in steps:
        run = json.loads((out / step / "run.json").read_text())
        assert (run["params"]["calibration"], run["params"]["sink_dims"], run["params"]["batch_size"]) == (3, [1, 90], 2)
        assert run["calibration"]["n_samples"] == 3 and run["calibration"]["sink_dims"] == [1, 90]
        assert run["calibration"]["sink_dims_method"] != "auto-gap"  # pinned, not discovered
    assert json.loads((out / "report.json").read_text())["config"]["calibration"] == 3
    assert "--calibration 3" in report_command(cfg, out) and "--sink-dims 1,90" in report_command(cfg, out)

    own = run_report(tmp_path / "own", ReportConfig(model="organism", limit=4, steps=steps, viewer_samples=1),
                     adapter=organism, log=lambda m: None)
    sizes = {s: json.loads((own / s / "run.json").read_text())["params"]["batch_size"] for s in steps}
    assert sizes == {"scan": 4, "heads": 4, "patching": 8}

    result = CliRunner().invoke(app, ["report", "--model", "organism", "--out", str(tmp_path / "cli"), "--limit", "2",
                                      "--steps", "scan", "--calibration", "2", "--sink-dims", "1,90"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "cli" / "scan" / "run.json").read_text())
    assert run["params"]["calibration"] == 2 and run["params"]["sink_dims"] == [1, 90]
    bad = CliRunner().invoke(app, ["report", "--model", "organism", "--out", str(tmp_path / "bad"), "--calibration", "0"])
    assert bad.exit_code == 2 and "--calibration" in bad.output and not (tmp_path / "bad").exists()
