"""sinkscope.runconfig: one typed place for a run's settings, one message per problem."""

from __future__ import annotations

import pytest

from sinkscope.errors import SinkscopeError
from sinkscope.runconfig import (RunConfig, check_data, check_out, differing_settings, parse_floats, parse_ints,
                                 resolve_sink_score)


@pytest.mark.parametrize("fields, message", [
    ({"limit": 0}, r"--limit must be a whole number of samples, 1 or more, or leave it out .*got 0"),
    ({"limit": -1}, r"--limit .*got -1"),
    ({"batch_size": 0}, r"--batch-size must be a whole number of samples per forward pass"),
    ({"calibration": 0}, r"--calibration must be a whole number of calibration samples"),
    ({"sink_score": "phi"}, r"--sink-score must be one of auto, rms, layer; got 'phi'"),
    ({"tau": 0.0}, r"--tau must be a number > 0"),
    ({"tau": float("nan")}, r"--tau must be a number > 0"),
    ({"sink_dims": [-1]}, r"--sink-dims must be hidden dimensions >= 0 like 1415,2533; got \[-1\]"),
    ({"sink_dims": []}, r"--sink-dims is empty"),
    ({"layers": [2, 2]}, r"--layers lists a value twice"),
    ({"layers": [-3]}, r"--layers must be layer indices >= 0"),
    ({"model": " "}, r"--model is empty"),
    ({"data": "no/such.jsonl"}, r"--data no/such.jsonl: no such file or folder"),
    ({"device": "tpu"}, r"unknown device 'tpu'"),
    ({"dtype": "int8"}, r"unknown dtype 'int8'"),
])
def test_each_problem_has_its_own_message(fields, message):
    with pytest.raises(SinkscopeError, match=message):
        RunConfig(**fields).validate()


def test_defaults_validate():
    RunConfig().validate()
    RunConfig(limit=None, layers=[0, 3], sink_dims=[7], tau=20.0, sink_score="layer", dtype="float32",
              device="cpu").validate()


def test_lists_parse_with_the_option_they_came_from():
    assert parse_ints(" 2, 3,4", "--layers") == [2, 3, 4] and parse_ints(None, "--layers") is None
    assert parse_ints("", "--sink-dims") is None
    with pytest.raises(SinkscopeError, match=r"^--layers must be comma-separated integers like 2,3,4; got 'a'$"):
        parse_ints("a", "--layers")
    with pytest.raises(SinkscopeError, match=r"^--sink-dims must be .* like 1415,2533"):
        parse_ints("1.5", "--sink-dims", "1415,2533")
    assert parse_floats("10, 20.5", "--taus") == [10.0, 20.5]
    with pytest.raises(SinkscopeError, match="--taus must be finite"):
        parse_floats("inf", "--taus")


def test_data_specs(tmp_path):
    check_data("demo")
    check_data("demo:pope-random")
    check_data(str(tmp_path))  # a folder: its images are listed by the loader
    (tmp_path / "q.jsonl").write_text("")
    check_data(str(tmp_path / "q.jsonl"))
    (tmp_path / "cat.png").write_bytes(b"")
    with pytest.raises(SinkscopeError, match=r"is a \.png file; .*put it in a folder"):
        check_data(str(tmp_path / "cat.png"))
    with pytest.raises(SinkscopeError, match="--image-root .* is not a folder"):
        check_data(str(tmp_path / "q.jsonl"), image_root=str(tmp_path / "missing"))


def test_out_check_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_out(target) == target and not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []  # the write probe was removed
    (tmp_path / "file").write_text("x")
    with pytest.raises(SinkscopeError, match="is a file; give a folder"):
        check_out(tmp_path / "file")
    with pytest.raises(SinkscopeError, match="is a file, so no folder can be made under it"):
        check_out(tmp_path / "file" / "run")
    with pytest.raises(SinkscopeError, match=r"--out /proc/x is not writable .*--out runs/NAME"):
        check_out("/proc/x")


def test_sink_score_rule():
    assert resolve_sink_score("auto", 4096) == "rms"  # LLaMA-2-7B: ceiling 64, tau 20 reachable
    assert resolve_sink_score("auto", 1600) == "rms"  # sqrt = 40: the boundary
    assert resolve_sink_score("auto", 576) == "layer"  # SmolLM2-135M: ceiling 24
    assert resolve_sink_score("rms", 576) == "rms" and resolve_sink_score("layer", 4096) == "layer"


def test_differing_settings():
    old = {"model": "demo", "limit": 32, "steps": ["scan"], "device": None}
    assert differing_settings(old, {"model": "demo", "limit": 32, "steps": ("scan",), "device": "cuda"},
                              ignore=("device",)) == []
    assert differing_settings(old, {**old, "limit": 4}) == ["limit: 32 -> 4"]
    # a setting added later matches while it is None, and counts once it is set
    assert differing_settings(old, {**old, "tau": None}) == []
    assert differing_settings(old, {**old, "tau": 20.0}) == ["tau: None -> 20.0"]
