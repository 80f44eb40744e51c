"""Measures on planted ground truth: massive activations, sink dims, phi, sink tokens, heads."""

from __future__ import annotations

import json
import math
import warnings

import pandas as pd
import pytest
import torch

from sinkscope.measures.heads import (HeadScoreAccumulator, head_scores, image_centric_mask,
                                      visual_attention_stats)
from sinkscope.measures.massive import (PUBLISHED_SINK_DIMS, MassiveCriterion, SinkDims, discover_sink_dims,
                                        is_massive, layer_magnitude_profile, pinned_sink_dims, rms_normalize,
                                        top_activations)
from sinkscope.measures.sinks import (SinkThreshold, choose_tau, phi, sink_mask, sink_mask_all, sink_tokens_table,
                                      visual_sink_mask)
from sinkscope.models.base import BOS, GENERATED, PAD, TEXT, VISUAL

DIM, LAYERS, TOKENS, BATCH = 64, 4, 12, 6
SINK_DIMS = (7, 41)
BIG = 500.0
VISUAL_POS = range(2, 8)  # image tokens
VISUAL_SINKS = {0: (3,), 1: (5,), 2: (3, 6), 3: (4,), 4: (7,), 5: (2,)}  # sample -> planted image sinks
PAD_ROW, PAD_POS = 5, 11  # one padded token


def _kinds() -> torch.Tensor:
    k = torch.full((BATCH, TOKENS), TEXT)
    k[:, 0] = BOS
    k[:, list(VISUAL_POS)] = VISUAL
    k[:, -2] = GENERATED
    k[PAD_ROW, PAD_POS] = PAD
    return k


