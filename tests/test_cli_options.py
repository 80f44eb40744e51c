"""Every CLI command takes the common options (with help that states defaults), and a bad
--device / --dtype is one clear line naming the fix, not a traceback (sinkscope.devices)."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from sinkscope import devices
from sinkscope.cli import app
from sinkscope.errors import SinkscopeError

COMMON = ("--model", "--data", "--out", "--limit", "--device", "--dtype", "--seed")
runner = CliRunner()


def _commands() -> list[str]:
    import typer.main

    group = typer.main.get_command(app)
    return sorted(group.commands)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


NO_MODEL = ("merge",)  # combines finished run folders; loads no model and reads no data


@pytest.mark.parametrize("command", [c for c in _commands() if c not in NO_MODEL])
def test_every_command_has_the_common_options(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    out = _plain(result.output)
    missing = [o for o in COMMON if o not in out]
    assert not missing, f"`sinkscope {command}` lacks {missing}"
    for option in ("--device", "--dtype"):  # None defaults: the help text says what happens
        line = next(ln for ln in out.splitlines() if option in ln)
        assert "default" in line, line


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    out = result.output.strip()
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    for n in needles:
        assert n in out, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["scan", "heads", "view"])
def test_cuda_without_cuda_is_a_clear_error(command, tmp_path):
    args = [command, str(tmp_path)] if command == "view" else [command, "--model", "tiny", "--out", str(tmp_path / "r")]
    if command == "view":
        (tmp_path / "run.json").write_text('{"analysis": "scan", "params": {"model": "tiny", "data": "demo"}, '
                                           '"tau": {"value": 1.0}, "sink_dims": [1]}')
    result = runner.invoke(app, args + ["--device", "cuda"])
    _one_line_error(result, "CUDA is not available", "--device cpu")
    assert not (tmp_path / "r").exists()  # nothing written before the check


def test_unknown_device_and_dtype(tmp_path):
    _one_line_error(runner.invoke(app, ["scan", "--model", "tiny", "--out", str(tmp_path), "--device", "gpu"]),
                    "unknown device 'gpu'", "cpu, cuda, cuda:N or mps")
    _one_line_error(runner.invoke(app, ["ablate", "--model", "tiny", "--out", str(tmp_path), "--dtype", "bfloat17"]),
                    "unknown dtype 'bfloat17'", "float32, bfloat16 or float16")


def test_resolve_device_and_dtype():
    assert devices.resolve_device(None) is None and devices.resolve_device("CPU") == "cpu"
    assert devices.resolve_dtype("bf16") is torch.bfloat16 and devices.resolve_dtype("float32") is torch.float32
    assert devices.resolve_dtype(None) is None and devices.resolve_dtype("auto") is None
    if torch.cuda.is_available():
        with pytest.raises(SinkscopeError, match="pick one of those"):
            devices.resolve_device(f"cuda:{torch.cuda.device_count()}")
    # a dtype the device cannot run: the probe's failure becomes one line naming the fix
    with pytest.raises(SinkscopeError, match=r"--dtype float16 cannot run on meta here .*use --dtype float32"):
        devices.resolve_dtype("float16", "meta")


def test_a_worker_of_torchrun_takes_its_own_gpu(monkeypatch):
    """--device cuda in one of several workers torchrun started is cuda:LOCAL_RANK where the machine shows several
    GPUs (CUDA's count is stood in for: these machines have none); an explicit index, one GPU shown, or a process not
    launched as a worker keep what was asked; more workers than GPUs name the fix."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    worker = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}  # two nodes of four
    assert devices.resolve_device("cuda", worker) == "cuda:1"
    assert devices.resolve_device("cuda:3", worker) == "cuda:3"
    assert devices.resolve_device("cuda", {}) == "cuda"
    assert devices.resolve_device("cuda", {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) == "cuda"
    assert devices.resolve_device("cpu", worker) == "cpu"
    with pytest.raises(SinkscopeError, match=r"LOCAL_RANK is 4, but the machine has 4 CUDA devices.*--nproc-per-node 4"):
        devices.resolve_device("cuda", {**worker, "LOCAL_RANK": "4"})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the launcher gave each worker one GPU
    assert devices.resolve_device("cuda", worker) == "cuda"


def test_a_device_map_strategy_is_refused_in_several_workers_of_one_machine(monkeypatch):
    """--device-map auto in one of several workers torchrun started on one machine would spread a copy of the model
    per worker over the same GPUs: refused, naming the ways that work (CUDA's count stood in for). One worker per
    machine, a machine showing one GPU, a process not launched, or an explicit map are let through."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    worker = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    for strategy in ("auto", "balanced", "sequential"):
        with pytest.raises(SinkscopeError, match=rf"--device-map {strategy} in worker 1 .* same 4 GPUs\. Run one "
                                                 r"process per machine .*CUDA_VISIBLE_DEVICES=0,1 .*--device cuda"):
            devices.check_device_map(strategy, environ=worker)
    devices.check_device_map("auto", environ={**worker, "LOCAL_WORLD_SIZE": "1"})  # one worker on each machine
    devices.check_device_map("auto", environ={})  # not launched
    devices.check_device_map({"model.layers.0": 0, "lm_head": 1}, environ=worker)  # the user placed every part
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the launcher gave each worker one GPU
    devices.check_device_map("auto", environ=worker)


def test_the_cli_refuses_a_spread_in_a_worker_before_the_model_loads(monkeypatch, tmp_path):
    """The refusal comes from the run's options, before a model is looked for (a model name that does not exist
    would otherwise be the error) and before anything is written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    worker = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    result = runner.invoke(app, ["scan", "--model", "no-such/model", "--device-map", "auto", "--out",
                                 str(tmp_path / "{shard}")], env=worker)
    _one_line_error(result, "--device-map auto in worker 0", "Run one process per machine")
    assert not any(tmp_path.iterdir())


def test_load_rejects_bad_device_from_python():
    import sinkscope

    with pytest.raises(SinkscopeError, match="unknown device"):
        sinkscope.load_model("tiny", device="tpu")
