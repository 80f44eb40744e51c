"""Defaults that cannot hurt (issue 14, part 4), through the `sinkscope` command line:

- every bad input is one line naming the fix, exit code 2, no traceback, no folder left, and the
  model is never loaded for it (the loader is replaced by one that fails the test);
- `sinkscope report` with defaults writes under runs/, never under reports/, and refuses a folder
  holding a report made with other settings unless --force;
- `scan` and `report` use the same sink score and tau by default;
- Ctrl-C prints what is saved and the exact command that resumes, and that command resumes;
- importing the CLI imports neither torch nor transformers (so `--help` is instant).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sinkscope import cli
from sinkscope.cli import app

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


class ModelLoaded(AssertionError):
    """Raised by the stand-in loader: the command loaded a model before rejecting its input."""


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test (bad input must be rejected before it)."""
    import sinkscope.models
    import sinkscope.models.registry

    def refuse(*args, **kwargs):
        raise ModelLoaded(f"a model was loaded for {args} {kwargs}")

    monkeypatch.setattr(sinkscope.models, "load", refuse)
    monkeypatch.setattr(sinkscope.models.registry, "load", refuse)


def _one_line_error(result, *needles: str) -> str:
    assert not isinstance(result.exception, ModelLoaded), "the model loaded before the input was checked"
    assert result.exit_code == 2, (result.exit_code, result.output, repr(result.exception))
    out = result.output.strip()
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert out.startswith("error: "), out
    for needle in needles:
        assert needle in out, (needle, out)
    return out


def _bad_jsonl(tmp_path: Path) -> str:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"image": "a.png", "text": "is there a cat ?", "label": "yes"}\nthis is not json\n')
    return str(path)


BAD_INPUTS = [  # (id, command line after the command's name, words the one-line error must contain)
    ("data-missing", ["scan", "--data", "no/such/file.jsonl"], ["--data no/such/file.jsonl", "no such file"]),
    ("data-image-file", ["heads", "--data", "README.md"], ["--data README.md is a .md file", "folder"]),
    ("data-unknown-demo-task", ["scan", "--data", "demo:nope"], ["unknown demo task 'nope'", "pope-random"]),
    ("limit-0", ["scan", "--limit", "0"], ["--limit must be a whole number of samples, 1 or more", "got 0"]),
    ("limit-negative", ["contributions", "--limit", "-1"], ["--limit", "got -1"]),
    ("out-unwritable", ["scan", "--out", "/proc/x"], ["--out /proc/x is not writable", "--out runs/NAME"]),
    ("out-under-a-file", ["location", "--out", "README.md/x"], ["README.md is a file"]),
    ("device-unknown", ["scan", "--device", "gpu"], ["unknown device 'gpu'", "cpu, cuda, cuda:N or mps"]),
    ("dtype-unknown", ["vit-sinks", "--dtype", "bfloat17"], ["unknown dtype 'bfloat17'", "float32, bfloat16"]),
    ("layers-not-ints", ["ablate", "--layers", "two,three"], ["--layers must be comma-separated integers", "2,3,4"]),
    ("layers-negative", ["patch", "--layers", "-1"], ["--layers must be layer indices >= 0", "[-1]"]),
    ("sink-dims-not-ints", ["scan", "--sink-dims", "x"], ["--sink-dims must be comma-separated integers", "1415,2533"]),
    ("sink-dims-twice", ["heads", "--sink-dims", "3,3"], ["--sink-dims lists a value twice"]),
    ("tau-negative", ["scan", "--tau", "-2"], ["--tau must be a number > 0"]),
    ("batch-size-0", ["heads", "--batch-size", "0"], ["--batch-size must be a whole number", "got 0"]),
    ("sink-score-unknown", ["scan", "--sink-score", "phi"], ["--sink-score must be one of auto, rms, layer"]),
    ("taus-not-numbers", ["ablate", "--taus", "a"], ["--taus must be comma-separated numbers"]),
    ("report-limit-0", ["report", "--limit", "0"], ["--limit", "got 0"]),
    ("report-data-missing", ["report", "--data", "nope.jsonl"], ["--data nope.jsonl", "no such file"]),
    ("report-steps-unknown", ["report", "--steps", "scan,typo"], ["unknown report steps ['typo']", "patching"]),
    ("report-out-unwritable", ["report", "--out", "/proc/x"], ["--out /proc/x is not writable"]),
    ("report-dtype-unknown", ["report", "--dtype", "fp8"], ["unknown dtype 'fp8'"]),
    ("inject-limit-0", ["inject", "--limit", "0"], ["--limit must be a whole number", "got 0"]),
    ("remove-out-unwritable", ["remove", "--out", "/proc/x"], ["--out /proc/x is not writable"]),
    ("var-eval-validation-missing", ["var-eval", "--validation", "val.jsonl"], ["--validation val.jsonl: no such file"]),
]


