"""`measures.by_class` against numpy, one (layer, sample, class) at a time: values with NaN, inf and ties, a class
with no tokens, one with only NaN, tokens in no class (padding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope.measures import by_class

LAYERS, BATCH, TOKENS, CLASSES = 3, 4, 30, 4


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    values = (torch.rand(LAYERS, BATCH, TOKENS, generator=g) * 10).round()  # rounded: many equal values
    values[torch.rand(values.shape, generator=g) < 0.1] = torch.nan
    values[0, 0, 5] = torch.inf
    code = torch.randint(-1, CLASSES - 1, (BATCH, TOKENS), generator=g)  # -1: in no class; class 3: empty
    code[1, :4] = 2
    values[:, 1][:, code[1] == 2] = torch.nan  # sample 1: class 2 has only NaN
    member = torch.stack([code == c for c in range(CLASSES)])
    return values, member


def _each(values, member):
    for layer in range(LAYERS):
        for b in range(BATCH):
            for c in range(CLASSES):
                x = values[layer, b][member[c, b]].double().numpy()
                yield (layer, b, c), x, x[~np.isnan(x)]


@pytest.mark.parametrize("seed", range(3))
def test_sums_maxima_and_counts_equal_numpy(seed):
    values, member = _case(seed)
    total, top = by_class.class_sum(values, member), by_class.class_max(values, member)
    count = by_class.class_count(member)
    assert total.dtype == torch.float64 and top.dtype == values.dtype and count.dtype == torch.int64
    for (layer, b, c), x, kept in _each(values, member):
        assert count[b, c] == len(x)
        assert total[layer, b, c].item() == kept.sum()  # NaN skipped; 0 for none
        assert np.isnan(top[layer, b, c].item()) if len(kept) == 0 else top[layer, b, c].item() == kept.max()


@pytest.mark.parametrize("seed", range(3))
def test_quantiles_equal_numpy(seed):
    values, member = _case(seed)
    median, p90, p0, p100 = by_class.class_quantiles(values, member, (0.5, 0.9, 0.0, 1.0))
    empty = 0
    for (layer, b, c), _, kept in _each(values, member):
        got = [q[layer, b, c].item() for q in (median, p90, p0, p100)]
        if len(kept) == 0:
            empty += 1
            assert all(np.isnan(v) for v in got)
            continue
        assert got[0] == np.median(kept) or (np.isinf(got[0]) and np.isinf(np.median(kept)))
        if np.isfinite(kept).all():
            assert got[1] == pytest.approx(np.quantile(kept, 0.9), rel=1e-12)
        assert (got[2], got[3]) == (kept.min(), kept.max())
    assert empty >= LAYERS * BATCH  # class 3 everywhere, class 2 of sample 1


def test_top_in_class_takes_the_largest_and_the_earlier_of_equals():
    values = torch.tensor([[[1.0, 5.0, 3.0, 5.0, torch.nan, 9.0, 3.0, 3.0]]])  # [layer 1, batch 1, token 8]
    member = torch.tensor([[True, True, True, True, True, False, True, True]])
    chosen = by_class.top_in_class(values, member, 3)
    assert torch.nonzero(chosen[0, 0]).flatten().tolist() == [1, 2, 3]  # 5, 5, then the first 3; 9 not a member
    assert by_class.top_in_class(values, member, 10)[0, 0].tolist() == [True, True, True, True, False, False,
                                                                        True, True]  # never NaN or non-members
    assert not by_class.top_in_class(values, torch.zeros_like(member), 3).any()


@pytest.mark.parametrize("seed", range(3))
def test_top_in_class_equals_a_sort_per_row(seed):
    values, member = _case(seed)
    values = torch.where(torch.isinf(values), 7.0, values)
    chosen = by_class.top_in_class(values, member[0], 4)
    for layer in range(LAYERS):
        for b in range(BATCH):
            row = values[layer, b]
            candidates = [t for t in range(TOKENS) if member[0, b, t] and not torch.isnan(row[t])]
            expected = sorted(candidates, key=lambda t: (-row[t].item(), t))[:4]
            assert torch.nonzero(chosen[layer, b]).flatten().tolist() == sorted(expected)


def test_counts_where_a_flag_holds_equal_numpy():
    values, member = _case(0)
    flag = values > 4  # NaN: False
    got = by_class.class_count(member, flag)
    assert got.shape == (LAYERS, BATCH, CLASSES) and got.dtype == torch.int64
    for layer in range(LAYERS):
        for b in range(BATCH):
            for c in range(CLASSES):
                assert got[layer, b, c] == int((member[c, b] & flag[layer, b]).sum())
