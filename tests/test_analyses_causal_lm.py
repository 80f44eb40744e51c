"""Plain causal LMs (the causal_lm adapter): residual streams and attention patterns equal
TransformerLens's on the same weights (the independent oracle), every analysis runs on text
prompts (.txt / .jsonl), and the classic BOS sink shows up where one is planted.
"""

from __future__ import annotations

import copy
import json
import warnings

import pandas as pd
import pytest
import torch

from sinkscope.eval.data import load_data
from sinkscope.errors import SinkscopeError
from sinkscope.models import adapter_for_model, load
from sinkscope.trace import Tracer
from tiny_text_models import PROMPTS, TEXT_FAMILIES, build_text, write_prompts


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


@pytest.fixture(scope="module", params=TEXT_FAMILIES)
def text_adapter(request):
    model, tok = build_text(request.param)
    return adapter_for_model(model, tok, f"tiny-{request.param}")


def test_adapter_structure_and_token_kinds(text_adapter):
    ad = text_adapter
    assert ad.family == "causal_lm" and ad.image_token_ids == ()
    assert ad.num_layers == 2 and ad.attention(0) is not None and ad.output_projection(0).weight.shape[0] == ad.hidden_size
    batch = ad.prepare(PROMPTS[:3])
    kinds = ad.token_kinds(batch["input_ids"], batch["attention_mask"])
    assert (kinds.bos_mask.sum(dim=1) == 1).all() and not kinds.visual_mask.any()
    with pytest.raises(SinkscopeError, match="text-only"):
        ad.prepare(PROMPTS[:1], [object()])


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_residual_and_patterns_equal_transformer_lens(family, tmp_path):
    """sinkscope's resid_pre / pattern of every layer == TransformerLens's hook_resid_pre / hook_pattern."""
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    model, tok = build_text(family)
    _quiet(model.save_pretrained, tmp_path)
    tok.save_pretrained(tmp_path)
    # the bridge wraps the modules of the model it gets: give it a copy (same weights)
    bridge = _quiet(TransformerBridge.boot_transformers, str(tmp_path), hf_model=copy.deepcopy(model))
    ad = adapter_for_model(model, tok, family)
    prompt = PROMPTS[2]
    batch = ad.prepare([prompt])
    ours = Tracer(ad).run_with_cache(batch)
    with torch.no_grad():
        _, theirs = bridge.run_with_cache(batch["input_ids"])
    for layer in range(ad.num_layers):
        torch.testing.assert_close(ours[f"resid_pre.{layer}"], theirs[f"blocks.{layer}.hook_resid_pre"].float(),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[f"pattern.{layer}"], theirs[f"blocks.{layer}.attn.hook_pattern"].float(),
                                   atol=1e-5, rtol=1e-5)


def test_load_a_saved_causal_lm_and_prompt_files(tmp_path):
    model, tok = build_text("llama")
    _quiet(model.save_pretrained, tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    ad = _quiet(load, str(tmp_path / "m"))
    assert ad.family == "causal_lm" and ad.text_attention == "eager"
    txt = write_prompts(tmp_path / "p.txt", 4)
    jsonl = write_prompts(tmp_path / "p.jsonl", 3, jsonl=True)
    assert [s.question for s in load_data(str(txt))] == PROMPTS[:4]
    assert [s.image_path for s in load_data(str(jsonl))] == [None] * 3
    (tmp_path / "bad.jsonl").write_text(json.dumps({"nothing": 1}) + "\n")
    with pytest.raises(SinkscopeError, match="prompt"):
        load_data(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SinkscopeError, match="no prompts"):
        load_data(str(tmp_path / "empty.txt"))


def test_scan_runs_on_text_prompts(tmp_path):
    from sinkscope.analyses.scan import ScanConfig, run_scan

    model, tok = build_text("gpt_neox")
    adapter = adapter_for_model(model, tok, "tiny-neox")
    prompts = write_prompts(tmp_path / "p.jsonl", 4, jsonl=True)
    folder = _quiet(run_scan, str(tmp_path / "scan"), ScanConfig(model="tiny-neox", data=str(prompts), limit=4,
                                                                   batch_size=2, calibration=2),
                    adapter=adapter, figures=False, log=lambda m: None)
    tokens = pd.read_csv(folder.path / "token_stats.csv")
    assert set(tokens["token_kind"]) <= {"bos", "text"} and (tokens[tokens["layer"] == 0]["token_kind"] == "bos").sum() == 4
