"""Eager attention, computed by sinkscope: the probabilities, and a registered function that hands them over.

`eager_probabilities` is transformers' eager attention up to the softmax (GQA by repeating the key
heads, softcapping where the module passes one, the model's own additive mask), in float32. The
attention edits (`interventions/attention.py`) run on it, and so does the capture below.

`capturing(adapter, hand)` is how a local trace reads each layer's probabilities without nnsight's
`.source` (which wraps every operation of every attention forward, ~170 interleaver calls per layer):
inside the block the language model's attention is `CAPTURE_NAME`, which computes exactly what
transformers' eager attention computes (the same operations in the same order, so the output is
bitwise eager) and calls `hand(layer, probs)` with the probabilities that multiply V ([batch, head,
query, key], in the query's dtype, as eager attention holds them) and, given one, `values(layer, v)` with the
value states it multiplies them with ([batch, kv_head, key, head_dim], before any repeat for grouped-query
attention). The hands are set on the model's attention modules for the block only; nothing is kept at module level
but the registered function.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

CAPTURE_NAME = "sinkscope_capture"
CAPTURE_ATTR = "_sinkscope_capture"
CAPTURE_VALUES_ATTR = "_sinkscope_capture_values"


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_head, token, dim] -> [batch, kv_head * n_rep, token, dim] (each kv head repeated n_rep times)."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def kv_groups(module, query: torch.Tensor, key: torch.Tensor) -> int:
    """Query heads per key-value head."""
    return int(getattr(module, "num_key_value_groups", None) or query.shape[1] // key.shape[1])


def eager_probabilities(module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                        scaling: float | None, softcap: float | None = None) -> torch.Tensor:
    """Post-softmax attention in float32, by the operations of transformers' eager attention.

    query: [batch, head, query, dim]; key: [batch, kv_head, key, dim]; attention_mask: additive
    [batch, 1, query, >=key] or None. Returns [batch, head, query, key] float32.
    """
    if scaling is None:
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    key_states = repeat_kv(key, kv_groups(module, query, key))
    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, 0.0, torch.finfo(scores.dtype).min).to(scores.dtype)
        scores = scores + attention_mask[:, :, :, : key_states.shape[-2]]
    return torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32)


def eager_output(module, probs: torch.Tensor, query: torch.Tensor, value: torch.Tensor,
                 dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest of eager attention from float32 probabilities: cast to the query's dtype, dropout, times V.

    Returns (attn_output [batch, query, head, dim], the probabilities that multiplied V [batch, head, query, key]).
    """
    probs = torch.nn.functional.dropout(probs.to(query.dtype), p=dropout, training=module.training)
    out = torch.matmul(probs, repeat_kv(value, kv_groups(module, query, value)))
    return out.transpose(1, 2).contiguous(), probs


def capture_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The registered capture function (eager signature): eager attention that hands its value states and its
    probabilities over.

    Returns (attn_output [batch, query, head, dim], probabilities [batch, head, query, key]).
    """
    hand_values = getattr(module, CAPTURE_VALUES_ATTR, None)
    if hand_values is not None:
        hand_values(getattr(module, "layer_idx", None), value)
    probs = eager_probabilities(module, query, key, attention_mask, scaling, kwargs.get("softcap"))
    out, probs = eager_output(module, probs, query, value, dropout)
    hand = getattr(module, CAPTURE_ATTR, None)
    if hand is not None:
        hand(getattr(module, "layer_idx", None), probs)
    return out, probs


def register_attention(name: str, function) -> str:
    """Register an attention function (eager signature) and the eager additive mask under `name` with
    transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, function)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, eager_mask)
    return name


register_attention(CAPTURE_NAME, capture_attention)


@contextlib.contextmanager
def capturing(adapter, hand: Callable[[int, torch.Tensor], None] | None,
              values: Callable[[int, torch.Tensor], None] | None = None) -> Iterator[None]:
    """Inside the block the language model's attention is the capture function: `hand(layer, probs)` gets every
    layer's probabilities and `values(layer, v)` its value states, before them (either may be None); the previous
    implementation and attributes come back on exit (also after an exception). The model must be on eager attention
    (a trace's requirement) and its attention modules must know their `layer_idx`.

    The switch sets `_attn_implementation` on the configs the attention modules read (and the text config),
    which is what they and the mask builder look up at each forward: O(1) per block, where
    `set_attn_implementation` walks every module of the model (0.6 ms per switch at 18 layers, two per trace).
    """
    modules = [adapter.attention(i) for i in range(adapter.num_layers)]
    configs = list({id(c): c for c in [adapter.text_config, *(getattr(m, "config", None) for m in modules)]
                    if c is not None}.values())
    previous = [c._attn_implementation for c in configs]
    try:
        for m in modules:
            setattr(m, CAPTURE_ATTR, hand)
            setattr(m, CAPTURE_VALUES_ATTR, values)
        for c in configs:
            c._attn_implementation = CAPTURE_NAME
        yield
    finally:
        for m in modules:
            for attr in (CAPTURE_ATTR, CAPTURE_VALUES_ATTR):
                if attr in m.__dict__:
                    delattr(m, attr)
        for c, name in zip(configs, previous):
            c._attn_implementation = name
