"""Remote runs through nnsight's serverless dry run of NDIF (`remote="local"`: the trace is serialised as
for NDIF, deserialised with sinkscope's own modules hidden, and run): only reductions come back, and
the tables equal those of a local run, on an LMM family (the planted organism) and a text-only causal LM.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import quiet
from sinkscope.errors import SinkscopeError

TABLES = ("sink_tokens", "token_stats", "head_scores", "massive_activations", "layer_magnitudes", "sink_summary",
          "dim_profile")


def _scan(adapter, out, data, remote):
    from sinkscope.analyses.scan import ScanConfig, run_scan

    cfg = ScanConfig(model=adapter.name, data=data, limit=4, batch_size=2, calibration=2, remote=remote)
    return quiet(run_scan, str(out), cfg, adapter=adapter, resume=False, log=lambda m: None, figures=False)


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
    Tracer(organism_adapter).run(batch, [reducer], remote="local")
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


def _here_and_there(run, cfg_cls, adapter, data, tmp_path):
    """(run folder here, run folder of the remote-local run): `run` (an analysis' run function) with the same
    config on 4 samples, batches of 2."""
    folders = []
    for name, remote in (("here", None), ("there", "local")):
        cfg = cfg_cls(model=adapter.name, data=data, limit=4, batch_size=2, calibration=2, n_boot=50, remote=remote)
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


def test_remote_local_location_equals_the_local_location(organism_adapter, tmp_path):
    """location's in-trace part is phi alone: the per-sample counts of visual sinks on background (the demo world's
    masks) and every summary are the same remotely as here."""
    from sinkscope.analyses.location import LocationConfig, run_location

    here, there = _here_and_there(run_location, LocationConfig, organism_adapter, "demo", tmp_path)
    tables = sorted(p.stem for p in here.path.glob("*.csv"))
    assert "location_per_sample" in tables and tables == sorted(p.stem for p in there.path.glob("*.csv"))
    _same_tables(here, there, tables)
    per = pd.read_csv(here.path / "location_per_sample.csv")
    assert per["n_sinks"].sum() > 0 and per["n_background"].sum() > 0


def test_remote_local_vit_sinks_equal_the_local_vit_sinks(organism_adapter, tmp_path):
    """vit-sinks reads the projector's input (the vision features) and layer 0's image tokens inside the trace and
    sends back each token's norm and top dim only: the same tables as here, at both sites."""
    from sinkscope.analyses.vit_sinks import VitSinksConfig, run_vit_sinks

    here, there = _here_and_there(run_vit_sinks, VitSinksConfig, organism_adapter, "demo", tmp_path)
    _same_tables(here, there, ("vit_tokens", "vit_sinks", "vit_dims"))
    tokens = pd.read_csv(there.path / "vit_tokens.csv")
    assert set(tokens["site"]) == {"vit", "lm_input"} and tokens["lm_visual_sink"].any()


def test_analyses_that_edit_the_forward_refuse_remote(organism_adapter, tmp_path):
    from sinkscope.analyses.remove import RemoveConfig, run_remove

    cfg = RemoveConfig(model="organism", data="demo", limit=2, remote="local")
    with pytest.raises(SinkscopeError, match="remove cannot run remotely: it edits attention"):
        run_remove(str(tmp_path / "c"), cfg, adapter=organism_adapter, log=lambda m: None)
    assert not (tmp_path / "c").exists()
