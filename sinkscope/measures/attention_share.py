"""How much attention a set of keys receives from a set of queries, per head.

Two readings of the same probabilities `[batch, head, query, key]`:
  - `attention_share`: the attention *mass* on the key set (summed over its keys), averaged over the
    selected queries: "what share of the text queries' attention goes to these tokens";
  - `measures.contributions.class_means`: the mean per key of the set (share per token).
"""

from __future__ import annotations

import torch


def attention_share(probs: torch.Tensor, key_mask: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Sum over keys in key_mask of a_{h,i,j}, averaged over the queries in query_mask: float32 [batch, head].

    probs: [batch, head, query, key]; key_mask: [batch, key] bool; query_mask: [batch, query] bool.
    NaN for a row without a selected query. Units: share of the query's attention (0..1).
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be [batch, head, query, key], got {tuple(probs.shape)}")
    k = key_mask.to(probs.device).float()[:, None, None, :]
    q = query_mask.to(probs.device).float()[:, None, :]
    mass = (probs.float() * k).sum(dim=-1)  # [batch, head, query]
    n_q = q.sum(dim=-1)  # [batch, 1]
    total = (mass * q).sum(dim=-1)
    return torch.where(n_q > 0, total / n_q.clamp_min(1), torch.full_like(total, float("nan")))
