"""Tiny, randomly initialised plain causal LMs (text only) of the families the causal_lm adapter covers."""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch

from tiny_models import HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, LAYERS, VOCAB, word_tokenizer

TEXT_FAMILIES = ("llama", "qwen2", "gemma2", "gemma3_text", "gpt_neox")


def _tokenizer(bos: bool = True):
    return word_tokenizer(["<pad>", "<s>", "</s>", "<unk>"], bos="<s>" if bos else None, eos="</s>", pad="<pad>",
                          unk="<unk>", padding_side="left")


def _config(family: str, tok):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, **common)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6, **common)
    if family == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=KV_HEADS, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                               rms_norm_eps=1e-6, **common)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(num_key_value_heads=KV_HEADS, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                                   layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-6, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(rotary_pct=0.5, layer_norm_eps=1e-5, use_parallel_residual=True, **common)
    raise KeyError(family)


@lru_cache(maxsize=None)
def build_text(family: str = "llama", seed: int = 0):
    """(model, tokenizer): a tiny random causal LM with eager attention (cached: treat as read-only)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = _tokenizer(bos=family != "gpt_neox")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(_config(family, tok), attn_implementation="eager")
    return model.eval(), tok


PROMPTS = ["what is in the image ?", "describe the red square .", "hello . what is the picture of ?",
           "a red square and a picture .", "compare them . left and right .", "is the square red ?"]


def write_prompts(path, n: int = 6, jsonl: bool = False):
    import json

    lines = [json.dumps({"prompt": p}) if jsonl else p for p in (PROMPTS * 3)[:n]]
    path.write_text("\n".join(lines) + "\n")
    return path
