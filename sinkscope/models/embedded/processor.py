"""The demo LMM's processor: a word-level tokenizer, a CLIP image processor, a chat template.

Saved as standard files, so ``AutoProcessor.from_pretrained(dir)`` loads it offline like any
hub processor. The tokenizer prepends a real BOS token (``<s>``) at position 0.
"""

from __future__ import annotations

import warnings

import sinkscope.world as world

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
N_IMAGE_TOKENS = (world.IMAGE_SIZE // world.PATCH_SIZE) ** 2

# LLaVA-1.5 style: "USER: <image> question ASSISTANT: answer </s> USER: ..."
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in parts %}{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT: "
    "{% for part in parts %}{{ part['text'] }} {% endfor %}{{ eos_token }} "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def vocabulary() -> list[str]:
    return list(SPECIAL_TOKENS) + world.vocabulary()


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, padding_side="left",
        model_max_length=512,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return fast


def build_image_processor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(
            size={"shortest_edge": world.IMAGE_SIZE},
            crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
            do_resize=True, do_center_crop=True, do_convert_rgb=True,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        )


def build_processor():
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(), tokenizer=build_tokenizer(),
        patch_size=world.PATCH_SIZE, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token=IMAGE, num_additional_image_tokens=1,
    )
