"""The attention-edit mechanism (sinkscope.interventions.attention): exactness against transformers'
eager attention, SDPA for unedited layers, scoping to one model and one `with` block, restoration
(also after an exception), KV-cache positions, every supported family."""

from __future__ import annotations

import warnings

import pytest
import torch

import tiny_models
from sinkscope.errors import SinkscopeError, UnsupportedModelError
from sinkscope.interventions import attention as A
from sinkscope.interventions.attention import AttentionEdit, edit_attention
from sinkscope.models import adapter_for_model


def _adapter(tiny):
    return adapter_for_model(tiny.model, tiny.processor)


def _inputs(tiny, adapter):
    """Two prompts of different lengths (left padding), one image each."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = tiny.inputs(["what is in the image", "describe"], [[tiny.image(0)], [tiny.image(1)]])
    return adapter.forward_inputs(batch)


class Recorder(AttentionEdit):
    """Records what it is given and changes nothing."""

    def __init__(self, layers):
        self._layers = set(layers)
        self.calls = []

    def layers(self, n_layers):
        return self._layers

    def edit(self, probs, *, layer, query_positions, state):
        self.calls.append((layer, probs.clone(), query_positions.clone(), state.prefill, state.past_length))
        return probs


class ZeroKeyZero(AttentionEdit):
    """In one layer, one head, the last query: drop key 0 and renormalise that row."""

    def __init__(self, layer, head):
        self.layer, self.head = layer, head

    def layers(self, n_layers):
        return {self.layer}

    def edit(self, probs, *, layer, query_positions, state):
        out = probs.clone()
        row = out[:, self.head, -1]
        row[:, 0] = 0
        out[:, self.head, -1] = row / row.sum(-1, keepdim=True)
        return out


def _forward(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw)


def test_identity_edit_is_bitwise_eager_on_every_family(tiny):
    adapter = _adapter(tiny)
    inputs = _inputs(tiny, adapter)
    base = _forward(tiny.model, inputs, output_attentions=True)
    with edit_attention(adapter, Recorder(range(adapter.num_layers))):
        out = _forward(tiny.model, inputs, output_attentions=True)
    assert torch.equal(out.logits, base.logits)
    for a, b in zip(out.attentions, base.attentions):
        assert torch.equal(a, b)


def test_unedited_layers_heads_queries_bitwise_equal(tiny_llava):
    adapter = _adapter(tiny_llava)
    inputs = _inputs(tiny_llava, adapter)
    base = _forward(tiny_llava.model, inputs, output_attentions=True)
    with edit_attention(adapter, ZeroKeyZero(layer=1, head=2)):
        out = _forward(tiny_llava.model, inputs, output_attentions=True)
    assert torch.equal(out.attentions[0], base.attentions[0])  # unedited layer (eager: weights were asked for)
    edited, ref = out.attentions[1], base.attentions[1]
    keep = torch.ones(edited.shape[1:3], dtype=torch.bool)
    keep[2, -1] = False
    assert torch.equal(edited[:, keep], ref[:, keep])  # other heads and queries
    assert torch.all(edited[:, 2, -1, 0] == 0)
    assert torch.allclose(edited[:, 2, -1].sum(-1), torch.ones(2), atol=1e-6)
    assert not torch.equal(out.logits[:, -1], base.logits[:, -1])


def test_unedited_layers_run_on_sdpa(tiny_llava, monkeypatch):
    adapter = _adapter(tiny_llava)
    inputs = _inputs(tiny_llava, adapter)
    calls = []
    real = A._sdpa
    monkeypatch.setattr(A, "_sdpa", lambda module, *a, **k: calls.append(module.layer_idx) or real(module, *a, **k))
    base = _forward(tiny_llava.model, inputs)
    rec = Recorder({1})
    with edit_attention(adapter, rec):
        out = _forward(tiny_llava.model, inputs)
    assert calls == [0] and [c[0] for c in rec.calls] == [1]
    assert torch.allclose(out.logits, base.logits, atol=1e-5)
    calls.clear()
    with edit_attention(adapter, rec):  # weights requested: eager everywhere, so no SDPA
        _forward(tiny_llava.model, inputs, output_attentions=True)
    assert calls == []
    with edit_attention(adapter, rec, fallback="eager"):
        out = _forward(tiny_llava.model, inputs)
    assert calls == [] and torch.equal(out.logits, base.logits)


def _snapshot(adapter):
    model = adapter.model
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    attrs = [A.SESSION_ATTR in adapter.attention(i).__dict__ for i in range(adapter.num_layers)]
    return (adapter.text_attention, model.config.vision_config._attn_implementation, hooks, attrs)


def test_block_restores_the_model_also_after_an_exception(tiny_llava):
    adapter = _adapter(tiny_llava)
    inputs = _inputs(tiny_llava, adapter)
    before, state = _forward(tiny_llava.model, inputs), _snapshot(adapter)
    with edit_attention(adapter, ZeroKeyZero(1, 0)):
        assert adapter.text_attention == A.ATTENTION_NAME
        assert adapter.model.config.vision_config._attn_implementation == state[1]  # vision tower untouched
        _forward(tiny_llava.model, inputs)
    assert _snapshot(adapter) == state
    assert torch.equal(_forward(tiny_llava.model, inputs).logits, before.logits)
    with pytest.raises(RuntimeError, match="boom"):
        with edit_attention(adapter, ZeroKeyZero(1, 0)):
            _forward(tiny_llava.model, inputs)
            raise RuntimeError("boom")
    assert _snapshot(adapter) == state
    assert torch.equal(_forward(tiny_llava.model, inputs).logits, before.logits)


def test_enable_handle_and_nesting(tiny_llava):
    adapter = _adapter(tiny_llava)
    inputs = _inputs(tiny_llava, adapter)
    state = _snapshot(adapter)
    outer, inner = Recorder({0, 1}), Recorder({1})
    handle = A.enable(adapter, outer)
    with edit_attention(adapter, inner):
        _forward(tiny_llava.model, inputs)
    assert [c[0] for c in outer.calls] == [0, 1] and [c[0] for c in inner.calls] == [1]
    assert adapter.text_attention == A.ATTENTION_NAME  # the outer handle is still on
    handle.disable()
    assert _snapshot(adapter) == state


def test_edit_state_is_per_model_instance():
    first, second = tiny_models.build("llava", seed=0), tiny_models.build("llava", seed=1)
    a, b = _adapter(first), _adapter(second)
    inputs = _inputs(first, a)
    rec = Recorder({0, 1})
    with edit_attention(a, rec):
        _forward(second.model, inputs)  # the other model: same class, same implementation name unused
    assert rec.calls == [] and b.text_attention == "eager"


def test_query_positions_prefill_then_decode_steps(tiny_llava):
    adapter = _adapter(tiny_llava)
    inputs = _inputs(tiny_llava, adapter)
    rec = Recorder({1})
    with edit_attention(adapter, rec):
        with torch.no_grad():
            tiny_llava.model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    t = inputs["input_ids"].shape[1]
    assert [c[2].tolist() for c in rec.calls] == [list(range(t)), [t], [t + 1]]
    assert [c[3] for c in rec.calls] == [True, False, False]
    assert [c[1].shape[-1] for c in rec.calls] == [t, t + 1, t + 2]


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_generate_unchanged_by_identity_edit(family):
    tiny = tiny_models.build(family)
    adapter = _adapter(tiny)
    inputs = _inputs(tiny, adapter)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        base = tiny.model.generate(**inputs, **kw)
        with edit_attention(adapter, Recorder(range(adapter.num_layers))):
            out = tiny.model.generate(**inputs, **kw)
    assert torch.equal(out, base)


def test_errors(tiny_llava, monkeypatch):
    adapter = _adapter(tiny_llava)
    state = _snapshot(adapter)

    class OutOfRange(AttentionEdit):
        def layers(self, n_layers):
            return {n_layers}

    with pytest.raises(SinkscopeError, match=r"valid: 0\.\.1"):
        with edit_attention(adapter, OutOfRange()):
            pass
    with pytest.raises(SinkscopeError, match="fallback"):
        with edit_attention(adapter, Recorder({0}), fallback="flash"):
            pass
    monkeypatch.setattr(adapter.model, "_can_set_attn_implementation", lambda: False)
    with pytest.raises(UnsupportedModelError, match="AttentionInterface"):
        with edit_attention(adapter, Recorder({0})):
            pass
    assert _snapshot(adapter) == state and adapter.text_attention == "eager"
