"""Sink-emergence statistics of a forward pass (Gu et al. 2024; Guo et al. 2024).

Pure tensor functions: they take attention maps, residual states and value states of one
layer and return scalars, so training logs and model cards compute them the same way.
"""

from __future__ import annotations

import torch


def mean_attention_to_position(attention: torch.Tensor, key_position: int = 0, first_query: int = 1,
                               query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean attention each head pays to one key, averaged over queries and batch.

    attention: [batch, head, query, key] post-softmax probabilities.
    query_mask: optional [batch, query] bool of the queries to average over (e.g. not padding);
    queries before `first_query` are skipped (query 0 can only attend to itself).
    Returns [head].
    """
    col = attention[..., key_position].float()  # [batch, head, query]
    mask = torch.ones(col.shape[0], col.shape[2], dtype=torch.bool, device=col.device)
    if query_mask is not None:
        mask = query_mask.to(col.device).bool().clone()
    mask[:, :first_query] = False
    weights = mask[:, None, :].float()
    return (col * weights).sum(dim=(0, 2)) / weights.sum(dim=(0, 2)).clamp_min(1)


def sink_share(head_attention_to_sink: torch.Tensor, epsilon: float = 0.3) -> float:
    """Gu et al.'s Sink_eps: share of heads whose mean attention to the sink exceeds epsilon.

    head_attention_to_sink: [...] mean attention per head (any shape). Returns a float in [0, 1].
    """
    return float((head_attention_to_sink > epsilon).float().mean())


def norm_ratio_to_median(states: torch.Tensor, position: int = 0, token_mask: torch.Tensor | None = None) -> float:
    """L2 norm of the token at `position` over the median token norm (pooled over batch).

    states: [batch, token, dim] (residual stream) or [batch, head, token, head_dim] (values,
    norms taken per head then averaged). token_mask: optional [batch, token] bool of real tokens.
    """
    if states.dim() == 4:
        norms = states.float().norm(dim=-1).mean(dim=1)  # [batch, token]
    else:
        norms = states.float().norm(dim=-1)
    if token_mask is None:
        token_mask = torch.ones_like(norms, dtype=torch.bool)
    token_mask = token_mask.to(norms.device).bool()
    target = norms[:, position][token_mask[:, position]].mean()
    others = token_mask.clone()
    others[:, position] = False
    median = norms[others].median()
    return float(target / median.clamp_min(1e-12))


def top_activation_ratio(states: torch.Tensor, token_mask: torch.Tensor | None = None, k: int = 1):
    """Largest |activation| over the median |activation| (Sun et al.'s headline number).

    states: [batch, token, dim]. Returns (ratio, dims) with dims the `k` feature dims that
    hold the largest magnitudes.
    """
    mags = states.float().abs()
    if token_mask is not None:
        mags = mags[token_mask.to(mags.device).bool()]  # [n_tokens, dim]
    else:
        mags = mags.reshape(-1, mags.shape[-1])
    median = mags.median().clamp_min(1e-12)
    per_dim = mags.max(dim=0).values
    top = per_dim.topk(min(k, per_dim.numel()))
    return float(top.values[0] / median), [int(d) for d in top.indices]
