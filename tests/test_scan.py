"""`sinkscope scan` end to end on a tiny random demo-architecture LLaVA saved to disk.

(a) the run folder: run.json, the tables with the design's columns, sink_dims.json, index.md;
(b) resume: an interrupted run (rows of an unfinished batch on disk, samples_done.txt short)
    ends with one copy of each sample's rows, equal to the uninterrupted run's tables;
(c) the CLI: bad --tau / --rho, a missing model directory, an unsupported family (exit 2,
    a message, no traceback);
(d) data: empty / garbage images and a .jsonl without 'image' give SinkscopeError;
(e) a prompt without an image through Tracer + ScanReducer.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from sinkscope.analyses.scan import (ScanConfig, ScanReducer, block_of, joined, layer_of, prepare_batch, run_scan,
                                     text_queries_after_image)
from sinkscope.cli import app
from sinkscope.eval.tasks import Sample, load_samples
from sinkscope.models import SinkscopeError
from sinkscope.models.registry import adapter_for_model, supported
from sinkscope.trace import Tracer

LIMIT, BATCH = 6, 3
MASSIVE_COLUMNS = ["sample", "layer", "position", "token_kind", "dim", "value", "rms_value", "ratio_to_median"]
HEAD_COLUMNS = ["layer", "head", "image_attention", "visual_sink_attention", "visual_nonsink_ratio", "image_centric"]
SINK_TOKEN_COLUMNS = ["sample", "layer", "position", "token_kind", "role", "token", "phi"]
PER_SAMPLE_TABLES = ("massive_activations", "layer_magnitudes_per_sample", "token_stats", "sink_tokens",
                     "head_scores_per_sample")
SUMMARY_TABLES = ("layer_magnitudes", "head_scores", "sink_summary", "dim_profile")


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A randomly initialised demo-architecture LLaVA + the demo processor, saved (safetensors)."""
    from sinkscope.models.embedded.modeling import build_model
    from sinkscope.models.embedded.processor import build_processor

    d = tmp_path_factory.mktemp("demo_random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_model(seed=0).save_pretrained(d)
        build_processor().save_pretrained(d)
    assert (d / "model.safetensors").exists() and (d / "config.json").exists()
    return d


def _cfg(demo_dir, **over) -> ScanConfig:
    kw = dict(model=str(demo_dir), data="demo", limit=LIMIT, batch_size=BATCH, calibration=3)
    kw.update(over)
    return ScanConfig(**kw)


def _scan(out, cfg, logs=None):
    return _quiet(run_scan, str(out), cfg, figures=False, log=(logs.append if logs is not None else lambda m: None))


@pytest.fixture(scope="module")
def full_run(demo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scan") / "run"
    _scan(out, _cfg(demo_dir))
    return out


def _table(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(folder / f"{name}.csv", dtype={"sample": str})


# -- (a) the run folder ----------------------------------------------------------------------------

def test_run_folder_contents(full_run, demo_dir):
    meta = json.loads((full_run / "run.json").read_text())
    assert meta["analysis"] == "scan"
    assert meta["params"]["model"] == str(demo_dir) and meta["params"]["limit"] == LIMIT
    assert meta["params"]["batch_size"] == BATCH and meta["params"]["calibration"] == 3
    assert {"python", "torch", "transformers", "nnsight", "sinkscope"} <= set(meta["versions"])
    assert meta["started"] and meta["finished"] and meta["finished"] >= meta["started"]
    assert meta["resumed"] is False and meta["n_samples"] == LIMIT
    assert meta["model"]["family"] == "llava" and meta["model"]["text_attention"] == "eager"
    assert meta["tau"]["value"] > 0 and "sink_dims" in meta

    samples = [s.sample_id for s in load_samples("demo", LIMIT)]
    assert (full_run / "samples_done.txt").read_text().split() == samples

    massive = _table(full_run, "massive_activations")
    assert list(massive.columns[: len(MASSIVE_COLUMNS)]) == MASSIVE_COLUMNS
    assert sorted(massive["sample"].unique()) == sorted(samples)
    layers = meta["model"]["layers"]
    assert sorted(massive["layer"].unique()) == list(range(layers))
    assert (massive.groupby(["sample", "layer"]).size() == 5).all()  # top_k = 5 per sample and layer
    assert set(massive["token_kind"]) <= {"bos", "text", "visual"}
    assert (massive["ratio_to_median"] > 0).all()

    dims = json.loads((full_run / "sink_dims.json").read_text())
    assert dims["dims"] == meta["sink_dims"] and "method" in dims

    sink_tokens = _table(full_run, "sink_tokens")  # exists even when no token is a sink
    assert list(sink_tokens.columns) == SINK_TOKEN_COLUMNS
    tokens = _table(full_run, "token_stats")
    assert len(sink_tokens) == int(tokens["is_sink"].sum())
    assert ((tokens["phi"] >= meta["tau"]["value"]) == tokens["is_sink"]).all()
    # positions count the sample's own tokens (BOS = 0), whatever padding its batch needed
    first = tokens.groupby(["sample", "layer"])["position"].agg(["min", "max", "size"])
    assert (first["min"] == 0).all() and (first["max"] == first["size"] - 1).all()
    assert (tokens[tokens["token_kind"] == "bos"]["position"] == 0).all()
    assert massive["position"].between(0, tokens["position"].max()).all()

    heads = _table(full_run, "head_scores")
    assert list(heads.columns) == HEAD_COLUMNS
    assert len(heads) == layers * meta["model"]["heads"]
    assert heads[["image_attention", "visual_nonsink_ratio", "image_centric"]].apply(
        lambda c: c.between(0, 1 + 1e-6).all()).all()
    assert (heads["image_attention"] > 0).all()  # the text after the image attends to it

    index = (full_run / "index.md").read_text()
    assert index.startswith("# Sink scan") and "sink_tokens.csv" in index
    for name in SUMMARY_TABLES:
        assert (full_run / f"{name}.csv").exists(), name


# -- (b) resume ------------------------------------------------------------------------------------

def _interrupt(src: Path, dst: Path, keep: int | None) -> None:
    """Copy a finished run and make it look interrupted: the first `keep` samples done (None:
    stopped inside the first batch, before samples_done.txt was written), every table row still
    on disk, no summaries, no index, no finish time."""
    shutil.copytree(src, dst)
    done = (dst / "samples_done.txt").read_text().split()
    if keep is None:
        (dst / "samples_done.txt").unlink()
    else:
        (dst / "samples_done.txt").write_text("".join(f"{s}\n" for s in done[:keep]))
    for name in SUMMARY_TABLES[:-1] + ("index.md",):
        (dst / (name if name.endswith(".md") else f"{name}.csv")).unlink()
    meta = json.loads((dst / "run.json").read_text())
    meta.pop("finished")
    (dst / "run.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("keep", [BATCH, LIMIT - 1, None], ids=["last-batch", "last-sample", "first-batch"])
def test_resume_after_interruption(full_run, demo_dir, tmp_path, keep):
    out = tmp_path / "run"
    _interrupt(full_run, out, keep)
    unfinished = LIMIT - (keep or 0)
    before = _table(out, "token_stats")
    assert before["sample"].nunique() == LIMIT  # the unfinished samples' rows are on disk
    logs: list[str] = []
    _scan(out, _cfg(demo_dir), logs)
    assert any(f"{LIMIT - unfinished} samples already done, {unfinished} to go" in m for m in logs), logs
    assert any("resuming with sink dims" in m for m in logs)  # calibration is not redone

    meta = json.loads((out / "run.json").read_text())
    assert meta["finished"] and meta["resumed"] is (keep is not None)
    samples = [s.sample_id for s in load_samples("demo", LIMIT)]
    assert sorted((out / "samples_done.txt").read_text().split()) == sorted(samples)
    for name in PER_SAMPLE_TABLES + SUMMARY_TABLES:
        got, want = _table(out, name), _table(full_run, name)
        assert not got.duplicated().any(), name
        if "sample" in got and name != "dim_profile":
            counts = got.groupby("sample").size()
            assert counts.to_dict() == want.groupby("sample").size().to_dict(), name
        keys = [c for c in ("sample", "layer", "position", "head", "token_kind", "dim", "rank") if c in want]
        got = got.sort_values(keys).reset_index(drop=True)
        want = want.sort_values(keys).reset_index(drop=True)
        # batches of another composition pad differently: equal up to float rounding
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-5, atol=1e-6, obj=name)
    assert (out / "index.md").exists()


def test_an_error_in_a_forward_keeps_the_batch_traced_before_it(full_run, demo_dir, tmp_path, monkeypatch):
    """run_scan writes a batch's tables while the next batch's forward runs; when that forward fails, the batch
    before it is still written and marked done, and a resumed run ends equal to the uninterrupted one."""
    samples = [s.sample_id for s in load_samples("demo", LIMIT)]
    plain_run = Tracer.run

    def failing(self, batch, reducers, *args, sample_ids=None, **kwargs):
        if sample_ids == samples[BATCH:2 * BATCH]:
            raise KeyboardInterrupt  # the second batch's forward, after the first was traced
        return plain_run(self, batch, reducers, *args, sample_ids=sample_ids, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(Tracer, "run", failing)
    with pytest.raises(KeyboardInterrupt):
        _scan(out, _cfg(demo_dir))
    assert (out / "samples_done.txt").read_text().split() == samples[:BATCH]
    assert sorted(set(_table(out, "token_stats")["sample"])) == sorted(samples[:BATCH])
    monkeypatch.setattr(Tracer, "run", plain_run)
    logs: list[str] = []
    _scan(out, _cfg(demo_dir), logs)
    assert any(f"{BATCH} samples already done, {LIMIT - BATCH} to go" in m for m in logs), logs
    for name in PER_SAMPLE_TABLES:
        pd.testing.assert_frame_equal(_table(out, name), _table(full_run, name), check_exact=True, obj=name)


def test_resume_with_pinned_sinks(demo_dir, tmp_path):
    """Pinned sink dims and a low tau: sink_tokens.csv has rows, and resuming keeps one copy."""
    cfg = lambda: _cfg(demo_dir, sink_dims=[0, 1], tau=1.5, limit=4, batch_size=2, calibration=2)  # noqa: E731
    full, out = tmp_path / "full", tmp_path / "run"
    _scan(full, cfg())
    sink_tokens = _table(full, "sink_tokens")
    tokens = _table(full, "token_stats")
    assert len(sink_tokens) > 0 and len(sink_tokens) == int(tokens["is_sink"].sum())
    assert (sink_tokens["phi"] >= 1.5).all()
    assert json.loads((full / "sink_dims.json").read_text())["dims"] == [0, 1]
    _interrupt(full, out, keep=2)
    _scan(out, cfg())
    for name in ("sink_tokens", "token_stats", "head_scores"):
        pd.testing.assert_frame_equal(_table(out, name), _table(full, name), check_exact=False, rtol=1e-5,
                                      atol=1e-6, obj=name)


def test_resume_refuses_other_parameters(full_run, demo_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    with pytest.raises(SinkscopeError, match="other parameters"):
        _scan(out, _cfg(demo_dir, rho=0.7))


def test_other_parameters_are_refused_before_the_model_loads(full_run, tmp_path):
    """The check reads run.json only: a model that cannot load is never reached, and the folder is untouched."""
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    with pytest.raises(SinkscopeError, match=r"other parameters \(.*rho") as err:
        _scan(out, _cfg(tmp_path / "no-such-model", rho=0.7))
    assert "no-such-model" not in str(err.value) and "--no-resume" in str(err.value)
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before


# -- (c) the CLI -----------------------------------------------------------------------------------

def _cli(*args):
    return CliRunner().invoke(app, ["scan", *args])


@pytest.mark.parametrize("args, words", [
    (["--tau", "0"], ["--tau", "> 0"]),
    (["--tau", "-1"], ["--tau", "> 0"]),
    (["--rho", "1.5"], ["--rho", "[0, 1]"]),
])
def test_cli_rejects_bad_thresholds(tmp_path, args, words):
    res = _cli("--out", str(tmp_path / "run"), *args)
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and all(w in res.output for w in words), res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cli_missing_model_directory(tmp_path):
    res = _cli("--model", "/nonexistent/dir", "--out", str(tmp_path / "run"), "--limit", "2")
    assert res.exit_code == 2, res.output
    assert "/nonexistent/dir" in res.output and "does not exist" in res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)


def test_cli_unknown_family(tmp_path):
    from transformers import BertConfig, BertModel

    d = tmp_path / "bert"
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    _quiet(BertModel(cfg).save_pretrained, d)
    assert (d / "model.safetensors").exists()
    res = _cli("--model", str(d), "--out", str(tmp_path / "run"), "--limit", "2")
    assert res.exit_code == 2, res.output
    assert "unsupported architecture" in res.output and "Bert" in res.output
    for family, archs in supported().items():
        assert family in res.output and all(a in res.output for a in archs)
    assert "Traceback" not in res.output


# -- (d) data --------------------------------------------------------------------------------------

def test_empty_image_file(tmp_path):
    """A data set of nothing but unreadable images fails at load time, naming the file and why
    (a partly bad data set runs without them: tests/test_bad_data.py)."""
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(SinkscopeError, match=r"empty\.png.*empty"):
        load_samples(str(tmp_path))
    with pytest.raises(SinkscopeError, match=r"empty\.png.*empty"):
        Sample("empty", "q", str(tmp_path / "empty.png")).image()


def test_garbage_image_file(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really an image" * 10)
    with pytest.raises(SinkscopeError, match=r"garbage\.png.*cannot be read"):
        load_samples(str(tmp_path))
    with pytest.raises(SinkscopeError, match=r"garbage\.png.*cannot be read"):
        Sample("garbage", "q", str(tmp_path / "garbage.png")).image()


def test_missing_image_file_in_jsonl(tmp_path):
    data = tmp_path / "pope.jsonl"
    data.write_text(json.dumps({"question_id": 1, "image": "nope.png", "text": "is there a cat ?"}) + "\n")
    with pytest.raises(SinkscopeError, match=r"nope\.png.*does not exist"):
        load_samples(str(data))


def test_jsonl_without_image_field(tmp_path):
    data = tmp_path / "pope.jsonl"
    data.write_text(json.dumps({"question_id": 1, "text": "is there a cat ?", "label": "no"}) + "\n")
    with pytest.raises(SinkscopeError, match=r"pope\.jsonl:1.*'image'"):
        load_samples(str(data))


# -- (e) a prompt without an image -----------------------------------------------------------------

def test_text_only_batch_through_scan_reducer(tiny_llava):
    adapter = adapter_for_model(tiny_llava.model, tiny_llava.processor)
    samples = [Sample("t0", "what is in the image ?"), Sample("t1", "hello")]
    batch = _quiet(prepare_batch, adapter, samples)
    assert "pixel_values" not in batch
    assert not (batch["input_ids"] == tiny_llava.image_token_id).any()
    tracer = Tracer(adapter)
    info = tracer.batch_info(batch)
    assert not info.token_kinds.visual_mask.any()
    queries = text_queries_after_image(info)
    assert torch.equal(queries, info.token_kinds.text_mask)  # no image: every prompt text token

    n_layers, n_heads = adapter.num_layers, adapter.num_heads
    reducer = ScanReducer(dims=[0], tau=1.0, top_k=3, rho=0.5, summ=0.2, eps=adapter.rms_norm_eps,
                          samples=samples, want_profile=True)
    tracer.run(batch, [reducer], sample_ids=["t0", "t1"])
    assert not reducer.kinds.visual_mask.any()
    heads = pd.concat(reducer.head_rows, ignore_index=True)
    assert len(heads) == 2 * n_layers * n_heads
    assert (heads["image_attention"] == 0).all() and (heads["visual_sink_attention"] == 0).all()
    assert (heads["image_centric"] == 0).all() and (heads["n_queries"] > 0).all()
    tokens = pd.concat(reducer.token_rows, ignore_index=True)
    assert set(tokens["token_kind"]) == {"bos", "text"} and (tokens["image_index"] == -1).all()
    massive = pd.concat(reducer.massive_rows, ignore_index=True)
    assert set(massive["sample"]) == {"t0", "t1"} and "visual" not in set(massive["token_kind"])
    assert set(reducer.profile) == set(range(n_layers))
    assert all("visual" not in entry and "text_median" in entry for entry in reducer.profile.values())

    mixed = [samples[0], Sample("i0", "what ?", _image=tiny_llava.image(0))]
    with pytest.raises(SinkscopeError, match="mixes samples with and without images"):
        prepare_batch(adapter, mixed)


def test_token_detail_does_not_change_summaries(tmp_path):
    """--token-stats sinks keeps fewer rows but the same summaries (they come from exact counts)."""
    from sinkscope.models.registry import embedded_path

    try:
        embedded_path("organism")
    except Exception:
        pytest.skip("organism not built")
    frames = {}
    for detail in ("all", "sinks"):
        folder = run_scan(str(tmp_path / detail), ScanConfig(model="organism", limit=6, batch_size=3, calibration=6,
                                                             token_stats=detail), figures=False, log=lambda m: None)
        frames[detail] = {t: pd.read_csv(folder.path / f"{t}.csv") for t in ("sink_summary", "token_stats", "sink_tokens")}
    pd.testing.assert_frame_equal(frames["all"]["sink_summary"], frames["sinks"]["sink_summary"])
    assert len(frames["sinks"]["token_stats"]) < len(frames["all"]["token_stats"]) / 3
    full = frames["all"]["token_stats"]
    summary = frames["all"]["sink_summary"].set_index(["layer", "token_kind"])
    direct = full.groupby(["layer", "token_kind"]).agg(n=("phi", "size"), sinks=("is_sink", "sum"), phi=("phi", "mean"))
    assert (summary["n_tokens"] == direct["n"]).all() and (summary["n_sinks"] == direct["sinks"]).all()
    assert np.allclose(summary["mean_phi"], direct["phi"])
    assert int(summary["n_sinks"].sum()) == len(frames["all"]["sink_tokens"]) > 0


# -- the per-layer reductions never wait for the device --------------------------------------------

def _planted_kinds():
    """Three rows: left padding, right padding, and padding inside (real tokens not in one block)."""
    from sinkscope.kinds import BOS, PAD, TEXT, VISUAL, TokenKinds

    kind = torch.tensor([[PAD, PAD, BOS, TEXT, VISUAL, VISUAL, VISUAL, TEXT, TEXT],
                         [BOS, TEXT, VISUAL, VISUAL, VISUAL, TEXT, TEXT, PAD, PAD],
                         [BOS, TEXT, PAD, VISUAL, VISUAL, VISUAL, TEXT, TEXT, TEXT]])
    return TokenKinds(kind, torch.where(kind == VISUAL, 0, -1))


def _reduction(kinds, host, defer=False, score="rms", block_bytes=2**29, keep_bytes=2**31):
    from sinkscope.analyses.scan import ScanLayerReduction

    return ScanLayerReduction([1, 3], 2.0, 5, 0.5, 0.2, 1e-6, score, kinds, kinds.queries_after_image(), True,
                              host=host, defer=defer, block_bytes=block_bytes, keep_bytes=keep_bytes)


def test_scan_reductions_read_nothing_back_from_the_device():
    """Run on the meta device, where no value exists to read, the per-layer reductions complete, leave every
    payload on the device, and copy nothing from the host after the batch's first layer: no host sync between
    layers, so a GPU is never left idle waiting for the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Crossings(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
            if {t.device.type for t in tensors if t.dim()} == {"cpu", "meta"} or (
                    func._schema.name == "aten::_to_copy" and tensors[0].device.type == "cpu"):
                self.ops.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    kinds = _planted_kinds()
    kinds = type(kinds)(kinds.kind[:2], kinds.image_index[:2])  # the padding of a real batch: left or right
    reduction = _reduction(kinds, host=False)
    for layer in range(3):
        with Crossings() as crossings:
            payload = {**reduction.residual(layer, torch.empty(2, 9, 16, device="meta")),
                       **reduction.attention(layer, torch.empty(2, 4, 9, 9, device="meta"))}
        assert {v.device.type for v in payload.values()} == {"meta"}
        assert len(crossings.ops) == (4 if layer == 0 else 0), crossings.ops  # kinds (2), queries, text rows: once


def test_scan_reductions_kept_on_the_device_equal_those_sent_per_layer():
    """host=False (the local scan: payloads moved after the forward) gives what host=True (a remote trace) does,
    and the median |x| of each row is the median over its real tokens, whatever the padding."""
    kinds = _planted_kinds()
    g = torch.Generator().manual_seed(0)
    states = torch.randn(3, 9, 16, generator=g) * torch.linspace(0.5, 3.0, 16)
    states[:, :, 3] += 40.0 * (kinds.kind == 0)  # a sink dim on BOS
    probs = torch.softmax(torch.randn(3, 4, 9, 9, generator=g), dim=-1)
    kept, sent = _reduction(kinds, host=False), _reduction(kinds, host=True)
    a = {**kept.residual(0, states), **kept.attention(0, probs)}
    b = {**sent.residual(0, states), **sent.attention(0, probs)}
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key]), key
    real = kinds.real_mask
    for row in range(3):
        assert torch.equal(a["median"][row], states[row][real[row]].abs().median())
    assert torch.equal(a["profile_bos"], (states[0, 2] / states[0, 2].pow(2).mean().add(1e-6).sqrt()))


@pytest.mark.parametrize("score", ["rms", "layer"])
@pytest.mark.parametrize("block_bytes", [2**29, 1, 7000])
def test_deferred_reductions_in_blocks_of_layers_equal_the_per_layer_ones(score, block_bytes):
    """The local scan keeps each layer's state and query rows and reduces them in blocks of layers after the
    forward (block_bytes=1: one layer per block; 7000: residual blocks of 2 layers, one attention block of 4, so
    the attention block takes phi from two residual blocks); every payload equals the one reduced as its layer
    ran."""
    kinds = _planted_kinds()
    g = torch.Generator().manual_seed(1)
    n_layers = 4
    states = [torch.randn(3, 9, 32, generator=g) * torch.linspace(0.5, 3.0, 32) for _ in range(n_layers)]
    for layer, s in enumerate(states):
        s[:, :, 3] += (10.0 + 20 * layer) * (kinds.kind == 0)  # a sink dim on BOS, growing
        s[:, 5, 1] += 6.0 * layer  # and an image token that grows one
    probs = [torch.softmax(torch.randn(3, 4, 9, 9, generator=g) * 2, dim=-1) for _ in range(n_layers)]
    now, later = _reduction(kinds, host=True, score=score), _reduction(kinds, host=False, defer=True, score=score,
                                                                       block_bytes=block_bytes)
    expected = {}
    for layer in range(n_layers):
        expected[("residual", layer)] = now.residual(layer, states[layer])
        expected[("attention", layer)] = now.attention(layer, probs[layer])
        assert later.residual(layer, states[layer]) is None and later.attention(layer, probs[layer]) is None
    blocks = later.finish()
    sizes = {kind: [len(block_layers) for k, block_layers, _ in blocks if k == kind] for kind in ("residual", "attention")}
    assert sizes == {2**29: {"residual": [4], "attention": [4]}, 1: {"residual": [1] * 4, "attention": [1] * 4},
                     7000: {"residual": [2, 2], "attention": [4]}}[block_bytes]
    got = [(kind, layer, layer_of(block, i)) for kind, block_layers, block in blocks
           for i, layer in enumerate(block_layers)]
    assert [(kind, layer) for kind, layer, _ in got] == ([("residual", l) for l in range(n_layers)]
                                                         + [("attention", l) for l in range(n_layers)])
    for kind, layer, payload in got:
        want = expected[(kind, layer)]
        assert payload.keys() == want.keys()
        for key in want:
            assert payload[key].shape == want[key].shape, (kind, layer, key)
            if payload[key].dtype.is_floating_point:
                assert torch.allclose(payload[key], want[key], rtol=1e-6, atol=1e-7, equal_nan=True), (kind, layer, key)
            else:
                assert torch.equal(payload[key], want[key]), (kind, layer, key)
    sinks = [expected[("residual", l)]["phi"] >= 2.0 for l in range(n_layers)]
    assert any(s[:, 5].any() for s in sinks) and all(s[:, 2].any() or s[:, 0].any() for s in sinks)  # sinks exist


@pytest.mark.parametrize("keep_bytes,during", [(1, [[0], [1], [2]]), (12000, [[0, 1]])])
def test_deferred_layers_past_the_memory_budget_are_reduced_during_the_forward(keep_bytes, during):
    """A long prompt of a text-only LM keeps whole attention maps: once the kept layers would pass keep_bytes, the
    local scan reduces them during the forward (on the device, nothing read back) and keeps only their small
    results, so it holds at most the budget plus a layer; the payloads equal those reduced as each layer ran."""
    kinds = _planted_kinds()
    g = torch.Generator().manual_seed(2)
    now, later = _reduction(kinds, host=True), _reduction(kinds, host=False, defer=True, keep_bytes=keep_bytes)
    reductions, reduce = [], later._store._reduce
    later._store._reduce = lambda kept: reductions.append(sorted(kept["residual"])) or reduce(kept)
    expected = {}
    for layer in range(4):
        states = torch.randn(3, 9, 32, generator=g)
        states[:, :, 3] += 20.0 * (kinds.kind == 0)
        probs = torch.softmax(torch.randn(3, 4, 9, 9, generator=g) * 2, dim=-1)
        expected[("residual", layer)] = now.residual(layer, states)
        expected[("attention", layer)] = now.attention(layer, probs)
        later.residual(layer, states)
        later.attention(layer, probs)
        layer_bytes = 4 * (states.numel() + probs[:, :, later.query_rows[0]:later.query_rows[1]].numel())
        assert later._store.bytes <= keep_bytes + layer_bytes
    assert reductions == during  # before the end of the forward
    blocks = later.finish()
    got = [(kind, layer, layer_of(block, i)) for kind, block_layers, block in blocks
           for i, layer in enumerate(block_layers)]
    order = [(kind, layer) for kind, layer, _ in got]
    assert sorted(order) == sorted(expected) and all(
        order.index(("residual", layer)) < order.index(("attention", layer)) for layer in range(4))
    for kind, layer, payload in got:
        for key, want in expected[(kind, layer)].items():
            assert torch.allclose(payload[key].to(want.dtype), want, rtol=1e-6, atol=1e-7, equal_nan=True), key


def test_deferred_reductions_do_two_copies_per_layer_during_the_trace():
    """Deferred (the local scan), a layer costs one copy of its state and one of its query rows while the forward
    runs; everything else waits for finish(), which also runs on the meta device (reads nothing back)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[1]
            if name not in ("view", "slice", "detach", "alias", "as_strided", "unsqueeze", "expand", "empty",
                            "empty_like", "empty_strided"):  # views and allocations launch nothing
                self.names.append(name)
            return func(*args, **(kwargs or {}))

    kinds = _planted_kinds()
    kinds = type(kinds)(kinds.kind[:2], kinds.image_index[:2])
    reduction = _reduction(kinds, host=False, defer=True)
    for layer in range(3):
        with Ops() as ops:
            reduction.residual(layer, torch.empty(2, 9, 16, device="meta"))
            reduction.attention(layer, torch.empty(2, 4, 9, 9, device="meta"))
        assert ops.names == ["clone", "clone"], ops.names
    blocks = reduction.finish()
    assert [(kind, layers) for kind, layers, _ in blocks] == [("residual", [0, 1, 2]), ("attention", [0, 1, 2])]
    assert all(v.device.type == "meta" for _, _, p in blocks for v in p.values())


def _literal_residual_tables(reducer, payloads):
    """The residual tables one (layer, sample) at a time, as the scan built them before they were vectorised."""
    from sinkscope.analyses.scan import MAGNITUDE_COLUMNS, MASSIVE_COLUMNS
    from sinkscope.models.base import KIND_NAMES

    massive = {name: [] for name in MASSIVE_COLUMNS}
    magnitude = {name: [] for name in MAGNITUDE_COLUMNS}
    for layer, p in payloads:
        keep = [b for b, n in enumerate(p["n_real"].tolist()) if n > 0]
        k = p["top_value"].shape[1]
        for b in keep:
            for rank in range(k):
                pos = int(p["top_position"][b, rank])
                value = float(p["top_value"][b, rank].double())
                massive["sample"].append(reducer.sample_ids[b])
                massive["layer"].append(layer)
                massive["position"].append(int(reducer.real_pos[b, pos]))
                massive["token_kind"].append(KIND_NAMES[int(reducer.kinds.kind[b, pos])])
                massive["dim"].append(int(p["top_dim"][b, rank]))
                massive["value"].append(value)
                massive["rms_value"].append(value / float(p["top_rms"][b, rank].double()))
                massive["ratio_to_median"].append(abs(value) / max(float(p["median"][b].double()), 1e-12))
                massive["rank"].append(rank + 1)
            top = [float(v) for v in p["top3"][b].double()] + [float("nan")] * 3
            magnitude["sample"].append(reducer.sample_ids[b])
            magnitude["layer"].append(layer)
            for i, name in enumerate(("top1", "top2", "top3")):
                magnitude[name].append(top[i])
            magnitude["median"].append(float(p["median"][b].double()))
    return pd.DataFrame(massive), pd.DataFrame(magnitude)


def test_residual_tables_equal_the_literal_per_layer_per_sample_build():
    """The massive-activation and magnitude tables, built in one vectorised pass over layers, equal a literal
    loop over (layer, sample, rank): a left-padded, a right-padded and an inner-padded row, 3 layers, top 5."""
    from sinkscope.analyses.scan import ScanReducer
    from sinkscope.trace import BatchInfo

    kinds = _planted_kinds()
    g = torch.Generator().manual_seed(2)
    reduction = _reduction(kinds, host=True)
    payloads = []
    for layer in range(3):
        states = torch.randn(3, 9, 16, generator=g)
        states[:, :, 3] += (5.0 + 10 * layer) * (kinds.kind == 0)
        payloads.append((layer, reduction.residual(layer, states)))
    reducer = ScanReducer([1, 3], 2.0, 5, 0.5, 0.2, 1e-6, [], want_profile=False)
    reducer.begin(BatchInfo(torch.zeros(3, 9, dtype=torch.long), kinds, ["a", "b", "c"]))
    reducer._residual_tables([0, 1, 2], joined([([layer], block_of(p)) for layer, p in payloads])[1])
    massive, magnitude = _literal_residual_tables(reducer, payloads)
    pd.testing.assert_frame_equal(reducer.massive_rows[0], massive, check_exact=True)
    pd.testing.assert_frame_equal(reducer.magnitude_rows[0], magnitude, check_exact=True)
    assert len(massive) == 3 * 3 * 5 and set(massive["token_kind"]) >= {"bos"}


def _literal_token_and_head_tables(reducer, payloads, phi_of):
    """The token and head tables one (layer, sample, token or head) at a time, as the scan built them before they
    were vectorised."""
    from sinkscope.measures import sinks
    from sinkscope.models.base import KIND_NAMES

    strings = reducer.token_strings(reducer.info.input_ids)
    masks = {s.sample_id: s.meta.get("background_patches") for s in reducer.samples}
    tokens = {name: [] for name in ("sample", "layer", "position", "token_kind", "role", "token", "image_index",
                                    "phi", "is_sink", "attention_received", "visual_rank", "on_background")}
    heads = {name: [] for name in ("sample", "layer", "head", "image_attention", "visual_sink_attention",
                                   "visual_nonsink_ratio", "image_centric", "n_queries")}
    for layer, p in payloads:
        phi = phi_of[layer]
        for b, sid in enumerate(reducer.sample_ids):
            positions = [t for t in range(reducer.real.shape[1]) if reducer.real[b, t]]
            names = [KIND_NAMES[int(reducer.kinds.kind[b, t])] for t in positions]
            text = [strings[b][t] if name != "visual" else "" for name, t in zip(names, positions)]
            for t, name, word, role in zip(positions, names, text, sinks.token_roles(names, text)):
                tokens["sample"].append(sid)
                tokens["layer"].append(layer)
                tokens["position"].append(int(reducer.real_pos[b, t]))
                tokens["token_kind"].append(name)
                tokens["role"].append(role)
                tokens["token"].append(word)
                tokens["image_index"].append(int(reducer.kinds.image_index[b, t]))
                tokens["phi"].append(phi[b, t].numpy())
                tokens["is_sink"].append(bool(phi[b, t] >= reducer.tau))
                tokens["attention_received"].append(p["received"][b, t].numpy())
                image = int(reducer.kinds.image_index[b, t])  # rank: earlier real tokens of the same image
                rank = -1 if image < 0 else sum(int(reducer.kinds.image_index[b, u]) == image
                                                and bool(reducer.real[b, u]) for u in range(t))
                tokens["visual_rank"].append(rank)
                mask = masks.get(sid)
                tokens["on_background"].append(None if rank < 0 or mask is None or rank >= len(mask)
                                               else bool(mask[rank]))
            for head in range(p["image_attention"].shape[1]):
                heads["sample"].append(sid)
                heads["layer"].append(layer)
                heads["head"].append(head)
                for name in ("image_attention", "visual_sink_attention", "visual_nonsink_ratio", "image_centric"):
                    heads[name].append(p[name][b, head].numpy())
                heads["n_queries"].append(int(reducer.queries[b].sum()))
    tokens = pd.DataFrame({k: (np.array(v) if k in ("phi", "attention_received") else
                               np.array(v, dtype=object) if k == "on_background" else v) for k, v in tokens.items()})
    heads = pd.DataFrame({k: (np.array(v) if isinstance(v[0], np.ndarray) else v) for k, v in heads.items()})
    return tokens, heads


def test_token_and_head_tables_equal_the_literal_per_layer_per_sample_build():
    """The token and head tables, built in one vectorised pass over layers, equal a literal loop over (layer,
    sample, token) and (layer, sample, head), dtypes included: a left-padded, a right-padded and an inner-padded
    row, token strings, 3 layers."""
    from sinkscope.analyses.scan import ScanReducer
    from sinkscope.trace import BatchInfo

    kinds = _planted_kinds()
    g = torch.Generator().manual_seed(3)
    reduction = _reduction(kinds, host=True)
    samples = [Sample(sample_id="a", question="q", meta={"background_patches": [True, False, True]}),
               Sample(sample_id="b", question="q", meta={"background_patches": [False, True]}),  # shorter than image
               Sample(sample_id="c", question="q")]  # no mask
    reducer = ScanReducer([1, 3], 2.0, 5, 0.5, 0.2, 1e-6, samples, want_profile=False,
                          token_strings=lambda ids: [[f"w{b}.{t}" for t in range(ids.shape[1])]
                                                     for b in range(ids.shape[0])])
    reducer.begin(BatchInfo(torch.zeros(3, 9, dtype=torch.long), kinds, ["a", "b", "c"]))
    payloads, phi_of = [], {}
    for layer in range(3):
        states = torch.randn(3, 9, 16, generator=g)
        states[:, :, 3] += (5.0 + 10 * layer) * (kinds.kind == 0)
        states[:, 5, 1] += 8.0 * layer  # an image token that becomes a sink
        residual = reduction.residual(layer, states)
        phi_of[layer] = residual["phi"]
        reducer.take("residual", layer, residual)
        payloads.append((layer, reduction.attention(layer, torch.softmax(torch.randn(3, 4, 9, 9, generator=g), -1))))
        reducer.take("attention", layer, payloads[-1][1])
    reducer.end()
    tokens, heads = _literal_token_and_head_tables(reducer, payloads, phi_of)
    pd.testing.assert_frame_equal(reducer.token_rows[0], tokens, check_exact=True)
    pd.testing.assert_frame_equal(reducer.head_rows[0], heads, check_exact=True)
    assert len(tokens) == 3 * (7 + 7 + 8) and len(heads) == 3 * 3 * 4
    assert tokens["is_sink"].any() and not tokens["is_sink"].all()
    assert (tokens.loc[tokens.token_kind == "visual", "token"] == "").all() and "w2.8" in set(tokens["token"])
    visual = tokens[tokens.token_kind == "visual"]
    assert visual["visual_rank"].tolist() == [0, 1, 2] * 9  # three image tokens per row, in every layer
    assert visual["on_background"].tolist() == [True, False, True, False, True, None, None, None, None] * 3


@pytest.mark.parametrize("n_layers", [2, 6])
def test_deferred_payloads_reach_the_host_once_per_block_not_once_per_layer(n_layers):
    """The local scan's payloads leave the device once per block of layers: a device-to-host copy is a wait for
    the device, so the number of copies must not grow with the layers. Run on the meta device with every copy to
    the CPU counted (and made an empty CPU tensor, as meta holds no values)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.to_host = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and str(kwargs.get("device")) == "cpu" \
                    and args[0].device.type == "meta":
                self.to_host += 1
                return torch.empty(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            return func(*args, **kwargs)

    kinds = _planted_kinds()
    reduction = _reduction(kinds, host=True, defer=True)
    for layer in range(n_layers):
        reduction.residual(layer, torch.empty(3, 9, 16, device="meta"))
        reduction.attention(layer, torch.empty(3, 4, 9, 9, device="meta"))
    with Copies() as copies:
        blocks = reduction.finish()
    assert [(kind, layers) for kind, layers, _ in blocks] == [("residual", list(range(n_layers))),
                                                               ("attention", list(range(n_layers)))]
    assert all(v.device.type == "cpu" for _, _, p in blocks for v in p.values())
    keys = {kind: len(p) for kind, _, p in blocks}
    assert copies.to_host == keys["residual"] + keys["attention"], (copies.to_host, keys)  # one block of each kind


def test_deferred_blocks_never_mix_devices():
    """A model split across devices keeps each layer's state and query rows where the layer ran: blocks are runs of
    layers on one device, reduced there (layers 0-1 on the CPU, 2-4 on the meta device; residual 0-2 on the CPU,
    as a layer's input may still sit where the previous layer left it)."""
    from conftest import feed_layers_split_across_devices

    reduction = _reduction(_planted_kinds(), host=False, defer=True)
    feed_layers_split_across_devices(reduction, batch=3, seed=4)
    blocks = reduction.finish()
    assert [(kind, layers, {v.device.type for v in block.values()}) for kind, layers, block in blocks] == [
        ("residual", [0, 1, 2], {"cpu"}), ("residual", [3, 4], {"meta"}),
        ("attention", [0, 1], {"cpu"}), ("attention", [2, 3, 4], {"meta"})]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_states_give_the_exact_median_over_real_tokens(dtype):
    """A model in 16 bits hands 16-bit states: the scan's median |x| of each (sample, layer) is then taken from a
    histogram of bit patterns, and equals torch's median over the row's real tokens, left, right and inner padding,
    per layer and deferred in a block of layers."""
    kinds = _planted_kinds()
    g = torch.Generator().manual_seed(5)
    states = [(torch.randn(3, 9, 16, generator=g) * torch.linspace(0.5, 3.0, 16) * (layer + 1)).to(dtype)
              for layer in range(3)]
    now, later = _reduction(kinds, host=True), _reduction(kinds, host=True, defer=True)
    real = kinds.real_mask
    for layer, s in enumerate(states):
        median = now.residual(layer, s)["median"]
        later.residual(layer, s)
        for row in range(3):
            assert torch.equal(median[row], s[row][real[row]].float().abs().median()), (layer, row)
    (kind, layers, block), = later.finish()
    assert (kind, layers) == ("residual", [0, 1, 2])
    for layer, s in enumerate(states):
        for row in range(3):
            assert torch.equal(block["median"][row, layer], s[row][real[row]].float().abs().median())


def test_tables_later_wait_for_the_queued_copies_before_reading_them(tiny_llava):
    """With tables_later, end() leaves the tables to build(), which first waits on every copy event (CUDA copies
    are queued non-blocking; on a CPU none are, so a stand-in event is planted) and then equals the tables an
    immediate reducer makes."""
    adapter, samples = adapter_for_model(tiny_llava.model, tiny_llava.processor), load_samples("demo", 2)
    batch = _quiet(prepare_batch, adapter, samples)
    ids = [s.sample_id for s in samples]
    make = lambda later: ScanReducer([0, 1], 1.0, 3, 0.5, 0.2, 1e-6, samples, want_profile=False, tables_later=later)
    now, later = make(False), make(True)
    Tracer(adapter).run(batch, [now, later], sample_ids=ids)
    assert later.massive_rows == [] and later.count_rows == [] and now.count_rows
    order: list[str] = []

    class Event:
        def synchronize(self):
            order.append("waited")

    later._copies.append(Event())
    columns = later._sample_columns
    later._sample_columns = lambda: (order.append("tables"), columns())[1]
    later.build()
    later.build()  # nothing new: nothing done twice
    assert order == ["waited", "tables"]
    for name in ("massive_rows", "magnitude_rows", "head_rows", "count_rows", "role_rows", "token_rows"):
        for got, want in zip(getattr(later, name), getattr(now, name), strict=True):
            pd.testing.assert_frame_equal(got, want, check_exact=True, obj=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the queued (non-blocking) copies exist there")
def test_tables_later_on_cuda_equal_the_immediate_tables(tiny_llava):
    """On a GPU, tables_later queues the payloads' copies to pinned host memory and records an event; the tables
    built after waiting on it equal those of a reducer that copied synchronously."""
    model = tiny_llava.model.to("cuda")
    try:
        adapter, samples = adapter_for_model(model, tiny_llava.processor), load_samples("demo", 2)
        batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in _quiet(prepare_batch, adapter,
                                                                                     samples).items()}
        make = lambda later: ScanReducer([0, 1], 1.0, 3, 0.5, 0.2, 1e-6, samples, want_profile=False,
                                         tables_later=later)
        now, later = make(False), make(True)
        Tracer(adapter).run(batch, [now, later], sample_ids=[s.sample_id for s in samples])
        assert later._copies, "no copy was queued"
        later.build()
        for name in ("massive_rows", "head_rows", "count_rows", "role_rows", "token_rows"):
            for got, want in zip(getattr(later, name), getattr(now, name), strict=True):
                pd.testing.assert_frame_equal(got, want, check_exact=True, obj=name)
    finally:
        tiny_llava.model.to("cpu")
