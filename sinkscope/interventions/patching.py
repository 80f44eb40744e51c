"""Activation patching with nnsight: copy activations of one run into another and read the logits.

Two sites:
  - residual: the residual stream entering decoder layer l at chosen tokens, [batch, token, dim];
  - heads: the output of chosen attention heads at chosen query tokens, i.e. the input of the
    layer's output projection (o_proj) viewed as [batch, token, head, head_dim], before the heads
    are mixed.

nnsight 0.8 does not batch several image inputs as separate invokes of one trace, so patching
across images takes two traces: `capture` runs the source and keeps the activations of the
layers asked for, `run` runs the target and overwrites the masked entries in place. Patching a
run with its own activations changes nothing, bit for bit (the same operations see the same
values); tests check this invariant.

    patcher = Patcher(adapter)
    source = patcher.run(source_inputs, capture=[2, 3])                 # PatchRun with activations
    patched = patcher.run(target_inputs, patches=[
        Patch("residual", 2, token_mask, source.residual[2]),           # token_mask [batch, token]
        Patch("heads", 3, head_mask, source.heads[3]),                  # head_mask [batch, head, token]
    ])
    effect = logit_diff(patched.logits, yes, no, sign) - logit_diff(clean.logits, yes, no, sign)

Source and target must have the same token layout (same prompt text, same number of image
tokens): `check_aligned` says so with a clear error otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from sinkscope.errors import SinkscopeError
from sinkscope.trace import envoy_at

SITES = ("residual", "heads")


@dataclass(frozen=True)
class Patch:
    """Overwrite `site` of `layer` where `mask` is True with `source`.

    site "residual": mask [batch, token] bool, source [batch, token, dim] (the residual entering `layer`).
    site "heads": mask [batch, head, token] bool, source [batch, token, head, head_dim] (per-head outputs).
    """

    site: str
    layer: int
    mask: torch.Tensor
    source: torch.Tensor

    def __post_init__(self):
        if self.site not in SITES:
            raise SinkscopeError(f"patch site must be one of {SITES}, got {self.site!r}")


@dataclass
class PatchRun:
    """One traced forward pass. logits: [batch, vocab] at the last position (float32, cpu).

    residual: layer -> [batch, token, dim]; heads: layer -> [batch, token, head, head_dim]
    (only the layers asked for in `capture`, detached clones on the model's device).
    """

    logits: torch.Tensor
    residual: dict[int, torch.Tensor] = field(default_factory=dict)
    heads: dict[int, torch.Tensor] = field(default_factory=dict)


def check_aligned(target_ids: torch.Tensor, source_ids: torch.Tensor) -> None:
    """Patching position by position needs equal token layouts: [batch, token] ids equal."""
    if target_ids.shape != source_ids.shape or not torch.equal(target_ids.cpu(), source_ids.cpu()):
        raise SinkscopeError(
            f"source and target prompts do not line up (ids {tuple(source_ids.shape)} vs {tuple(target_ids.shape)}): "
            "patching needs the same question text and the same number of image tokens in both runs; ask the "
            "target's question about the source image, and use images of one size")


def logit_diff(logits: torch.Tensor, yes_id: int, no_id: int, sign: torch.Tensor | None = None) -> torch.Tensor:
    """[batch] logit(yes) - logit(no), times `sign` [batch] (+1 where the right answer is yes, -1 for no)."""
    d = logits[:, yes_id].float() - logits[:, no_id].float()
    return d if sign is None else d * sign.to(d)


class Patcher:
    """Reads and writes residual streams and head outputs of an adapter's language model with nnsight."""

    def __init__(self, adapter, envoy=None):
        from nnsight import NNsight

        self.adapter = adapter
        self.envoy = envoy if envoy is not None else NNsight(adapter.model)
        self._layers = None
        self._o_proj: dict[int, object] = {}

    def _layer(self, i: int):
        if self._layers is None:
            self._layers = envoy_at(self.envoy, self.adapter.model, self.adapter.layers, "the decoder layers")
        return self._layers[i]

    def _out_proj(self, i: int):
        if i not in self._o_proj:
            module = self.adapter.output_projection(i)
            if not isinstance(getattr(module, "base_layer", module), torch.nn.Linear):  # LoRA wraps a Linear
                raise SinkscopeError(f"layer {i}'s output projection is a {type(module).__name__}, not a Linear; "
                                     "head patching needs the per-head input of o_proj")
            self._o_proj[i] = envoy_at(self.envoy, self.adapter.model, module)
        return self._o_proj[i]

    def _check(self, patches: Sequence[Patch], batch: int, tokens: int) -> None:
        n, heads, dim = self.adapter.num_layers, self.adapter.num_heads, self.adapter.head_dim
        for p in patches:
            if not 0 <= p.layer < n:
                raise SinkscopeError(f"patch layer {p.layer} out of range: the model has {n} layers (0..{n - 1})")
            want = (batch, tokens) if p.site == "residual" else (batch, heads, tokens)
            if tuple(p.mask.shape) != want:
                raise SinkscopeError(f"{p.site} patch mask of layer {p.layer} must be {want}, got {tuple(p.mask.shape)}")
            src = (batch, tokens, self.adapter.hidden_size) if p.site == "residual" else (batch, tokens, heads, dim)
            if tuple(p.source.shape) != src:
                raise SinkscopeError(f"{p.site} patch source of layer {p.layer} must be {src}, got "
                                     f"{tuple(p.source.shape)}; capture it from a run with the same token layout")

    @torch.no_grad()
    def run(self, inputs: dict, patches: Sequence[Patch] = (), capture: Sequence[int] = (),
            capture_heads: bool = True) -> PatchRun:
        """One traced forward pass of `inputs` (model keyword arguments, on the model's device).

        patches: applied in layer order (residual before heads within a layer); capture: layers whose
        residual (and, with capture_heads, head outputs) are kept, after the patches of that layer.
        """
        ids = inputs["input_ids"]
        batch, tokens = int(ids.shape[0]), int(ids.shape[1])
        self._check(patches, batch, tokens)
        heads, dim = self.adapter.num_heads, self.adapter.head_dim
        by_layer: dict[int, list[Patch]] = {}
        for p in patches:
            by_layer.setdefault(p.layer, []).append(p)
        wanted = sorted(set(capture) | set(by_layer))
        device = self.adapter.device
        saved_resid, saved_heads = {}, {}
        with self.envoy.trace(**inputs):
            for layer in wanted:
                todo = by_layer.get(layer, [])
                resid = [p for p in todo if p.site == "residual"]
                head = [p for p in todo if p.site == "heads"]
                if resid or layer in capture:
                    x = self._layer(layer).input  # [batch, token, dim]
                    for p in resid:
                        m = p.mask.to(device)
                        x[m] = p.source.to(device=device, dtype=x.dtype)[m]
                    if layer in capture:
                        saved_resid[layer] = x.detach().clone().save()
                if head or (layer in capture and capture_heads):
                    o = self._out_proj(layer).input  # [batch, token, head * head_dim]
                    per_head = o.view(batch, tokens, heads, dim)
                    for p in head:
                        m = p.mask.to(device).permute(0, 2, 1)  # [batch, token, head]
                        per_head[m] = p.source.to(device=device, dtype=o.dtype)[m]
                    if layer in capture and capture_heads:
                        saved_heads[layer] = per_head.detach().clone().save()
            logits = self.envoy.output.logits[:, -1].detach().float().cpu().save()
        return PatchRun(logits, dict(saved_resid), dict(saved_heads))


def _scores(where: torch.Tensor, generator) -> torch.Tensor:
    """U(0, 1) scores at the True cells of `where` [batch, ...], 2.0 elsewhere (on the CPU).

    generator: one torch.Generator (one draw over the whole tensor), or one per batch row: row b's cells are drawn
    from generator[b] over that row's True cells only, so a sample's draw depends on its own generator (seeded by the
    sample: `runconfig.sample_seed`), not on padding, the other rows of its batch or the shard it runs in."""
    if isinstance(generator, torch.Generator):
        return torch.rand(where.shape, generator=generator).masked_fill(~where.cpu(), 2.0)
    if len(generator) != where.shape[0]:
        raise ValueError(f"one generator per batch row: got {len(generator)} for {where.shape[0]} rows")
    scores = torch.full(where.shape, 2.0)
    for b, gen in enumerate(generator):
        cells = where[b].cpu()
        scores[b][cells] = torch.rand(int(cells.sum()), generator=gen)
    return scores


def matched_heads(chosen: torch.Tensor, eligible: torch.Tensor, generator) -> torch.Tensor:
    """Per (batch, query), as many heads as `chosen` selects, drawn at random among `eligible` & ~chosen.

    chosen, eligible: [batch, head, query] bool. Returns [batch, head, query] bool. Where fewer
    other heads exist than chosen ones, all of them are taken (the count is then smaller).
    generator: one, or one per batch row (`_scores`).
    """
    pool = eligible & ~chosen
    count = chosen.sum(dim=1)  # [batch, query]
    scores = _scores(pool, generator).to(chosen.device)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return (rank < count[:, None, :]) & pool


def matched_tokens(count: torch.Tensor, pool: torch.Tensor, generator) -> torch.Tensor:
    """Per row, `count` [batch] tokens drawn at random from `pool` [batch, token] bool -> [batch, token] bool.
    generator: one, or one per batch row (`_scores`)."""
    scores = _scores(pool, generator).to(pool.device)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return (rank < count[:, None].to(pool.device)) & pool
