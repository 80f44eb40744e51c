"""Plain causal language models (AutoModelForCausalLM) whose attention goes through transformers'
attention interface: LLaMA, Mistral, Qwen2/Qwen3, Gemma 2, Gemma 3 (text), GPT-NeoX.

No image: every token is BOS (the first real token), prompt text or generated, so the
analyses reproduce the classic attention-sink picture (BOS and delimiter sinks). Module paths
differ per architecture and are read from the model, not hard-coded per family:
  - decoder stack: `model.base_model` (LlamaModel at `.model`, GPTNeoXModel at `.gpt_neox`), `.layers`;
  - attention: `layer.self_attn` (LLaMA, Qwen, Gemma) or `layer.attention` (GPT-NeoX);
  - output projection: `o_proj` or `dense`; final norm: `norm` or `final_layer_norm`;
  - unembedding: `get_output_embeddings()` (`lm_head` or `embed_out`).
Prompts are raw text (no chat template), tokenised with the model's tokenizer; a tokenizer
without a pad token pads with EOS, on the left.
"""

from __future__ import annotations

from sinkscope.errors import SinkscopeError
from sinkscope.models.base import ModelAdapter


def _first_attr(obj, names: tuple[str, ...], what: str):
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    raise SinkscopeError(f"{type(obj).__name__} has no {what} (looked for {', '.join(names)}); this architecture is "
                         "not laid out like LLaMA or GPT-NeoX: write an adapter for it in sinkscope/models/")


class CausalLMAdapter(ModelAdapter):
    family = "causal_lm"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GPTNeoXForCausalLM")
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt_neox")

    @classmethod
    def model_class(cls):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @classmethod
    def attention_kwarg(cls, implementation: str):
        return implementation  # one config: a plain string

    def __init__(self, model, processor=None, name: str = ""):
        super().__init__(model, processor, name)
        tok = self.tokenizer
        if tok is not None:
            if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
                tok.pad_token = tok.eos_token
            tok.padding_side = "left"

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def language_model(self):
        return self.model.base_model

    def attention(self, layer: int):
        return _first_attr(self.layers[layer], ("self_attn", "attention"), "attention module")

    def output_projection(self, layer: int):
        return _first_attr(self.attention(layer), ("o_proj", "dense"), "attention output projection")

    @property
    def final_norm(self):
        return _first_attr(self.language_model, ("norm", "final_layer_norm"), "final norm")

    @property
    def unembed(self):
        return self.model.get_output_embeddings()

    @property
    def rms_norm_eps(self) -> float:
        cfg = self.text_config
        return float(getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", None) or 1e-6)

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        return ()

    def set_text_attention(self, implementation: str) -> None:
        self.model.set_attn_implementation(implementation)

    def prepare(self, prompts, images=None, chat: bool = False):
        """Tokenised raw prompts: input_ids, attention_mask [batch, token] (left padding)."""
        if images is not None and any(im is not None for im in (images if isinstance(images, list) else [images])):
            raise SinkscopeError(f"{self.name} is a text-only language model: give prompts without images "
                                 "(--data a .txt file, one prompt per line, or a .jsonl of {\"prompt\": ...})")
        if self.tokenizer is None:
            raise SinkscopeError(f"{self.name}: no tokenizer was loaded; save it beside the weights")
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.tokenizer(list(prompts), return_tensors="pt", padding=True)

    def forward_inputs(self, batch) -> dict:
        return {k: v for k, v in dict(batch).items() if k in ("input_ids", "attention_mask")}
