"""Planted ground truth: `sinkscope scan` must find exactly what the organism's edits installed.

(a) On a tiny RANDOM demo-architecture LLaVA: install the mechanism, check it with `verify`, save
    it, scan it, and require the scan to report exactly the planted sink dims, and exactly BOS plus
    the planted sink patches as sink tokens in every layer from `massive_from_layer` on (none before).
(b) The shipped organism (sinkscope/models/embedded/assets/organism), when present: the same exact check
    through the CLI (`sinkscope scan --model organism`), and its ground_truth.json matches its
    weights (verify() holds; the edits are where the file says). Skipped while the asset is absent.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from sinkscope import world
from sinkscope.models.embedded.organism import GroundTruth, install, measure, sink_patch_rule, verify

N_PATCH = (world.IMAGE_SIZE // world.PATCH_SIZE) ** 2
LIMIT = 8


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _table(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(folder / f"{name}.csv", dtype={"sample": str})


# -- shared checks ---------------------------------------------------------------------------------


def assert_scan_finds_ground_truth(run: Path, truth: GroundTruth, n_layers: int, n_samples: int = LIMIT) -> None:
    """sink_dims.json and sink_tokens.csv of a scan equal the planted ground truth, exactly."""
    dims = json.loads((run / "sink_dims.json").read_text())
    assert dims["dims"] == sorted(truth.sink_dims), dims["reason"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["sink_dims"] == sorted(truth.sink_dims) and meta["n_samples"] == n_samples

    tokens = _table(run, "token_stats")
    sinks = _table(run, "sink_tokens")
    assert len(sinks) == int(tokens["is_sink"].sum())
    samples = sorted(tokens["sample"].unique())
    assert len(samples) == n_samples
    assert sorted(tokens["layer"].unique()) == list(range(n_layers))

    first = tokens[tokens["layer"] == 0]
    bos = first[first["token_kind"] == "bos"].groupby("sample")["position"].agg(list)
    visual = first[first["token_kind"] == "visual"].groupby("sample")["position"].agg(list)
    expected: dict[str, dict[int, str]] = {}
    for s in samples:
        assert len(bos[s]) == 1, f"sample {s}: BOS positions {bos[s]}"
        image = sorted(visual[s])
        assert len(image) == N_PATCH and image == list(range(image[0], image[0] + N_PATCH)), s
        expected[s] = {bos[s][0]: "bos", **{image[0] + p: "visual" for p in truth.sink_patches}}

    early = sinks[sinks["layer"] < truth.massive_from_layer]
    assert early.empty, f"sinks before layer {truth.massive_from_layer}:\n{early}"
    for s in samples:
        for layer in range(truth.massive_from_layer, n_layers):
            rows = sinks[(sinks["sample"] == s) & (sinks["layer"] == layer)]
            got = dict(zip(rows["position"].astype(int), rows["token_kind"]))
            assert got == expected[s], f"sample {s}, layer {layer}: sinks {got}, planted {expected[s]}"
    # the visual sinks sit on the planted patches (visual_rank = row-major patch index)
    vis = tokens[tokens["is_sink"] & (tokens["token_kind"] == "visual")]
    assert set(vis["visual_rank"]) == set(truth.sink_patches)
    # phi separates the planted sinks from every other token, in every layer from the onset
    late = tokens[tokens["layer"] >= truth.massive_from_layer]
    tau = meta["tau"]["value"]
    is_planted = [int(p) in expected[s] for s, p in zip(late["sample"], late["position"])]
    planted = late[is_planted]
    assert (planted["phi"] >= tau).all() and (late[[not x for x in is_planted]]["phi"] < tau).all()


@torch.no_grad()
def assert_weights_match_ground_truth(model, truth: GroundTruth) -> None:
    """The edits recorded in ground_truth.json are in the weights."""
    lm = model.model.language_model
    cfg = model.config.text_config
    d1, d2 = truth.sink_dims  # sorted; the neuron writes +A into one and -A/2 into the other
    flag, neuron, unit, channel = truth.flag_dim, truth.mlp_neuron, truth.projector_unit, truth.vision_channel
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    def nonzero(t: torch.Tensor) -> list[int]:
        return torch.nonzero(t != 0).flatten().tolist()

    # 1. the flag: BOS's embedding only; the projector unit reads only the vision channel
    embed = lm.embed_tokens.weight
    assert nonzero(embed[:, flag]) == [cfg.bos_token_id]
    pos = model.model.vision_tower.embeddings.position_embedding.weight
    assert nonzero(pos[:, channel]) == [1 + p for p in sorted(truth.sink_patches)]  # position 0 is CLS
    l1, l2 = model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2
    assert nonzero(l1.weight[unit]) == [channel]
    assert nonzero(l1.weight[:, channel]) == [unit]
    assert nonzero(l2.weight[:, unit]) == [flag]
    assert nonzero(l2.weight[flag]) == [unit] and float(l2.bias[flag]) == 0.0
    # nothing else writes the flag dim; only one layer's MLP reads it
    for i, layer in enumerate(lm.layers):
        assert not layer.self_attn.o_proj.weight[flag].any() and not layer.mlp.down_proj.weight[flag].any()
        assert float(layer.input_layernorm.weight[flag]) == 0.0
        reads = float(layer.post_attention_layernorm.weight[flag])
        assert reads == (1.0 if i == truth.massive_from_layer - 1 else 0.0), i
    # 2. the massive neuron: reads the flag, writes only the sink dims
    mlp = lm.layers[truth.massive_from_layer - 1].mlp
    assert nonzero(mlp.gate_proj.weight[neuron]) == [flag] and nonzero(mlp.up_proj.weight[neuron]) == [flag]
    assert nonzero(mlp.gate_proj.weight[:, flag]) == [neuron]
    assert nonzero(mlp.down_proj.weight[:, neuron]) == [d1, d2]
    w = mlp.down_proj.weight[[d1, d2], neuron]
    assert torch.isclose(w.abs().max() / w.abs().min(), torch.tensor(2.0)) and float(w[0] * w[1]) < 0
    # 4. values ignore the sink dims from the onset on; keys read them only in the sink heads
    sink_rows = {}
    for layer, head in truth.sink_heads:
        sink_rows.setdefault(layer, []).append(head * head_dim + head_dim // 2 - 1)
    for i in range(truth.massive_from_layer, cfg.num_hidden_layers):
        attn = lm.layers[i].self_attn
        assert not attn.v_proj.weight[:, [d1, d2]].any(), i
        keys = attn.k_proj.weight[:, [d1, d2]]
        assert sorted(set(torch.nonzero(keys != 0)[:, 0].tolist())) == sorted(sink_rows.get(i, [])), i
    for i in range(truth.massive_from_layer):
        assert lm.layers[i].self_attn.v_proj.weight[:, [d1, d2]].any()  # untouched before the onset


# -- (a) a random model with the mechanism installed -------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from sinkscope.models.embedded.modeling import build_model
    from sinkscope.models.embedded.processor import build_processor
    from sinkscope.models.embedded.tiny_data import make_batch

    model = build_model(seed=0)
    model.eval()
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    patches, rule = sink_patch_rule(n_scenes=300)
    assert patches and all(0 <= p < N_PATCH for p in patches) and "300" in rule
    # calibrate on 8 validation scenes to be fast; verify below on the default 32 and the scan on test scenes
    truth = _quiet(install, model, patches, rule, batch=make_batch("finetune", "validation", list(range(8))))
    d = tmp_path_factory.mktemp("organism_random")
    _quiet(model.save_pretrained, d)
    _quiet(build_processor().save_pretrained, d)
    (d / "ground_truth.json").write_text(truth.to_json())
    return model, truth, d


def test_install_records_a_consistent_ground_truth(planted):
    model, truth, d = planted
    patches, _ = sink_patch_rule(n_scenes=300)
    assert truth.sink_patches == patches
    assert len(truth.sink_dims) == 2 and truth.flag_dim not in truth.sink_dims
    assert truth.massive_from_layer == 2 and truth.massive_value >= 100
    n_layers = model.config.text_config.num_hidden_layers
    assert [h[0] for h in truth.sink_heads] == list(range(truth.massive_from_layer, n_layers - 1))
    assert "PLANTED" in truth.note
    loaded = GroundTruth.load(d / "ground_truth.json")
    assert loaded.sink_dims == truth.sink_dims and loaded.sink_patches == truth.sink_patches
    assert_weights_match_ground_truth(model, truth)


def test_verify_holds(planted):
    model, truth, _ = planted
    assert verify(model, truth) == []  # default calibration batch: 32 validation scenes
    m = measure(model, truth)
    for row in m["layers"]:
        if row["layer"] >= truth.massive_from_layer:
            assert row["max_abs_sink_dim"] >= 0.5 * truth.massive_value
    # and verify is not vacuous: silence the massive neuron and it complains
    mlp = model.model.language_model.layers[truth.massive_from_layer - 1].mlp
    saved = mlp.down_proj.weight[:, truth.mlp_neuron].clone()
    try:
        with torch.no_grad():
            mlp.down_proj.weight[:, truth.mlp_neuron] = 0.0
        assert verify(model, truth)
    finally:
        with torch.no_grad():
            mlp.down_proj.weight[:, truth.mlp_neuron] = saved
    assert verify(model, truth) == []


def test_scan_finds_the_planted_ground_truth(planted, tmp_path):
    from sinkscope.analyses.scan import ScanConfig, run_scan

    model, truth, d = planted
    out = tmp_path / "scan"
    _quiet(run_scan, str(out), ScanConfig(model=str(d), data="demo", limit=LIMIT, batch_size=4, calibration=8),
           figures=False, log=lambda m: None)
    assert_scan_finds_ground_truth(out, truth, model.config.text_config.num_hidden_layers)


# -- (b) the shipped organism ---------------------------------------------------------------------


def _shipped() -> Path:
    path = Path(__file__).resolve().parent.parent / "sinkscope" / "models" / "embedded" / "assets" / "organism"
    if not ((path / "config.json").exists() and (path / "ground_truth.json").exists()):
        pytest.skip(f"the shipped organism is not built yet ({path} lacks config.json or ground_truth.json); "
                    "build it with `python -m sinkscope.models.embedded.organism`")
    return path


def test_shipped_organism_ground_truth_matches_weights():
    from sinkscope.models import load

    path = _shipped()
    truth = GroundTruth.load(path / "ground_truth.json")
    assert "PLANTED" in truth.note
    adapter = _quiet(load, "organism")
    model = adapter.model
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    assert_weights_match_ground_truth(model, truth)
    assert verify(model, truth) == []
    patches, rule = sink_patch_rule()  # the stated rule reproduces the recorded patches
    assert truth.sink_patches == patches and truth.patch_rule == rule


def test_shipped_organism_scan_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from sinkscope.cli import app

    path = _shipped()
    truth = GroundTruth.load(path / "ground_truth.json")
    out = tmp_path / "scan"
    result = _quiet(CliRunner().invoke, app, ["scan", "--model", "organism", "--out", str(out), "--limit", str(LIMIT)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (out / "index.md").exists()
    meta = json.loads((out / "run.json").read_text())
    assert meta["planted"] is True
    n_layers = json.loads((path / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert_scan_finds_ground_truth(out, truth, n_layers)
