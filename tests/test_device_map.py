"""Models across devices: a layer-split device map (accelerate's hooks, layers offloaded to disk and
brought back per forward) gives the same scan, knockout, VAR and sink injection as one device;
device maps this machine cannot honour fail with a message naming the fix.

On a CPU-only machine every placed layer executes on the CPU, but the path is the one a multi-GPU
map takes: accelerate's AlignDevicesHook on each dispatched module moves inputs and (for the
offloaded layers) weights in and out around every forward, and weights rest on `meta`.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from conftest import ORGANISM_ASSET, quiet
from sinkscope.errors import SinkscopeError


def _split_map(n_layers: int, first: str = "cpu", second: str = "disk") -> dict:
    """Vision tower and first half of the language model on `first`, the second half (and the final norm) on `second`."""
    placed = {"model.vision_tower": first, "model.multi_modal_projector": first,
              "model.language_model.embed_tokens": first, "model.language_model.rotary_emb": first,
              "model.language_model.norm": second, "lm_head": first}
    for i in range(n_layers):
        placed[f"model.language_model.layers.{i}"] = first if i < n_layers // 2 else second
    return placed


# (first half, second half, rtol of the scan's tables, rtol = atol of the edits' logits). On CUDA, float32
# kernels differ from the CPU's in the last bits (other reduction orders); TF32 is switched off so they stay float32.
SPLITS = {"cpu+disk": ("cpu", "disk", 1e-6, 1e-5), "cuda+cpu": ("cuda:0", "cpu", 1e-4, 1e-3)}


@pytest.fixture(scope="module", params=sorted(SPLITS))
def pair(request, tmp_path_factory):
    """(single-device organism, the organism loaded with a layer-split device map, (table rtol, logit tolerance)).

    cpu+disk: the second half offloaded to disk (accelerate's hooks bring each layer in per forward);
    cuda+cpu (only where CUDA is): vision tower and first half on the GPU, the rest "cpu", which accelerate
    treats as CPU offload when a GPU is present (weights at rest in CPU memory, brought to the GPU per
    forward); masks and indices the edits build on the CPU must follow the GPU tensors they index.
    """
    from sinkscope.models import load

    first, second, table_rtol, logit_tol = SPLITS[request.param]
    if first.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("needs CUDA (runs on a GPU machine)")
    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built")
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the vision tower's patch convolution would run in TF32
    single = quiet(load, "organism")
    split = quiet(load, "organism", device_map=_split_map(single.num_layers, first, second),
                  offload_folder=str(tmp_path_factory.mktemp("offload")))
    assert split.device_map is not None and second in split.device_map.values()
    # offloaded at rest: disk entries always; cpu entries too where a GPU is (accelerate then keeps their
    # weights in CPU memory and runs those layers on the GPU, moving the weights in per forward)
    assert split.layers[single.num_layers - 1].self_attn.q_proj.weight.device.type == "meta"
    assert split.device.type == torch.device(first).type
    yield single, split, (table_rtol, logit_tol)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


def assert_json_close(a, b, rtol: float, where: str = "") -> None:
    """The same JSON structure, strings, integers and booleans exactly; floats within rtol."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_json_close(a[k], b[k], rtol, f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_json_close(x, y, rtol, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rtol, abs=rtol / 10), where
    else:
        assert a == b, where


def _scan(adapter, out):
    from sinkscope.analyses.scan import ScanConfig, run_scan

    cfg = ScanConfig(model="organism", data="demo", limit=4, batch_size=2, calibration=4)
    return quiet(run_scan, str(out), cfg, adapter=adapter, resume=False, log=lambda m: None, figures=False)


def test_split_device_map_gives_the_same_scan(pair, tmp_path):
    single, split, (table_rtol, _) = pair
    a, b = _scan(single, tmp_path / "single"), _scan(split, tmp_path / "split")
    assert_json_close(json.loads((a.path / "sink_dims.json").read_text()),
                      json.loads((b.path / "sink_dims.json").read_text()), table_rtol)
    for table in ("head_scores", "token_stats", "sink_tokens", "massive_activations", "sink_summary"):
        pd.testing.assert_frame_equal(pd.read_csv(a.path / f"{table}.csv"), pd.read_csv(b.path / f"{table}.csv"),
                                      check_exact=False, rtol=table_rtol, atol=table_rtol / 10)
    assert pd.read_csv(a.path / "sink_tokens.csv").shape[0] > 0


def test_split_device_map_gives_the_same_heads_and_contributions(pair, tmp_path):
    """The head and contribution analyses follow the layers too: the head tables, and the contribution tables,
    whose W_O of an offloaded layer (at rest on the meta device) the adapter brings in to read, equal one device's."""
    from sinkscope.analyses.contributions import ContributionsConfig, run_contributions
    from sinkscope.analyses.heads import HeadsConfig, run_heads

    single, split, (table_rtol, _) = pair
    runs = {"heads": (HeadsConfig, run_heads, ("head_scores_per_sample", "token_attention", "attention_maps")),
            "contributions": (ContributionsConfig, run_contributions, ("contributions_per_sample",))}
    for name, (config, run, tables) in runs.items():
        folders = [quiet(run, str(tmp_path / f"{name}-{where}"),
                         config(model="organism", data="demo", limit=4, batch_size=2, calibration=4, n_boot=50),
                         adapter=adapter, log=lambda m: None, figures=False)
                   for where, adapter in (("single", single), ("split", split))]
        for table in tables:
            a, b = (pd.read_csv(f.path / f"{table}.csv") for f in folders)
            assert len(a), (name, table)
            pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=table_rtol, atol=table_rtol / 10, obj=table)


