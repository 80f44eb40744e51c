"""Knockout (sinkscope.interventions.knockout): exactness on hand-built attention and on tiny models,
KV-cache generation, the control key sets and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import tiny_models
from sinkscope.errors import SinkscopeError
from sinkscope.interventions.knockout import knockout, knockout_probs, random_image_keys, top_nonsink_image_keys
from sinkscope.kinds import BOS, PAD, TEXT, VISUAL, TokenKinds
from sinkscope.models import adapter_for_model


def _random_probs(batch=2, heads=3, q=5, k=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, q, k, generator=g)
    causal = torch.ones(q, k, dtype=torch.bool).tril(k - q)
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


# -- hand-built attention -------------------------------------------------------------------

def test_empty_knockout_is_bitwise_identity():
    probs = _random_probs()
    out = knockout_probs(probs, torch.zeros(2, 9, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool))
    assert torch.equal(out, probs)


def test_knocked_keys_get_zero_rows_sum_to_one_other_rows_untouched():
    probs = _random_probs()
    keys = torch.zeros(2, 9, dtype=torch.bool)
    keys[0, [1, 3]] = True
    keys[1, [0]] = True
    queries = torch.tensor([[False, True, True, False, True], [True, True, True, True, True]])
    out = knockout_probs(probs, keys, queries)
    sel = queries[:, None, :, None] & keys[:, None, None, :]
    assert torch.all(out[sel.expand_as(out)] == 0)
    rows = queries[:, None, :].expand(2, 3, 5)
    assert torch.allclose(out.sum(-1)[rows], torch.ones(int(rows.sum())), atol=1e-6)
    assert torch.equal(out[~rows], probs[~rows])
    # the kept entries keep their proportions
    kept = ((~keys[0]) & (probs[0, 0, 1] > 0)).nonzero().flatten()  # visible to query 1, not blocked
    ratio = out[0, :, 1, kept] / probs[0, :, 1, kept]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-6)


# -- tiny models ----------------------------------------------------------------------------

def _batch(tiny, adapter, questions=("what is in the image", "describe")):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = tiny.inputs(list(questions), [[tiny.image(i)] for i in range(len(questions))])
    inputs = adapter.forward_inputs(batch)
    kinds = adapter.token_kinds(inputs["input_ids"], inputs["attention_mask"])
    return inputs, kinds


def _queries_after_image(kinds):
    pos = torch.arange(kinds.kind.shape[1])[None].expand_as(kinds.kind)
    last = torch.where(kinds.visual_mask, pos, -1).amax(1)
    return kinds.text_mask & (pos > last[:, None])


@pytest.fixture(scope="module")
def llava():
    tiny = tiny_models.build("llava")
    return tiny, adapter_for_model(tiny.model, tiny.processor)


def test_empty_knockout_equals_unmodified_forward_bitwise(llava):
    tiny, adapter = llava
    inputs, kinds = _batch(tiny, adapter)
    with torch.no_grad():
        base = tiny.model(**inputs, output_attentions=True)
        with knockout(adapter, torch.zeros_like(kinds.kind, dtype=torch.bool)):
            out = tiny.model(**inputs, output_attentions=True)
            plain = tiny.model(**inputs)
    assert torch.equal(out.logits, base.logits) and torch.equal(plain.logits, base.logits)
    assert all(torch.equal(a, b) for a, b in zip(out.attentions, base.attentions))


def test_knockout_in_every_layer_and_earlier_queries_bitwise(llava):
    tiny, adapter = llava
    inputs, kinds = _batch(tiny, adapter)
    keys = kinds.visual_mask.clone()
    keys[:, :] &= torch.rand(keys.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    queries = _queries_after_image(kinds)
    with torch.no_grad():
        base = tiny.model(**inputs, output_attentions=True)
        with knockout(adapter, keys):
            out = tiny.model(**inputs, output_attentions=True)
    first_query = int(queries.float().argmax(1).min())
    for a, b in zip(out.attentions, base.attentions):
        q = queries[:, None, :, None].expand_as(a)
        blocked = q & keys[:, None, None, :]
        assert torch.all(a[blocked] == 0)
        assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-6)
        # queries before the first knocked-out query see identical inputs (causal): bitwise equal
        assert torch.equal(a[:, :, :first_query], b[:, :, :first_query])


def test_prefill_edits_only_the_query_rows_and_equals_the_whole_row_formula_bitwise(llava):
    """At prefill the knockout reads and rewrites only the rows from the first default query of any row on (the
    rows before it are no default query in any row); the result equals `knockout_probs` on every row of the
    probabilities it was given, bit for bit, on a padded batch whose rows' queries start at different positions."""
    from sinkscope.interventions.attention import AttentionEdit, edit_attention

    class Before(AttentionEdit):  # the outer block's edit runs first: the probabilities the knockout receives
        def __init__(self):
            self.probs = {}

        def edit(self, probs, *, layer, query_positions, state):
            self.probs[layer] = probs.clone()
            return probs

    tiny, adapter = llava
    inputs, kinds = _batch(tiny, adapter)
    keys = kinds.visual_mask & (torch.rand(kinds.kind.shape, generator=torch.Generator().manual_seed(1)) < 0.5)
    queries = _queries_after_image(kinds)
    starts = queries.float().argmax(1)
    assert starts.min() > 0 and starts.min() != starts.max()
    before = Before()
    with torch.no_grad(), edit_attention(adapter, before):
        with knockout(adapter, keys):
            out = tiny.model(**inputs, output_attentions=True)
    assert len(out.attentions) == len(before.probs)
    for layer, edited in enumerate(out.attentions):
        assert torch.equal(edited, knockout_probs(before.probs[layer], keys, queries))


