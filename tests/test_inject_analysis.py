"""`sinkscope inject` (sinkscope.analyses.inject) end to end on the planted organism, and its pieces.

On the organism the sink mechanism is PLANTED (ground truth): the planted heads key on the planted
sink dims, so an injected image token must become a sink by the scan's rule and draw those heads'
attention; the random-dim control must not. Plus the pure pieces: attention_share, token draws,
layer bands, the bootstrap CI.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from sinkscope.analyses.inject import InjectConfig, draw_tokens, layer_bands, run_inject, text_pool
from sinkscope.eval.stats import bootstrap_ci
from sinkscope.errors import SinkscopeError
from sinkscope.measures.attention_share import attention_share


def test_attention_share_sums_class_mass_over_selected_queries():
    probs = torch.softmax(torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    keys = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    queries = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    share = attention_share(probs, keys, queries)
    expected = probs[0][:, [1, 2]][:, :, [0, 2]].sum(-1).mean(-1)
    assert torch.allclose(share[0], expected) and torch.isnan(share[1]).all()
    everything = attention_share(probs, torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool))
    assert torch.allclose(everything, torch.ones(2, 3))


def test_draw_tokens_matched_counts_from_pool_only():
    pool = torch.zeros(3, 10, dtype=torch.bool)
    pool[0, [1, 4, 5, 7]] = True
    pool[1, [2, 3]] = True
    pool[2, [0]] = True  # too few
    mask, ok = draw_tokens(pool, 2, torch.Generator().manual_seed(0))
    assert ok.tolist() == [True, True, False]
    assert mask.sum(1).tolist() == [2, 2, 0] and not (mask & ~pool).any()
    other, _ = draw_tokens(pool, 2, torch.Generator().manual_seed(5))
    assert torch.equal(other[1], mask[1])  # row 1 has exactly two: always the same


def test_text_pool_falls_back_when_no_text_before_the_queries():
    ordinary_text = torch.tensor([[0, 1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    queries = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    pool = text_pool(ordinary_text, queries, 2)
    assert pool[0].tolist() == [False, True, True, False, False, False, False]
    assert pool[1].tolist() == [False, False, False, False, True, True, False]  # the last token is never drawn


def test_layer_bands_and_bootstrap():
    bands = layer_bands(2, 9)
    assert sorted(bands) == list(range(2, 9)) and len(set(bands.values())) == 3
    assert bands[2] == "layers 2-4" and bands[8] == "layers 7-8"
    lo, hi = bootstrap_ci(np.array([1.0, 2.0, 3.0, 4.0]), n_boot=500, seed=0)
    assert 1.0 <= lo < 2.5 < hi <= 4.0
    assert all(np.isnan(bootstrap_ci(np.array([1.0]), n_boot=500, seed=0)))


def test_config_validation_names_the_fix():
    with pytest.raises(SinkscopeError, match="scales"):
        InjectConfig(scales=[2.0]).validate()
    with pytest.raises(SinkscopeError, match="groups"):
        InjectConfig(groups=["sky"]).validate()
    with pytest.raises(SinkscopeError, match="inject"):
        InjectConfig(treatments=["rescale"]).validate()


def test_inject_on_the_organism_recovers_the_planted_mechanism(organism_adapter, tmp_path):
    """Ground truth (PLANTED): image tokens injected with the planted signature become sinks by the
    scan's rule and draw the planted heads' attention; the random-dim control does not."""
    import json

    from conftest import ORGANISM_ASSET
    from sinkscope.models.embedded.organism import GroundTruth

    truth = GroundTruth.load(ORGANISM_ASSET / "ground_truth.json")
    cfg = InjectConfig(model="organism", limit=4, calibration=4, scales=[0.0, 0.1, 1.0], n_seeds=1, n_boot=200,
                       groups=["background", "object"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = run_inject(str(tmp_path / "inject"), cfg, adapter=organism_adapter, log=lambda m: None)
    meta = json.loads((folder.path / "run.json").read_text())
    assert meta["planted"] and meta["signature"]["dims"] == sorted(truth.sink_dims)
    assert meta["signature"]["layer"] == truth.massive_from_layer
    assert "PLANTED" in (folder.path / "index.md").read_text()
    table = pd.read_csv(folder.path / "inject.csv")
    assert {"treatment", "group", "scale", "band", "metric", "value", "ci_low", "ci_high"} <= set(table.columns)
    finite = table.dropna(subset=["ci_low", "ci_high"])
    assert (finite["ci_low"] <= finite["value"] + 1e-9).all() and (finite["value"] <= finite["ci_high"] + 1e-9).all()
    onsets = pd.read_csv(folder.path / "inject_sink_scales.csv").set_index("group")
    for group in ("background", "object"):
        assert onsets.loc[group, "sink_scale_injection_layer"] <= 1.0  # becomes a sink by the scan's rule
    heads = pd.read_csv(folder.path / "inject_heads.csv")
    for layer, head in truth.sink_heads:
        h = heads[(heads["layer"] == layer) & (heads["head"] == head)]
        injected = h[(h["treatment"] == "inject") & (h["scale"] == 1.0)]["attention"].mean()
        plain = h[h["treatment"] == "none"]["attention"].mean()
        assert injected > 5 * plain, (layer, head, injected, plain)
    per = pd.read_csv(folder.path / "inject_per_sample.csv")
    at = per[(per["layer"] == truth.sink_heads[0][0]) & (per["scale"] == 1.0)]
    inj = at[at["treatment"] == "inject"]["attention_max_head"].mean()
    ctl = at[at["treatment"] == "random_dim"]["attention_max_head"].mean()
    assert inj > 3 * ctl, (inj, ctl)
    # the planted value drain: an injected token stops writing
    inj_c = at[at["treatment"] == "inject"]["contribution"].mean()
    none_c = per[(per["layer"] == truth.sink_heads[0][0]) & (per["treatment"] == "none")]["contribution"].mean()
    assert inj_c < 0.1 * none_c
    var = pd.read_csv(folder.path / "inject_var.csv").set_index("condition")
    assert var.loc["inject+var", "var_flags_injected"] == 1.0 and var.loc["var", "var_flags_injected"] == 0.0
    # the VAR rows' logit difference comes from generate's first step, the answers table's from a forward: the same
    var_rows = pd.read_csv(folder.path / "inject_var_per_sample.csv", dtype={"sample": str})
    answers = pd.read_csv(folder.path / "inject_answers_per_sample.csv", dtype={"sample": str})
    plain = var_rows[var_rows["condition"] == "none"].set_index("sample")["logit_diff"]
    forward = answers[answers["treatment"] == "none"].groupby("sample")["logit_diff"].first()
    assert len(plain) > 0
    np.testing.assert_allclose(plain.to_numpy(), forward.loc[plain.index].to_numpy(), atol=1e-4, rtol=1e-4)
    assert (folder.path / "dose_response.png").exists()


def test_cli_rejects_bad_options_before_loading_a_model(tmp_path):
    from typer.testing import CliRunner

    from sinkscope.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["inject", "--groups", "sky", "--out", str(tmp_path / "a")])
    assert bad.exit_code == 2 and "background, object, text" in bad.output
    bad = runner.invoke(app, ["inject", "--scales", "0,5", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--scales" in bad.output
    bad = runner.invoke(app, ["remove", "--to", "median", "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "zero, mean, chosen_mean" in bad.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_var_table_counts_unparseable_and_tests_only_parsed_pairs():
    """inject_var.csv: unparseable answers are counted per condition and left out of McNemar's test; the accuracy
    change is the paired mean against `none`."""
    import numpy as np

    from sinkscope.analyses.inject import _var_line, var_table

    rows = []
    for i in range(20):
        truth = "yes" if i % 2 else "no"
        for condition, answer in (("none", truth), ("var", None if i < 5 else truth),
                                  ("inject", "no"), ("inject+var", truth)):
            rows.append({"sample": i, "condition": condition, "answer": answer, "correct": answer == truth,
                         "logit_diff": 1.0 if answer == truth else -1.0, "var_flags_injected": np.nan,
                         "var_dims": "", "var_tau": np.nan, "n_tokens": 4})
    table = var_table(pd.DataFrame(rows), n_boot=200, seed=0).set_index("condition")
    assert table.loc["var", "n_unparseable"] == 5 and table.loc["none", "n_unparseable"] == 0
    assert table.loc["var", "n_pairs"] == 15  # the 5 unparseable pairs are excluded from the test
    assert table.loc["var", "p_value"] == 1.0  # no discordant parsed pair
    assert table.loc["var", "accuracy_change"] == pytest.approx(-5 / 20)
    assert table.loc["inject", "accuracy_change"] == pytest.approx(-0.5)
    line = _var_line(table.reset_index().set_index("condition", drop=False).loc["var"].to_dict())
    assert "5 of 20 answers unparseable" in line and "15 parsed pairs" in line
    same = _var_line(table.reset_index().set_index("condition", drop=False).loc["inject+var"].to_dict())
    assert "no detectable effect" in same


def test_observed_forward_keeps_the_models_own_probabilities_of_the_asked_keys(organism_adapter):
    """Independent oracle: what observed_forward keeps (a few key columns per layer from the onset on, as each layer
    computes them) equals those columns of the maps the model returns with output_attentions=True, unedited and
    under an injection; the layers before the onset are not kept; the hidden states are the model's."""
    import torch

    from sinkscope.analyses.inject import _columns, observed_forward
    from sinkscope.analyses.scan import prepare_batch
    from sinkscope.eval.tasks import load_samples
    from sinkscope.interventions.attention import edit_attention
    from sinkscope.interventions.sink_signature import SinkSignature, inject_sink

    adapter = organism_adapter
    batch = prepare_batch(adapter, load_samples("demo", 2))
    inputs = adapter.device_inputs(batch)
    kinds = adapter.token_kinds(inputs["input_ids"], inputs["attention_mask"])
    mask = kinds.visual_mask & (torch.arange(kinds.kind.shape[1]) % 7 == 3)
    other = kinds.visual_mask & (torch.arange(kinds.kind.shape[1]) % 11 == 5)
    columns = _columns([mask, other])
    assert torch.equal(columns, (mask | other).any(dim=0).nonzero().flatten())
    onset = 2
    sig = SinkSignature((1, 90), onset, 100.0, "layer")
    for injected in (False, True):
        def session():
            return (inject_sink(adapter, mask, layer=onset, scale=1.0, signature=sig) if injected
                    else edit_attention(adapter, fallback="eager"))
        with session() as s, torch.no_grad():
            out, kept = observed_forward(adapter, inputs, s, onset, columns)
        with session(), torch.no_grad():
            full = adapter.model(**inputs, output_attentions=True, output_hidden_states=True)
        assert sorted(kept.probs) == list(range(onset, adapter.num_layers))
        for layer in range(onset, adapter.num_layers):
            cols = mask.any(dim=0).nonzero().flatten()
            assert torch.equal(kept.of(layer, cols), full.attentions[layer][..., cols].float()), (injected, layer)
        for a, b in zip(out.hidden_states, full.hidden_states):
            assert torch.equal(a, b)
