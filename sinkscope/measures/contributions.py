"""What an attended token writes into the residual stream: the OV contribution (Kang et al.
2025, evidence 5).

For query i, key j of head h in one layer, with v_j the key's value state (what the attention
function multiplies the probabilities with) and W_O^h the head's slice of the output projection:

    contribution_{h,i,j} = || a_{h,i,j} v_j W_O^h || = a_{h,i,j} * || W_O^h v_j ||

(the paper's `|| a_ij x_j W_OV ||`, with x_j the normalised input of the layer). a is a
probability, so the contribution is in residual-stream units. Grouped-query attention: query
head h reads key-value head h // (heads / kv_heads), as in transformers' `repeat_kv`.

Layouts: values `[batch, kv_head, key, head_dim]`, W_O `[hidden, head * head_dim]` (nn.Linear
weight), attention `[batch, head, query, key]`.
"""

from __future__ import annotations

import torch


def _exact_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS has not: float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def ov_grams(o_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """G_h = (W_O^h)^T W_O^h for every head: float64 [head, head_dim, head_dim], so that
    || W_O^h v ||^2 = v^T G_h v. o_weight: [hidden, num_heads * head_dim]. Made once per layer and run (the weights
    do not change), it is all the contribution measures need of W_O: 32 x 128 x 128 numbers per layer at 7B,
    against 4096 x 4096 for W_O itself. float64 so that the quadratic form keeps the precision of a direct float32
    norm even for a value that W_O^h nearly cancels (a drained sink)."""
    if o_weight.dim() != 2 or o_weight.shape[1] % num_heads:
        raise ValueError(f"o_weight must be [hidden, num_heads * head_dim] with {num_heads} heads, "
                         f"got {tuple(o_weight.shape)}")
    w = o_weight.to(_exact_dtype(o_weight.device)).reshape(o_weight.shape[0], num_heads, -1)  # [hidden, head, dim]
    return torch.einsum("ohd,ohe->hde", w, w)


def ov_norms_from_grams(values: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """|| W_O^h v_j || = sqrt(v_j^T G_h v_j) for every head and key: float32 [batch, head, key], without the
    [batch, head, key, hidden] tensor of what each key writes.

    values: [batch, kv_head, key, head_dim]; grams: [head, head_dim, head_dim] (`ov_grams`); the number of heads
    must be a multiple of kv_head (query head h reads kv head h // (heads / kv_heads)).
    """
    if values.dim() != 4:
        raise ValueError(f"values must be [batch, kv_head, key, head_dim], got {tuple(values.shape)}")
    batch, kv, n_k, head_dim = values.shape
    num_heads = grams.shape[0]
    if num_heads % kv:
        raise ValueError(f"{num_heads} query heads cannot share {kv} key-value heads evenly")
    if tuple(grams.shape[1:]) != (head_dim, head_dim):
        raise ValueError(f"grams must be [head, {head_dim}, {head_dim}] for values of head_dim {head_dim}, "
                         f"got {tuple(grams.shape)}")
    exact = _exact_dtype(values.device)
    v = values.to(exact).repeat_interleave(num_heads // kv, dim=1)  # [batch, head, key, head_dim]
    squared = torch.einsum("bhkd,hde,bhke->bhk", v, grams.to(values.device, exact), v)
    return squared.clamp_min(0).sqrt().float()  # G_h is positive semi-definite; rounding may dip just below 0


def ov_norms(values: torch.Tensor, o_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """|| W_O^h v_j || for every head and key: float32 [batch, head, key].

    values: [batch, kv_head, key, head_dim]; o_weight: [hidden, num_heads * head_dim];
    num_heads must be a multiple of kv_head. (Through `ov_grams`; a caller with many batches makes those once.)
    """
    head_dim = values.shape[-1]
    if o_weight.dim() != 2 or o_weight.shape[1] != num_heads * head_dim:
        raise ValueError(f"o_weight must be [hidden, {num_heads} * {head_dim}], got {tuple(o_weight.shape)}")
    return ov_norms_from_grams(values, ov_grams(o_weight.to(values.device), num_heads))  # which checks the values


def ov_contributions(attn: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """a_{h,i,j} * || W_O^h v_j ||: float32 [batch, head, query, key].

    attn: [batch, head, query, key] post-softmax; norms: [batch, head, key] from `ov_norms`.
    """
    if attn.dim() != 4 or tuple(norms.shape) != (attn.shape[0], attn.shape[1], attn.shape[3]):
        raise ValueError(f"attn [batch, head, query, key] {tuple(attn.shape)} and norms [batch, head, key] "
                         f"{tuple(norms.shape)} do not match")
    return attn.float() * norms.float().to(attn.device)[:, :, None, :]


def class_means(values: torch.Tensor, key_mask: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over the queries in query_mask and the keys in key_mask, per head: [batch, head].

    values: [batch, head, query, key] (attention or contributions); key_mask: [batch, key] bool;
    query_mask: [batch, query] bool. NaN where a row has no such query or key (never a division by 0).
    """
    q = query_mask.to(values.device).float()[:, None, :, None]
    k = key_mask.to(values.device).float()[:, None, None, :]
    total = (values.float() * q * k).sum(dim=(2, 3))
    count = (query_mask.sum(dim=1) * key_mask.sum(dim=1)).to(total)[:, None].expand_as(total)  # [batch, head]
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def class_contributions(attn: torch.Tensor, norms: torch.Tensor, key_classes: torch.Tensor,
                        query_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per token class, what `class_means` gives of the attention and of the contribution, and the mean
    || W_O^h v_j || of the class's tokens, for several classes at once without a [batch, head, query, key]
    contribution tensor: since contribution_{h,i,j} = a_{h,i,j} || W_O^h v_j ||, the sum over the class's
    (query, key) pairs is sum_j (sum_i a_{h,i,j}) || W_O^h v_j ||, so the queries are summed out first, once.

    attn: [batch, head, query, key]; norms: [batch, head, key] (`ov_norms`); key_classes: [batch, class, key]
    bool; query_mask: [batch, query] bool. Returns float32 "attention", "contribution" (means per (query, token)
    pair, NaN where the row has no query or no token of the class) and "ov_norm" (mean over the class's tokens, 0
    where it has none), each [batch, class, head]; and "n_tokens" [batch, class] (int64).
    """
    if attn.dim() != 4 or tuple(norms.shape) != (attn.shape[0], attn.shape[1], attn.shape[3]):
        raise ValueError(f"attn [batch, head, query, key] {tuple(attn.shape)} and norms [batch, head, key] "
                         f"{tuple(norms.shape)} do not match")
    queries = query_mask.to(attn.device)
    return class_means_of_received(received_by_key(attn, queries), norms, key_classes, queries.sum(dim=-1))


def received_by_key(attn: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """sum over the queries in query_mask of a_{h,i,j}: float32 [batch, head, key] (the queries summed out, what
    `class_means_of_received` takes). attn: [batch, head, query, key]; query_mask: [batch, query] bool."""
    return torch.einsum("bhqk,bq->bhk", attn.float(), query_mask.to(attn.device).float())


def class_means_of_received(received: torch.Tensor, norms: torch.Tensor, key_classes: torch.Tensor,
                            n_queries: torch.Tensor) -> dict[str, torch.Tensor]:
    """`class_contributions` from the queries' summed attention: any leading dims L (e.g. [batch] or
    [batch, layer]). received, norms: [*L, head, key]; key_classes: [*L, class, key] bool; n_queries: the queries
    summed over, [batch] (broadcast over the other leading dims). Returns "attention", "contribution", "ov_norm"
    [*L, class, head] and "n_tokens" [*L, class], as `class_contributions`."""
    keys = key_classes.to(received.device)
    norms = norms.float().to(received.device)
    per_key = torch.stack([received, received * norms, norms])  # [3, *L, head, key]
    sums = torch.einsum("m...hk,...ck->m...ch", per_key, keys.float())  # [3, *L, class, head]
    n_tokens = keys.sum(dim=-1)  # [*L, class]
    n_q = n_queries.to(received.device).reshape(n_queries.shape + (1,) * (n_tokens.dim() - n_queries.dim()))
    pairs = (n_q * n_tokens).float()[..., None]  # [*L, class, 1]
    nan = torch.tensor(float("nan"), device=received.device)
    return {"attention": torch.where(pairs > 0, sums[0] / pairs.clamp_min(1), nan),
            "contribution": torch.where(pairs > 0, sums[1] / pairs.clamp_min(1), nan),
            "ov_norm": sums[2] / n_tokens.clamp_min(1).float()[..., None], "n_tokens": n_tokens}