@pytest.mark.parametrize("command, needles", [(c, n) for _, c, n in BAD_INPUTS], ids=[i for i, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_before_the_model_loads_and_leaves_no_folder(command, needles, tmp_path, no_model,
                                                                          monkeypatch):
    monkeypatch.chdir(REPO)  # relative --data README.md and README.md/x refer to the repository's README
    out = tmp_path / "run"
    args = list(command)
    if "--out" not in args:
        args += ["--out", str(out)]
    result = runner.invoke(app, args)
    _one_line_error(result, *needles)
    assert not out.exists()
    assert not Path("/proc/x").exists()


def test_malformed_data_rows_fail_before_the_model_loads(tmp_path, no_model):
    out = tmp_path / "run"
    result = runner.invoke(app, ["scan", "--data", _bad_jsonl(tmp_path), "--out", str(out)])
    _one_line_error(result, "broken.jsonl:2")
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["scan", "report", "ablate", "var-eval"])
def test_cuda_without_cuda_before_the_model_loads(command, tmp_path, no_model):
    out = tmp_path / "run"
    _one_line_error(runner.invoke(app, [command, "--device", "cuda", "--out", str(out)]),
                    "CUDA is not available", "--device cpu")
    assert not out.exists()


# ----------------------------------------------------------------------------- report folders


def _plant_reference_report(root: Path) -> Path:
    """A copy of the committed reference report's settings and index under root/reports/demo."""
    folder = root / "reports" / "demo"
    folder.mkdir(parents=True)
    for name in ("report.json", "index.md", "findings.csv"):
        (folder / name).write_bytes((REPO / "reports" / "demo" / name).read_bytes())
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_report_default_out_is_under_runs_for_every_model():
    for model in ("demo", "tiny", "organism", "llava-hf/llava-1.5-7b-hf", "/models/my-llava/"):
        out = Path(cli.default_report_out(model))
        assert out.parts[0] == "runs" and "reports" not in out.parts, out
    assert cli.default_report_out("llava-hf/llava-1.5-7b-hf") == "runs/report-llava-1.5-7b-hf"


def test_report_with_defaults_leaves_reports_untouched(tmp_path, monkeypatch):
    """From a folder laid out like the repository: the report goes to runs/report-tiny; reports/ is unchanged."""
    reference = _plant_reference_report(tmp_path)
    before = _snapshot(tmp_path / "reports")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", "--model", "tiny", "--limit", "2", "--steps", "scan"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (tmp_path / "runs" / "report-tiny" / "index.md").exists()
    assert _snapshot(tmp_path / "reports") == before
    assert sorted(p.name for p in reference.iterdir()) == ["findings.csv", "index.md", "report.json"]


def test_report_with_no_options_at_all_targets_runs(tmp_path, monkeypatch):
    """`sinkscope report` as typed: validated, then handed runs/report-demo (the run itself is not needed here)."""
    import sinkscope.analyses.report as report

    seen = {}

    def record(out, cfg, adapter=None, log=print, force=False):
        seen.update(out=out, cfg=cfg, force=force)
        return Path(out)

    monkeypatch.setattr(report, "run_report", record)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert seen["out"] == "runs/report-demo" and seen["force"] is False
    assert seen["cfg"].sink_score == "auto" and seen["cfg"].model == "demo"


def test_report_refuses_a_folder_of_another_report_unless_forced(tmp_path, monkeypatch, no_model):
    """The issue's repro: `report --limit 4 --steps scan` into the reference folder is refused, model unloaded."""
    reference = _plant_reference_report(tmp_path)
    before = _snapshot(reference)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", "--out", "reports/demo", "--limit", "4", "--steps", "scan"])
    _one_line_error(result, "--out reports/demo holds a report made with other settings", "limit: 32 -> 4",
                    "would be dropped", "--force")
    assert _snapshot(reference) == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("not a report")
    _one_line_error(runner.invoke(app, ["report", "--out", str(other)]), "no report.json", "--force")
    assert (other / "mine.txt").read_text() == "not a report"


def test_report_same_settings_resume_and_force_replaces(tmp_path, monkeypatch):
    """Same settings (another device, more steps) pass the check; --force deletes the old report's files only."""
    import sinkscope.analyses.report as report

    reference = _plant_reference_report(tmp_path)
    (reference / "scan").mkdir()
    (reference / "scan" / "run.json").write_text("{}")
    (reference / "mine.txt").write_text("kept")
    recorded = json.loads((reference / "report.json").read_text())["config"]
    same = report.ReportConfig(**{**recorded, "steps": tuple(recorded["steps"]), "device": "cpu"})
    report.check_report_folder(reference, same)  # no error: resuming
    assert (reference / "index.md").exists()
    changed = report.ReportConfig(**{**recorded, "steps": tuple(recorded["steps"]), "seed": 1})
    assert "seed: 0 -> 1" in report.report_folder_conflict(reference, changed)
    with pytest.raises(report.SinkscopeError, match="seed: 0 -> 1"):
        report.check_report_folder(reference, changed)
    report.clear_report(reference)  # what --force does once the model has loaded
    assert sorted(p.name for p in reference.iterdir()) == ["mine.txt"]


def test_force_keeps_the_old_report_when_the_model_fails_to_load(tmp_path, monkeypatch):
    import sinkscope.analyses.report as report
    import sinkscope.models
    from sinkscope.errors import SinkscopeError

    def unloadable(*args, **kwargs):
        raise SinkscopeError("no such model")

    monkeypatch.setattr(sinkscope.models.registry, "load", unloadable)
    reference = _plant_reference_report(tmp_path)
    before = _snapshot(reference)
    with pytest.raises(SinkscopeError, match="no such model"):
        report.run_report(reference, report.ReportConfig(model="tiny", limit=2, steps=("scan",)), force=True)
    assert _snapshot(reference) == before


# ----------------------------------------------------------------------------- one sink score and tau


def _demo_available() -> bool:
    import importlib.util

    from sinkscope.models.embedded import smollm

    return importlib.util.find_spec(smollm.PACKAGE) is not None


@pytest.mark.skipif(not _demo_available(), reason="the demo's pretrained LLM package is not installed")
def test_scan_and_report_default_to_the_same_score_and_tau_on_the_demo(tmp_path, monkeypatch):
    import warnings

    import sinkscope.analyses.scan as scan
    import sinkscope.models
    from sinkscope.analyses.common import calibrate_samples
    from sinkscope.eval.data import load_data
    from sinkscope.trace import Tracer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        demo = sinkscope.models.load("demo")
    monkeypatch.setattr(sinkscope.models.registry, "load", lambda *a, **k: demo)
    configs = {}

    class Stop(Exception):
        pass

    def capture(name):
        def run_scan(out, cfg, adapter=None, **kwargs):
            configs[name] = scan.replace(cfg, sink_score=scan.resolve_sink_score(cfg.sink_score, demo.hidden_size))
            raise Stop

        return run_scan

    monkeypatch.setattr(scan, "run_scan", capture("scan"))
    result = runner.invoke(app, ["scan", "--model", "demo", "--out", str(tmp_path / "scan")])
    assert isinstance(result.exception, Stop), result.output
    monkeypatch.setattr(scan, "run_scan", capture("report"))
    result = runner.invoke(app, ["report", "--model", "demo", "--out", str(tmp_path / "report")])
    assert isinstance(result.exception, Stop), result.output

    from_scan, from_report = asdict(configs["scan"]), asdict(configs["report"])
    assert from_scan == from_report, {k: (v, from_report[k]) for k, v in from_scan.items() if from_report[k] != v}
    assert from_scan["sink_score"] == "layer" and from_scan["tau"] is None  # hidden 576: phi's ceiling is 24
    # and the tau each would calibrate (two samples are enough to compare: the same rule on the same data)
    samples = load_data("demo", 2)
    taus = [calibrate_samples(demo, samples, scan.replace(configs[k], calibration=2), Tracer(demo),
                              log=lambda m: None).tau for k in ("scan", "report")]
    assert taus[0] == taus[1] and taus[0].value < float("inf")


# ----------------------------------------------------------------------------- Ctrl-C


def _last_line(text: str) -> str:
    """The last line a terminal shows (progress bars redraw with carriage returns)."""
    return text.strip().splitlines()[-1].split("\r")[-1]


def test_ctrl_c_says_what_is_saved_and_the_command_that_resumes(tmp_path, monkeypatch):
    from sinkscope.runfolder import RunFolder

    out = tmp_path / "scan"
    real_mark_done = RunFolder.mark_done
    calls = []

    def interrupt_after_first_batch(self, sample_ids):
        if calls:
            raise KeyboardInterrupt
        calls.append(list(sample_ids))
        real_mark_done(self, sample_ids)

    monkeypatch.setattr(RunFolder, "mark_done", interrupt_after_first_batch)
    args = ["scan", "--model", "tiny", "--out", str(out), "--limit", "4", "--batch-size", "2", "--calibration", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output + repr(result.exception)
    assert "Traceback" not in result.output, result.output
    line = _last_line(result.stderr)  # above it: the run's own progress (weights, batches)
    assert line.startswith(f"interrupted: 2 finished samples are saved in {out}; resume with: sinkscope scan"), line
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:2] == ["sinkscope", "scan"] and command[command.index("--out") + 1] == str(out)
    for option, value in (("--limit", "4"), ("--batch-size", "2"), ("--calibration", "2"), ("--model", "tiny")):
        assert command[command.index(option) + 1] == value, (option, command)

    monkeypatch.setattr(RunFolder, "mark_done", real_mark_done)
    resumed = runner.invoke(app, command[1:])
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    assert re.search(r"2 samples already done.*, 2 to go", resumed.output), resumed.output
    done = (out / "samples_done.txt").read_text().split()
    assert len(done) == len(set(done)) == 4 and calls[0] == done[:2]  # the first two kept, not recomputed


def test_an_interrupted_worker_names_the_line_that_resumes_its_shard_without_the_launcher(tmp_path, monkeypatch):
    """Worker 1 of 2 (RANK / WORLD_SIZE as torchrun sets them) writing --out .../{shard}: its resume line spells out
    its folder and --shard 1/2, and that line, run with no launcher around it, resumes the shard."""
    from sinkscope.runfolder import RunFolder

    real_mark_done = RunFolder.mark_done

    def interrupt_after_first_batch(self, sample_ids):
        real_mark_done(self, sample_ids)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "mark_done", interrupt_after_first_batch)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["scan", "--model", "tiny", "--out", str(tmp_path / "{shard}"), "--limit", "6", "--batch-size", "1",
            "--calibration", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output + repr(result.exception)
    command = shlex.split(_last_line(result.stderr).split("resume with: ", 1)[1])
    out = tmp_path / "1-of-2"
    assert command[command.index("--out") + 1] == str(out) and command[command.index("--shard") + 1] == "1/2"
    monkeypatch.setattr(RunFolder, "mark_done", real_mark_done)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    resumed = runner.invoke(app, command[1:])
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    assert re.search(r"1 samples already done, 2 to go \(shard 1/2", resumed.output), resumed.output
    assert len((out / "samples_done.txt").read_text().split()) == 3  # samples 1, 3, 5 of six


def test_ctrl_c_during_a_report_names_the_finished_steps(tmp_path, monkeypatch):
    import sinkscope.analyses.heads as heads

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(heads, "run_heads", interrupted)
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", "--model", "tiny", "--out", str(out), "--limit", "2",
                                 "--steps", "scan,heads"])
    assert result.exit_code == 130, result.output + repr(result.exception)
    assert "Traceback" not in result.output, result.output
    line = _last_line(result.stderr)
    assert f"interrupted: finished steps (scan) and the interrupted step's finished samples are saved in {out}" in line
    assert line.endswith(f"resume with: sinkscope report --model tiny --out {out} --limit 2 --steps scan,heads"), line


