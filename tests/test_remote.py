"""Remote runs through nnsight's serverless dry run of NDIF (`remote="local"`: the trace is serialised as
for NDIF, deserialised with sinkscope's own modules hidden, and run): only reductions come back, and
the tables equal those of a local run, on an LMM family (the planted organism) and a text-only causal LM.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pandas as pd
import pytest
import torch

from conftest import quiet
from sinkscope.errors import SinkscopeError

TABLES = ("sink_tokens", "token_stats", "head_scores", "massive_activations", "layer_magnitudes", "sink_summary",
          "dim_profile")


def _scan(adapter, out, data, remote, resume=False, **options):
    from sinkscope.analyses.scan import ScanConfig, run_scan

    cfg = ScanConfig(model=adapter.name, data=data, remote=remote, **{**dict(limit=4, batch_size=2, calibration=2),
                                                                      **options})
    return quiet(run_scan, str(out), cfg, adapter=adapter, resume=resume, log=lambda m: None, figures=False)


def _same_tables(a, b, tables=TABLES):
    """The run folders hold the same sink dims (every analysis calibrates) and the same tables."""
    assert (a.path / "sink_dims.json").read_text() == (b.path / "sink_dims.json").read_text()
    for table in tables:
        pd.testing.assert_frame_equal(pd.read_csv(a.path / f"{table}.csv"), pd.read_csv(b.path / f"{table}.csv"),
                                      obj=table)


def test_remote_local_scan_of_an_lmm_equals_the_local_scan(organism_adapter, tmp_path):
    here = _scan(organism_adapter, tmp_path / "here", "demo", None)
    there = _scan(organism_adapter, tmp_path / "there", "demo", "local")
    _same_tables(here, there)
    assert pd.read_csv(here.path / "sink_tokens.csv")["token_kind"].eq("visual").any()  # the planted visual sinks


def test_remote_local_scan_of_a_text_only_lm_equals_the_local_scan(tmp_path):
    from tiny_text_models import build_text, write_prompts

    from sinkscope.models import adapter_for_model

    model, tok = build_text("llama")
    adapter = adapter_for_model(model, tok, "tiny-llama")
    prompts = str(write_prompts(tmp_path / "p.jsonl", 4, jsonl=True))
    _same_tables(_scan(adapter, tmp_path / "here", prompts, None), _scan(adapter, tmp_path / "there", prompts, "local"))


def test_a_remote_trace_sends_back_no_attention_map(organism_adapter):
    """What crosses the wire back is the in-trace part's payloads: none holds a [head, query, key] map."""
    from sinkscope.analyses.scan import ScanReducer, prepare_batch, text_queries_after_image
    from sinkscope.eval.tasks import load_samples
    from sinkscope.trace import Tracer

    batch = prepare_batch(organism_adapter, load_samples("demo", 2))
    seen = []

    class Recording(ScanReducer):
        def take(self, kind, layer, payload):
            seen.append((kind, {k: tuple(v.shape) for k, v in payload.items()}))
            super().take(kind, layer, payload)

    reducer = Recording([1, 90], 20.0, 5, 0.5, 0.2, 1e-6, [], want_profile=False)
    unembedded = []  # positions the unembedding saw: the last one only (the trace asks for no logits)
    handle = organism_adapter.unembed.register_forward_pre_hook(lambda m, args: unembedded.append(args[0].shape[1]))
    try:
        Tracer(organism_adapter).run(batch, [reducer], remote="local")
    finally:
        handle.remove()
    assert unembedded == [1]
    n_tokens = batch["input_ids"].shape[1]
    assert {k for k, _ in seen} == {"residual", "attention"} and len(seen) == 2 * organism_adapter.num_layers
    for _, shapes in seen:
        for shape in shapes.values():
            assert len(shape) <= 2 and shape.count(n_tokens) <= 1  # [batch, token], [batch, head], [batch, k]


def test_reducers_that_need_full_tensors_refuse_to_run_remotely(organism_adapter):
    from sinkscope.analyses.scan import prepare_batch
    from sinkscope.eval.tasks import load_samples
    from sinkscope.trace import Tracer

    batch = prepare_batch(organism_adapter, load_samples("demo", 1))

    class Full:
        def begin(self, info): ...
        def residual(self, layer, states): ...
        def attention(self, layer, probs): ...
        def end(self): ...

    with pytest.raises(SinkscopeError, match="cannot run remotely"):
        Tracer(organism_adapter).run(batch, [Full()], remote="local")
    with pytest.raises(SinkscopeError, match="NDIF does not know it; load it as a hosted model"):
        Tracer(organism_adapter).run(batch, [], remote="ndif")  # a model held here has no hub key to send
    with pytest.raises(SinkscopeError, match="choose local .* ndif .* URL"):
        Tracer(organism_adapter).run(batch, [], remote="nidf")


def _adapter_and_data(lm: str, organism_adapter, tmp_path):
    """(adapter, data) of the LMM (the organism on the demo world) or a tiny text-only Qwen2 on 4 prompts."""
    if lm == "organism":
        return organism_adapter, "demo"
    from tiny_text_models import build_text, write_prompts

    from sinkscope.models import adapter_for_model

    model, tok = build_text("qwen2")
    return adapter_for_model(model, tok, "tiny-qwen2"), str(write_prompts(tmp_path / "p.jsonl", 4, jsonl=True))


