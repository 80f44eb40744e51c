"""Tracer (nnsight) on tiny random models of every family, against the model's own outputs.

(a) run_with_cache on a two-image prompt: residual[l] == output_hidden_states[l], attention[l]
    == eager output_attentions[l] for every layer, logits == the model's logits;
(b) reducers: layers arrive in order, only the requested subset, with the right shapes;
(c) errors: out-of-range layers, non-eager text attention;
(d) a left-padded batch of 2 equals per-sample runs on the real tokens.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import HEADS, HIDDEN, LAYERS

from sinkscope.models import SinkscopeError
from sinkscope.models.registry import adapter_for_model
from sinkscope.trace import Tracer

QUESTIONS = ["describe both images", "what ?"]


@pytest.fixture(scope="session")
def traced(tiny):
    """(tiny, adapter, tracer) per family; the Tracer locates the probability op once."""
    adapter = adapter_for_model(tiny.model, tiny.processor)
    assert adapter.text_attention == "eager"
    return tiny, adapter, Tracer(adapter)


@pytest.fixture(scope="session")
def two_images(traced):
    tiny, adapter, _ = traced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return adapter.prepare([QUESTIONS[0]], [[tiny.image(0), tiny.image(1)]])


def _reference(tiny, adapter, batch):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny.model(**adapter.forward_inputs(batch), output_attentions=True, output_hidden_states=True)


class _Recorder:
    """Records every call and the shapes it received."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.info = None

    def begin(self, info):
        self.info = info
        self.calls.append(("begin",))

    def residual(self, layer, states):
        self.calls.append(("residual", layer, tuple(states.shape)))

    def attention(self, layer, probs):
        self.calls.append(("attention", layer, tuple(probs.shape)))

    def end(self):
        self.calls.append(("end",))


# -- (a) the cache equals the model's own outputs --------------------------------------------------

def test_cache_matches_model_outputs(traced, two_images):
    tiny, adapter, tracer = traced
    batch = two_images
    ids = batch["input_ids"]
    assert (ids == tiny.image_token_id).sum() > 0
    kinds = adapter.token_kinds(ids, batch["attention_mask"])
    assert set(kinds.image_index[0][kinds.visual_mask[0]].tolist()) == {0, 1}  # really two images

    cache = tracer.run_with_cache(batch)
    ref = _reference(tiny, adapter, batch)
    T = ids.shape[1]
    assert sorted(cache.residual) == sorted(cache.attention) == list(range(LAYERS))
    assert len(ref.attentions) == LAYERS and len(ref.hidden_states) == LAYERS + 1
    for layer in range(LAYERS):
        assert cache.residual[layer].shape == (1, T, HIDDEN)
        assert cache.attention[layer].shape == (1, HEADS, T, T)
        torch.testing.assert_close(cache.residual[layer], ref.hidden_states[layer], atol=1e-6, rtol=0)
        torch.testing.assert_close(cache.attention[layer], ref.attentions[layer], atol=1e-6, rtol=0)
        assert torch.equal(cache[f"resid_pre.{layer}"], cache.residual[layer])
        assert torch.equal(cache[f"pattern.{layer}"], cache.attention[layer])
    assert cache.logits is not None
    torch.testing.assert_close(cache.logits, ref.logits, atol=1e-6, rtol=0)
    assert cache.stacked_residual().shape == (LAYERS, 1, T, HIDDEN)
    assert torch.equal(cache.batch.token_kinds.kind, kinds.kind)
    with pytest.raises(KeyError):
        cache["mlp_out.0"]
    # validate() agrees: the located op holds probabilities
    assert tracer.validate(batch)["row_sum_error"] < 1e-5


# -- (b) reducers ----------------------------------------------------------------------------------

def test_reducer_sees_layers_in_order(traced, two_images):
    _, adapter, tracer = traced
    T = two_images["input_ids"].shape[1]
    rec = _Recorder()
    assert tracer.run(two_images, [rec], layers=list(reversed(range(LAYERS)))) is None
    expected = [("begin",)]
    for layer in range(LAYERS):
        expected += [("residual", layer, (1, T, HIDDEN)), ("attention", layer, (1, HEADS, T, T))]
    expected.append(("end",))
    assert rec.calls == expected
    assert rec.info.batch_size == 1 and rec.info.sample_ids == [0]


