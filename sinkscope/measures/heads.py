"""Visual attention of heads: the visual non-sink ratio and image-centric heads (Kang et al.
2025, section 4).

For a query i of head (l, h), with a = post-softmax attention and I_vis the image tokens:
  image_attention        = sum_{j in I_vis} a_ij
  visual_sink_attention  = sum_{j in I_vis, sink} a_ij
  visual_nonsink_ratio r = sum_{j in I_vis, not sink} a_ij / image_attention   (0 if no image attention)
Head (l, h) is image-centric for query i if image_attention >= summ (0.2) and r >= rho (0.5).
Attention values are probabilities (unitless, each row sums to 1). Layout: attention
`[batch, head, query, key]`, masks `[batch, key]` / `[batch, query]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

HEAD_COLUMNS = ["layer", "head", "image_attention", "visual_sink_attention", "visual_nonsink_ratio",
                "image_centric", "visual_nonsink_ratio_pooled", "n_queries"]


def _check_rho_summ(rho: float, summ: float) -> None:
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho (minimum visual non-sink ratio) must be in [0, 1], got {rho}")
    if not 0.0 <= summ <= 1.0:
        raise ValueError(f"summ (minimum attention to the image, a probability) must be in [0, 1], got {summ}")


@dataclass
class VisualAttentionStats:
    """Per (batch, head, query) float32 tensors [batch, head, query], plus the query mask
    [batch, query] they were computed with (stats are given for every query; the mask only
    restricts selection and averages)."""

    image_attention: torch.Tensor
    visual_sink_attention: torch.Tensor
    visual_nonsink_attention: torch.Tensor
    visual_nonsink_ratio: torch.Tensor
    query_mask: torch.Tensor


def visual_attention_stats(attn: torch.Tensor, image_mask: torch.Tensor, sink_mask: torch.Tensor,
                           query_mask: torch.Tensor | None = None) -> VisualAttentionStats:
    """Image, visual-sink and visual-non-sink attention of every query of every head.

    attn: [batch, head, query, key] post-softmax attention of one layer, or [batch, layer, head, query, key]
      for several layers at once (any leading dims before head, matched by the masks').
    image_mask: [batch, key] bool, image tokens. sink_mask: [batch, key] bool (or [batch, layer, key]), sink
      tokens of the layer (any kind; only those that are image tokens count as visual sinks).
    query_mask: [batch, query] bool (default all).
    Returns VisualAttentionStats ([batch, (layer,) head, query]); visual_nonsink_ratio is 0 where image_attention
    is 0. The three sums are one product with a [key, 3] column matrix.
    """
    if attn.dim() < 4:
        raise ValueError(f"attn must be [batch, head, query, key], got {tuple(attn.shape)}")
    batch, n_q, n_k = attn.shape[0], attn.shape[-2], attn.shape[-1]
    lead = tuple(attn.shape[:-3])  # (batch,) or (batch, layer)
    for name, m in (("image_mask", image_mask), ("sink_mask", sink_mask)):
        if tuple(m.shape) not in ((batch, n_k), lead + (n_k,)):
            raise ValueError(f"{name} must be [batch, key] = {(batch, n_k)}, got {tuple(m.shape)}")
    if query_mask is None:
        query_mask = torch.ones(batch, n_q, dtype=torch.bool, device=attn.device)
    elif tuple(query_mask.shape) != (batch, n_q):
        raise ValueError(f"query_mask must be [batch, query] = {(batch, n_q)}, got {tuple(query_mask.shape)}")
    a = attn.float()
    extra = (1,) * (len(lead) - 1)  # a [batch, key] mask over every layer
    image = image_mask.to(a.device).bool()
    sink = sink_mask.to(a.device).bool()
    image = image.reshape(image.shape[:1] + extra + image.shape[1:]) if image.dim() == 2 else image
    sink = sink.reshape(sink.shape[:1] + extra + sink.shape[1:]) if sink.dim() == 2 else sink
    columns = torch.stack(torch.broadcast_tensors(image, image & sink, image & ~sink), dim=-1).float()
    masses = torch.matmul(a, columns.unsqueeze(-3))  # [..., head, query, 3]
    image_att, vsink_att, nonsink_att = masses.unbind(-1)
    ratio = torch.where(image_att > 0, nonsink_att / image_att.clamp_min(1e-30), torch.zeros_like(image_att))
    return VisualAttentionStats(image_att, vsink_att, nonsink_att, ratio.clamp(0.0, 1.0),
                                query_mask.to(a.device).bool())


def image_centric_from_stats(stats: VisualAttentionStats, rho: float, summ: float) -> torch.Tensor:
    """`image_centric_mask` from stats already computed: bool [batch, (layer,) head, query]."""
    _check_rho_summ(rho, summ)
    queries = stats.query_mask.reshape(stats.query_mask.shape[:1] + (1,) * (stats.image_attention.dim() - 2)
                                       + stats.query_mask.shape[1:])
    return ((stats.image_attention >= summ) & (stats.image_attention > 0) & (stats.visual_nonsink_ratio >= rho)
            & queries)


def query_averaged_head_measures(probs: torch.Tensor, visual_mask: torch.Tensor, sink_mask: torch.Tensor,
                                 query_mask: torch.Tensor, rho: float, summ: float,
                                 all_sinks: bool = False) -> dict[str, torch.Tensor]:
    """The per-head measures of several layers at once, each averaged over the queries in query_mask.

    probs: [batch, layer, head, query, key] post-softmax (only the query rows the caller wants, e.g. those after
    the image); visual_mask: [batch, key] bool; sink_mask: [batch, layer, key] bool, every sink of the layer (the
    visual ones are those in visual_mask); query_mask: [batch, query] bool over the same rows.
    Returns float32 [batch, layer, head]: image_attention, visual_sink_attention, visual_nonsink_ratio,
    image_centric (the share of queries for which the head is image-centric), and with `all_sinks` sink_attention
    (to any sink, BOS included); and received [batch, layer, key]: the attention each key receives, mean over heads
    and queries. Rows without queries give 0.
    """
    probs = probs.float()
    qf = query_mask.to(probs.device).float()
    visual = visual_mask.to(probs.device)
    sink = sink_mask.to(probs.device)
    denom = qf.sum(dim=-1).clamp_min(1)  # [batch]
    received = (probs.mean(dim=2) * qf[:, None, :, None]).sum(dim=2) / denom[:, None, None]  # [batch, layer, key]
    stats = visual_attention_stats(probs, visual, sink & visual[:, None, :], query_mask)
    centric = image_centric_from_stats(stats, rho, summ)
    measures = [("image_attention", stats.image_attention), ("visual_sink_attention", stats.visual_sink_attention),
                ("visual_nonsink_ratio", stats.visual_nonsink_ratio), ("image_centric", centric)]
    if all_sinks:
        measures.append(("sink_attention", torch.einsum("blhqk,blk->blhq", probs, sink.float())))
    weights = qf[:, None, None, :]  # [batch, 1, 1, query]
    out = {name: (value.float() * weights).sum(-1) / denom[:, None, None] for name, value in measures}
    out["received"] = received
    return out


def image_centric_mask(attn: torch.Tensor, image_mask: torch.Tensor, sink_mask: torch.Tensor, rho: float = 0.5,
                       summ: float = 0.2, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which (batch, head, query) are image-centric: image_attention >= summ and r >= rho.

    Shapes as in `visual_attention_stats`; returns bool [batch, head, query]. Queries outside
    query_mask and queries with no image attention at all are never selected (so with no image
    tokens nothing is). With rho = 0 a query whose image attention is all on sinks can be
    selected (r = 0 >= 0): an intervention that redistributes to non-sinks must guard that.
    Raises ValueError unless 0 <= rho <= 1 and 0 <= summ <= 1.
    """
    _check_rho_summ(rho, summ)
    return image_centric_from_stats(visual_attention_stats(attn, image_mask, sink_mask, query_mask), rho, summ)


class HeadScoreAccumulator:
    """Streaming per-(layer, head) sums of the head measures, over queries in query_mask and batches.

    Memory is O(layers x heads) whatever the data size. `frame()` gives the means (see
    `head_scores`); `merge` adds another accumulator (e.g. another shard).
    """

    def __init__(self, rho: float = 0.5, summ: float = 0.2):
        _check_rho_summ(rho, summ)
        self.rho, self.summ = rho, summ
        self._sums: dict[int, torch.Tensor] = {}  # layer -> [5, head] float64
        self._counts: dict[int, int] = {}  # layer -> number of (batch, query) pairs

    def update(self, layer: int, attn: torch.Tensor, image_mask: torch.Tensor, sink_mask: torch.Tensor,
               query_mask: torch.Tensor | None = None) -> None:
        """Add one layer's batch. attn [batch, head, query, key]; masks as in visual_attention_stats."""
        stats = visual_attention_stats(attn, image_mask, sink_mask, query_mask)
        w = stats.query_mask[:, None, :].double()  # [batch, 1, query]
        centric = image_centric_from_stats(stats, self.rho, self.summ)
        sums = torch.stack([
            (stats.image_attention.double() * w).sum(dim=(0, 2)),
            (stats.visual_sink_attention.double() * w).sum(dim=(0, 2)),
            (stats.visual_nonsink_ratio.double() * w).sum(dim=(0, 2)),
            centric.double().sum(dim=(0, 2)),
            (stats.visual_nonsink_attention.double() * w).sum(dim=(0, 2)),
        ]).cpu()
        layer = int(layer)
        if layer in self._sums:
            if self._sums[layer].shape != sums.shape:
                raise ValueError(f"layer {layer}: {sums.shape[1]} heads, earlier batches had {self._sums[layer].shape[1]}")
            self._sums[layer] += sums
        else:
            self._sums[layer] = sums
        self._counts[layer] = self._counts.get(layer, 0) + int(stats.query_mask.sum())

    def merge(self, other: "HeadScoreAccumulator") -> "HeadScoreAccumulator":
        if (other.rho, other.summ) != (self.rho, self.summ):
            raise ValueError(f"cannot merge accumulators with different rho/summ: {(self.rho, self.summ)} vs "
                             f"{(other.rho, other.summ)}")
        for layer, s in other._sums.items():
            if layer in self._sums:
                self._sums[layer] = self._sums[layer] + s
            else:
                self._sums[layer] = s.clone()
            self._counts[layer] = self._counts.get(layer, 0) + other._counts[layer]
        return self

    def frame(self) -> pd.DataFrame:
        """Columns: layer, head, image_attention, visual_sink_attention, visual_nonsink_ratio (means
        over queries), image_centric (share of queries selected), visual_nonsink_ratio_pooled
        (sum of non-sink over sum of image attention), n_queries."""
        rows = []
        for layer in sorted(self._sums):
            s, n = self._sums[layer], self._counts[layer]
            d = max(n, 1)
            for h in range(s.shape[1]):
                image = float(s[0, h])
                rows.append({
                    "layer": layer, "head": h, "image_attention": image / d,
                    "visual_sink_attention": float(s[1, h]) / d, "visual_nonsink_ratio": float(s[2, h]) / d,
                    "image_centric": float(s[3, h]) / d,
                    "visual_nonsink_ratio_pooled": float(s[4, h]) / image if image > 0 else 0.0,
                    "n_queries": n,
                })
        return pd.DataFrame(rows, columns=HEAD_COLUMNS)


def head_scores(attn, image_mask: torch.Tensor, sink_mask, query_mask: torch.Tensor | None = None,
                rho: float = 0.5, summ: float = 0.2, layer_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """Head measures averaged over queries in query_mask and batch, one row per (layer, head).

    attn: [layer, batch, head, query, key], or one layer [batch, head, query, key], or a list
      of per-layer [batch, head, query, key] tensors.
    image_mask: [batch, key] bool. sink_mask: [batch, key] (same sinks in every layer) or
      [batch, layer, key] (per layer, the layout of phi) or a list of per-layer [batch, key].
    query_mask: [batch, query] bool, typically text tokens after the image (default all).
    layer_ids: model layer of each entry (default 0..). Columns as HeadScoreAccumulator.frame().
    """
    if isinstance(attn, torch.Tensor):
        if attn.dim() == 4:
            attn = attn[None]
        if attn.dim() != 5:
            raise ValueError(f"attn must be [layer, batch, head, query, key] or [batch, head, query, key], "
                             f"got {tuple(attn.shape)}")
    layers = list(attn)
    layer_ids = list(range(len(layers))) if layer_ids is None else list(layer_ids)
    if len(layer_ids) != len(layers):
        raise ValueError(f"{len(layer_ids)} layer_ids for {len(layers)} layers of attention")
    acc = HeadScoreAccumulator(rho, summ)
    for i, (layer, a) in enumerate(zip(layer_ids, layers)):
        if isinstance(sink_mask, torch.Tensor) and sink_mask.dim() == 2:
            sm = sink_mask
        elif isinstance(sink_mask, torch.Tensor):
            sm = sink_mask[:, i]
        else:
            sm = sink_mask[i]
        acc.update(layer, a, image_mask, sm, query_mask)
    return acc.frame()
