"""`sinkscope remove` (sinkscope.analyses.remove) and its measures: perplexity on text prompts of a
tiny causal LM with pinned sink dims, attention redistribution on the planted organism (ground truth:
its planted heads key on the sink dims, so removing the signature from the planted visual sinks takes
their attention away), the shipped public-domain text set, and bad options."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from sinkscope.analyses.remove import PLAIN_TEXT, RemoveConfig, run_remove
from sinkscope.errors import SinkscopeError
from sinkscope.measures.perplexity import token_nll


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def test_token_nll_equals_cross_entropy_and_skips_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    nll, n = token_nll(logits, ids, mask)
    assert n.tolist() == [4, 2]
    full = torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="sum")
    part = torch.nn.functional.cross_entropy(logits[1, 2:-1].double(), ids[1, 3:], reduction="sum")
    assert torch.allclose(nll, torch.stack([full, part]))


def test_shipped_text_set_is_there_with_its_sources():
    lines = [l for l in PLAIN_TEXT.read_text().splitlines() if l.strip()]
    assert len(lines) >= 16
    assert "public domain" in (PLAIN_TEXT.parent / "SOURCES.md").read_text()


def test_bad_options_name_the_fix():
    with pytest.raises(SinkscopeError, match="targets"):
        RemoveConfig(targets=["everything"]).validate()
    with pytest.raises(SinkscopeError, match="--to"):
        RemoveConfig(to=["median"]).validate()
    with pytest.raises(SinkscopeError, match="onset"):
        RemoveConfig(layers="some").validate()


def test_perplexity_on_text_prompts_of_a_causal_lm(tmp_path):
    from tiny_text_models import build_text, write_prompts
    from sinkscope.models import adapter_for_model

    model, tok = build_text("llama")
    adapter = adapter_for_model(model, tok, "tiny-llama")
    prompts = write_prompts(tmp_path / "p.txt", 6)
    cfg = RemoveConfig(model="tiny-llama", data=str(prompts), limit=6, batch_size=3, calibration=3, n_boot=100,
                       sink_dims=[3], tau=1.0, start_layer=1, layer=1, targets=["first", "sinks"])
    folder = _quiet(run_remove, str(tmp_path / "remove"), cfg, adapter=adapter, log=lambda m: None)
    table = pd.read_csv(folder.path / "remove.csv")
    ppl = table[table["metric"] == "perplexity"].set_index(["target", "to"])["value"]
    assert ("none", "none") in ppl.index and ("first", "zero") in ppl.index and ("sinks", "chosen_mean") in ppl.index
    assert (ppl > 1).all() and not table[table["metric"] == "accuracy"].shape[0]  # prompts have no answers
    removed = table[(table["metric"] == "n_removed") & (table["target"] == "first")]["value"]
    assert (removed == 1).all()
    # removing changes the text's likelihood (dim 3 of a random model carries information)
    assert ppl[("first", "zero")] != ppl[("none", "none")]
    att = pd.read_csv(folder.path / "remove_attention.csv")
    none = att[att["target"] == "none"].set_index("key_class")["attention"]
    assert abs(none.sum() - 1.0) < 1e-4  # the classes partition the keys of every text query
    assert none["image"] == 0


def test_remove_visual_sinks_of_the_organism_takes_their_attention(organism_adapter, tmp_path):
    """PLANTED ground truth: the planted heads find the planted visual sinks by their sink dims; removing
    the signature (to zero or to the mean over ordinary tokens) moves attention away from them."""
    cfg = RemoveConfig(model="organism", data="demo:pope-adversarial", limit=4, calibration=4, n_boot=100,
                       targets=["visual_sinks"], to=["zero", "mean"])
    folder = _quiet(run_remove, str(tmp_path / "remove"), cfg, adapter=organism_adapter, log=lambda m: None)
    table = pd.read_csv(folder.path / "remove.csv")
    n = table[(table["metric"] == "n_removed") & (table["target"] == "visual_sinks")]["value"]
    assert (n == 4).all()  # the four planted sink patches in every sample
    assert set(table[table["metric"] == "accuracy"]["to"]) == {"none", "zero", "mean"}
    assert table[table["metric"] == "perplexity"].empty  # image prompts: no text perplexity
    att = pd.read_csv(folder.path / "remove_attention.csv")
    base = att[(att["target"] == "none") & (att["key_class"] == "image")]["attention"].mean()
    for to in ("zero", "mean"):
        r = att[(att["target"] == "visual_sinks") & (att["to"] == to) & (att["key_class"] == "removed")]
        assert float(r["change"].iloc[0]) < 0 and float(r["change_ci_high"].iloc[0]) < 0
    assert base > 0


def test_remove_table_paired_change_and_findings_follow_the_rule(tmp_path):
    """accuracy_change is the paired mean of (removed - unmodified) per sample; a change whose CI spans 0 is
    reported as 'no detectable effect', one whose CI excludes 0 as an effect."""
    import numpy as np
    import pandas as pd

    from sinkscope.analyses.remove import findings, remove_table

    n = 40
    base = np.array([1.0] * 30 + [0.0] * 10)
    rows = []
    for i in range(n):
        rows.append({"sample": i, "target": "none", "to": "zero", "nll": 10.0, "n_predicted": 5, "n_removed": 0,
                     "correct": bool(base[i])})
        rows.append({"sample": i, "target": "first", "to": "zero", "nll": 30.0 + i % 3, "n_predicted": 5,
                     "n_removed": 1, "correct": bool(i % 2)})  # half right: accuracy falls from 0.75 to 0.5
        rows.append({"sample": i, "target": "visual", "to": "zero", "nll": 10.0 + (0.5 if i % 2 else -0.5),
                     "n_predicted": 5, "n_removed": 2, "correct": bool(base[(i + 1) % n] if i < n - 1 else base[0])})
    per = pd.DataFrame(rows)
    table = remove_table(per, n_boot=500, seed=0)
    change = table[(table["metric"] == "accuracy_change")].set_index("target")
    want = np.mean(np.array([i % 2 for i in range(n)], float) - base)
    assert change.loc["first", "value"] == pytest.approx(want)
    assert change.loc["first", "ci_low"] <= want <= change.loc["first", "ci_high"]
    folder = tmp_path / "r"
    folder.mkdir()
    table.to_csv(folder / "remove.csv", index=False)
    found = {f.name: f for f in findings(folder)}
    first = found["accuracy change, first to zero"]
    assert first.status == "effect" and "accuracy falls" in first.sentence  # CI of -0.25 with n = 40 excludes 0
    nll_first = found["NLL per token change, first to zero"]
    assert nll_first.status == "effect" and "NLL per token rises" in nll_first.sentence
    visual = found["NLL per token change, visual to zero"]
    assert visual.status == "no detectable effect" and "no detectable effect (95% CI" in visual.sentence


def test_remove_attention_shares_equal_those_of_the_models_own_attention_maps(organism_adapter, tmp_path):
    """Independent oracle: the shares the run reduces layer by layer as the probabilities come (no layer's maps
    kept) equal `measures.attention_share` over the maps the model returns with output_attentions=True, unedited and
    with the visual sinks' signature removed (to zero), for every key class, mean over heads and layers >= onset."""
    import torch

    from sinkscope.analyses.remove import CLASSES, class_masks
    from sinkscope.analyses.scan import prepare_batch
    from sinkscope.eval.tasks import load_samples
    from sinkscope.interventions.sink_signature import SinkSignature, remove_sink
    from sinkscope.measures.attention_share import attention_share

    cfg = RemoveConfig(model="organism", data="demo:pope-adversarial", limit=3, batch_size=3, calibration=3,
                       n_boot=20, targets=["visual_sinks"], to=["zero"])
    folder = _quiet(run_remove, str(tmp_path / "remove"), cfg, adapter=organism_adapter, log=lambda m: None)
    got = pd.read_csv(folder.path / "remove_attention_per_sample.csv", dtype={"sample": str})
    meta = json.loads((folder.path / "run.json").read_text())
    sig = SinkSignature(**{k: meta["signature"][k] for k in ("dims", "layer", "tau", "score")},
                        eps=organism_adapter.rms_norm_eps)
    samples = load_samples("demo:pope-adversarial", 3)
    batch = prepare_batch(organism_adapter, samples)
    inputs = organism_adapter.device_inputs(batch)
    kinds = organism_adapter.token_kinds(inputs["input_ids"], inputs["attention_mask"])
    queries = kinds.queries_after_image()
    with torch.no_grad():
        plain = organism_adapter.model(**inputs, output_attentions=True).attentions
        with remove_sink(organism_adapter, "visual_sinks", layer=meta["edited_layers"], to="zero",
                         signature=sig) as session:
            edited = organism_adapter.model(**inputs, output_attentions=True).attentions
            removed = torch.stack(list(session.memory(session.edits[-1])["masks"].values())).any(dim=0).cpu()
    for target, maps, removed_now in (("none", plain, torch.zeros_like(removed)), ("visual_sinks", edited, removed)):
        masks = class_masks(kinds, kinds.bos_mask, removed_now)
        for c in CLASSES:
            want = torch.stack([attention_share(maps[l].float(), masks[c], queries).mean(dim=1)
                                for l in range(sig.layer, organism_adapter.num_layers)]).mean(dim=0)
            rows = got[(got["target"] == target) & (got["key_class"] == c)].set_index("sample")
            values = rows.loc[[s.sample_id for s in samples], "attention"].to_numpy()
            np.testing.assert_allclose(values, want.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{target} {c}")
    assert removed.any()  # the edited condition removed something
