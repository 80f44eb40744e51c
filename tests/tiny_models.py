"""Tiny, randomly initialised LMMs of every supported family, built offline from configs.

Each family gets a real transformers model (eager attention in the language model only), and
its real Processor class around the family's real image processor (the PIL backend: no
torchvision needed) and a small word-level tokenizer. Image placeholders are therefore
expanded by the processor's own rule (LLaVA-NeXT AnyRes tiles + newline features, Qwen2-VL
`image_grid_thw`, Gemma 3 boi/soft-token/eoi sequences), exactly as for a hub checkpoint.

    tiny = build("qwen2_vl")
    batch = tiny.inputs(["describe both"], [[tiny.image(0), tiny.image(1)]])
    out = tiny.model(**batch, output_attentions=True)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3")

# language model sizes shared by all families
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 32, 2, 4, 2, 64, 320
WORDS = ("\n", "what", "is", "in", "the", "image", "describe", "both", "images", "a", "red", "square",
         "compare", "them", "yes", "no", "hello", "USER:", "ASSISTANT:", "user", "model", "assistant",
         "system", "picture", "and", "of", "left", "right", "?", ".")


def word_tokenizer(specials: list[str], *, bos: str | None, eos: str, pad: str, unk: str,
                   extra_special_tokens: dict[str, str] | None = None, padding_side: str = "left"):
    """A PreTrainedTokenizerFast over a fixed word list; specials are split out of running text.

    bos=None: no BOS is added (Qwen2 style). Ids: specials first, then WORDS.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(dict.fromkeys(specials)) + list(WORDS))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    # words split on spaces; every "\n" is a token of its own, as in real LMM tokenizers (the
    # "\n" that chat templates write after each <image> keeps two images apart)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated")])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    kwargs: dict[str, Any] = {"eos_token": eos, "unk_token": unk, "pad_token": pad}
    if bos is not None:
        kwargs["bos_token"] = bos
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=extra_special_tokens or {},
                                   padding_side=padding_side, model_max_length=4096, **kwargs)
    fast.add_special_tokens({"additional_special_tokens": list(specials)})
    return fast


def _llama(tok, **over):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       max_position_embeddings=512, rms_norm_eps=1e-5,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **over)


def _clip(image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image_size, patch_size=patch_size, projection_dim=32)


def pil_image_processor(name: str):
    """The PIL (slow) image processor class `name`: `{name}Pil` on transformers >= 5.x where the
    backends split, `{name}` itself on the oldest 5.0 releases (there it is the PIL one)."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def _clip_image_processor(size: int):
    return pil_image_processor("CLIPImageProcessor")(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_resize=True, do_center_crop=True, do_convert_rgb=True)


LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }} {% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>user "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image> "
    "{% else %}{{ part['text'] }} {% endif %}{% endfor %}<end_of_turn> {% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
)


@dataclass
class Tiny:
    family: str
    model: Any
    processor: Any
    image_sizes: tuple[tuple[int, int], ...]  # (width, height) of image(0), image(1): different where the family allows
    placeholder: str  # what a prompt writes for one image, before the processor expands it
    extra: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def image(self, i: int = 0, seed: int | None = None):
        from PIL import Image

        w, h = self.image_sizes[i % len(self.image_sizes)]
        rng = np.random.default_rng(i if seed is None else seed)
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    def prompt(self, question: str, n_images: int) -> str:
        return "".join([self.placeholder] * n_images) + question

    def inputs(self, questions: list[str], images: list[list] | None = None):
        """Processor batch for raw prompts (the placeholders written before each question)."""
        texts = [self.prompt(q, len(images[i]) if images else 0) for i, q in enumerate(questions)]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images is not None:
            kwargs["images"] = images
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.processor(**kwargs)


def _eager_text(model):
    model.set_attn_implementation({"text_config": "eager"})
    return model.eval()


def _build_llava() -> Tiny:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = word_tokenizer(["<pad>", "<s>", "</s>", "<unk>", "<image>"], bos="<s>", eos="</s>", pad="<pad>",
                         unk="<unk>", extra_special_tokens={"image_token": "<image>"})
    cfg = LlavaConfig(vision_config=_clip(16, 8), text_config=_llama(tok), image_token_id=tok.image_token_id,
                      vision_feature_select_strategy="default", vision_feature_layer=-2,
                      pad_token_id=tok.pad_token_id)
    model = _eager_text(LlavaForConditionalGeneration(cfg))
    proc = LlavaProcessor(image_processor=_clip_image_processor(16), tokenizer=tok, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_TEMPLATE, image_token="<image>")
    return Tiny("llava", model, proc, ((20, 16), (16, 24)), "<image>\n")


def _build_llava_next() -> Tiny:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    pinpoints = [[16, 32], [32, 16], [32, 32]]
    tok = word_tokenizer(["<pad>", "<s>", "</s>", "<unk>", "<image>"], bos="<s>", eos="</s>", pad="<pad>",
                         unk="<unk>", extra_special_tokens={"image_token": "<image>"})
    cfg = LlavaNextConfig(vision_config=_clip(16, 8), text_config=_llama(tok), image_token_id=tok.image_token_id,
                          vision_feature_select_strategy="default", vision_feature_layer=-2,
                          image_grid_pinpoints=pinpoints, pad_token_id=tok.pad_token_id)
    model = _eager_text(LlavaNextForConditionalGeneration(cfg))
    improc = pil_image_processor("LlavaNextImageProcessor")(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                        image_grid_pinpoints=pinpoints, do_pad=True)
    proc = LlavaNextProcessor(image_processor=improc, tokenizer=tok, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_TEMPLATE, image_token="<image>")
    # landscape vs portrait: different best resolutions, unpadding and newline counts
    return Tiny("llava_next", model, proc, ((40, 20), (18, 30)), "<image>\n")


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>", "<unk>"]


@lru_cache(maxsize=None)
def _without_video(processor_cls):
    """`processor_cls` minus its video processor.

    Qwen2VLProcessor / Qwen2_5_VLProcessor take a video processor, and ProcessorMixin checks
    it against `VideoProcessorMixin`, which transformers 5 only defines with torchvision
    installed (without it the constructor dies with an AttributeError on
    VIDEO_PROCESSOR_MAPPING). The sub-processors a ProcessorMixin manages are read from its
    `__init__` signature, so a subclass whose `__init__` has no `video_processor` is the
    real processor (same image-token expansion, same `mm_token_type_ids`) for images only.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(processor_cls.__name__, (processor_cls,), {"__init__": __init__, "__module__": __name__})