def _batch(adapter):
    from sinkscope.analyses.scan import prepare_batch
    from sinkscope.eval.tasks import load_samples

    return prepare_batch(adapter, load_samples("demo", 2))


def test_edits_on_a_split_model_equal_one_device(pair):
    from sinkscope.interventions.knockout import knockout
    from sinkscope.interventions.sink_signature import SinkSignature, inject_sink
    from sinkscope.interventions.var import calibrate, var

    single, split, (_, tol) = pair
    batch = _batch(single)
    inputs = single.forward_inputs(batch)
    config = calibrate(single, batch)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    visual = single.token_kinds(batch["input_ids"], batch["attention_mask"]).visual_mask
    keys = visual & (torch.arange(visual.shape[1]) % 3 == 0)  # a third of the image tokens
    signature = SinkSignature.discover(single, batch)
    target = visual & (torch.arange(visual.shape[1]) % 7 == 0)
    outputs = {}
    for name, adapter in (("single", single), ("split", split)):
        with torch.no_grad():
            with var(adapter, config) as run:
                v = adapter.model.generate(**inputs, **gen, output_scores=True, return_dict_in_generate=True)
                sinks = run.sinks(run.resolved.layers[0]).cpu()
            with knockout(adapter, keys):
                k = adapter.model(**inputs).logits
            with inject_sink(adapter, target, signature=signature):
                i = adapter.model(**inputs).logits
        outputs[name] = (v.sequences, torch.stack(v.scores), sinks, k, i)
    for what, x, y in zip(("VAR tokens", "VAR scores", "VAR sinks", "knockout logits", "injection logits"),
                          outputs["single"], outputs["split"]):
        x, y = x.float().cpu(), y.float().cpu()
        assert torch.allclose(x, y, rtol=tol, atol=tol), f"{what}: max |difference| {float((x - y).abs().max()):.3g}"
    assert outputs["single"][2].any()  # VAR found sinks to redistribute


@pytest.mark.parametrize("device_map,max_memory,device,fix", [
    ({"model.language_model.layers.0": 3}, None, None, "GPU 3"),
    ({"model.language_model.layers.0": "cuda:1"}, None, None, "CUDA"),
    ("everywhere", None, None, "auto, balanced"),
    ("auto", {7: "10GiB"}, None, "GPU 7"),
    ("auto", None, "cpu", "give one"),
    (None, {"cpu": "10GiB"}, None, "--device-map auto"),
])
def test_bad_device_maps_name_the_fix(device_map, max_memory, device, fix):
    from sinkscope.models import load

    if torch.cuda.is_available():
        pytest.skip("the messages checked here are those of a machine without CUDA")
    with pytest.raises(SinkscopeError, match=fix):
        load("organism", device=device, device_map=device_map, max_memory=max_memory)