def _here_and_there(run, cfg_cls, adapter, data, tmp_path, per_request: int = 1):
    """(run folder here, run folder of the remote-local run): `run` (an analysis' run function) with the same
    config on 4 samples, batches of 2 (`per_request` of them in one request of the remote run)."""
    folders = []
    for name, remote, bundled in (("here", None, 1), ("there", "local", per_request)):
        cfg = cfg_cls(model=adapter.name, data=data, limit=4, batch_size=2, calibration=2, n_boot=50, remote=remote,
                      batches_per_request=bundled)
        folders.append(quiet(run, str(tmp_path / name), cfg, adapter=adapter, log=lambda m: None, figures=False))
    return folders


@pytest.mark.parametrize("lm", ["organism", "text"])
def test_remote_local_heads_equal_the_local_heads(lm, organism_adapter, tmp_path):
    from sinkscope.analyses.heads import HeadsConfig, run_heads

    here, there = _here_and_there(run_heads, HeadsConfig, *_adapter_and_data(lm, organism_adapter, tmp_path), tmp_path)
    _same_tables(here, there, [t for t in ("head_scores", "head_scores_per_sample", "token_attention", "attention_maps")
                               if (here.path / f"{t}.csv").exists() or (there.path / f"{t}.csv").exists()])
    assert (here.path / "head_scores.csv").exists()


@pytest.mark.parametrize("lm", ["organism", "text"])
def test_remote_local_contributions_equal_the_local_contributions(lm, organism_adapter, tmp_path):
    """contributions' in-trace part (values kept for the layer's attention, per-class means out) gives the same
    tables remotely as here, for an LMM and a text-only causal LM."""
    from sinkscope.analyses.contributions import ContributionsConfig, run_contributions

    here, there = _here_and_there(run_contributions, ContributionsConfig,
                                  *_adapter_and_data(lm, organism_adapter, tmp_path), tmp_path)
    _same_tables(here, there, ("contributions_per_sample", "contributions", "contribution_heads"))
    per = pd.read_csv(here.path / "contributions_per_sample.csv")
    assert len(per) and (lm == "text" or {"visual_sink", "visual_nonsink"} <= set(per["token_class"]))


@pytest.mark.parametrize("per_request", [1, 2])
def test_remote_local_location_equals_the_local_location(per_request, organism_adapter, tmp_path):
    """location's in-trace part is phi alone: the per-sample counts of visual sinks on background (the demo world's
    masks) and every summary are the same remotely as here, one batch per request or both in one."""
    from sinkscope.analyses.location import LocationConfig, run_location

    here, there = _here_and_there(run_location, LocationConfig, organism_adapter, "demo", tmp_path, per_request)
    tables = sorted(p.stem for p in here.path.glob("*.csv"))
    assert "location_per_sample" in tables and tables == sorted(p.stem for p in there.path.glob("*.csv"))
    _same_tables(here, there, tables)
    per = pd.read_csv(here.path / "location_per_sample.csv")
    assert per["n_sinks"].sum() > 0 and per["n_background"].sum() > 0


@pytest.mark.parametrize("per_request", [1, 2])
def test_remote_local_vit_sinks_equal_the_local_vit_sinks(per_request, organism_adapter, tmp_path):
    """vit-sinks reads the projector's input (the vision features) and layer 0's image tokens inside the trace and
    sends back each token's norm and top dim only: the same tables as here, at both sites, one batch per request or
    both in one."""
    from sinkscope.analyses.vit_sinks import VitSinksConfig, run_vit_sinks

    here, there = _here_and_there(run_vit_sinks, VitSinksConfig, organism_adapter, "demo", tmp_path, per_request)
    _same_tables(here, there, ("vit_tokens", "vit_sinks", "vit_dims"))
    tokens = pd.read_csv(there.path / "vit_tokens.csv")
    assert set(tokens["site"]) == {"vit", "lm_input"} and tokens["lm_visual_sink"].any()


@contextlib.contextmanager
def _requests(fail_at: int | None = None):
    """The kinds of the requests the dry run serves ("trace", or "session" for several batches in one); the request
    numbered `fail_at` (from 0) fails as a server's would."""
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.intervention.tracer import InterleavingTracer  # a model's trace; a session is a plain Tracer

    kinds: list[str] = []
    serve = LocalSimulationBackend.__call__

    def counting(self, tracer):
        if fail_at is not None and len(kinds) == fail_at:
            raise RuntimeError("the server went away")
        kinds.append("trace" if isinstance(tracer, InterleavingTracer) else "session")
        return serve(self, tracer)

    with mock.patch.object(LocalSimulationBackend, "__call__", counting):
        yield kinds