def _build_qwen(family: str) -> Tiny:
    import transformers as tf

    if family == "qwen2_vl":
        Config, Text, Vision = tf.Qwen2VLConfig, tf.Qwen2VLTextConfig, tf.Qwen2VLVisionConfig
        Model, Processor = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
        vision = Vision(depth=2, embed_dim=32, hidden_size=HIDDEN, mlp_ratio=2, num_heads=2, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2)
    else:
        Config, Text, Vision = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLTextConfig, tf.Qwen2_5_VLVisionConfig
        Model, Processor = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
        vision = Vision(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=HIDDEN, num_heads=2,
                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                        fullatt_block_indexes=[1])
    tok = word_tokenizer(QWEN_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk="<unk>",
                         extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    ids = tok.convert_tokens_to_ids
    text = Text(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 1, 1]},  # sums to head_dim / 2 = 4
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    cfg = Config(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                 video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                 vision_end_token_id=ids("<|vision_end|>"))
    model = _eager_text(Model(cfg))
    improc = pil_image_processor("Qwen2VLImageProcessor")(patch_size=14, merge_size=2, temporal_patch_size=2,
                                         min_pixels=28 * 28, max_pixels=28 * 28 * 16)
    proc = _without_video(Processor)(image_processor=improc, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    # 56x56 -> grid (1, 4, 4) -> 4 tokens; 84x56 -> grid (1, 4, 6) -> 6 tokens
    return Tiny(family, model, proc, ((56, 56), (84, 56)), "<|vision_start|><|image_pad|><|vision_end|>\n")


def _build_gemma3() -> Tiny:
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig,
                              SiglipVisionConfig)

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tok = word_tokenizer(specials, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
                         extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                               "image_token": "<image_soft_token>"})
    ids = tok.convert_tokens_to_ids
    text = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                            num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                            head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=512,
                            sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                            rms_norm_eps=1e-6, pad_token_id=ids("<pad>"), eos_token_id=ids("<eos>"),
                            bos_token_id=ids("<bos>"))
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=16, patch_size=4)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                       boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                       image_token_index=ids("<image_soft_token>"))
    model = _eager_text(Gemma3ForConditionalGeneration(cfg))
    improc = pil_image_processor("Gemma3ImageProcessor")(size={"height": 16, "width": 16}, do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=improc, tokenizer=tok, chat_template=GEMMA_TEMPLATE,
                           image_seq_length=4)
    return Tiny("gemma3", model, proc, ((20, 16), (16, 24)), "<start_of_image> ",
                extra={"boi": ids("<start_of_image>"), "eoi": ids("<end_of_image>")})


_BUILDERS = {"llava": _build_llava, "llava_next": _build_llava_next, "qwen2_vl": lambda: _build_qwen("qwen2_vl"),
             "qwen2_5_vl": lambda: _build_qwen("qwen2_5_vl"), "gemma3": _build_gemma3}


@lru_cache(maxsize=None)
def build(family: str, seed: int = 0) -> Tiny:
    """A tiny model + processor of `family` (cached: treat the model as read-only)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _BUILDERS[family]()
