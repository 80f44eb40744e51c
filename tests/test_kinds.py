"""TokenKinds.queries_after_image: the one definition of "text queries after the image", against a literal loop."""

from __future__ import annotations

import torch

from sinkscope.kinds import BOS, GENERATED, PAD, TEXT, VISUAL, TokenKinds


def _literal(kind: torch.Tensor, include_generated: bool) -> torch.Tensor:
    out = torch.zeros_like(kind, dtype=torch.bool)
    wanted = {TEXT, GENERATED} if include_generated else {TEXT}
    for b in range(kind.shape[0]):
        images = [t for t in range(kind.shape[1]) if kind[b, t] == VISUAL]
        last = images[-1] if images else -1
        for t in range(kind.shape[1]):
            out[b, t] = int(kind[b, t]) in wanted and t > last
    return out


def test_queries_after_image_equals_a_literal_loop():
    kind = torch.tensor([
        [PAD, BOS, TEXT, VISUAL, VISUAL, TEXT, TEXT, GENERATED],   # left padding, one image
        [BOS, TEXT, VISUAL, TEXT, VISUAL, TEXT, GENERATED, GENERATED],  # two images: after the last one only
        [BOS, TEXT, TEXT, TEXT, TEXT, TEXT, GENERATED, PAD],       # no image: every text token
    ])
    kinds = TokenKinds(kind, torch.full_like(kind, -1))
    for include_generated in (False, True):
        assert torch.equal(kinds.queries_after_image(include_generated), _literal(kind, include_generated))
