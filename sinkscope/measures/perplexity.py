"""Next-token negative log-likelihood of a text under a model's logits (perplexity = exp of its mean)."""

from __future__ import annotations

import torch


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (nats) of each row's tokens given the tokens before them, and how many were predicted.

    logits: [batch, token, vocab]; input_ids: [batch, token]; attention_mask: [batch, token] (1 = real;
    padding may sit on either side). Token t is scored from position t - 1 when both are real, so a
    row's first real token is never scored. Returns (nll_sum [batch] float64, n_predicted [batch] long).
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} do not match")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = input_ids[:, 1:].to(logits.device)
    nll = -logp.gather(-1, target[..., None])[..., 0]  # [batch, token - 1]
    scored = (real[:, 1:] & real[:, :-1]).to(logits.device)
    return (nll * scored).sum(dim=-1).cpu(), scored.sum(dim=-1).cpu()