def test_reducer_gets_only_requested_layers(traced, two_images):
    _, adapter, tracer = traced
    T = two_images["input_ids"].shape[1]
    last = LAYERS - 1
    rec, rec2 = _Recorder(), _Recorder()
    tracer.run(two_images, [rec, rec2], layers=[last, last], sample_ids=["s0"])
    want = [("begin",), ("residual", last, (1, T, HIDDEN)), ("attention", last, (1, HEADS, T, T)), ("end",)]
    assert rec.calls == want and rec2.calls == want  # every reducer, each layer once
    assert rec.info.sample_ids == ["s0"]

    rec = _Recorder()
    tracer.run(two_images, [rec], layers=[0], attention=False)
    assert rec.calls == [("begin",), ("residual", 0, (1, T, HIDDEN)), ("end",)]
    rec = _Recorder()
    tracer.run(two_images, [rec], layers=[0], residual=False)
    assert rec.calls == [("begin",), ("attention", 0, (1, HEADS, T, T)), ("end",)]

    cache = tracer.run_with_cache(two_images, layers=[last])
    assert list(cache.residual) == [last] and list(cache.attention) == [last]


# -- (c) errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [[LAYERS], [-1], [0, LAYERS + 5]])
def test_out_of_range_layers(traced, two_images, layers):
    _, _, tracer = traced
    rec = _Recorder()
    with pytest.raises(SinkscopeError, match="out of range"):
        tracer.run(two_images, [rec], layers=layers)
    assert rec.calls == []  # refused before anything ran


def test_non_eager_attention_is_refused(traced, two_images):
    tiny, adapter, _ = traced
    adapter.set_text_attention("sdpa")
    try:
        assert adapter.text_attention == "sdpa"
        tracer = Tracer(adapter)
        with pytest.raises(SinkscopeError, match="eager"):
            tracer.run(two_images, [_Recorder()])
        with pytest.raises(SinkscopeError, match="eager"):
            tracer.run_with_cache(two_images)
        # the residual stream alone does not need eager attention
        rec = _Recorder()
        tracer.run(two_images, [rec], attention=False)
        assert [c[0] for c in rec.calls] == ["begin"] + ["residual"] * LAYERS + ["end"]
    finally:
        adapter.set_text_attention("eager")  # the tiny model is shared across tests
    assert adapter.text_attention == "eager"


# -- (d) padding -----------------------------------------------------------------------------------

