"""LLaVA-1.5 (LlavaForConditionalGeneration): CLIP ViT + MLP projector + LLaMA/Vicuna."""

from __future__ import annotations

from sinkscope.models.base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)

