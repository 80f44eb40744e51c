"""What every LMM family adapter provides: the one place that knows module paths.

An adapter wraps a loaded Hugging Face model (and its processor, when there is one) and
answers the questions the rest of sinkscope asks: where are the decoder layers and their
attention modules, the final norm and unembedding, how many heads, which tokens of a batch
are BOS / prompt text / image / generated.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch

from sinkscope.errors import SinkscopeError, UnsupportedModelError  # noqa: F401  (re-exported)

# Token kinds live in the bottom module sinkscope.kinds; re-exported here so old imports keep working.
from sinkscope.kinds import (  # noqa: F401
    BOS, GENERATED, KIND_NAMES, PAD, TEXT, VISUAL, TokenKinds, token_kinds_from_ids,
)


def _acting_weight(module) -> torch.Tensor:
    """A linear module's weight, plus an active (unmerged) LoRA adapter's delta when it is a PEFT LoRA layer."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight
    weight = base.weight
    if not getattr(module, "disable_adapters", False) and not getattr(module, "merged", False):
        for name in getattr(module, "active_adapters", []):
            if name in getattr(module, "lora_A", {}):
                weight = weight + module.get_delta_weight(name)
    return weight


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself prepends its BOS (SmolLM2's calls <|im_start|> BOS but adds none)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos_id


class ModelAdapter:
    """Base adapter. Subclasses set the class attributes and override what differs."""

    family: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()  # HF class names, e.g. "LlavaForConditionalGeneration"
    model_types: ClassVar[tuple[str, ...]] = ()  # config.model_type values
    image_token_attributes: ClassVar[tuple[str, ...]] = ("image_token_id", "image_token_index")

    @classmethod
    def model_class(cls):
        """The transformers class that loads this family (the first of `architectures`)."""
        import transformers

        return getattr(transformers, cls.architectures[0])

    @classmethod
    def attention_kwarg(cls, implementation: str):
        """The `attn_implementation=` value that selects `implementation` for the language model only."""
        return {"text_config": implementation}

    def __init__(self, model, processor: Any = None, name: str = ""):
        self.model = model
        self.processor = processor
        self.name = name or getattr(model.config, "_name_or_path", "") or self.family
        # A mechanism was installed by hand (the organism: its folder has ground_truth.json); what the analyses
        # find in it validates sinkscope and is no finding. `models.load` sets it from the model's files.
        self.planted = False
        # A model NDIF serves (`models.load_hosted`): nnsight's wrapper, keyed by hub id, that traces go
        # through; `model` is then its meta-device module tree (no weights here).
        self.hosted = None

    # -- structure ---------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def language_model(self):
        """The decoder stack (e.g. LlamaModel) that holds `.layers` and `.norm`."""
        return self.model.model.language_model

    @property
    def layers(self):
        return self.language_model.layers

    def attention(self, layer: int):
        return self.layers[layer].self_attn

    def output_projection(self, layer: int):
        """The attention's output projection (W_O, a Linear [hidden, heads * head_dim]) of `layer`."""
        return self.attention(layer).o_proj

    def output_weight(self, layer: int) -> torch.Tensor:
        """W_O as it acts: [hidden, heads * head_dim], including an active (unmerged) LoRA adapter's delta. A layer
        offloaded by accelerate (its weights at rest on the meta device, brought in per forward) is brought in for
        the read and its W_O returned as a copy on the layer's execution device."""
        module = self.output_projection(layer)
        offloaded = [m for m in (module, getattr(module, "base_layer", None))
                     if m is not None and getattr(getattr(m, "_hf_hook", None), "offload", False)]
        if not offloaded:
            return _acting_weight(module)
        for m in offloaded:
            m._hf_hook.pre_forward(m)  # accelerate's AlignDevicesHook: the weights onto the execution device
        try:
            return _acting_weight(module).detach().clone()
        finally:
            for m in offloaded:
                m._hf_hook.post_forward(m, None)  # and back to the meta device

    @property
    def final_norm(self):
        return self.language_model.norm

    @property
    def unembed(self):
        return self.model.lm_head

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.text_config, "head_dim", None) or self.hidden_size // self.num_heads)

    @property
    def rms_norm_eps(self) -> float:
        return float(getattr(self.text_config, "rms_norm_eps", 1e-6))

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        for attribute in self.image_token_attributes:
            tid = getattr(self.model.config, attribute, None)
            if tid is not None:
                return (int(tid),)
        return ()

    @property
    def bos_token_id(self) -> int | None:
        tok = getattr(self.processor, "tokenizer", self.processor)
        bos = getattr(tok, "bos_token_id", None)
        if bos is None:
            bos = getattr(self.text_config, "bos_token_id", None)
        return bos

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device that holds data (weights offloaded by accelerate sit on
        `meta` until their layer runs, and its hooks move inputs to each layer's own device); the CPU if none."""
        for p in self.model.parameters():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    @property
    def device_map(self) -> dict | None:
        """accelerate's {module name: device} when the model was dispatched across devices, else None."""
        return getattr(self.model, "hf_device_map", None)

    # -- attention implementation ------------------------------------------------------
    def set_text_attention(self, implementation: str) -> None:
        """Switch the language model's attention only; the vision tower keeps its own."""
        sub = {"text_config": implementation}
        self.model.set_attn_implementation(sub)

    @property
    def text_attention(self) -> str:
        return self.text_config._attn_implementation

    # -- tokens ------------------------------------------------------------------------
    def token_kinds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    prompt_length: int | None = None) -> TokenKinds:
        return token_kinds_from_ids(input_ids, self.image_token_ids, attention_mask, prompt_length)

    # -- inputs ------------------------------------------------------------------------
    def chat_prompt(self, question: str, n_images: int = 1) -> str:
        """The question wrapped in the model's chat template with `n_images` image slots."""
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if self.processor is None or getattr(self.processor, "chat_template", None) is None:
            raise SinkscopeError(
                f"{self.name}: no processor with a chat template was found; pass prompts that already "
                "contain the image placeholder tokens, or save the processor beside the weights"
            )
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prepare(self, prompts: list[str] | str, images: list | None = None, chat: bool = True):
        """Processor outputs (input_ids, attention_mask, pixel_values, ...) for a batch.

        prompts: questions (wrapped in the chat template when `chat`) or raw prompts.
        images: one PIL image per prompt, or a list of images per prompt, or None (text only).
        """
        if self.processor is None:
            why = getattr(self, "processor_error", "")
            raise SinkscopeError(
                f"{self.name}: no processor was loaded" + (f" ({why})" if why else "") + ". Save the processor "
                "beside the weights, install what it needs (Qwen2-VL's needs torchvision), or pass token ids "
                "and pixel values yourself"
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        per_prompt = None
        if images is not None:
            per_prompt = [im if isinstance(im, (list, tuple)) else [im] for im in images]
            if len(per_prompt) != len(prompts):
                raise SinkscopeError(f"got {len(prompts)} prompts but {len(per_prompt)} image lists")
        if chat:
            prompts = [self.chat_prompt(p, len(per_prompt[i]) if per_prompt else 0) for i, p in enumerate(prompts)]
            tokenizer = getattr(self.processor, "tokenizer", None)
            bos = getattr(tokenizer, "bos_token", None)
            if bos and _adds_bos(tokenizer):  # the template writes BOS and the tokenizer adds one: keep one
                prompts = [p[len(bos):] if p.startswith(bos) else p for p in prompts]
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if per_prompt is not None:
            kwargs["images"] = per_prompt
        return self.processor(**kwargs)

    def token_strings(self, input_ids: torch.Tensor) -> list[list[str]]:
        """[batch, token] ids -> each token decoded on its own ("" where there is no tokenizer)."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if tokenizer is None or not hasattr(tokenizer, "batch_decode"):
            return [[""] * input_ids.shape[1] for _ in range(input_ids.shape[0])]
        return [tokenizer.batch_decode([[t] for t in row]) for row in input_ids.tolist()]

    def forward_inputs(self, batch) -> dict:
        """The keys of a processor batch that the model's forward takes."""
        keep = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw",
                "mm_token_type_ids", "token_type_ids", "pixel_attention_mask")
        return {k: v for k, v in dict(batch).items() if k in keep}

    def without_logits(self) -> dict:
        """Forward keyword arguments for a pass whose logits nobody reads (a trace that only reads activations):
        the logits of the last position only (`logits_to_keep=1`), where the model's forward takes it. Every layer
        computes as before; what is left out is the unembedding of every other position, [batch, token, vocab]
        (1.5 GB at batch 8 of Qwen2-VL's 152k vocabulary in bfloat16, and ~8% of its 7B forward)."""
        return {"logits_to_keep": 1} if _takes_logits_to_keep(type(self.model)) else {}

    def device_inputs(self, batch) -> dict:
        """`forward_inputs(batch)` with every tensor moved to `self.device` (what model(...) / generate take)."""
        device = self.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.forward_inputs(batch).items()}

    def weights_fingerprint(self) -> str:
        """16 hex digits that change when the weights do: sha256 over every parameter's name, shape, dtype and
        up to 64 of its values (evenly strided). Offloaded parameters (on the meta device) count by shape, and a
        hosted model's (all on meta here) by shape and its key on the server (hub id, revision).
        One small copy per parameter, so cheap at 7B; runs record it so a resume never mixes two models' rows."""
        import hashlib

        digest = hashlib.sha256()
        if self.hosted is not None:
            digest.update(self.hosted.to_model_key().encode())
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
                if param.device.type != "meta" and param.numel():
                    flat = param.detach().reshape(-1)
                    sample = flat[:: max(1, flat.numel() // 64)][:64]
                    digest.update(sample.float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "family": self.family, "name": self.name, "architecture": type(self.model).__name__,
            "layers": self.num_layers, "hidden_size": self.hidden_size, "heads": self.num_heads,
            "kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "image_token_ids": list(self.image_token_ids), "text_attention": self.text_attention,
            **({"served_as": self.hosted.to_model_key()} if self.hosted is not None else {}),
        }


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(model_class: type) -> bool:
    """Whether a model class's forward takes `logits_to_keep` (read once per class)."""
    import inspect

    return "logits_to_keep" in inspect.signature(model_class.forward).parameters
