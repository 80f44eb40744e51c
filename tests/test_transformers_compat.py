"""What changes between transformers releases and must not break the attention edits.

transformers 5.24 renamed the KV-cache argument of a model's forward (`cache=`; `past_key_values`
is a deprecated alias). The edit session finds the cache by type, so a decode step is never taken
for a new prompt; and if one ever is, the edits fail by name instead of with a shape error later.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

import tiny_models
from sinkscope.errors import SinkscopeError
from sinkscope.interventions import attention as A
from sinkscope.interventions.attention import AttentionEdit, edit_attention, find_cache
from sinkscope.models import adapter_for_model


class StepLog(AttentionEdit):
    """Records (past_length, query_length, cache_seen, number of keys) of every call; changes nothing."""

    def __init__(self):
        self.steps = []

    def layers(self, n_layers):
        return {0}

    def edit(self, probs, *, layer, query_positions, state):
        self.steps.append((state.past_length, state.query_length, state.cache_seen, probs.shape[-1]))
        return probs


def _batch(tiny):
    adapter = adapter_for_model(tiny.model, tiny.processor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = tiny.inputs(["what is in the image", "describe"], [[tiny.image(0)], [tiny.image(1)]])
    return adapter, adapter.forward_inputs(batch)


def test_find_cache_by_type_under_any_name():
    cache = DynamicCache()
    assert find_cache((), {"cache": cache}) is cache
    assert find_cache((), {"past_key_values": cache}) is cache
    assert find_cache((torch.zeros(1), cache), {}) is cache
    assert find_cache((torch.zeros(1),), {"some_future_name": cache, "use_cache": True}) is cache
    assert find_cache((torch.zeros(1),), {"cache": None, "use_cache": True}) is None


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_generate_decode_steps_see_the_cache(family):
    """Every decode step of `generate` reaches the edits as a step after the prompt, on every family."""
    tiny = tiny_models.build(family)
    adapter, inputs = _batch(tiny)
    log = StepLog()
    with torch.no_grad(), edit_attention(adapter, log):
        tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    t = inputs["input_ids"].shape[1]
    assert [s[:2] for s in log.steps] == [(0, t), (t, 1), (t + 1, 1)]
    assert all(s[2] for s in log.steps), "generate passed a KV cache that the session did not find"
    assert [s[3] for s in log.steps] == [t, t + 1, t + 2]


def test_decode_step_taken_for_a_prompt_fails_by_name(tiny_llava, monkeypatch):
    """If the cache is ever missed again (another rename), the edits say so at the first decode step."""
    adapter, inputs = _batch(tiny_llava)
    monkeypatch.setattr(A, "find_cache", lambda args, kwargs: None)
    with pytest.raises(SinkscopeError, match="decode step reached the attention edits as a new prompt"):
        with torch.no_grad(), edit_attention(adapter, StepLog()):
            tiny_llava.model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_forward_without_cache_is_a_prompt(tiny_llava):
    """A plain forward (no cache at all) is a prompt: keys == queries, nothing raised."""
    adapter, inputs = _batch(tiny_llava)
    log = StepLog()
    with torch.no_grad(), edit_attention(adapter, log):
        tiny_llava.model(**inputs, use_cache=False)
    t = inputs["input_ids"].shape[1]
    assert log.steps == [(0, t, False, t)]