def test_knockout_chosen_layers_and_generate_with_cache(llava):
    tiny, adapter = llava
    inputs, kinds = _batch(tiny, adapter)
    keys = kinds.visual_mask
    t = keys.shape[1]
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_attentions=True, return_dict_in_generate=True)
    with torch.no_grad():
        # the oracle is generate itself: its prefill places a left-padded row's positions from the attention mask,
        # which a plain forward does not, so the two differ in the last bits (1.5e-8 on an AVX2-only CPU)
        base = tiny.model.generate(**inputs, **kw)
        with knockout(adapter, keys, layers=[1]):
            gen = tiny.model.generate(**inputs, **kw)
    assert torch.equal(gen.attentions[0][0], base.attentions[0][0])  # layer 0 untouched
    for step in gen.attentions[1:]:  # decode steps: every generated query is knocked out
        a = step[1]
        assert a.shape[2] == 1 and torch.all(a[..., :t][keys[:, None, None, :].expand_as(a[..., :t])] == 0)
        assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-6)
        assert not torch.all(step[0][..., :t][keys[:, None, None, :].expand_as(a[..., :t])] == 0)


def test_explicit_query_mask_and_no_generated_queries(llava):
    tiny, adapter = llava
    inputs, kinds = _batch(tiny, adapter)
    keys = kinds.bos_mask
    queries = torch.zeros_like(keys)
    queries[:, -1] = True
    with torch.no_grad():
        with knockout(adapter, keys, query_mask=queries, generated_queries=False):
            gen = tiny.model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0,
                                      output_attentions=True, return_dict_in_generate=True)
    pre = gen.attentions[0][1]
    bos = keys.float().argmax(1)
    assert torch.all(pre[torch.arange(2), :, -1, bos] == 0)
    assert torch.all(pre[torch.arange(2), :, -2, bos] > 0)
    assert torch.all(gen.attentions[1][1][torch.arange(2), :, 0, bos] > 0)


def test_knockout_on_every_family_runs_generate(tiny):
    adapter = adapter_for_model(tiny.model, tiny.processor)
    inputs, kinds = _batch(tiny, adapter)
    with torch.no_grad(), knockout(adapter, kinds.visual_mask):
        out = tiny.model(**inputs, output_attentions=True)
        tiny.model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    q = _queries_after_image(kinds)
    for a in out.attentions:
        assert torch.all(a[(q[:, None, :, None] & kinds.visual_mask[:, None, None, :]).expand_as(a)] == 0)


def test_bad_input(llava):
    tiny, adapter = llava
    inputs, kinds = _batch(tiny, adapter)
    with pytest.raises(SinkscopeError, match=r"0\.\.1"):
        with knockout(adapter, kinds.visual_mask, layers=[0, 5]):
            pass
    with pytest.raises(SinkscopeError, match="prompt is"):
        with knockout(adapter, kinds.visual_mask[:, :-1]):
            tiny.model(**inputs)
    with pytest.raises(SinkscopeError, match="key_mask must be"):
        knockout(adapter, kinds.visual_mask[0]).__enter__()
    assert adapter.text_attention == "eager"


# -- control key sets -----------------------------------------------------------------------

def _kinds():
    kind = torch.tensor([[PAD, BOS, VISUAL, VISUAL, VISUAL, VISUAL, TEXT, TEXT],
                         [BOS, TEXT, VISUAL, VISUAL, TEXT, VISUAL, VISUAL, TEXT]])
    return TokenKinds(kind, torch.where(kind == VISUAL, 0, -1))


