"""Activation patching (nnsight): the source == target invariant, shapes and errors, and the organism's
planted truth: its drained sinks carry no answer information, object tokens do."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from sinkscope.errors import SinkscopeError
from sinkscope.interventions.patching import Patch, Patcher, check_aligned, matched_heads, matched_tokens

ORGANISM = Path(__file__).resolve().parent.parent / "sinkscope" / "models" / "embedded" / "assets" / "organism"


from conftest import quiet as _quiet  # noqa: E402


@pytest.fixture(scope="module")
def organism(organism_adapter):
    return organism_adapter


def _inputs(adapter, samples):
    batch = adapter.prepare([s.question for s in samples], [s.image() for s in samples])
    return adapter.forward_inputs(batch)


def test_self_patch_is_exactly_zero_and_other_patches_move(organism):
    from sinkscope.eval.pope import demo_pope

    samples = demo_pope("test", "adversarial", 4)
    inputs = _inputs(organism, samples)
    patcher = Patcher(organism)
    layers = list(range(organism.num_layers))
    clean = patcher.run(inputs, capture=layers)
    with torch.no_grad():
        plain = organism.model(**inputs).logits[:, -1].float()
    assert torch.equal(clean.logits, plain)  # the trace computes what the model computes
    kinds = organism.token_kinds(inputs["input_ids"], inputs["attention_mask"])
    every_head = torch.ones(4, organism.num_heads, inputs["input_ids"].shape[1], dtype=torch.bool)
    own = patcher.run(inputs, [Patch("residual", l, kinds.real_mask, clean.residual[l]) for l in layers]
                      + [Patch("heads", l, every_head, clean.heads[l]) for l in layers])
    assert torch.equal(own.logits, clean.logits)  # invariant: source == target -> exactly zero effect
    rolled = patcher.run(inputs, [Patch("residual", 2, kinds.visual_mask, clean.residual[2].roll(1, 0))])
    assert (rolled.logits - clean.logits).abs().max() > 1e-2
    heads = patcher.run(inputs, [Patch("heads", 3, every_head, clean.heads[3].roll(1, 0))])
    assert (heads.logits - clean.logits).abs().max() > 1e-3


def test_errors_and_matched_controls(organism):
    from sinkscope.eval.pope import demo_pope

    inputs = _inputs(organism, demo_pope("test", "random", 2))
    t = inputs["input_ids"].shape[1]
    patcher = Patcher(organism)
    with pytest.raises(SinkscopeError, match="out of range"):
        patcher.run(inputs, [Patch("residual", 99, torch.ones(2, t, dtype=torch.bool), torch.zeros(2, t, 128))])
    with pytest.raises(SinkscopeError, match="mask of layer 1 must be"):
        patcher.run(inputs, [Patch("residual", 1, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, t, 128))])
    with pytest.raises(SinkscopeError, match="site must be one of"):
        Patch("mlp", 1, torch.ones(1), torch.ones(1))
    with pytest.raises(SinkscopeError, match="do not line up"):
        check_aligned(torch.zeros(2, 5), torch.zeros(2, 6))
    g = torch.Generator().manual_seed(0)
    chosen = torch.zeros(2, 4, 3, dtype=torch.bool)
    chosen[0, :2, 0] = True
    chosen[1, :3, 1] = True
    eligible = torch.ones_like(chosen)
    other = matched_heads(chosen, eligible, g)
    assert not (other & chosen).any()
    assert other[0, :, 0].sum() == 2 and other[1, :, 1].sum() == 1  # only one other head left there
    pool = torch.tensor([[True, True, False, True], [False, True, True, True]])
    picked = matched_tokens(torch.tensor([2, 3]), pool, g)
    assert picked.sum(1).tolist() == [2, 3] and not (picked & ~pool).any()


def test_organism_planted_sinks_carry_no_answer_objects_do(organism, tmp_path):
    from sinkscope.analyses.patching import PatchConfig, run_patching

    cfg = PatchConfig(model="organism", data="demo:pope-adversarial", limit=24, batch_size=8, n_boot=500, calibration=8)
    folder = _quiet(run_patching, str(tmp_path / "patch"), cfg, adapter=organism)
    table = pd.read_csv(folder.path / "patching.csv")
    per = pd.read_csv(folder.path / "patching_per_sample.csv")
    assert list(table.columns[:8]) == ["source", "target", "site", "layer", "n_tokens", "effect", "ci_low", "ci_high"]

    def row(site, layer=-1):
        return table[(table["site"] == site) & (table["layer"] == layer)].iloc[0]

    full = row("visual_sinks")["full_effect"]
    assert full < -1.0  # the other image flips the answer's direction
    sinks = row("visual_sinks")
    assert sinks["n_tokens"] == 4  # the four planted sink patches
    # ~0: the whole CI within 0.1% of the full swap (float32 rounding and the drained remainder only)
    assert max(abs(sinks["ci_low"]), abs(sinks["ci_high"])) < 1e-3 * abs(full)
    for layer in (0, 1):  # not sinks before the massive activation appears: nothing patched
        assert row("visual_sinks", layer)["n_tokens"] == 0 and row("visual_sinks", layer)["effect"] == 0
    objects = row("object_tokens")
    assert objects["ci_high"] < 0 and objects["effect"] < 0.5 * full  # objects carry most of the answer
    control = row("random_nonsink")
    assert control["n_tokens"] == 4 and control["ci_high"] < 0  # as many ordinary image tokens do matter
    assert row("image_centric_heads")["ci_high"] < 0
    own = per[per["source"] == "self"]
    assert len(own) == 24 and (own["effect"] == 0).all()  # invariant, per sample, exactly
    var_full, var_sel = row("var_full"), row("var_selected_heads")
    assert var_sel["effect"] == pytest.approx(var_full["effect"], abs=0.2 * abs(var_full["effect"]) + 1e-4)
    text = (folder.path / "index.md").read_text()
    assert "PLANTED" in text and (folder.path / "patching.png").exists()
    # the page's findings follow the findings rule (sinkscope.findings): the sinks' ~0 is an effect only if its CI
    # excludes 0, and a share of the full swap is printed only for an effect
    [sinks_line] = [line for line in text.splitlines() if line.startswith("- visual_sinks from the other_image run")]
    assert ("no detectable effect" in sinks_line) == (sinks["ci_low"] <= 0 <= sinks["ci_high"])
    assert ("% of swapping" in sinks_line) == ("no detectable effect" not in sinks_line)
    assert "negligible" not in text and "fraction_of_full |" not in text
    # resuming a finished run recomputes nothing and keeps the table
    again = _quiet(run_patching, str(tmp_path / "patch"), cfg, adapter=organism)
    assert pd.read_csv(again.path / "patching.csv").equals(table)
