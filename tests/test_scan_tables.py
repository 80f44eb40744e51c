"""The scan's per-sample summaries against literal loops over their groups and rows.

`ScanReducer` makes its summaries (token_summary_per_sample, role_phi_per_sample) and its kept token rows
(--token-stats sinks) from the batch's tensors (`measures.by_class`), `_rank_in_image` and `_on_background`
are vectorised tensors and arrays (benchmarks/scan_tables.py); here each is recomputed one group, row or token
at a time with plain Python and numpy over the reducer's own full token rows, on a traced batch of the organism
with several samples (ids not in sorted order, one with padding, one without a background mask), layers, kinds,
roles, sinks and images.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sinkscope.analyses.common import prepare_batch
from sinkscope.analyses.scan import TOP_VISUAL, ScanReducer, _on_background, _rank_in_image, batch_tables
from sinkscope.eval.tasks import Sample, load_samples
from sinkscope.trace import Tracer

KINDS = {"bos": "first", "text": "text", "delimiter": "delimiter", "visual": "image"}


def _tokens(seed: int, n_samples: int = 3, n_layers: int = 4, n_tokens: int = 40) -> pd.DataFrame:
    """Token rows as `ScanReducer.end()` makes them, minus on_background: (layer, sample, position) order."""
    rng = np.random.default_rng(seed)
    kinds = ["bos"] + list(rng.choice(["text", "delimiter", "visual", "visual", "visual"], n_tokens - 1))
    rows = []
    for layer in range(n_layers):
        for b in range(n_samples):
            rank = 0
            for pos, kind in enumerate(kinds):
                phi = np.float32(abs(rng.standard_normal()) * (40 if rng.random() < 0.1 else 3))
                rows.append({"sample": f"s{b}", "layer": layer, "position": pos, "token_kind": str(kind),
                             "role": KINDS[kind], "token": "" if kind == "visual" else f"w{pos}",
                             "image_index": 0 if kind == "visual" else -1, "phi": phi, "is_sink": bool(phi >= 20),
                             "attention_received": np.float32(rng.random()),
                             "visual_rank": rank if kind == "visual" else -1})
                rank += kind == "visual"
    frame = pd.DataFrame(rows)
    return frame.astype({"phi": np.float32, "attention_received": np.float32})


def _samples(n_samples: int = 3, n_tokens: int = 40) -> list[Sample]:
    """s0: a mask longer than the image; s1: a mask shorter than it (its last image tokens unknown); s2: none."""
    rng = np.random.default_rng(7)
    return [Sample(sample_id="s0", question="q", meta={"background_patches": list(rng.random(60) < .5)}),
            Sample(sample_id="s1", question="q", meta={"background_patches": list(rng.random(9) < .5)}),
            Sample(sample_id="s2", question="q", meta={})][:n_samples]


def _with_background(tokens: pd.DataFrame, samples: list[Sample]) -> pd.DataFrame:
    """on_background looked up row by row: the mask entry at the token's rank in its image, None where unknown."""
    masks = {s.sample_id: s.meta.get("background_patches") for s in samples}
    values = []
    for sid, rank, kind in zip(tokens["sample"], tokens["visual_rank"], tokens["token_kind"]):
        mask = masks[sid]
        values.append(None if kind != "visual" or mask is None or rank >= len(mask) else bool(mask[rank]))
    return tokens.assign(on_background=pd.Series(values, index=tokens.index, dtype=object))


@pytest.mark.parametrize("seed", range(3))
def test_background_marks_equal_a_row_by_row_lookup(seed):
    rows = _tokens(seed)
    rows = rows[rows["layer"] == 0]  # the static columns: one layer's rows
    samples = _samples()
    static = {"sample": rows["sample"].tolist(), "visual_rank": rows["visual_rank"].to_numpy()}
    got = _on_background(static, samples).tolist()
    assert got == _with_background(rows, samples)["on_background"].tolist()
    assert all(type(v) is bool for v in got if v is not None)  # Python bools, written True/False
    assert any(v is None for v in got) and any(v is True for v in got) and any(v is False for v in got)


def test_rank_in_image_equals_counting_earlier_tokens_of_the_same_image():
    g = torch.Generator().manual_seed(0)
    image_index = torch.randint(-1, 3, (4, 50), generator=g)
    image_index[1] = -1  # a row without images
    image_index[2, :10] = -1  # padding or text first
    got = _rank_in_image(image_index)
    for b in range(4):
        for t in range(50):
            k = int(image_index[b, t])
            expected = -1 if k < 0 else int((image_index[b, :t] == k).sum())
            assert int(got[b, t]) == expected
    assert (_rank_in_image(torch.full((2, 5), -1)) == -1).all()
    assert _rank_in_image(torch.zeros(0, 0, dtype=torch.long)).shape == (0, 0)



ASSET = Path(__file__).resolve().parent.parent / "sinkscope" / "models" / "embedded" / "assets" / "organism"