def test_parse_max_memory_and_device_map(tmp_path):
    import json

    from sinkscope.devices import parse_device_map, parse_max_memory

    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    with pytest.raises(SinkscopeError, match="DEVICE=SIZE"):
        parse_max_memory("0:20GiB")
    assert parse_device_map("auto") == "auto"
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.language_model.layers.0": "cpu"}))
    assert parse_device_map(str(path)) == {"model.language_model.layers.0": "cpu"}
    with pytest.raises(SinkscopeError, match="JSON file"):
        parse_device_map("nowhere.json")


def test_cli_scan_with_a_device_map_file_equals_one_device(tmp_path):
    import json

    from typer.testing import CliRunner

    from sinkscope.cli import app

    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built")
    placed = _split_map(6)
    placed = {k: ("cpu" if v == "disk" else v) for k, v in placed.items()}  # disk needs an offload folder
    (tmp_path / "map.json").write_text(json.dumps(placed))
    common = ["scan", "--model", "organism", "--limit", "2", "--calibration", "2", "--batch-size", "2"]
    runner = CliRunner()
    one = runner.invoke(app, common + ["--out", str(tmp_path / "one")])
    split = runner.invoke(app, common + ["--out", str(tmp_path / "split"), "--device-map", str(tmp_path / "map.json")])
    assert one.exit_code == 0 and split.exit_code == 0, (one.output, split.output)
    for table in ("head_scores", "token_stats"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "one" / f"{table}.csv"),
                                      pd.read_csv(tmp_path / "split" / f"{table}.csv"))
    bad = runner.invoke(app, common + ["--out", str(tmp_path / "bad"), "--device-map", "everywhere"])
    assert bad.exit_code == 2 and "--device-map 'everywhere'" in bad.output and not (tmp_path / "bad").exists()


# command -> the module and run function `_run_analysis` calls for it
ANALYSIS_RUNNERS = {"scan": ("scan", "run_scan"), "heads": ("heads", "run_heads"),
                    "contributions": ("contributions", "run_contributions"), "location": ("location", "run_location"),
                    "vit-sinks": ("vit_sinks", "run_vit_sinks"), "ablate": ("ablate", "run_ablate"),
                    "patch": ("patching", "run_patching"), "var-eval": ("var_eval", "run_var_eval"),
                    "inject": ("inject", "run_inject"), "remove": ("remove", "run_remove")}


def _cpu_map_file(tmp_path) -> str:
    """A device map JSON file placing every module of the organism on "cpu" (layer by layer, as a split map does)."""
    placed = {k: "cpu" for k in _split_map(6)}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(placed))
    return str(path)


@pytest.mark.parametrize("command", sorted(ANALYSIS_RUNNERS))
def test_every_analysis_command_hands_its_device_map_to_the_config_and_the_model(command, tmp_path, monkeypatch):
    """--device-map and --max-memory of every analysis command reach the analysis config (so run.json records them)
    and the model load, parsed (the map file's {module: device}, accelerate's max_memory)."""
    import importlib

    from typer.testing import CliRunner

    import sinkscope.models
    from sinkscope.cli import app

    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built")
    module, function = ANALYSIS_RUNNERS[command]
    seen, real_load = {}, sinkscope.models.load

    def load(*args, **kwargs):
        seen.update(load_map=kwargs.get("device_map"), load_memory=kwargs.get("max_memory"))
        return real_load(*args, **kwargs)

    def runner(out, cfg, adapter=None, **kwargs):
        seen.update(device_map=cfg.device_map, max_memory=cfg.max_memory)
        return type("Folder", (), {"path": tmp_path / "out"})()

    monkeypatch.setattr(sinkscope.models.registry, "load", load)
    monkeypatch.setattr(importlib.import_module(f"sinkscope.analyses.{module}"), function, runner)
    map_file = _cpu_map_file(tmp_path)
    result = CliRunner().invoke(app, [command, "--model", "organism", "--out", str(tmp_path / "out"),
                                      "--device-map", map_file, "--max-memory", "cpu=8GiB"])
    assert result.exit_code == 0, result.output
    assert seen["device_map"] == map_file and seen["max_memory"] == "cpu=8GiB"
    assert seen["load_map"] == json.loads((tmp_path / "map.json").read_text())
    assert seen["load_memory"] == {"cpu": "8GiB"}


