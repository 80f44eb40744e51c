"""Token kinds: the small vocabulary every layer of sinkscope shares (bottom of the import graph).

Codes in `TokenKinds.kind` and names in tables. Nothing here knows about models; adapters
(sinkscope.models) compute TokenKinds for their batches, measures read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Token kinds, as codes in TokenKinds.kind and names in tables.
PAD, BOS, TEXT, VISUAL, GENERATED = -1, 0, 1, 2, 3
KIND_NAMES = {PAD: "pad", BOS: "bos", TEXT: "text", VISUAL: "visual", GENERATED: "generated"}


@dataclass
class TokenKinds:
    """Per-token roles of a batch.

    kind: [batch, token] long, codes PAD/BOS/TEXT/VISUAL/GENERATED (see KIND_NAMES).
      BOS is the first non-padding token of each row: the canonical text sink, whether the
      tokenizer calls it <s>, <bos> or (Qwen2, which has none) <|im_start|>.
    image_index: [batch, token] long, which image of the row (0, 1, ...) a visual token
      belongs to, -1 for every other token.
    """

    kind: torch.Tensor
    image_index: torch.Tensor

    @property
    def bos_mask(self) -> torch.Tensor:
        return self.kind == BOS

    @property
    def visual_mask(self) -> torch.Tensor:
        return self.kind == VISUAL

    @property
    def text_mask(self) -> torch.Tensor:
        """Prompt text, BOS excluded."""
        return self.kind == TEXT

    @property
    def generated_mask(self) -> torch.Tensor:
        return self.kind == GENERATED

    @property
    def real_mask(self) -> torch.Tensor:
        return self.kind != PAD

    def queries_after_image(self, include_generated: bool = False) -> torch.Tensor:
        """[batch, token] bool: prompt text tokens (and generated ones, if asked) after the row's last
        image token; every such token when the row has no image (the queries of knockout, VAR, the scan)."""
        queries = self.text_mask | self.generated_mask if include_generated else self.text_mask
        pos = torch.arange(self.kind.shape[1], device=self.kind.device)[None].expand_as(self.kind)
        last_image = torch.where(self.visual_mask, pos, torch.full_like(pos, -1)).amax(dim=1)
        return queries & (pos > last_image[:, None])

    def names(self, row: int = 0) -> list[str]:
        return [KIND_NAMES[int(k)] for k in self.kind[row]]

    def to(self, device) -> "TokenKinds":
        return TokenKinds(self.kind.to(device), self.image_index.to(device))


def token_kinds_from_ids(input_ids: torch.Tensor, image_token_ids: set[int] | tuple[int, ...],
                         attention_mask: torch.Tensor | None = None,
                         prompt_length: int | None = None) -> TokenKinds:
    """Token roles from ids alone (any family whose image tokens are placeholder ids).

    input_ids: [batch, token]. attention_mask: [batch, token] (0 = padding, left or right).
    prompt_length: tokens from this index on are generated (as after `generate`).
    Consecutive runs of image tokens count as one image each.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    kind = torch.full_like(input_ids, TEXT)
    kind[~real] = PAD
    is_image = torch.zeros_like(real)
    for tid in image_token_ids:
        is_image |= input_ids == tid
    is_image &= real
    kind[is_image] = VISUAL
    first_real = real.float().argmax(dim=1)  # first non-padding position per row
    rows = torch.arange(input_ids.shape[0])
    kind[rows, first_real] = torch.where(real[rows, first_real], torch.tensor(BOS), torch.tensor(PAD))
    if prompt_length is not None:
        gen = torch.zeros_like(real)
        gen[:, prompt_length:] = True
        kind[gen & real] = GENERATED
    # image index: a new image starts where an image token follows a non-image token
    starts = is_image & ~torch.nn.functional.pad(is_image[:, :-1], (1, 0), value=False)
    image_index = torch.cumsum(starts.long(), dim=1) - 1
    image_index[~is_image] = -1
    return TokenKinds(kind, image_index)