@pytest.fixture(scope="module")
def traced(organism_adapter):
    """(reducer, every token row, the batch's tables with --token-stats sinks) of one organism batch."""
    adapter = organism_adapter
    truth = json.loads((ASSET / "ground_truth.json").read_text())
    demo = load_samples("demo", 3)
    ids = ["s10", "s2", "s1"]  # batch order differs from sorted order ("s1" < "s10" < "s2")
    samples = [dataclasses.replace(s, sample_id=i) for s, i in zip(demo, ids)]
    samples[1] = dataclasses.replace(samples[1], meta={k: v for k, v in samples[1].meta.items()
                                                       if k != "background_patches"})
    batch = prepare_batch(adapter, samples)
    reducer = ScanReducer(truth["sink_dims"], 100.0, 5, 0.5, 0.2, adapter.rms_norm_eps, samples,
                          want_profile=False, token_strings=adapter.token_strings, score="layer")
    Tracer(adapter).run(batch, [reducer], sample_ids=ids)
    tokens = pd.concat(reducer.token_rows, ignore_index=True)
    assert batch["attention_mask"].eq(0).any(), "a padded sample"
    assert tokens["is_sink"].any() and not tokens["is_sink"].all()
    assert tokens["on_background"].isna().any() and tokens["on_background"].eq(True).any()
    return reducer, tokens, batch_tables(reducer, "sinks")


def test_token_counts_equal_a_loop_over_groups(traced):
    reducer, tokens, tables = traced
    got = tables["token_summary_per_sample"]
    assert list(got.columns[:3]) == ["sample", "layer", "token_kind"]
    assert got["sample"].dtype == tokens["sample"].dtype and got["token_kind"].dtype == tokens["token_kind"].dtype
    got = got.set_index(["sample", "layer", "token_kind"])
    assert list(got.index) == sorted(got.index)  # sorted keys, one row per group present
    for (sid, layer, kind), rows in tokens.groupby(["sample", "layer", "token_kind"]):
        row = got.loc[(sid, layer, kind)]
        sink = rows["is_sink"].to_numpy()
        known = np.array([v is not None for v in rows["on_background"]])
        background = np.array([v is True for v in rows["on_background"]])
        phi, attention = rows["phi"].to_numpy(np.float64), rows["attention_received"].to_numpy(np.float64)
        assert row["n_tokens"] == len(rows) and row["n_sinks"] == sink.sum()
        assert row["max_phi"] == rows["phi"].max()
        assert row["sum_phi"] == np.float32(phi.sum())  # summed in float64, stored in float32
        assert row["sum_attention"] == np.float32(attention.sum())
        assert row["sum_sink_attention"] == np.float32(attention[sink].sum())
        assert (row["n_known_background"], row["n_background"]) == (known.sum(), background.sum())
        assert (row["n_sink_known_background"], row["n_sink_background"]) == ((known & sink).sum(),
                                                                             (background & sink).sum())
    assert len(got) == tokens.groupby(["sample", "layer", "token_kind"]).ngroups
    assert dict(got.dtypes) == {"n_tokens": np.int64, "n_sinks": np.int64, "sum_phi": np.float32,
                                "max_phi": np.float32, "sum_attention": np.float32,
                                "sum_sink_attention": np.float32, "n_known_background": np.int64,
                                "n_background": np.int64, "n_sink_known_background": np.int64,
                                "n_sink_background": np.int64}


def test_role_phi_equals_a_loop_over_groups(traced):
    reducer, tokens, tables = traced
    got = tables["role_phi_per_sample"].set_index(["sample", "layer", "role"])
    assert list(got.index) == sorted(got.index)
    assert got["phi_p90"].dtype == np.float32 and got["phi_median"].dtype == np.float32
    for (sid, layer, role), rows in tokens.groupby(["sample", "layer", "role"]):
        row = got.loc[(sid, layer, role)]
        phi = np.sort(rows["phi"].to_numpy(np.float64))
        position = 0.9 * (len(phi) - 1)  # linear interpolation between the order statistics around it
        low, frac = int(np.floor(position)), position - np.floor(position)
        p90 = phi[low] + (phi[min(low + 1, len(phi) - 1)] - phi[low]) * frac
        assert row["phi_p90"] == np.float32(p90) or abs(row["phi_p90"] - p90) <= 1e-6 * abs(p90)
        assert row["phi_median"] == np.float32(np.median(phi))
        assert (row["n_tokens"], row["n_sinks"], row["phi_max"]) == (len(rows), rows["is_sink"].sum(), phi.max())
        assert row["attention_received"] == np.float32(rows["attention_received"].to_numpy(np.float64).sum())
    assert len(got) == tokens.groupby(["sample", "layer", "role"]).ngroups


def test_kept_token_rows_are_bos_sinks_and_the_top_image_tokens(traced):
    reducer, tokens, tables = traced
    expected = []
    for (_, _), rows in tokens.groupby(["sample", "layer"]):  # sorted sample ids, then layers
        visual = rows[rows["token_kind"] == "visual"]
        # the TOP_VISUAL highest phi, the earlier token first among equal phi
        top = sorted(zip(-visual["phi"].to_numpy(np.float64), visual["position"], visual.index))[:TOP_VISUAL]
        keep = {i for i, r in rows.iterrows() if r["is_sink"] or r["token_kind"] == "bos"} | {i for *_, i in top}
        expected += sorted(keep, key=lambda i: rows.loc[i, "position"])
    pd.testing.assert_frame_equal(tables["token_stats"], tokens.loc[expected].reset_index(drop=True),
                                  check_exact=True)
    sinks = tokens[tokens["is_sink"]][["sample", "layer", "position", "token_kind", "role", "token", "phi"]]
    pd.testing.assert_frame_equal(tables["sink_tokens"], sinks.reset_index(drop=True), check_exact=True)
    assert reducer.n_token_rows == len(tokens)
    pd.testing.assert_frame_equal(reducer.token_table("all"), tokens, check_exact=True)