def test_left_padded_batch_equals_single_runs(traced):
    tiny, adapter, tracer = traced
    images = [[tiny.image(0), tiny.image(1)], [tiny.image(1)]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = adapter.prepare(QUESTIONS, images)
    mask = batch["attention_mask"].bool()
    assert mask[0].all() and not mask[1].all() and not mask[1, 0]  # row 1 is left-padded
    cache = tracer.run_with_cache(batch, sample_ids=["a", "b"])
    assert cache.batch.sample_ids == ["a", "b"]
    for row in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            single = adapter.prepare([QUESTIONS[row]], [images[row]])
        real = mask[row]
        assert torch.equal(batch["input_ids"][row][real], single["input_ids"][0])
        alone = tracer.run_with_cache(single)
        for layer in range(LAYERS):
            torch.testing.assert_close(cache.residual[layer][row][real], alone.residual[layer][0],
                                       atol=1e-5, rtol=0)
            probs = cache.attention[layer][row]
            torch.testing.assert_close(probs[:, real][:, :, real], alone.attention[layer][0], atol=1e-5, rtol=0)
            assert float(probs[:, real][:, :, ~real].abs().sum()) < 1e-6  # real queries ignore padding
        torch.testing.assert_close(cache.logits[row][real], alone.logits[0], atol=1e-5, rtol=0)


class _Keep:
    def __init__(self):
        self.probs, self.states = {}, {}

    def begin(self, info):
        pass

    def residual(self, layer, states):
        self.states[layer] = states.detach().clone()

    def attention(self, layer, probs):
        self.probs[layer] = probs.detach().clone()

    def end(self):
        pass


def _own_copy_and_batch(tiny, dtype: torch.dtype = torch.float32):
    """An adapter over this test's own copy of the session's tiny model (left as it is) in `dtype`, and a two-sample
    batch."""
    import copy

    adapter = adapter_for_model(copy.deepcopy(tiny.model).to(dtype), tiny.processor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return adapter, adapter.prepare([QUESTIONS[0], QUESTIONS[1]], [[tiny.image(0)], [tiny.image(1)]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_probabilities_come_from_the_capture_function_bitwise_as_through_source(tiny, dtype):
    """A local run takes the probabilities from sinkscope's registered eager function instead of nnsight's
    `.source` (which wraps every attention operation): the same tensors bit for bit, in float32 and bfloat16, with
    reducers called residual, attention, residual, ... per layer; the model comes back on eager attention."""
    adapter, batch = _own_copy_and_batch(tiny, dtype)
    captured, sourced, order = _Keep(), _Keep(), _Recorder()
    tracer = Tracer(adapter)
    tracer.run(batch, [captured, order])
    assert tracer._labels is None and tracer._envoy is None  # `.source` never opened, the model never wrapped
    Tracer(adapter).run(batch, [sourced], via_source=True)
    assert adapter.text_attention == "eager"
    assert sorted(captured.probs) == sorted(sourced.probs) == list(range(LAYERS))
    for layer in range(LAYERS):
        assert captured.probs[layer].dtype == sourced.probs[layer].dtype == dtype
        assert torch.equal(captured.probs[layer], sourced.probs[layer]), layer
        assert torch.equal(captured.states[layer], sourced.states[layer]), layer
    expected = [("begin",)] + [c for layer in range(LAYERS) for c in (
        ("residual", layer, tuple(captured.states[layer].shape)),
        ("attention", layer, tuple(captured.probs[layer].shape)))] + [("end",)]
    assert order.calls == expected


def _unembedded_positions(adapter) -> tuple[list, object]:
    """(the number of positions each call of the unembedding saw, the hook's handle)."""
    seen: list[int] = []
    handle = adapter.unembed.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    return seen, handle


@pytest.mark.parametrize("via_source", [False, True])
def test_a_trace_that_reads_activations_unembeds_only_the_last_position(tiny, via_source):
    """Reducers never read the logits, so a run without `return_logits` asks the model for the last position's only
    (`logits_to_keep=1`): the unembedding sees one position per row, and every layer's states and probabilities are
    bit for bit those of a forward that unembeds every position. With `return_logits` the logits are the model's
    own, every position."""
    adapter, batch = _own_copy_and_batch(tiny)
    assert adapter.without_logits() == {"logits_to_keep": 1}
    seen, handle = _unembedded_positions(adapter)
    lean, full = _Keep(), _Keep()
    try:
        Tracer(adapter).run(batch, [lean], via_source=via_source)
        assert seen == [1]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(adapter), "without_logits", lambda self: {})
            Tracer(adapter).run(batch, [full], via_source=via_source)
        assert seen == [1, batch["input_ids"].shape[1]]
        logits = Tracer(adapter).run(batch, [], return_logits=True, via_source=via_source)
    finally:
        handle.remove()
    assert sorted(lean.probs) == sorted(full.probs) == list(range(LAYERS))
    for layer in range(LAYERS):
        assert torch.equal(lean.probs[layer], full.probs[layer]) and torch.equal(lean.states[layer], full.states[layer])
    torch.testing.assert_close(logits, _reference(tiny, adapter, batch).logits, atol=1e-6, rtol=0)


def test_a_model_whose_forward_takes_no_logits_to_keep_runs_as_it_is(tiny):
    """A forward without the argument (an older or custom class) gets no extra keyword."""
    adapter, _ = _own_copy_and_batch(tiny)

    class Plain(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None):
            return input_ids

    adapter.model = Plain()
    assert adapter.without_logits() == {}


def test_capturing_switches_only_inside_its_block_and_restores_after_an_error(tiny):
    """The capture switch sets the implementation on the configs the attention modules read: inside the block
    every text attention module sees the capture function and holds the hand; after the block (also one left by
    an exception) they are back on their implementation, without the hand, and the vision tower was not touched."""
    import copy

    from sinkscope.eager import CAPTURE_ATTR, CAPTURE_NAME, capturing

    adapter = adapter_for_model(copy.deepcopy(tiny.model), tiny.processor)
    modules = [adapter.attention(i) for i in range(adapter.num_layers)]
    vision = getattr(adapter.model.config, "vision_config", None)
    vision_before = None if vision is None else vision._attn_implementation
    for attempt in range(2):
        with pytest.raises(RuntimeError, match="stop"):
            with capturing(adapter, lambda layer, probs: None):
                assert adapter.text_attention == CAPTURE_NAME
                assert all(m.config._attn_implementation == CAPTURE_NAME and hasattr(m, CAPTURE_ATTR)
                           for m in modules)
                assert vision is None or vision._attn_implementation == vision_before
                raise RuntimeError("stop")
        assert adapter.text_attention == "eager"
        assert all(m.config._attn_implementation == "eager" and CAPTURE_ATTR not in m.__dict__ for m in modules)


def test_stacked_residual_gathers_layers_from_several_devices():
    """A model split across devices leaves each layer's cached states where the layer ran; stacking them puts
    every layer on the first layer's device (here the meta device, then the CPU) instead of raising."""
    from sinkscope.kinds import TokenKinds
    from sinkscope.trace import ActivationCache, BatchInfo

    kinds = TokenKinds(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), -1))
    cache = ActivationCache(BatchInfo(torch.zeros(1, 3, dtype=torch.long), kinds, [0]))
    cache.residual = {1: torch.ones(1, 3, 4), 0: torch.zeros(1, 3, 4, device="meta")}
    stacked = cache.stacked_residual()
    assert stacked.device.type == "meta" and stacked.shape == (2, 1, 3, 4)


def test_local_residual_only_runs_use_hooks_and_leave_none_behind(tiny):
    """A local run without attention takes the residual states from forward pre-hooks: the same tensors as
    nnsight's `.input`; the hooks go away after the run, also when a reducer raises, and the model is never
    wrapped by nnsight."""
    adapter, batch = _own_copy_and_batch(tiny)
    hooked, sourced = _Keep(), _Keep()
    tracer = Tracer(adapter)
    tracer.run(batch, [hooked], attention=False, layers=[1])
    assert tracer._envoy is None
    Tracer(adapter).run(batch, [sourced], attention=False, layers=[1], via_source=True)
    assert sorted(hooked.states) == sorted(sourced.states) == [1] and not hooked.probs
    assert torch.equal(hooked.states[1], sourced.states[1])

    class Fails(_Keep):
        def residual(self, layer, states):
            raise RuntimeError("reducer failed")

    with pytest.raises(RuntimeError, match="reducer failed"):
        tracer.run(batch, [Fails()])
    assert all(not layer._forward_pre_hooks for layer in adapter.layers)
    assert adapter.text_attention == "eager"


class _KeepValues(_Keep):
    def begin(self, info):
        super().begin(info)
        self.values_of, self.calls = {}, []

    def residual(self, layer, states):
        super().residual(layer, states)
        self.calls.append(("residual", layer))

    def values(self, layer, v):
        self.values_of[layer] = v.detach().clone()
        self.calls.append(("values", layer))

    def attention(self, layer, probs):
        super().attention(layer, probs)
        self.calls.append(("attention", layer))


def test_local_value_states_come_from_the_capture_function_bitwise_as_through_source(tiny):
    """With `values=True` a local run hands each layer's value states from the capture function, the tensors
    nnsight's `.source` reads as the attention function's fourth input ([batch, kv_head, key, head_dim], before
    any grouped-query repeat), bit for bit, between the layer's residual and its attention; only the requested
    layers; the model is never wrapped by nnsight and no hand is left on its attention modules."""
    from sinkscope.eager import CAPTURE_ATTR, CAPTURE_VALUES_ATTR

    adapter, batch = _own_copy_and_batch(tiny)
    captured, sourced = _KeepValues(), _KeepValues()
    tracer = Tracer(adapter)
    tracer.run(batch, [captured], values=True, layers=[0, LAYERS - 1])
    assert tracer._envoy is None
    Tracer(adapter).run(batch, [sourced], values=True, layers=[0, LAYERS - 1], via_source=True)
    assert sorted(captured.values_of) == sorted(sourced.values_of) == [0, LAYERS - 1]
    for layer in captured.values_of:
        v = captured.values_of[layer]
        assert v.dim() == 4 and v.shape[0] == 2 and v.shape[2] == batch["input_ids"].shape[1]
        assert torch.equal(v, sourced.values_of[layer]), layer
        assert torch.equal(captured.probs[layer], sourced.probs[layer]), layer
    assert captured.calls == [(kind, layer) for layer in (0, LAYERS - 1)
                              for kind in ("residual", "values", "attention")]
    assert all(attr not in adapter.attention(i).__dict__
               for i in range(LAYERS) for attr in (CAPTURE_ATTR, CAPTURE_VALUES_ATTR))
