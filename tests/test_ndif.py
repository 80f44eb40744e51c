"""`--remote ndif`: traces sent to the NDIF service under the model's hub key, served by `fake_ndif` (the
service's exchange replaced by a server in this process that deserialises the request with sinkscope hidden and
runs it on its own copy of the weights). A hosted model is held here on the meta device only, so every number in
these tables was computed by the server: they must equal a scan, head analysis and contribution analysis of the
same checkpoint loaded here. No test reaches the real service (these machines cannot).
"""

from __future__ import annotations

import contextlib
import copy
import json
from unittest import mock

import pandas as pd
import pytest
import torch

from conftest import quiet
from fake_ndif import fake_ndif
from sinkscope.errors import SinkscopeError

REPO = "org/tiny-llama"
PLANTED_DIM = 3


def _sends_attention() -> bool:
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("nnsight")) >= Version("0.8.1")


# nnsight 0.8.0 sends no attention implementation with a request, so sinkscope refuses to send a trace with it
# (test_an_nnsight_that_would_not_ask_ndif_for_eager_attention_is_refused); the oldest supported set-up has it
served = pytest.mark.skipif(not _sends_attention(), reason="nnsight 0.8.0: sinkscope refuses NDIF (no attention "
                            "implementation in a request)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama saved as a hub checkpoint would be, with a massive activation planted in dim 3 of the BOS
    embedding (so sink dims, sinks and sink-aware tables are not empty)."""
    from tiny_text_models import build_text

    model, tok = build_text("llama")
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.bos_token_id, PLANTED_DIM] = 80.0
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    quiet(model.save_pretrained, path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from tiny_text_models import write_prompts

    return str(write_prompts(tmp_path_factory.mktemp("data") / "p.jsonl", 4, jsonl=True))


def _both(run, cfg_cls, checkpoint, prompts, tmp_path, while_served=None, there=None, **own):
    """(local run folder, NDIF run folder, requests served): the same analysis of the checkpoint loaded here and
    of the one the fake service serves (inside `while_served`, a context manager, when given; `there`: options of
    the served run only)."""
    from sinkscope.models import load
    from sinkscope.models import load_hosted

    folders = []
    common = dict(data=prompts, limit=4, batch_size=2, calibration=4, start_layer=0, n_boot=50, **own)
    here = quiet(load, str(checkpoint))
    folders.append(quiet(run, str(tmp_path / "here"), cfg_cls(model=REPO, **common), adapter=here,
                         log=lambda m: None, figures=False))
    with fake_ndif({REPO: str(checkpoint)}) as served, while_served or contextlib.nullcontext():
        hosted = quiet(load_hosted, str(checkpoint))
        assert {p.device.type for p in hosted.model.parameters()} == {"meta"}  # no weight is held here
        folders.append(quiet(run, str(tmp_path / "there"), cfg_cls(model=REPO, remote="ndif", **common, **(there or {})),
                             adapter=hosted, log=lambda m: None, figures=False))
    return folders[0], folders[1], served


def _check_requests(served):
    assert served, "nothing was sent to the service"
    for request in served:
        key = json.loads(request.model_key.split(":", 1)[1])
        assert request.model_key.startswith("nnsight.modeling.transformers.TransformersModel:")
        assert key["repo_id"] == REPO and key["task"] == "text-generation"  # the hub id, never the local path
        assert request.env.get("attn_implementation") == "eager"  # the server's model runs eager attention
        # only the reductions come back, with the op labels once (a run reading value states finds them first);
        # several batches in one request (a session) bring back one list of reductions per batch
        assert set(request.saved) in ({"collected", "found"}, {"results", "found"}, {"labels"})


def _same(here, there, tables):
    for table in tables:
        pd.testing.assert_frame_equal(pd.read_csv(here.path / f"{table}.csv"), pd.read_csv(there.path / f"{table}.csv"),
                                      obj=table)


@served
def test_a_scan_over_ndif_equals_the_scan_of_the_same_checkpoint_here(checkpoint, prompts, tmp_path):
    from sinkscope.analyses.scan import ScanConfig, run_scan

    here, there, served = _both(run_scan, ScanConfig, checkpoint, prompts, tmp_path)
    _check_requests(served)
    assert (here.path / "sink_dims.json").read_text() == (there.path / "sink_dims.json").read_text()
    assert PLANTED_DIM in json.loads((there.path / "sink_dims.json").read_text())["dims"]
    _same(here, there, ("sink_tokens", "token_stats", "head_scores", "massive_activations", "layer_magnitudes",
                        "sink_summary", "dim_profile"))
    assert pd.read_csv(there.path / "sink_tokens.csv")["token_kind"].eq("bos").any()  # the planted BOS sink
    # the op labels are found on the server too (this process holds no weights to run a layer with), inside the
    # first trace that reads attention: they come back with its payloads, not in a request of their own
    assert all("collected" in request.saved for request in served)
    assert sum("found" in request.saved for request in served) >= 1


@served
def test_batches_sent_to_ndif_as_one_request_give_the_scan_here(checkpoint, prompts, tmp_path):
    """--batches-per-request 2: the two batches of each pass (calibration's, the scan's) travel as one nnsight
    session, one job in the service's queue, and the tables equal those of the scan run here."""
    from sinkscope.analyses.scan import ScanConfig, run_scan

    here, there, served = _both(run_scan, ScanConfig, checkpoint, prompts, tmp_path, there={"batches_per_request": 2})
    _check_requests(served)
    _same(here, there, ("sink_tokens", "token_stats", "head_scores", "massive_activations", "layer_magnitudes",
                        "sink_summary", "dim_profile"))
    # 4 prompts in batches of 2: one request for each pass over them (the BOS states that find the sink dims, the
    # scan) where one per batch would be four
    assert len(served) == 2 and all("results" in request.saved for request in served)
    assert json.loads((there.path / "run.json").read_text())["params"]["batches_per_request"] == 2


@served
def test_heads_over_ndif_equal_the_heads_here(checkpoint, prompts, tmp_path):
    from sinkscope.analyses.heads import HeadsConfig, run_heads

    here, there, served = _both(run_heads, HeadsConfig, checkpoint, prompts, tmp_path)
    _check_requests(served)
    _same(here, there, [t for t in ("head_scores", "head_scores_per_sample", "token_attention", "attention_maps")
                        if (here.path / f"{t}.csv").exists()])


@served
def test_contributions_over_ndif_make_w_o_grams_on_the_server_and_equal_those_here(checkpoint, prompts, tmp_path):
    """The contribution norms need W_O, which a hosted model has only on the server: its grams are made there,
    in the trace, and the per-sample contributions equal those computed here from the local weights."""
    from sinkscope.analyses.contributions import ContributionsConfig, run_contributions

    never_here = mock.patch("sinkscope.analyses.contributions.output_grams",
                            side_effect=AssertionError("W_O's grams were made in this process"))
    here, there, served = _both(run_contributions, ContributionsConfig, checkpoint, prompts, tmp_path,
                                while_served=never_here)
    _check_requests(served)
    _same(here, there, ("contributions_per_sample", "contributions"))
    per = pd.read_csv(there.path / "contributions_per_sample.csv")
    assert len(per) and per["ov_norm"].gt(0).all()


def test_what_cannot_be_sent_to_ndif_is_refused_before_anything_loads(checkpoint, tmp_path):
    from sinkscope.analyses.scan import ScanConfig
    from sinkscope.models import load_placed

    for model, match in (("organism", "built on this machine"), ("demo", "built on this machine"),
                         (str(checkpoint), "local directory; NDIF loads checkpoints by hub id")):
        with pytest.raises(SinkscopeError, match=match):
            load_placed(ScanConfig(model=model, remote="ndif"))
    with pytest.raises(SinkscopeError, match="--device, --dtype with --remote ndif: NDIF places the model"):
        load_placed(ScanConfig(model=REPO, device="cuda", dtype="float16", remote="ndif"))
    with pytest.raises(SinkscopeError, match="choose local .* ndif .* URL"):
        ScanConfig(model=REPO, remote="ndfi").validate()
    ScanConfig(model=REPO, remote="https://ndif.example.org").validate()  # a server of one's own


def _organism_both(run, cfg_cls, tmp_path, **there):
    """(run folder here, run folder over the NDIF stand-in, requests served): the analysis of the organism (planted
    visual sinks) loaded here with eager attention throughout, as a request asks of the server, and served (`there`:
    options of the served run only)."""
    from sinkscope.models import load, load_hosted
    from sinkscope.models.registry import embedded_path

    path = str(embedded_path("organism"))
    common = dict(data="demo", limit=4, batch_size=2, calibration=2, n_boot=50)
    here = quiet(load, "organism")
    here.model.set_attn_implementation("eager")  # the vision tower too
    local = quiet(run, str(tmp_path / "here"), cfg_cls(model="org/organism", **common), adapter=here,
                  log=lambda m: None, figures=False)
    with fake_ndif({"org/organism": path}) as served:
        hosted = quiet(load_hosted, path)
        assert {p.device.type for p in hosted.model.parameters()} == {"meta"}
        there = quiet(run, str(tmp_path / "there"), cfg_cls(model="org/organism", remote="ndif", **common, **there),
                      adapter=hosted, log=lambda m: None, figures=False)
    for request in served:
        key = json.loads(request.model_key.split(":", 1)[1])
        assert key["task"] == "image-text-to-text" and request.env["attn_implementation"] == "eager"
    assert (local.path / "sink_dims.json").read_text() == (there.path / "sink_dims.json").read_text()
    return local, there, served


@served
def test_a_scan_of_an_lmm_over_ndif_finds_the_planted_visual_sinks_as_here(organism_adapter, tmp_path):
    """An LMM goes under nnsight's image-text-to-text task, its images travel as pixel values with the request, and
    every part of it runs eager attention there (one implementation per request, for the whole model)."""
    from sinkscope.analyses.scan import ScanConfig, run_scan

    local, there, _ = _organism_both(run_scan, ScanConfig, tmp_path)
    _same(local, there, ("sink_tokens", "token_stats", "head_scores", "massive_activations", "layer_magnitudes",
                         "sink_summary", "dim_profile"))
    assert pd.read_csv(there.path / "sink_tokens.csv")["token_kind"].eq("visual").any()  # the planted visual sinks


@served
def test_batches_of_an_lmm_sent_to_ndif_as_one_request_give_the_contributions_here(organism_adapter, tmp_path):
    """The analysis' two batches of images in one session (up to three allowed): the op labels are found before it
    (the run reads value states), W_O's grams are made in each of its traces, and the per-sample contributions equal
    those computed here."""
    from sinkscope.analyses.contributions import ContributionsConfig, run_contributions

    local, there, served = _organism_both(run_contributions, ContributionsConfig, tmp_path, batches_per_request=3)
    _same(local, there, ("contributions_per_sample", "contributions", "contribution_heads"))
    # calibration's one batch, the labels' own trace, the two batches of the analysis in one session
    assert [sorted(request.saved) for request in served] == [["collected", "found"], ["labels"], ["found", "results"]]


@served
def test_vit_sinks_of_an_lmm_over_ndif_read_the_projector_input_on_the_server(organism_adapter, tmp_path):
    """The vision features entering the projector are read where the model runs: the norms and top dims at both
    sites equal those of the same checkpoint run here."""
    from sinkscope.analyses.vit_sinks import VitSinksConfig, run_vit_sinks

    local, there, _ = _organism_both(run_vit_sinks, VitSinksConfig, tmp_path)
    _same(local, there, ("vit_tokens", "vit_sinks", "vit_dims"))
    assert set(pd.read_csv(there.path / "vit_tokens.csv")["site"]) == {"vit", "lm_input"}


@served
def test_heads_and_contributions_of_an_lmm_over_ndif_equal_those_here(organism_adapter, tmp_path):
    """The image-centric heads and the visual sinks' small value contributions of the organism, computed on the
    server (W_O's grams made there), equal those computed here."""
    from sinkscope.analyses.contributions import ContributionsConfig, run_contributions
    from sinkscope.analyses.heads import HeadsConfig, run_heads

    local, there, _ = _organism_both(run_heads, HeadsConfig, tmp_path / "heads")
    _same(local, there, ("head_scores", "head_scores_per_sample", "token_attention"))
    local, there, _ = _organism_both(run_contributions, ContributionsConfig, tmp_path / "contributions")
    _same(local, there, ("contributions_per_sample", "contributions", "contribution_heads"))
    per = pd.read_csv(there.path / "contributions_per_sample.csv")
    assert {"visual_sink", "visual_nonsink"} <= set(per["token_class"])


def test_an_editing_analysis_refuses_ndif_as_it_refuses_the_dry_run(checkpoint, prompts, tmp_path):
    from sinkscope.analyses.ablate import AblateConfig, run_ablate

    with pytest.raises(SinkscopeError, match="ablate cannot run remotely: it edits attention"):
        run_ablate(str(tmp_path / "a"), AblateConfig(model=REPO, data=prompts, limit=2, remote="ndif"),
                   adapter=object(), log=lambda m: None)
    assert not (tmp_path / "a").exists()


@served
def test_a_hosted_model_is_neither_traced_nor_edited_here(checkpoint, prompts):
    """Its weights are on the server: a local trace, the dry run and an attention edit name the fix instead of
    running a meta-device model."""
    from sinkscope.analyses.common import prepare_batch
    from sinkscope.eval.data import load_data
    from sinkscope.interventions.knockout import knockout
    from sinkscope.models import load_hosted
    from sinkscope.trace import Tracer

    with fake_ndif({REPO: str(checkpoint)}):
        hosted = quiet(load_hosted, str(checkpoint))
        batch = prepare_batch(hosted, list(load_data(prompts, 1, "", None)))
        for remote in (None, "local"):
            with pytest.raises(SinkscopeError, match="served by NDIF .* trace it with remote='ndif'"):
                Tracer(hosted).run(batch, [], remote=remote)
        with pytest.raises(SinkscopeError, match="served by NDIF .* attention edits run in the process"):
            with knockout(hosted, torch.zeros_like(batch["input_ids"], dtype=torch.bool)):
                pass


def test_an_nnsight_that_would_not_ask_ndif_for_eager_attention_is_refused(checkpoint):
    """nnsight 0.8.0 sends no attention implementation with a request (the server would run SDPA, whose
    probabilities are never formed); sinkscope says to upgrade instead of failing on the server."""
    from nnsight import TransformersModel

    from sinkscope.models import load_hosted

    with fake_ndif({REPO: str(checkpoint)}), mock.patch.object(TransformersModel, "_remoteable_get_env", lambda self: {}):
        with pytest.raises(SinkscopeError, match="does not send the attention implementation .* upgrade nnsight"):
            quiet(load_hosted, str(checkpoint))


@served
@pytest.mark.parametrize("family", ["gpt_neox", "gemma3_text"])
def test_contributions_over_ndif_equal_those_here_for_other_layouts(family, prompts, tmp_path):
    """GPT-NeoX (attention at `attention`, W_O at `dense`, a 'gpt_neox' model path) and Gemma 3 (sliding-window
    layers, a scaled embedding): the module paths the server resolves and the W_O it reads are the ones here."""
    from tiny_text_models import build_text

    from sinkscope.analyses.contributions import ContributionsConfig, run_contributions

    model, tok = build_text(family)
    path = tmp_path / family
    quiet(model.save_pretrained, path)
    tok.save_pretrained(path)
    here, there, served = _both(run_contributions, ContributionsConfig, path, prompts, tmp_path)
    _check_requests(served)
    _same(here, there, ("contributions_per_sample", "contributions"))
    assert (here.path / "sink_dims.json").read_text() == (there.path / "sink_dims.json").read_text()


@served
def test_a_missing_key_a_model_ndif_does_not_run_and_a_failed_request_say_what_to_do(checkpoint, prompts, tmp_path):
    from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
    from nnsight.schema.config import CONFIG

    from sinkscope.analyses.scan import ScanConfig, run_scan
    from sinkscope.models import load_hosted, load_placed
    from sinkscope.models.hosted import check_running

    with mock.patch.object(CONFIG.API, "APIKEY", None):
        with pytest.raises(SinkscopeError, match="needs an NDIF API key: run `nnsight login` or set NDIF_API_KEY"):
            load_placed(ScanConfig(model=REPO, remote="ndif"))
    with fake_ndif({REPO: str(checkpoint)}, running=()):
        with pytest.raises(SinkscopeError, match="NDIF is not running .*tiny-llama \\(task text-generation\\) now"):
            check_running(quiet(load_hosted, str(checkpoint)), "ndif")
    with fake_ndif({REPO: str(checkpoint)}):
        check_running(quiet(load_hosted, str(checkpoint)), "ndif")  # running: no error
        hosted = quiet(load_hosted, str(checkpoint))

        def refused(self, request, tracer):
            raise RemoteError("Failed to send request: invalid API key")

        cfg = ScanConfig(model=REPO, data=prompts, limit=2, batch_size=1, calibration=1, remote="ndif")
        with mock.patch.object(RemoteBackend, "request", refused):
            with pytest.raises(SinkscopeError, match="the NDIF request for .* failed: Failed to send request: invalid "
                                                     "API key. Check the API key .* rerun the same command to resume"):
                quiet(run_scan, str(tmp_path / "scan"), cfg, adapter=hosted, log=lambda m: None, figures=False)