@pytest.mark.parametrize("command,options", [
    ("scan", ["--calibration", "2"]),
    ("ablate", ["--calibration", "2", "--n-random", "1", "--n-boot", "20", "--layers", "2"]),
])
def test_run_json_records_the_device_map_of_the_command_line(command, options, tmp_path):
    """A real run with a device map file: its run.json's params hold --device-map and --max-memory as given, and a
    run without them holds None for both."""
    from typer.testing import CliRunner

    from sinkscope.cli import app

    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built")
    map_file = _cpu_map_file(tmp_path)
    common = [command, "--model", "organism", "--limit", "2", "--batch-size", "2", *options]
    runner = CliRunner()
    split = runner.invoke(app, common + ["--out", str(tmp_path / "split"), "--device-map", map_file,
                                         "--max-memory", "cpu=8GiB"])
    assert split.exit_code == 0, split.output
    params = json.loads((tmp_path / "split" / "run.json").read_text())["params"]
    assert params["device_map"] == map_file and params["max_memory"] == "cpu=8GiB"
    one = runner.invoke(app, common + ["--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    params = json.loads((tmp_path / "one" / "run.json").read_text())["params"]
    assert params["device_map"] is None and params["max_memory"] is None


def test_a_run_resumes_and_its_shards_merge_under_another_device_map(tmp_path):
    """The device map is where the model runs, not what is computed: a finished shard resumed with another
    --max-memory resumes (run.json then records the new one), and shards placed differently (a device map; an explicit
    --device, as torchrun ranks get) merge into the tables of the unsharded one-device run."""
    from typer.testing import CliRunner

    from sinkscope.cli import app

    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built")
    map_file = _cpu_map_file(tmp_path)
    common = ["scan", "--model", "organism", "--limit", "3", "--calibration", "2", "--batch-size", "1"]
    runner = CliRunner()
    placed = ["--device-map", map_file, "--max-memory", "cpu=8GiB"]
    for args in (["--out", str(tmp_path / "whole")], ["--out", str(tmp_path / "s0"), "--shard", "0/2", *placed],
                 ["--out", str(tmp_path / "s1"), "--shard", "1/2", "--device", "cpu"]):  # torchrun: a device per rank
        result = runner.invoke(app, common + args)
        assert result.exit_code == 0, result.output
    again = runner.invoke(app, common + ["--out", str(tmp_path / "s0"), "--shard", "0/2", "--device-map", map_file,
                                         "--max-memory", "cpu=9GiB"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "s0" / "run.json").read_text())["params"]["max_memory"] == "cpu=9GiB"
    merged = runner.invoke(app, ["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "merged"),
                                 "--no-figures"])
    assert merged.exit_code == 0, merged.output
    for table in ("head_scores", "token_stats", "sink_tokens", "massive_activations"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / f"{table}.csv"),
                                      pd.read_csv(tmp_path / "merged" / f"{table}.csv"), obj=table)
    other = runner.invoke(app, common + ["--out", str(tmp_path / "s0"), "--shard", "0/2", "--dtype", "bfloat16"])
    assert other.exit_code == 2 and "other parameters (dtype)" in other.output  # what is computed still must match


def test_an_analysis_config_places_the_model_it_loads(tmp_path, monkeypatch):
    """The Python API: an analysis given no adapter loads its model with the config's device map and max memory
    (parsed as the CLI parses them), and run.json records them."""
    import sinkscope.models
    from sinkscope.analyses.contributions import ContributionsConfig, run_contributions

    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built")
    seen, real_load = {}, sinkscope.models.load

    def load(*args, **kwargs):
        seen.update(device_map=kwargs.get("device_map"), max_memory=kwargs.get("max_memory"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(sinkscope.models.registry, "load", load)
    map_file = _cpu_map_file(tmp_path)
    cfg = ContributionsConfig(model="organism", limit=2, calibration=2, batch_size=2, n_boot=20, device_map=map_file,
                              max_memory="cpu=8GiB")
    quiet(run_contributions, str(tmp_path / "run"), cfg, log=lambda m: None)
    assert seen == {"device_map": json.loads((tmp_path / "map.json").read_text()), "max_memory": {"cpu": "8GiB"}}
    params = json.loads((tmp_path / "run" / "run.json").read_text())["params"]
    assert params["device_map"] == map_file and params["max_memory"] == "cpu=8GiB"