def test_batches_sent_as_one_request_give_the_tables_of_one_request_per_batch(organism_adapter, tmp_path):
    """--batches-per-request 2 on 6 samples in batches of 2: calibration's two batches travel as one session, the
    scan's three as a session of two and a trace of one; the tables equal those of a local run."""
    from sinkscope.analyses.scan import ScanConfig, run_scan

    here = _scan(organism_adapter, tmp_path / "here", "demo", None, limit=6, calibration=4)
    with _requests() as kinds:
        there = _scan(organism_adapter, tmp_path / "there", "demo", "local", limit=6, calibration=4,
                      batches_per_request=2)
    assert kinds == ["session", "session", "trace"]
    _same_tables(here, there)
    with _requests() as kinds:
        _scan(organism_adapter, tmp_path / "single", "demo", "local", limit=6, calibration=4)
    assert kinds == ["trace"] * 5
    # a run resumes, and its shards merge, under another bundling: it changes no number
    cfg = ScanConfig(model=organism_adapter.name, data="demo", limit=6, batch_size=2, calibration=4, remote="local")
    with _requests() as kinds:
        quiet(run_scan, str(tmp_path / "there"), cfg, adapter=organism_adapter, log=lambda m: None, figures=False)
    assert kinds == []  # resumed: every sample done, the calibration read from the folder


def test_a_failed_bundled_request_loses_only_its_batches_and_the_run_resumes(organism_adapter, tmp_path):
    """The scan's second request (its third and fourth batches) fails: the first request's samples are written and
    marked done, none of the failed request's; the rerun does the rest and its tables equal an uninterrupted run."""
    from sinkscope.eval.tasks import load_samples

    here = _scan(organism_adapter, tmp_path / "here", "demo", None, limit=8, calibration=2)
    with _requests(fail_at=2), pytest.raises(RuntimeError, match="the server went away"):
        _scan(organism_adapter, tmp_path / "there", "demo", "local", limit=8, calibration=2, batches_per_request=2,
              resume=True)  # requests: calibration's batch, the scan's batches 1-2, batches 3-4
    done = (tmp_path / "there" / "samples_done.txt").read_text().split()
    assert done == [x.sample_id for x in load_samples("demo", 4)]
    with _requests() as kinds:
        there = _scan(organism_adapter, tmp_path / "there", "demo", "local", limit=8, calibration=2,
                      batches_per_request=2, resume=True)
    assert kinds == ["session"]  # only the batches the failed request held
    _same_tables(here, there)


def test_run_many_hands_each_batch_its_own_payloads_and_refuses_a_shared_reducer(organism_adapter):
    """Three batches in one session give each reducer the payloads of a request of its own, bitwise; one reducer in
    two batches would be begun twice before any payload arrives, so it is refused with the fix."""
    from sinkscope.analyses.scan import ScanReducer, prepare_batch
    from sinkscope.eval.tasks import load_samples
    from sinkscope.trace import Tracer

    samples = load_samples("demo", 5)
    chunks = [samples[0:2], samples[2:4], samples[4:5]]
    tracer = Tracer(organism_adapter)

    class Recording(ScanReducer):
        def take(self, kind, layer, payload):
            self.seen.append((kind, layer, payload))
            super().take(kind, layer, payload)

    def reducer():
        r = Recording([1, 90], 20.0, 5, 0.5, 0.2, 1e-6, [], want_profile=False)
        r.seen = []
        return r

    alone, together = [reducer() for _ in chunks], [reducer() for _ in chunks]
    for chunk, r in zip(chunks, alone):
        tracer.run(prepare_batch(organism_adapter, chunk), [r], remote="local")
    with _requests() as kinds:
        tracer.run_many([(prepare_batch(organism_adapter, c), [r], None) for c, r in zip(chunks, together)],
                        remote="local")
    assert kinds == ["session"]
    for a, b in zip(alone, together):
        assert [(k, i) for k, i, _ in a.seen] == [(k, i) for k, i, _ in b.seen] and a.seen
        for (_, _, pa), (_, _, pb) in zip(a.seen, b.seen):
            assert pa.keys() == pb.keys() and all(torch.equal(pa[key], pb[key]) for key in pa)
    shared = reducer()
    with pytest.raises(SinkscopeError, match="a reducer appears in more than one batch; give each batch reducers"):
        tracer.run_many([(prepare_batch(organism_adapter, c), [shared], None) for c in chunks[:2]], remote="local")


def test_batches_per_request_is_checked_before_anything_runs():
    from sinkscope.analyses.scan import ScanConfig

    with pytest.raises(SinkscopeError, match="--batches-per-request must be >= 1; got 0"):
        ScanConfig(model="organism", remote="local", batches_per_request=0).validate()
    with pytest.raises(SinkscopeError, match="--batches-per-request bundles remote traces .* it needs --remote"):
        ScanConfig(model="organism", batches_per_request=2).validate()


def test_analyses_that_edit_the_forward_refuse_remote(organism_adapter, tmp_path):
    from sinkscope.analyses.remove import RemoveConfig, run_remove

    cfg = RemoveConfig(model="organism", data="demo", limit=2, remote="local")
    with pytest.raises(SinkscopeError, match="remove cannot run remotely: it edits attention"):
        run_remove(str(tmp_path / "c"), cfg, adapter=organism_adapter, log=lambda m: None)
    assert not (tmp_path / "c").exists()
