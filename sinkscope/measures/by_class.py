"""Reductions of per-token values over classes of tokens, per layer and sample: the scan's summaries taken from
its tensors instead of grouping ~20,000 table rows per LLaVA sample (benchmarks/scan_tables.py).

values: [layer, batch, token] floats; member: [class, batch, token] bools (a token may be in no class, e.g.
padding). NaN values are skipped, as pandas' grouped reductions skip them.
"""

from __future__ import annotations

import numpy as np
import torch


def class_count(member: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """[class, batch, token] -> [batch, class] tokens per class (int64); with `where` [layer, batch, token] bools,
    [layer, batch, class] the class's tokens where it holds."""
    if where is None:
        return member.sum(dim=-1).transpose(0, 1).long()
    return (member[:, None] & where[None]).sum(dim=-1).permute(1, 2, 0).long()


def class_sum(values: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """[layer, batch, class] sum of each class's values in float64, NaN skipped (0 for an empty class)."""
    inside = member[:, None] & ~torch.isnan(values)[None]  # [class, layer, batch, token]
    total = torch.where(inside, values.double()[None], 0.0).sum(dim=-1)
    return total.permute(1, 2, 0)


def class_max(values: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """[layer, batch, class] largest value of each class in the values' dtype, NaN skipped (NaN where none)."""
    inside = member[:, None] & ~torch.isnan(values)[None]
    low = torch.tensor(-torch.inf, dtype=values.dtype)
    top = torch.where(inside, values[None], low).amax(dim=-1)
    top = torch.where(inside.any(dim=-1), top, torch.nan)
    return top.permute(1, 2, 0)


def class_quantiles(values: torch.Tensor, member: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """Per q: [layer, batch, class] q-quantile of each class's values, in float64: linear interpolation between the
    order statistics around q (n - 1) (numpy's and pandas' default; q = 0.5 as numpy's median, the mean of the two
    middle values); NaN skipped, NaN for a class without values. CPU tensors (numpy sorts them ~10x faster than
    torch's CPU sort)."""
    valid = member[:, None] & ~torch.isnan(values)[None]  # [class, layer, batch, token]
    padded = torch.where(member[:, None], values[None], torch.inf)  # others last; a class's NaN after them
    ordered = torch.from_numpy(np.sort(padded.numpy(), axis=-1)).double()
    count = valid.sum(dim=-1)
    last = (count - 1).clamp(min=0)
    out = []
    for q in qs:
        position = q * last.double()
        low = position.floor().long()
        frac = position - low
        high = low + (frac > 0).long()  # the next statistic only where the position falls between two
        a = ordered.gather(-1, low[..., None]).squeeze(-1)
        b = ordered.gather(-1, high[..., None]).squeeze(-1)
        value = (a + b) / 2 if q == 0.5 else torch.where(frac > 0, a + (b - a) * frac, a)  # inf stays inf
        out.append(torch.where(count > 0, value, torch.nan).permute(1, 2, 0))
    return out


def top_in_class(values: torch.Tensor, member: torch.Tensor, k: int) -> torch.Tensor:
    """[layer, batch, token] bools: the k largest values of one class ([batch, token] member) per layer and sample;
    among equal values the earlier token first; NaN never chosen."""
    inside = member[None] & ~torch.isnan(values)
    ranked = torch.where(inside, values, -torch.inf).sort(dim=-1, descending=True, stable=True).indices
    chosen = torch.zeros_like(inside)
    chosen.scatter_(-1, ranked[..., :k], True)
    return chosen & inside
