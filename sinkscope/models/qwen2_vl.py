"""Qwen2-VL and Qwen2.5-VL (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration):
a native-resolution ViT with 2x2 patch merging + a Qwen2 language model with M-RoPE.

transformers 5 paths: `model.model.language_model` (Qwen2VLTextModel / Qwen2_5_VLTextModel)
with `.layers` and `.norm`; `model.model.visual` is the vision tower; `model.lm_head`.
Image placeholders are `config.image_token_id` (151655, `<|image_pad|>`), framed by
`<|vision_start|>` / `<|vision_end|>` (text tokens). The number of placeholders of an image
is `image_grid_thw.prod() // spatial_merge_size**2`, so images of different sizes get
different counts. The tokenizer adds no BOS: the first real token (`<|im_start|>` in chat
prompts) is marked BOS by `token_kinds`, as in the base class. Video placeholders
(`config.video_token_id`, `<|video_pad|>`) count as visual tokens as well.
"""

from __future__ import annotations

from sinkscope.models.base import ModelAdapter, TokenKinds, token_kinds_from_ids


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    model_types = ("qwen2_vl",)

    # the forward keys the processor may return. M-RoPE needs `mm_token_type_ids` and the grids
    # whenever pixels are passed: on transformers 5.23 Qwen2-VL raises without them, and
    # Qwen2.5-VL silently falls back to 1-D positions (wrong attention, no error)
    _forward_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids",
                     "pixel_values_videos", "video_grid_thw")


    @property
    def head_dim(self) -> int:
        # Qwen2VLAttention always uses hidden_size // num_attention_heads (config.head_dim is ignored)
        return self.hidden_size // self.num_heads

    @property
    def bos_token_id(self) -> int | None:
        # Qwen2 prepends no BOS; config.bos_token_id (<|endoftext|>) never starts a prompt
        tok = getattr(self.processor, "tokenizer", self.processor)
        return getattr(tok, "bos_token_id", None)

    @property
    def video_token_ids(self) -> tuple[int, ...]:
        tid = getattr(self.model.config, "video_token_id", None)
        return (int(tid),) if tid is not None else ()

    def token_kinds(self, input_ids, attention_mask=None, prompt_length=None) -> TokenKinds:
        # video placeholders (<|video_pad|>) are visual too; each video is one run, like an image
        return token_kinds_from_ids(input_ids, self.image_token_ids + self.video_token_ids, attention_mask,
                                    prompt_length)

    def forward_inputs(self, batch) -> dict:
        return {k: v for k, v in dict(batch).items() if k in self._forward_keys}


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)

    _forward_keys = Qwen2VLAdapter._forward_keys + ("second_per_grid_ts",)