def test_random_image_keys_only_image_tokens_matched_counts():
    kinds = _kinds()
    n = torch.tensor([2, 3])
    draws = [random_image_keys(kinds, n, torch.Generator().manual_seed(s)) for s in range(30)]
    for d in draws:
        assert torch.equal(d.sum(1), n)
        assert not (d & ~kinds.visual_mask).any()
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 5  # seeds draw different sets
    again = random_image_keys(kinds, n, torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[0])
    with pytest.raises(SinkscopeError, match="only 4"):
        random_image_keys(kinds, torch.tensor([5, 1]), torch.Generator().manual_seed(0))


def test_top_nonsink_image_keys():
    kinds = _kinds()
    received = torch.tensor([[0.9, 0.8, 0.5, 0.7, 0.1, 0.6, 0.9, 0.9],
                             [0.9, 0.9, 0.2, 0.3, 0.9, 0.4, 0.1, 0.9]])
    sinks = torch.zeros(2, 8, dtype=torch.bool)
    sinks[0, 3] = True
    out = top_nonsink_image_keys(received, kinds.visual_mask, sinks, torch.tensor([2, 1]))
    assert out[0].nonzero().flatten().tolist() == [2, 5]
    assert out[1].nonzero().flatten().tolist() == [5]
    with pytest.raises(SinkscopeError, match="non-sink image tokens"):
        top_nonsink_image_keys(received, kinds.visual_mask, sinks, torch.tensor([4, 1]))


def _knockout_as_first_written(probs, key_mask, query_mask, renormalize=True):
    """The knockout formula as first written (two masks, an extra guard), kept as the oracle of the leaner one."""
    blocked = key_mask[:, None, None, :]
    kept = probs.masked_fill(blocked, 0.0)
    removed = (probs * blocked).sum(dim=-1, keepdim=True)
    touched = query_mask[:, None, :, None] & (removed > 0)
    if not renormalize:
        return torch.where(touched, kept, probs)
    remaining = kept.sum(dim=-1, keepdim=True)
    renormalised = torch.where(remaining > 0, kept / remaining.clamp_min(torch.finfo(probs.dtype).tiny), kept)
    return torch.where(touched, renormalised, probs)


@pytest.mark.parametrize("renormalize", [True, False])
def test_knockout_probs_equals_the_first_formula_bitwise(renormalize):
    """The leaner knockout (no guard on an empty remainder, no query mask when every query is edited) gives the
    first formula's tensors bit for bit: ordinary rows, a row whose whole mass is on blocked keys, a row left with
    a subnormal remainder, rows with nothing blocked; query_mask=None equals an all-True mask."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 5, 8, generator=g) * 3, dim=-1)
    keys = torch.zeros(2, 8, dtype=torch.bool)
    keys[0, [1, 4]] = True
    keys[1, 0] = True
    probs[0, 0, 0] = 0.0
    probs[0, 0, 0, [1, 4]] = 0.5  # all mass on blocked keys
    probs[0, 1, 1] = 0.0
    probs[0, 1, 1, 1] = 1.0
    probs[0, 1, 1, 2] = 1e-41  # a subnormal remainder
    probs[1, 2, 3, 0] = 0.0  # nothing on the blocked key
    queries = torch.rand(2, 5, generator=g) > 0.3
    got = knockout_probs(probs, keys, queries, renormalize)
    assert torch.equal(got, _knockout_as_first_written(probs, keys, queries, renormalize))
    every = knockout_probs(probs, keys, None, renormalize)
    assert torch.equal(every, _knockout_as_first_written(probs, keys, torch.ones(2, 5, dtype=torch.bool), renormalize))
    if renormalize:
        assert torch.equal(got[0, 0, 0], torch.zeros(8)) or not queries[0, 0]


def test_a_decode_step_of_knockout_adds_seven_operations_per_layer(llava, monkeypatch):
    """What knockout adds to a layer at a decode step, counted exactly (the launch-bound proxy of
    benchmarks/dispatch_count.py): whether the row has mass on a blocked key (a product and its `any`), the blocked
    entries zeroed, the kept mass, its floor, the division and the select; views left out (and the key mask, grown
    once per step for every layer). A regression guard: it was 8 (the mass on blocked keys was summed and
    compared), 12 before that."""
    from decode_ops import decode_step_ops

    from sinkscope.interventions.knockout import KnockoutEdit

    tiny, adapter = llava
    inputs, kinds = _batch(tiny, adapter)
    with torch.no_grad(), knockout(adapter, kinds.visual_mask), decode_step_ops(monkeypatch, KnockoutEdit) as count:
        tiny.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert count.calls == 2 * adapter.num_layers  # two decode steps
    assert count.ops.pop("constant_pad_nd") == 2  # the key mask grown by the step's key: once per step, for all layers
    per_layer = {name: n / count.calls for name, n in count.ops.items()}
    assert per_layer == {"mul": 1, "any": 1, "masked_fill": 1, "sum": 1, "clamp_min": 1, "div": 1, "where": 1}, per_layer
