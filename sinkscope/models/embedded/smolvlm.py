"""The embedded default model: a LLaVA whose language model is the pretrained SmolLM2-135M-Instruct.

A genuine ``LlavaForConditionalGeneration`` built the way LLaVA is built:
- language model: SmolLM2-135M-Instruct (30 layers, hidden 576, 9 heads, 3 key-value heads),
  unchanged, from the user cache (``smollm.ensure_cached``), with one token ``<image>`` added
  the standard way (a new embedding row initialised to the mean embedding);
- vision tower: a small CLIP ViT trained from scratch by sinkscope on the synthetic world
  (64 px images, 8 px patches: 64 image tokens);
- projector: LLaVA-1.5's two-layer MLP, trained by sinkscope;
- LoRA adapters (peft, unmerged) on the language model's attention projections (q, k, v, o of all
  30 layers; older configs also name the MLP's), trained in the instruction stage; the pretrained
  weights under them are untouched (`set_lora_enabled(model,
  False)` gives back exactly the pretrained language model).

Only what sinkscope trained is shipped (``assets/demo/trained.safetensors``: vision tower, projector,
LoRA adapters); ``load_demo()`` assembles the model from the cache and those parts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import sinkscope.world as world
from sinkscope.errors import SinkscopeError

IMAGE_TOKEN = "<image>"
ASSETS = Path(__file__).resolve().parent / "assets" / "demo"
TRAINED_FILE = "trained.safetensors"
N_IMAGE_TOKENS = (world.IMAGE_SIZE // world.PATCH_SIZE) ** 2
TRAINED_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")
LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
LORA_ATTENTION_TARGETS = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


def _is_trained_key(key: str) -> bool:
    return key.startswith(TRAINED_PREFIXES) or ".lora_" in key


def lora_settings(rank: int, targets: str = LORA_TARGETS) -> dict:
    """What a config records (`config.sinkscope_lora`) so that `assemble` re-adds the same adapters."""
    return {"rank": rank, "alpha": 2 * rank, "targets": targets}


def add_lora(model, rank: int = 16, alpha: int = 32, targets: str = LORA_TARGETS):
    """LoRA adapters on the language model's projections matched by `targets` (peft), kept unmerged.

    targets: a regex over module names (default: attention and MLP projections of every layer;
    `LORA_ATTENTION_TARGETS`: attention only). The pretrained weights stay as they are (each wrapped
    layer's `base_layer`); the adapters add B @ A (B starts at zero, so a fresh adapter changes nothing).
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    inject_adapter_in_model(config, model)
    model.config.sinkscope_lora = {**lora_settings(rank, targets), "alpha": alpha}
    return model


def set_lora_enabled(model, enabled: bool) -> None:
    """Switch every LoRA adapter on or off (off: the language model is exactly the pretrained one)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)

# SmolLM2-Instruct's own ChatML template (default system prompt included), extended so that a
# message's content may be a list of {"type": "image"} and {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class VisionArchitecture:
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    intermediate: int = 768

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer(llm_dir: Path):
    """SmolLM2's tokenizer with `<image>` added as a special token (id 49152); left padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(llm_dir: Path):
    from transformers import LlavaProcessor

    from sinkscope.models.embedded.processor import build_image_processor

    return LlavaProcessor(
        image_processor=build_image_processor(), tokenizer=build_tokenizer(llm_dir),
        patch_size=world.PATCH_SIZE, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )


def build_config(llm_dir: Path, vision: VisionArchitecture | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = vision or VisionArchitecture()
    text_dict = json.loads((llm_dir / "config.json").read_text())
    for key in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
        text_dict.pop(key, None)
    text = LlamaConfig(**text_dict)
    image_token_id = text.vocab_size  # the row added for <image>
    text.vocab_size += 1
    vision_config = CLIPVisionConfig(
        hidden_size=vision.hidden, intermediate_size=vision.intermediate, num_hidden_layers=vision.layers,
        num_attention_heads=vision.heads, image_size=world.IMAGE_SIZE, patch_size=world.PATCH_SIZE,
        projection_dim=vision.hidden,
    )
    cfg = LlavaConfig(
        vision_config=vision_config, text_config=text, image_token_id=image_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=N_IMAGE_TOKENS, tie_word_embeddings=True,
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def llm_state_for_llava(llm_state: dict) -> dict:
    """LlamaForCausalLM keys -> LlavaForConditionalGeneration keys, embedding grown by the <image> row.

    The new row is the mean of the pretrained rows (what `resize_token_embeddings` does).
    """
    import torch

    out = {}
    for key, value in llm_state.items():
        if key.startswith("model."):
            out["model.language_model." + key[len("model."):]] = value
    embed = out["model.language_model.embed_tokens.weight"]
    out["model.language_model.embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)], 0)
    return out


def assemble(config, llm_dir: Path, trained_state: dict | None = None, dtype=None):
    """A LlavaForConditionalGeneration with the cached LLM and (optionally) the trained parts.

    trained_state: vision tower + projector tensors (keys under TRAINED_PREFIXES) and LoRA
    adapter tensors (".lora_" keys, when the config records `sinkscope_lora`); None keeps their
    initialisation (the start of training).
    """
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    config.text_config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config)
    state = llm_state_for_llava(load_file(str(llm_dir / "model.safetensors")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.startswith(TRAINED_PREFIXES)]
    if missing or unexpected:
        raise SinkscopeError(f"the demo model could not be assembled: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    lora = getattr(config, "sinkscope_lora", None)
    if lora:
        add_lora(model, lora["rank"], lora["alpha"], lora.get("targets", LORA_TARGETS))
    if trained_state is not None:
        unexpected = [k for k in trained_state if not _is_trained_key(k)]
        if unexpected:
            raise SinkscopeError(f"the trained parts hold keys outside the vision tower, projector and LoRA adapters: "
                                 f"{unexpected[:3]}")
        expected = {k for k in model.state_dict() if _is_trained_key(k)}
        absent = sorted(expected - set(trained_state))
        if absent:
            raise SinkscopeError(f"the trained parts lack {len(absent)} tensors (e.g. {absent[:2]}): they do not "
                                 "match this config; rebuild them with `python -m scripts.train_smolvlm`")
        model.load_state_dict(trained_state, strict=False)
    if dtype is not None:
        model = model.to(dtype)
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    return model.eval()


def trained_state(model) -> dict:
    """The parts sinkscope trains (vision tower, projector), detached and contiguous."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if _is_trained_key(k)}


def trained_state_from_dir(directory: Path) -> dict:
    """The tensors in a directory written by `save_trained`."""
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / TRAINED_FILE))


def save_trained(model, processor, out: Path, extra: dict | None = None) -> None:
    """Write the shippable parts: config.json, trained.safetensors, processor files (no LLM weights)."""
    import os

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    save_file(trained_state(model), str(out / (TRAINED_FILE + ".tmp")), metadata={"format": "pt"})
    os.replace(out / (TRAINED_FILE + ".tmp"), out / TRAINED_FILE)
    (out / "llm.json").write_text(json.dumps({"language_model": "SmolLM2-135M-Instruct", **(extra or {})}, indent=1))


def load_demo(assets: Path | str | None = None, dtype=None, log=print):
    """(model, processor) of the embedded demo, assembled from the cache and the shipped parts."""
    from safetensors.torch import load_file
    from transformers import LlavaConfig

    from sinkscope.models.embedded import smollm

    assets = Path(assets) if assets is not None else ASSETS
    if not (assets / TRAINED_FILE).exists() or not (assets / "config.json").exists():
        raise SinkscopeError(
            f"the demo's trained parts are not in {assets} (config.json, {TRAINED_FILE}). Rebuild them with "
            "`python -m scripts.train_smolvlm --out runs/smolvlm` and copy runs/smolvlm/model/* there."
        )
    llm_dir = smollm.ensure_cached(log=log)
    config = LlavaConfig.from_pretrained(str(assets))
    model = assemble(config, llm_dir, load_file(str(assets / TRAINED_FILE)), dtype=dtype)
    return model, build_processor(llm_dir)
