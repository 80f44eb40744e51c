"""Issue 15: the options every command that loops over samples shares are declared once. They are generated from
RunConfig's declared CLI fields (`runconfig.CLI_FIELDS`, defaults from `analysis_default`) and `cli.RunOptions`
(--out, --n-boot, --resume, --shard) by `cli.run_options`; nothing here lists them again."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from sinkscope import cli
from sinkscope.runconfig import CLI_FIELDS, RunConfig, analysis_default

REPO = Path(__file__).resolve().parent.parent
# every command that loops over samples shards (`sinkscope merge` merges them): the CLI's own list
SAMPLE_COMMANDS = sorted(c.strip() for c in cli.SHARDED.split(","))
RUN_OPTIONS = [f.name for f in fields(cli.RunOptions)]


def _decorated() -> dict[str, typing.Callable]:
    """{command name: its function} for every command whose options `cli.run_options` generated."""
    found = {}
    for info in cli.app.registered_commands:
        if hasattr(info.callback, "own_options"):
            found[info.name or info.callback.__name__.replace("_", "-")] = info.callback
    return found


def _params(command: str) -> dict:
    return {p.name: p for p in typer.main.get_command(cli.app).commands[command].params}


def _base_type(hint):
    """RunConfig's field type as the command line takes it: a list as comma-separated text, None dropped."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return str if typing.get_origin(args[0]) is list else args[0]


def test_every_sample_looping_command_gets_its_options_from_run_options():
    assert sorted(_decorated()) == SAMPLE_COMMANDS


@pytest.mark.parametrize("command", SAMPLE_COMMANDS)
def test_shared_options_are_runconfigs_cli_fields_with_its_defaults(command):
    function = _decorated()[command]
    params = _params(command)
    shared = [name for name in params if name not in function.own_options]
    assert shared == [*CLI_FIELDS, *RUN_OPTIONS], shared  # exactly these, in this order, before the command's own
    hints = typing.get_type_hints(RunConfig)
    for name in CLI_FIELDS:
        assert name in RunConfig.__dataclass_fields__, f"CLI_FIELDS names {name}, which is no RunConfig field"
        assert params[name].default == analysis_default(function.analysis, name), (command, name)
        assert params[name].type_descriptor.annotation is _base_type(hints[name]), (command, name)
    defaults = {f.name: f.default for f in fields(cli.RunOptions) if f.name != "out"}
    assert {name: params[name].default for name in defaults} == defaults
    assert params["out"].default.startswith("runs/")


@pytest.mark.parametrize("command", SAMPLE_COMMANDS)
def test_help_shows_every_shared_option_with_its_default(command):
    result = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.output)
    params = _params(command)
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if re.match(r"\W*--[a-z]", ln)]  # where each option's rows begin
    for name in [*CLI_FIELDS, *RUN_OPTIONS]:
        flag = "--" + name.replace("_", "-")
        first = next((i for i in starts if re.match(rf"\W*{flag}\b(?!-)", lines[i])), None)
        assert first is not None, f"`sinkscope {command} --help` lacks {flag}"
        rows = " ".join(" ".join(lines[first:min([i for i in starts if i > first], default=len(lines))]).split())
        default = params[name].default
        if default is not None:  # a None default is said in words by the help (e.g. "default: discover them")
            shown = (name if default else "no-" + name).replace("_", "-") if isinstance(default, bool) else default
            assert f"[default: {shown}]" in rows, (command, flag, rows)


def test_every_value_reaches_the_run_config_and_run_options(tmp_path, monkeypatch):
    seen = {}

    def record(ctx, run, opts, build, runner, question="describe the image ."):
        seen[ctx.info_name] = (run, opts)

    monkeypatch.setattr(cli, "_run_analysis", record)
    given = {"model": "tiny", "data": "demo:pope-random", "limit": 3, "batch_size": 2, "calibration": 5, "tau": 7.5,
             "sink_dims": "4,1", "sink_score": "rms", "device": "cpu", "dtype": "float32", "device_map": "auto",
             "max_memory": "cpu=1GiB", "seed": 9}
    assert set(given) == set(CLI_FIELDS), "give this test a value for the new field"
    for command in SAMPLE_COMMANDS:
        args = [command, "--out", str(tmp_path / command), "--n-boot", "50", "--no-resume", "--shard", "1/2"]
        for name, value in given.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        result = CliRunner().invoke(cli.app, args)
        assert result.exit_code == 0, (command, result.output, repr(result.exception))
        run, opts = seen[command]
        assert {name: getattr(run, name) for name in given} == {**given, "sink_dims": [4, 1]}, command
        assert opts == cli.RunOptions(out=str(tmp_path / command), n_boot=50, resume=False, shard="1/2"), command


ADD_A_FIELD = """
import dataclasses, json
import sinkscope.runconfig as rc

@dataclasses.dataclass
class Wider(rc.RunConfig):
    extra_knob: int = 7

rc.RunConfig = Wider
rc.CLI_FIELDS["extra_knob"] = "a setting added to RunConfig and to the table"
rc.ANALYSIS_DEFAULTS["ablate"] = {**rc.ANALYSIS_DEFAULTS.get("ablate", {}), "extra_knob": 3}
import typer.main
from typer.testing import CliRunner
from sinkscope import cli

seen, out = {}, {}
cli._run_analysis = lambda ctx, run, opts, *args, **kwargs: seen.__setitem__(ctx.info_name, run.extra_knob)
group = typer.main.get_command(cli.app)
for name in cli.SHARDED.split(","):
    name = name.strip()
    params = {p.name: p.default for p in group.commands[name].params}
    helped = "--extra-knob" in CliRunner().invoke(cli.app, [name, "--help"], env={"COLUMNS": "250"}).output
    result = CliRunner().invoke(cli.app, [name, "--extra-knob", "11"])
    out[name] = [params.get("extra_knob"), helped, result.exit_code, seen.get(name)]
print(json.dumps(out))
"""


def test_a_field_added_to_the_table_is_an_option_of_every_command():
    """A RunConfig field named in CLI_FIELDS becomes --its-name on every sample-looping command, with RunConfig's
    default (or the analysis' own), shown in --help, its value in the RunConfig the command runs with."""
    done = subprocess.run([sys.executable, "-c", ADD_A_FIELD], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(got) == SAMPLE_COMMANDS
    assert got == {name: [3 if name == "ablate" else 7, True, 0, 11] for name in SAMPLE_COMMANDS}, got


def test_a_command_cannot_redeclare_a_shared_option():
    def limit_again(ctx: typer.Context, run: RunConfig, opts: cli.RunOptions, limit: int = typer.Option(5)):
        pass

    with pytest.raises(TypeError, match=r"shared options \['limit'\]"):
        cli.run_options("scan", out="runs/x")(limit_again)
