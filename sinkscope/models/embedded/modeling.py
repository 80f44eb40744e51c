"""Architecture of the demo LMM: a genuine LlavaForConditionalGeneration, only tiny.

Vision: CLIP ViT, 64 px images, 8 px patches -> 8x8 = 64 image tokens (CLS dropped).
Language: LLaMA, word-level vocabulary of the synthetic world.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sinkscope.models.embedded import processor as demo_processor
import sinkscope.world as world


@dataclass
class DemoArchitecture:
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 512
    vision_hidden: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 192
    max_positions: int = 256
    rms_norm_eps: float = 1e-6

    def to_dict(self) -> dict:
        return asdict(self)


def build_config(arch: DemoArchitecture | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    arch = arch or DemoArchitecture()
    vocab = demo_processor.vocabulary()
    text = LlamaConfig(
        vocab_size=len(vocab), hidden_size=arch.text_hidden, intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_kv_heads, max_position_embeddings=arch.max_positions,
        rms_norm_eps=arch.rms_norm_eps, tie_word_embeddings=False,
        bos_token_id=vocab.index(demo_processor.BOS), eos_token_id=vocab.index(demo_processor.EOS),
        pad_token_id=vocab.index(demo_processor.PAD),
    )
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
        image_size=world.IMAGE_SIZE, patch_size=world.PATCH_SIZE, projection_dim=arch.vision_hidden,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=vocab.index(demo_processor.IMAGE),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=demo_processor.N_IMAGE_TOKENS,
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = text.pad_token_id
    cfg.bos_token_id = text.bos_token_id
    cfg.eos_token_id = text.eos_token_id
    return cfg


def build_model(arch: DemoArchitecture | None = None, seed: int = 0):
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = build_config(arch)
    cfg.text_config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    return model