def test_interrupted_before_anything_is_saved(tmp_path, monkeypatch):
    import sinkscope.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sinkscope.models.registry, "load", interrupted)
    result = runner.invoke(app, ["heads", "--model", "tiny", "--out", str(tmp_path / "h"), "--no-resume"])
    assert result.exit_code == 130
    assert _last_line(result.stderr) == (f"interrupted: nothing was saved yet; resume with: sinkscope heads --model tiny "
                                     f"--out {tmp_path / 'h'} --no-resume")


# ----------------------------------------------------------------------------- a fast --help


def test_importing_the_cli_imports_no_heavy_module():
    code = ("import sys, sinkscope.cli; "
            "heavy = ('torch', 'transformers', 'nnsight', 'pandas', 'matplotlib'); "
            "print(','.join(m for m in heavy if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing sinkscope.cli imported {done.stdout.strip()}"


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for command in ("scan", "report", "heads", "ablate", "contributions", "location", "vit-sinks", "patch",
                    "var-eval", "view"):
        assert command in result.output


def test_a_full_disk_mid_run_is_one_line(tmp_path, monkeypatch):
    from sinkscope.runfolder import RunFolder

    def full(self, table, frame):
        raise OSError(28, "No space left on device", str(self.path / f"{table}.csv"))

    monkeypatch.setattr(RunFolder, "append_rows", full)
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "--model", "tiny", "--out", str(out), "--limit", "2", "--calibration", "2"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = _last_line(result.stderr)
    assert line.startswith("error: No space left on device") and f"check that --out {out} is a folder you can write" \
        in line, line


def test_force_replaces_another_report_through_the_cli(tmp_path, monkeypatch):
    reference = _plant_reference_report(tmp_path)
    (reference / "mine.txt").write_text("kept: not a report file")
    monkeypatch.chdir(tmp_path)
    args = ["report", "--model", "tiny", "--out", "reports/demo", "--limit", "2", "--steps", "scan"]
    assert runner.invoke(app, args).exit_code == 2  # refused without --force
    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    config = json.loads((reference / "report.json").read_text())["config"]
    assert config["model"] == "tiny" and config["limit"] == 2 and config["steps"] == ["scan"]
    assert (reference / "mine.txt").exists() and (reference / "scan" / "run.json").exists()


def test_force_with_a_bad_input_deletes_nothing(tmp_path, monkeypatch, no_model):
    reference = _plant_reference_report(tmp_path)
    before = _snapshot(reference)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", "--out", "reports/demo", "--limit", "4", "--force", "--data", "nope.jsonl"])
    _one_line_error(result, "--data nope.jsonl: no such file")
    assert _snapshot(reference) == before


SAMPLE_COMMANDS = {"scan": "scan", "heads": "heads", "contributions": "contributions", "location": "location",
                   "vit-sinks": "vit_sinks", "ablate": "ablate", "patch": "patching", "var-eval": "var_eval",
                   "inject": "inject", "remove": "remove"}
SHARED_OPTIONS = ("model", "data", "out", "limit", "batch_size", "calibration", "tau", "sink_dims", "device", "dtype",
                  "device_map", "max_memory", "seed", "n_boot", "sink_score", "resume", "shard")


def test_every_sample_looping_command_has_the_same_options_and_defaults():
    """Issue 15: the shared options of RunConfig on every command that loops over samples, with RunConfig's
    defaults (per-analysis data / limit / batch size from runconfig.ANALYSIS_DEFAULTS, the one table)."""
    import typer.main

    from sinkscope.cli import app
    from sinkscope.runconfig import RunConfig, analysis_default

    commands = typer.main.get_command(app).commands
    for command, analysis in SAMPLE_COMMANDS.items():
        params = {p.name: p for p in commands[command].params}
        missing = [name for name in SHARED_OPTIONS if name not in params]
        assert not missing, f"{command} lacks {missing}"
        for name in ("limit", "batch_size", "data"):
            assert params[name].default == analysis_default(analysis, name), (command, name)
        for name in ("calibration", "seed", "sink_score", "tau", "sink_dims", "device", "dtype", "device_map",
                     "max_memory"):
            field = RunConfig.__dataclass_fields__[name]
            assert params[name].default == field.default, (command, name, params[name].default, field.default)
        assert params["n_boot"].default == 1000 and params["resume"].default is True and params["shard"].default is None


def test_calibration_reaches_every_analysis_config(tmp_path, monkeypatch):
    """--calibration given to any sample-looping command lands in the config its analysis runs with."""
    import importlib
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import sinkscope.cli as cli
    from sinkscope.cli import app

    seen = {}
    monkeypatch.setattr(cli, "_load", lambda run: SimpleNamespace(hidden_size=4096))
    runners = {"heads": "heads:run_heads", "contributions": "contributions:run_contributions",
               "location": "location:run_location", "vit-sinks": "vit_sinks:run_vit_sinks", "ablate": "ablate:run_ablate",
               "patch": "patching:run_patching", "var-eval": "var_eval:run_var_eval", "inject": "inject:run_inject"}
    for command, target in runners.items():
        module, function = target.split(":")

        def capture(out, cfg, command=command, **kwargs):
            seen[command] = cfg.calibration
            return SimpleNamespace(path=out)

        monkeypatch.setattr(importlib.import_module(f"sinkscope.analyses.{module}"), function, capture)
        result = CliRunner().invoke(app, [command, "--calibration", "5", "--limit", "8", "--out", str(tmp_path / command)])
        assert result.exit_code == 0, (command, result.output)
    assert seen == {command: 5 for command in runners}, seen


def test_var_eval_compile_flag_reaches_its_config(tmp_path, monkeypatch):
    """`sinkscope var-eval --compile` sets VarEvalConfig.compile; without it the edit runs unfused."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import sinkscope.analyses.var_eval as var_eval
    import sinkscope.cli as cli
    from sinkscope.cli import app

    seen = []
    monkeypatch.setattr(cli, "_load", lambda run: SimpleNamespace(hidden_size=4096))
    monkeypatch.setattr(var_eval, "run_var_eval", lambda out, cfg, **kw: (seen.append(cfg.compile),
                                                                           SimpleNamespace(path=out))[1])
    for flags in (["--compile"], []):
        result = CliRunner().invoke(app, ["var-eval", *flags, "--limit", "8", "--out", str(tmp_path / str(flags))])
        assert result.exit_code == 0, result.output
    assert seen == [True, False]