def _states(plant: bool = True, seed: int = 0) -> torch.Tensor:
    """[layer, batch, token, dim]: N(0,1), with dims 7, 41 = 500 on BOS and planted image sinks from layer 2."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(LAYERS, BATCH, TOKENS, DIM, generator=g)
    if plant:
        for layer in range(2, LAYERS):
            s[layer, :, 0, list(SINK_DIMS)] = BIG
            for b, positions in VISUAL_SINKS.items():
                for p in positions:
                    s[layer, b, p, list(SINK_DIMS)] = BIG
    s[:, PAD_ROW, PAD_POS] = 1e4  # pad garbage: must never be counted
    return s


def _planted_sinks() -> set[tuple[int, int, int]]:
    out = set()
    for layer in range(2, LAYERS):
        for b in range(BATCH):
            out.add((b, layer, 0))
            out |= {(b, layer, p) for p in VISUAL_SINKS[b]}
    return out


# --- massive activations ----------------------------------------------------------------


def test_rms_normalize_unit_rms_and_float32():
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16) * 30
    y = rms_normalize(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3, 5), atol=1e-3)


def test_top_activations_ranks_planted_values_first():
    s, kinds = _states(), _kinds()
    frame = top_activations(s[3], kinds, k=3, layer=3, sample_ids=[f"s{i}" for i in range(BATCH)])
    assert list(frame.columns) == ["sample", "layer", "position", "token_kind", "dim", "value", "rms_value",
                                   "ratio_to_median", "rank"]
    assert len(frame) == 3 * BATCH
    top = frame[frame["rank"] <= 2]
    assert set(top["dim"]) == set(SINK_DIMS)
    assert (top["value"] == BIG).all()
    assert not ((frame["sample"] == f"s{PAD_ROW}") & (frame["position"] == PAD_POS)).any()
    # ratio_to_median against the sample's own median over real tokens
    real = kinds[0] != PAD
    median = s[3, 0][real].abs().median()
    row = frame[(frame["sample"] == "s0") & (frame["rank"] == 1)].iloc[0]
    assert row["ratio_to_median"] == pytest.approx(BIG / float(median), rel=1e-5)
    assert row["token_kind"] in ("bos", "visual")
    # rms_value of a token with two dims at 500 and the rest ~N(0,1) is close to sqrt(DIM/2)
    assert abs(row["rms_value"]) == pytest.approx(math.sqrt(DIM / 2), rel=0.02)
    # batch median variant and the massive column
    f2 = top_activations(s[3], kinds, k=1, median_over="batch", criterion=MassiveCriterion())
    assert "layer" not in f2.columns and not f2["massive"].any()  # 500 is only ~750x the median
    f3 = top_activations(s[3], kinds, k=1, median_over="batch", criterion=MassiveCriterion(ratio=500))
    assert f3["massive"].all()
    f4 = top_activations(s[1], kinds, k=1, criterion=MassiveCriterion.ratio_only(500))
    assert not f4["massive"].any()  # no plant before layer 2, pad garbage ignored


def test_massive_criterion():
    v = torch.tensor([50.0, 150.0, 150.0, 2000.0])
    med = torch.tensor([0.01, 0.01, 1.0, 1.0])
    assert is_massive(v, med).tolist() == [False, True, False, True]
    assert MassiveCriterion.ratio_only(1000)(v, med).tolist() == [True, True, False, True]
    assert MassiveCriterion(absolute=100, ratio=None)(v, med).tolist() == [False, True, True, True]
    with pytest.raises(ValueError):
        MassiveCriterion(None, None)


def test_layer_magnitude_profile():
    s, kinds = _states(), _kinds()
    prof = layer_magnitude_profile(s, kinds)
    assert list(prof.columns) == ["layer", "top1", "top2", "top3", "median", "n_samples"]
    assert len(prof) == LAYERS
    assert (prof.loc[prof.layer >= 2, "top1"] == BIG).all()
    assert (prof.loc[prof.layer < 2, "top1"] < 10).all()  # pad garbage (1e4) ignored
    assert (prof["median"] < 1).all()
    one = layer_magnitude_profile(s[2], kinds)
    assert len(one) == 1 and one["top1"].iloc[0] == BIG


# --- sink dims ----------------------------------------------------------------------------


def _bos_states(plant=True, n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, LAYERS, DIM, generator=g)
    if plant:
        x[:, 2:, list(SINK_DIMS)] = BIG * (1 + 0.2 * torch.rand(n, LAYERS - 2, 2, generator=g))
    return x


def test_discover_sink_dims_finds_planted():
    found = discover_sink_dims(_bos_states())
    assert found.dims == list(SINK_DIMS)
    assert found.method == "auto-gap" and found.layers == [2, 3]
    sup = found.support
    assert list(sup.columns)[:5] == ["layer", "dim", "fraction_of_samples", "median_rms_value", "massive"]
    assert set(sup.loc[sup.massive, "dim"]) == set(SINK_DIMS)
    d = json.loads(found.to_json())
    assert d["dims"] == [7, 41] and d["references"].keys() == PUBLISHED_SINK_DIMS.keys()
    assert {r["dim"] for r in d["per_layer_support"]} == set(SINK_DIMS)
    assert SinkDims.from_json(found.to_json()).dims == [7, 41]
    # fixed threshold rule finds them too
    assert discover_sink_dims(_bos_states(), threshold=3.0).dims == list(SINK_DIMS)


def test_discover_sink_dims_robust_to_minority_and_single_sample():
    x = _bos_states()
    x[:1, 2:, 7] = 0.5  # one sample in 20 lacks dim 7: still >= 90%
    assert discover_sink_dims(x).dims == list(SINK_DIMS)
    assert discover_sink_dims(_bos_states()[0]).dims == list(SINK_DIMS)


def test_discover_sink_dims_none_planted():
    found = discover_sink_dims(_bos_states(plant=False))
    assert found.dims == [] and found.reason.startswith("no sink dims")
    json.loads(found.to_json())  # NaN threshold serialises
    few = discover_sink_dims(_bos_states()[:, :2])  # only layers 0, 1: nothing to consider
    assert few.dims == [] and "no layers" in few.reason


def test_pinned_sink_dims():
    p = pinned_sink_dims(PUBLISHED_SINK_DIMS["llama-2-7b / llava-1.5-7b"], hidden_size=4096)
    assert p.method == "pinned" and p.dims == [1415, 2533]
    assert p.to_dict()["references"]["llama-2-7b / llava-1.5-7b"]["shared"] == [1415, 2533]
    with pytest.raises(ValueError):
        pinned_sink_dims([5000], hidden_size=4096)


# --- phi and sink tokens --------------------------------------------------------------------


def test_phi_matches_formula_and_bound():
    s = _states()
    p = phi(s, SINK_DIMS)
    assert p.shape == (LAYERS, BATCH, TOKENS)
    x = s[3, 0, 0]
    rms = torch.sqrt(x.pow(2).mean() + 1e-6)
    assert float(p[3, 0, 0]) == pytest.approx(float((x[list(SINK_DIMS)].abs() / rms).max()), rel=1e-6)
    assert float(p.max()) <= math.sqrt(DIM) + 1e-4
    assert torch.equal(phi(s, pinned_sink_dims(SINK_DIMS)), p)
    assert (phi(s, []) == 0).all()
    with pytest.raises(ValueError):
        phi(s, [DIM])


def test_sink_tokens_table_flags_exactly_planted():
    s, kinds = _states(), _kinds()
    p = phi(s, SINK_DIMS).permute(1, 0, 2)  # [batch, layer, token]
    tau = choose_tau(p, DIM, token_kinds=kinds)
    assert tau.method == "gap" and 0.25 * math.sqrt(DIM) <= tau.value < math.sqrt(DIM / 2)
    table = sink_tokens_table(p, kinds, tau)
    assert list(table.columns) == ["sample", "layer", "position", "token_kind", "phi"]
    got = set(zip(table["sample"], table["layer"], table["position"]))
    assert got == _planted_sinks()
    kinds_by_pos = dict(zip(zip(table["sample"], table["position"]), table["token_kind"]))
    for (b, pos), kind in kinds_by_pos.items():
        assert kind == ("bos" if pos == 0 else "visual")
    vis = visual_sink_mask(p, kinds, tau)
    assert set(map(tuple, torch.nonzero(vis).tolist())) == {t for t in _planted_sinks() if t[2] != 0}
    allm = sink_mask_all(p, kinds, tau)
    assert set(map(tuple, torch.nonzero(allm).tolist())) == _planted_sinks()
    assert torch.equal(sink_mask(p, tau) & (kinds != PAD)[:, None], allm)
    # ids and a text sink
    p2 = p.clone()
    p2[1, 3, 9] = 7.5  # a text token
    t2 = sink_tokens_table(p2, kinds, tau, layer_ids=[10, 11, 12, 13], sample_ids=list("abcdef"))
    text = t2[t2.token_kind == "text"]
    assert len(text) == 1 and text.iloc[0][["sample", "layer", "position"]].tolist() == ["b", 13, 9]


def test_choose_tau_rules():
    assert choose_tau(None, 4096).value == 20.0 and choose_tau(None, 4096).method == "paper"
    assert choose_tau(None, 1600).method == "paper"
    with pytest.raises(ValueError, match="tau must be > 0"):
        choose_tau(None, 4096, tau=0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        choose_tau(None, 4096, tau=-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = choose_tau(None, 64, tau=20)
    assert "no token can reach it" in t.reason and caught
    assert isinstance(choose_tau(None, 4096, tau=15), SinkThreshold)
    # no separated group above the floor -> nothing but BOS is a sink
    kinds = _kinds()
    p = phi(_states(plant=False), SINK_DIMS).permute(1, 0, 2)
    tau = choose_tau(p, DIM, token_kinds=kinds)
    assert not sink_mask_all(p, kinds, tau)[:, :, 1:].any()


# --- heads ----------------------------------------------------------------------------------


def _reference_stats(attn, image_mask, sink_mask):
    """Slow literal loops: image attention, visual sink attention, r, per (batch, head, query)."""
    b_, h_, q_, k_ = attn.shape
    image = torch.zeros(b_, h_, q_)
    vsink = torch.zeros(b_, h_, q_)
    ratio = torch.zeros(b_, h_, q_)
    for b in range(b_):
        for h in range(h_):
            for q in range(q_):
                tot = sk = ns = 0.0
                for k in range(k_):
                    if image_mask[b, k]:
                        a = float(attn[b, h, q, k])
                        tot += a
                        if sink_mask[b, k]:
                            sk += a
                        else:
                            ns += a
                image[b, h, q], vsink[b, h, q] = tot, sk
                ratio[b, h, q] = ns / tot if tot > 0 else 0.0
    return image, vsink, ratio


def _reference_image_centric(attn, image_mask, sink_mask, query_mask, rho, summ):
    image, _, ratio = _reference_stats(attn, image_mask, sink_mask)
    out = torch.zeros(image.shape, dtype=torch.bool)
    for b in range(image.shape[0]):
        for h in range(image.shape[1]):
            for q in range(image.shape[2]):
                out[b, h, q] = bool(query_mask[b, q]) and image[b, h, q] > 0 and image[b, h, q] >= summ \
                    and ratio[b, h, q] >= rho
    return out


def _attention_case(seed=0, b=2, h=3, q=10, k=14, sink_boost=3.0):
    g = torch.Generator().manual_seed(seed)
    image_mask = torch.zeros(b, k, dtype=torch.bool)
    image_mask[:, 2:9] = True
    sink = torch.zeros(b, k, dtype=torch.bool)
    sink[:, 0] = True  # BOS
    sink[0, 4] = True  # planted visual sinks
    sink[1, [3, 7]] = True
    logits = torch.randn(b, h, q, k, generator=g) * 2
    logits = logits + sink_boost * sink[:, None, None, :].float() * torch.rand(b, h, q, 1, generator=g)
    attn = torch.softmax(logits, dim=-1)
    query_mask = torch.zeros(b, q, dtype=torch.bool)
    query_mask[:, 4:] = True  # text after the image
    query_mask[1, -1] = False
    return attn, image_mask, sink, query_mask


def test_visual_attention_stats_match_reference():
    attn, image_mask, sink, qm = _attention_case()
    assert torch.allclose(attn.sum(-1), torch.ones(attn.shape[:-1]))
    st = visual_attention_stats(attn, image_mask, sink, qm)
    image, vsink, ratio = _reference_stats(attn, image_mask, sink)
    assert torch.allclose(st.image_attention, image, atol=1e-6)
    assert torch.allclose(st.visual_sink_attention, vsink, atol=1e-6)
    assert torch.allclose(st.visual_nonsink_ratio, ratio, atol=1e-5)


def test_query_averaged_head_measures_match_the_literal_means_over_queries():
    """Several layers at once ([batch, layer, head, query, key], a different sink set per layer): each per-head
    measure is the mean over the row's queries of the literal per-query value (paper's formulas, loops above),
    attention to any sink (BOS included) and attention received (mean over heads and queries) likewise; a row with
    no query gives 0."""
    from sinkscope.measures.heads import query_averaged_head_measures

    layers = [_attention_case(seed=s) for s in (1, 2)]
    attn = torch.stack([c[0] for c in layers], dim=1)  # [batch, layer, head, query, key]
    image_mask, qm = layers[0][1], layers[0][3].clone()
    sinks = torch.stack([layers[0][2], layers[0][2].roll(1, dims=1)], dim=1)  # [batch, layer, key]
    qm[1] = False  # row 1: no query
    got = query_averaged_head_measures(attn, image_mask, sinks, qm, 0.5, 0.2, all_sinks=True)
    b_, l_, h_ = attn.shape[:3]
    for li in range(l_):
        image, vsink, ratio = _reference_stats(attn[:, li], image_mask, sinks[:, li])
        centric = _reference_image_centric(attn[:, li], image_mask, sinks[:, li], qm, 0.5, 0.2)
        for b in range(b_):
            qs = [q for q in range(qm.shape[1]) if qm[b, q]]
            for h in range(h_):
                def mean(values):
                    return sum(float(values[q]) for q in qs) / len(qs) if qs else 0.0
                assert float(got["image_attention"][b, li, h]) == pytest.approx(mean(image[b, h]), abs=1e-6)
                assert float(got["visual_sink_attention"][b, li, h]) == pytest.approx(mean(vsink[b, h]), abs=1e-6)
                assert float(got["visual_nonsink_ratio"][b, li, h]) == pytest.approx(mean(ratio[b, h]), abs=1e-5)
                assert float(got["image_centric"][b, li, h]) == pytest.approx(mean(centric[b, h].float()), abs=1e-6)
                to_sinks = [sum(float(attn[b, li, h, q, k]) for k in range(attn.shape[-1]) if sinks[b, li, k])
                            for q in range(qm.shape[1])]
                assert float(got["sink_attention"][b, li, h]) == pytest.approx(mean(to_sinks), abs=1e-6)
            for k in range(attn.shape[-1]):
                want = (sum(float(attn[b, li, h, q, k]) for h in range(h_) for q in qs) / (h_ * len(qs))
                        if qs else 0.0)
                assert float(got["received"][b, li, k]) == pytest.approx(want, abs=1e-6)
    assert got["image_centric"][0].sum() > 0 and got["image_attention"][1].abs().sum() == 0


@pytest.mark.parametrize("rho,summ", [(0.5, 0.2), (0.8, 0.4), (0.0, 0.0), (1.0, 0.1)])
def test_image_centric_matches_reference(rho, summ):
    attn, image_mask, sink, qm = _attention_case(seed=3)
    got = image_centric_mask(attn, image_mask, sink, rho=rho, summ=summ, query_mask=qm)
    want = _reference_image_centric(attn, image_mask, sink, qm, rho, summ)
    assert torch.equal(got, want)
    if (rho, summ) == (0.5, 0.2):
        assert 0 < int(got.sum()) < int(qm.sum()) * attn.shape[1]  # the case is not degenerate


def test_rho_summ_validation():
    attn, image_mask, sink, qm = _attention_case()
    for kw in ({"rho": 1.5}, {"rho": -0.1}, {"summ": 2.0}, {"summ": -1}):
        with pytest.raises(ValueError):
            image_centric_mask(attn, image_mask, sink, **kw)
    with pytest.raises(ValueError):
        HeadScoreAccumulator(rho=2)


def test_accumulator_equals_one_shot_and_reference():
    cases = [_attention_case(seed=s) for s in range(3)]
    attn = torch.stack([c[0] for c in cases])  # [layer, batch, head, query, key]
    image_mask, qm = cases[0][1], cases[0][3]
    sinks = torch.stack([c[2] for c in cases], dim=1)  # [batch, layer, key]
    one_shot = head_scores(attn, image_mask, sinks, qm, layer_ids=[2, 3, 4])
    assert list(one_shot.columns[:6]) == ["layer", "head", "image_attention", "visual_sink_attention",
                                          "visual_nonsink_ratio", "image_centric"]
    acc = HeadScoreAccumulator()
    half = HeadScoreAccumulator()
    for i, layer in enumerate([2, 3, 4]):
        for b in range(2):  # stream one sample at a time, half of them into a second accumulator
            target = acc if b == 0 else half
            target.update(layer, attn[i, b:b + 1], image_mask[b:b + 1], sinks[b:b + 1, i], qm[b:b + 1])
    streamed = acc.merge(half).frame()
    pd.testing.assert_frame_equal(streamed, one_shot, check_exact=False, rtol=1e-6)
    # reference means for one layer
    image, vsink, ratio = _reference_stats(attn[1], image_mask, sinks[:, 1])
    centric = _reference_image_centric(attn[1], image_mask, sinks[:, 1], qm, 0.5, 0.2)
    w = qm[:, None, :].float()
    n = w.sum()
    row = one_shot[one_shot.layer == 3].sort_values("head")
    assert torch.allclose(torch.tensor(row.image_attention.values, dtype=torch.float32),
                          (image * w).sum((0, 2)) / n, atol=1e-6)
    assert torch.allclose(torch.tensor(row.visual_sink_attention.values, dtype=torch.float32),
                          (vsink * w).sum((0, 2)) / n, atol=1e-6)
    assert torch.allclose(torch.tensor(row.visual_nonsink_ratio.values, dtype=torch.float32),
                          (ratio * w).sum((0, 2)) / n, atol=1e-5)
    assert torch.allclose(torch.tensor(row.image_centric.values, dtype=torch.float32),
                          centric.float().sum((0, 2)) / n, atol=1e-6)
    assert (row.n_queries == int(n)).all()
    # list inputs and a shared [batch, key] sink mask work too
    shared = head_scores(list(attn), image_mask, sinks[:, 0], qm)
    assert len(shared) == 3 * attn.shape[2]


def test_no_image_tokens():
    attn, _, sink, qm = _attention_case()
    no_image = torch.zeros(attn.shape[0], attn.shape[-1], dtype=torch.bool)
    st = visual_attention_stats(attn, no_image, sink, qm)
    assert (st.image_attention == 0).all() and (st.visual_nonsink_ratio == 0).all()
    assert not torch.isnan(st.visual_nonsink_ratio).any()
    assert not image_centric_mask(attn, no_image, sink, rho=0.0, summ=0.0, query_mask=qm).any()
    frame = head_scores(attn, no_image, sink, qm)
    assert (frame.image_attention == 0).all() and (frame.visual_nonsink_ratio == 0).all()
    assert (frame.image_centric == 0).all() and (frame.visual_nonsink_ratio_pooled == 0).all()
    # no queries at all: zeros, not NaN
    empty = head_scores(attn, no_image, sink, torch.zeros_like(qm))
    assert not empty.drop(columns=["layer", "head"]).isna().any().any()


def test_all_image_tokens_sinks_ratio_zero():
    attn, image_mask, _, qm = _attention_case()
    st = visual_attention_stats(attn, image_mask, image_mask.clone(), qm)
    assert torch.allclose(st.visual_sink_attention, st.image_attention)
    assert (st.visual_nonsink_ratio == 0).all()


def test_token_roles_first_delimiter_text_visual():
    from sinkscope.measures.sinks import is_delimiter, token_roles

    assert is_delimiter("\n") and is_delimiter(" .") and is_delimiter("<|im_end|>") and is_delimiter("</s>")
    assert not is_delimiter(" circle") and not is_delimiter("") and not is_delimiter("a1")
    kinds = ["bos", "text", "text", "visual", "text", "generated"]
    tokens = ["<|im_start|>", "user", "\n", "", "?", "yes"]
    assert token_roles(kinds, tokens) == ["first", "text", "delimiter", "visual", "delimiter", "generated"]


def test_layer_relative_score_against_a_literal_loop():
    """max_d |x_d| / median over real tokens of RMS(x), per row and layer; padding left out."""
    import statistics

    from sinkscope.measures.sinks import choose_tau_layer_relative, phi_layer_relative, sink_score

    g = torch.Generator().manual_seed(0)
    states = torch.randn(2, 3, 5, 8, generator=g)
    states[0, 1, 2, 3] = 500.0  # a planted massive value
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    got = phi_layer_relative(states, [3, 6], mask)
    for b in range(2):
        for layer in range(3):
            rms = [float(states[b, layer, t].pow(2).mean().add(1e-6).sqrt()) for t in range(5) if mask[b, t]]
            typical = statistics.median_low(rms) if len(rms) % 2 == 0 else statistics.median(rms)
            for t in range(5):
                want = max(abs(float(states[b, layer, t, d])) for d in (3, 6)) / typical
                assert abs(float(got[b, layer, t]) - want) < 1e-4 * max(1.0, want)
    assert float(got[0, 1, 2]) > 100  # the planted token, unbounded by sqrt(dim) = 2.83
    assert torch.equal(sink_score(states, [3, 6], "layer", mask), got)
    assert torch.equal(sink_score(states, [3, 6], "rms"), __import__("sinkscope.measures.sinks", fromlist=["phi"]).phi(states, [3, 6]))
    assert choose_tau_layer_relative().value == 100.0 and choose_tau_layer_relative(50).method == "given"
    with pytest.raises(ValueError):
        sink_score(states, [3], "bogus")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_row_median_abs_is_the_exact_median_over_each_rows_valid_entries(dtype, device):
    """The per-row median |x| (16-bit dtypes through a histogram of bit patterns, others a masked nanmedian) equals
    torch's median of the row's valid entries exactly: values over 6 decades, a massive one, ties, negative zero,
    subnormals, rows with one, two or no valid entries, rows given as [batch, layer, token, dim] with a token mask
    broadcast over layers and dims; on the GPU too (its bincount and search), where one is present."""
    from sinkscope.measures.massive import row_median_abs

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA (runs on a GPU machine)")

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, 9, 16, generator=g) * torch.logspace(-3, 3, 16)).to(dtype)
    x[0, 1, 2, 3] = 2500.0
    x[1, 2] = x[1, 2, 0, 0]  # a layer whose entries are all the same value
    x[2, 0, :, :4] = -0.0
    x[2, 1, :, :4] = torch.finfo(dtype).tiny / 4 if dtype != torch.bfloat16 else 1e-40  # subnormal
    real = torch.rand(3, 9, generator=g) > 0.3
    real[0, :] = True
    real[1, :] = False
    real[1, 4] = True  # one valid token (16 entries)
    real[2, :] = False  # no valid entries: nan
    got = row_median_abs(x.to(device), real[:, None, :, None].to(device), row_dims=2).cpu()
    assert got.shape == (3, 4) and got.dtype == torch.float32
    for b in range(3):
        for layer in range(4):
            entries = x[b, layer][real[b]].float().abs()
            if entries.numel() == 0:
                assert torch.isnan(got[b, layer])
            else:
                assert torch.equal(got[b, layer], entries.median()), (b, layer)
    two = row_median_abs(torch.tensor([[3.0, -1.0, 7.0]], dtype=dtype, device=device),
                         torch.tensor([[True, True, False]], device=device))
    assert torch.equal(two.cpu(), torch.tensor([1.0]))  # the lower of the two middle values, as torch.median


def test_row_median_abs_of_16_bit_values_equals_the_float32_path():
    """The histogram path and the nanmedian path agree on the same values (16-bit values widened to float32)."""
    from sinkscope.measures.massive import row_median_abs

    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(64, 1000, generator=g) * 30).to(dtype)
        valid = torch.rand(64, 1000, generator=g) > 0.5
        assert torch.equal(row_median_abs(x, valid), row_median_abs(x.float(), valid))
