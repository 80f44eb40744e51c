"""LLaVA-NeXT / LLaVA-1.6 (LlavaNextForConditionalGeneration): CLIP ViT with any-resolution
tiling (AnyRes) + MLP projector + a LLaMA/Mistral/Vicuna language model.

Module paths are those of LLaVA in transformers 5 (`model.model.language_model`, `model.lm_head`).
The image-newline features that LLaVA-NeXT appends after each row of patch features are
placeholder tokens too (`config.image_token_id`, 32000 on the released checkpoints), so they
count as visual tokens of their image; so do the base (low-resolution) features that precede
the tiles. Each image is one consecutive run of image tokens.
"""

from __future__ import annotations

from sinkscope.models.base import ModelAdapter


class LlavaNextAdapter(ModelAdapter):
    family = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)

