"""Pure measures of the analyses, on hand-built tensors with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sinkscope.measures import contributions as ov
from sinkscope.measures import location as loc


def test_ov_norms_gqa_equals_a_loop_over_heads():
    torch.manual_seed(0)
    b, heads, kv, keys, hd, hidden = 2, 4, 2, 5, 3, 7
    v = torch.randn(b, kv, keys, hd)
    w = torch.randn(hidden, heads * hd)
    got = ov.ov_norms(v, w, heads)
    for h in range(heads):
        g = h // (heads // kv)  # transformers' repeat_kv: query head h reads kv head h // groups
        want = (v[:, g] @ w[:, h * hd:(h + 1) * hd].T).norm(dim=-1)
        torch.testing.assert_close(got[:, h], want)
    attn = torch.softmax(torch.randn(b, heads, 3, keys), -1)
    contrib = ov.ov_contributions(attn, got)
    # the contribution is the norm of what a_ij v_j W_O^h writes
    h, i, j = 3, 1, 2
    written = attn[0, h, i, j] * (w[:, h * hd:(h + 1) * hd] @ v[0, h // 2, j])
    assert float(contrib[0, h, i, j]) == pytest.approx(float(written.norm()), rel=1e-5)


def test_ov_norms_rejects_bad_shapes():
    with pytest.raises(ValueError, match="evenly"):
        ov.ov_norms(torch.zeros(1, 3, 2, 4), torch.zeros(8, 16), 4)
    with pytest.raises(ValueError, match="o_weight"):
        ov.ov_norms(torch.zeros(1, 2, 2, 4), torch.zeros(8, 12), 4)


def test_class_means_and_empty_classes():
    values = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    keys = torch.tensor([[True, False, True], [False, False, False]])
    queries = torch.tensor([[False, True], [True, True]])
    m = ov.class_means(values, keys, queries)
    assert float(m[0, 0]) == pytest.approx((3 + 5) / 2)  # row 0: query 1, keys 0 and 2
    assert math.isnan(float(m[1, 0]))  # no key of the class: NaN, no division by zero


def test_token_background_by_area():
    mask = np.ones((8, 8), dtype=bool)
    mask[0:2, 0:2] = False  # an object in the top-left 2x2 patches
    np.testing.assert_array_equal(loc.token_background(mask, (8, 8)), mask.reshape(-1))
    np.testing.assert_array_equal(loc.token_background(mask, (2, 2)), [False, True, True, True])  # 4/16 covered
    np.testing.assert_array_equal(loc.token_background(mask, (4, 4), min_object_coverage=1.0),
                                  [False] + [True] * 15)
    # a grid that does not divide the mask: exact area fractions (3x3 over 8x8)
    assert loc.token_background(mask, (3, 3)).tolist()[0] is False
    assert loc.square_grid(64) == (8, 8) and loc.square_grid(6) is None and loc.square_grid(0) is None


def test_location_counts_and_enrichment():
    c = loc.location_counts(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 1], bool))
    assert (c.n_visual, c.n_background, c.n_sinks, c.n_sinks_background) == (4, 3, 2, 1)
    assert c.sink_share == 0.5 and c.base_rate == 0.75 and c.enrichment == pytest.approx(2 / 3)
    none = loc.location_counts(np.zeros(4, bool), np.ones(4, bool))
    assert math.isnan(none.sink_share) and math.isnan(none.enrichment)
    share, base, enr = loc.pooled_enrichment([4, 4], [3, 2], [2, 0], [2, 0])
    assert (share, base) == (1.0, 5 / 8) and enr == pytest.approx(1.6)


def test_class_contributions_equal_the_per_class_means_of_the_full_contribution_tensor():
    """The fused per-class measure (queries summed out first) equals, for every class, `class_means` of the
    attention and of `ov_contributions` (the [batch, head, query, key] tensor of the paper's formula) and the
    literal mean norm over the class's tokens; empty classes and rows without queries give NaN (norms: 0), as
    there. GQA values, three classes that overlap, one empty in a row."""
    g = torch.Generator().manual_seed(3)
    b, heads, kv, t, hd, hidden = 3, 4, 2, 7, 3, 5
    attn = torch.softmax(torch.randn(b, heads, t, t, generator=g), -1)
    norms = ov.ov_norms(torch.randn(b, kv, t, hd, generator=g), torch.randn(hidden, heads * hd, generator=g), heads)
    keys = torch.rand(b, 3, t, generator=g) > 0.5
    keys[1, 2] = False  # class 2 empty in row 1
    queries = torch.rand(b, t, generator=g) > 0.4
    queries[2] = False  # row 2 has no query
    got = ov.class_contributions(attn, norms, keys, queries)
    contrib = ov.ov_contributions(attn, norms)
    for c in range(3):
        torch.testing.assert_close(got["attention"][:, c], ov.class_means(attn, keys[:, c], queries), equal_nan=True)
        torch.testing.assert_close(got["contribution"][:, c], ov.class_means(contrib, keys[:, c], queries),
                                   equal_nan=True)
        for row in range(b):
            n = int(keys[row, c].sum())
            want = norms[row][:, keys[row, c]].mean(-1) if n else torch.zeros(heads)
            torch.testing.assert_close(got["ov_norm"][row, c], want)
            assert int(got["n_tokens"][row, c]) == n
    assert got["attention"][1, 2].isnan().all() and got["contribution"][2].isnan().all()
    assert not got["attention"][0].isnan().any()


def test_ov_norms_from_grams_keep_precision_for_values_that_w_o_nearly_cancels():
    """|| W_O^h v || through G_h = W_O^h^T W_O^h (float64) equals the direct float64 norm within float32 rounding,
    also for a massive value (norm 1e3) along W_O^h's weakest direction (singular values 1 down to 1e-4), where a
    float32 quadratic form would lose the answer to cancellation; and it never makes the [batch, head, key, hidden]
    tensor of what each key writes."""
    g = torch.Generator().manual_seed(7)
    heads, hd, hidden = 2, 8, 32
    u, _ = torch.linalg.qr(torch.randn(hidden, hd, generator=g, dtype=torch.float64))
    vt, _ = torch.linalg.qr(torch.randn(hd, hd, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -4, hd, dtype=torch.float64)
    w_head = u @ torch.diag(spectrum) @ vt.T  # [hidden, hd]
    w = torch.cat([w_head, torch.randn(hidden, hd, generator=g, dtype=torch.float64)], dim=1).float()
    values = torch.randn(1, heads, 5, hd, generator=g)
    values[0, 0, 2] = 1e3 * vt[:, -1].float()  # head 0, key 2: along the direction W_O^0 shrinks by 1e-4
    want = torch.stack([(values[0, h].double() @ w[:, h * hd:(h + 1) * hd].double().T).norm(dim=-1)
                        for h in range(heads)])[None]
    got = ov.ov_norms_from_grams(values, ov.ov_grams(w, heads))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert float(want[0, 0, 2]) == pytest.approx(0.1, rel=1e-3)  # 1e3 x 1e-4
    torch.testing.assert_close(ov.ov_norms(values, w, heads), got)
    with pytest.raises(ValueError, match="grams must be"):
        ov.ov_norms_from_grams(values, torch.zeros(heads, hd + 1, hd + 1))
