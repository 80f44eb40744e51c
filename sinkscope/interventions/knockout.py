"""Attention knockout: block attention from chosen queries to a chosen set of keys.

Kang et al. 2025, evidence 4: text queries after the image (and every generated token) may not
attend to a key set (e.g. the visual sinks); the remaining attention of each such row is
renormalised to sum to 1. Knocked-out keys receive exactly 0; rows with nothing knocked out keep
their eager values bitwise. A row whose every visible key is knocked out is left all zero (its
attention output is 0).

    from sinkscope.interventions.knockout import knockout, random_image_keys
    with knockout(adapter, key_mask, layers=None):        # key_mask: [batch, token] bool over the prompt
        model(**inputs); model.generate(**inputs)

Control sets for the ablation: `random_image_keys` (image tokens only, matched counts, one set for
all layers) and `top_nonsink_image_keys` (most-attended image tokens that are not sinks).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from sinkscope.errors import SinkscopeError
from sinkscope.interventions.attention import (AttentionEdit, EditSession, PromptInfo, StepState, edit_attention,
                                               with_rows_from)
from sinkscope.kinds import VISUAL, TokenKinds


def _codes(token_kinds) -> torch.Tensor:
    return token_kinds.kind if isinstance(token_kinds, TokenKinds) else torch.as_tensor(token_kinds)


def knockout_probs(probs: torch.Tensor, key_mask: torch.Tensor, query_mask: torch.Tensor | None,
                   renormalize: bool = True) -> torch.Tensor:
    """Block attention of selected queries to selected keys (and, by default, renormalise those rows).

    probs: [batch, head, query, key] post-softmax; key_mask: [batch, key] bool (keys to block);
    query_mask: [batch, query] bool (queries the knockout applies to), None for every query.
    Returns probs where, for rows of selected queries that had mass on blocked keys, blocked
    entries are 0 and the others are divided by the remaining mass; other rows are unchanged.
    renormalize=False zeroes the blocked entries only (the row then sums to less than 1): the
    blocked keys' value vectors are removed from the output and nothing else changes, which
    separates "what the keys write" from "how much attention they hold".
    """
    blocked = key_mask[:, None, None, :].to(probs.device)
    touched = (probs * blocked).any(dim=-1, keepdim=True)  # the row has mass on a blocked key (probabilities >= 0)
    kept = probs.masked_fill(blocked, 0.0)
    if query_mask is not None:
        touched = touched & query_mask[:, None, :, None].to(probs.device)
    if not renormalize:
        return torch.where(touched, kept, probs)
    # a row left with no mass stays all zero: its kept entries are 0, and 0 / tiny = 0
    renormalised = kept / kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.where(touched, renormalised, probs)


class KnockoutEdit(AttentionEdit):
    """Knockout as an AttentionEdit.

    key_mask: [batch, prompt_len] bool, keys to block (generated keys are never blocked).
    query_mask: [batch, prompt_len] bool or None (default: text tokens after the last image token).
    layers: layer indices or None (all). generated_queries: every generated token is a query too.
    """

    def __init__(self, key_mask: torch.Tensor, query_mask: torch.Tensor | None = None,
                 layers: Sequence[int] | None = None, generated_queries: bool = True, renormalize: bool = True):
        self.renormalize = renormalize
        if key_mask.dim() != 2:
            raise SinkscopeError(f"key_mask must be [batch, token] bool over the prompt, got shape {tuple(key_mask.shape)}")
        if query_mask is not None and query_mask.shape != key_mask.shape:
            raise SinkscopeError(f"query_mask {tuple(query_mask.shape)} must have key_mask's shape {tuple(key_mask.shape)}")
        self.key_mask = key_mask.bool()
        self.query_mask = None if query_mask is None else query_mask.bool()
        self._layers = None if layers is None else [int(l) for l in layers]
        self.generated_queries = generated_queries

    def layers(self, n_layers: int) -> set[int]:
        if self._layers is None:
            return set(range(n_layers))
        bad = [l for l in self._layers if not 0 <= l < n_layers]
        if bad:
            raise SinkscopeError(f"knockout layers {bad} are out of range: the model has {n_layers} layers, valid "
                                 f"layers are 0..{n_layers - 1}; pass layers in that range or None for all")
        return set(self._layers)

    def begin_prompt(self, session: EditSession, prompt: PromptInfo) -> None:
        shape = (prompt.batch_size, prompt.length)
        if tuple(self.key_mask.shape) != shape:
            raise SinkscopeError(f"knockout key_mask is {tuple(self.key_mask.shape)} but the prompt is [batch, token] = "
                                 f"{shape}; build the mask from this batch's input_ids (generate with num_beams or "
                                 "num_return_sequences repeats rows: repeat the mask the same way)")
        device = prompt.kinds.kind.device
        memory = session.memory(self)
        memory["keys"] = self.key_mask.to(device)
        memory["queries"] = None if self.query_mask is None else self.query_mask.to(device)

    def edit(self, probs, *, layer, query_positions, state: StepState):
        memory = state.memory(self)
        start = 0  # queries before it are left alone without a look
        if state.only_generated:  # a decode step
            if not self.generated_queries:
                return probs
            queries = None
        elif memory["queries"] is None:
            queries = state.default_query_mask()
            if not self.generated_queries and not state.prefill:
                queries = torch.zeros_like(queries)
            # the default queries start at the first text token after an image in any row: at prefill only those
            # rows (~10% of LLaVA's) are read and rewritten, in place; the rows before keep their values as before
            start = min(state.default_query_start, probs.shape[2])
        else:
            queries = state.prompt_query_mask(memory["queries"], generated=self.generated_queries)
        n_keys = probs.shape[-1]  # once per step for the layers (a sliding-window layer has its own n_keys)
        keys = state.cached(("knockout keys", id(self), n_keys), lambda: state.key_mask(memory["keys"], n_keys))
        if start:
            return with_rows_from(probs, start, knockout_probs(probs[:, :, start:], keys, queries[:, start:],
                                                              self.renormalize))
        return knockout_probs(probs, keys, queries, self.renormalize)


@contextlib.contextmanager
def knockout(model_or_adapter, key_mask: torch.Tensor, query_mask: torch.Tensor | None = None,
             layers: Sequence[int] | None = None, generated_queries: bool = True,
             fallback: str = "sdpa", renormalize: bool = True) -> Iterator[EditSession]:
    """Block attention to `key_mask` ([batch, token] bool over the prompt) inside the block.

    query_mask: [batch, token] bool over the prompt (default: text tokens after the last image
    token); generated tokens are queries too unless generated_queries=False.
    layers: None = all layers; an index out of range raises SinkscopeError naming the valid range.
    fallback: see `edit_attention` (layers outside `layers`).
    renormalize: False zeroes the blocked entries without rescaling the rest (see `knockout_probs`).
    """
    with edit_attention(model_or_adapter, KnockoutEdit(key_mask, query_mask, layers, generated_queries, renormalize),
                        fallback=fallback) as session:
        yield session


# ---------------------------------------------------------------------------------------
# key sets for the ablation
# ---------------------------------------------------------------------------------------

def _counts(n_per_row, batch: int) -> torch.Tensor:
    n = torch.as_tensor(n_per_row).long().flatten()
    if n.numel() == 1 and batch != 1:
        n = n.expand(batch)
    if n.numel() != batch:
        raise SinkscopeError(f"n_per_row has {n.numel()} entries for a batch of {batch}")
    if (n < 0).any():
        raise SinkscopeError(f"n_per_row must be >= 0, got {n.tolist()}")
    return n


def _top_n(scores: torch.Tensor, eligible: torch.Tensor, n: torch.Tensor, what: str) -> torch.Tensor:
    """[batch, token] bool: the n[b] eligible tokens of each row with the highest score."""
    available = eligible.sum(dim=1)
    short = (n.to(available.device) > available).nonzero().flatten().tolist()
    if short:
        b = short[0]
        raise SinkscopeError(f"row {b} asks for {int(n[b])} {what} but has only {int(available[b])}; lower n_per_row")
    ranked = scores.masked_fill(~eligible, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(ranked)
    rank.scatter_(1, ranked, torch.arange(scores.shape[1], device=scores.device).expand_as(ranked).contiguous())
    return (rank < n.to(scores.device)[:, None]) & eligible


def random_image_keys(token_kinds, n_per_row, generator: torch.Generator | None = None) -> torch.Tensor:
    """n_per_row[b] image tokens of row b drawn uniformly at random, without replacement.

    token_kinds: TokenKinds or [batch, token] kind codes; only VISUAL tokens can be drawn (never
    BOS, text, padding or generated tokens). n_per_row: [batch] counts (or one int).
    Returns [batch, token] bool with exactly n_per_row[b] True in row b: one key set, meant to be
    used in every layer (pass it to `knockout`).
    """
    codes = _codes(token_kinds)
    visual = codes == VISUAL
    n = _counts(n_per_row, codes.shape[0])
    scores = torch.rand(codes.shape, generator=generator, device=generator.device if generator is not None else "cpu")
    return _top_n(scores.to(codes.device), visual, n, "random image tokens")


def top_nonsink_image_keys(attention_received: torch.Tensor, visual_mask: torch.Tensor, sink_mask: torch.Tensor,
                           n_per_row) -> torch.Tensor:
    """The n_per_row[b] image tokens of row b that receive the most attention and are not sinks.

    attention_received: [batch, token] float (e.g. mean attention from the text queries);
    visual_mask, sink_mask: [batch, token] bool. Returns [batch, token] bool (ties: lower position first).
    """
    if attention_received.shape != visual_mask.shape or visual_mask.shape != sink_mask.shape:
        raise SinkscopeError(f"attention_received {tuple(attention_received.shape)}, visual_mask "
                             f"{tuple(visual_mask.shape)} and sink_mask {tuple(sink_mask.shape)} must all be [batch, token]")
    eligible = visual_mask.bool() & ~sink_mask.bool().to(visual_mask.device)
    n = _counts(n_per_row, visual_mask.shape[0])
    return _top_n(attention_received.float().to(visual_mask.device), eligible, n, "non-sink image tokens")
