"""VAR (sinkscope.interventions.var): the fast implementation against a slow literal transcription of
the paper's equations (and of the reference code's semantics), exactness properties, the organism's
planted truth, generate with KV cache on every family, batching, calibration and bad input."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

import sinkscope
import tiny_models
from sinkscope.errors import SinkscopeError
from sinkscope.interventions.attention import AttentionEdit, edit_attention
from sinkscope.interventions.var import VARConfig, calibrate, default_layers, enable, var, var_probs
from sinkscope.models import adapter_for_model

ORGANISM = Path(__file__).resolve().parent.parent / "sinkscope" / "models" / "embedded" / "assets" / "organism"


# -- the slow literal transcription ----------------------------------------------------------

def literal_var(a, S, I, Q, *, p, rho, summ, mode="paper", head_selection="image_centric", budget="image_nonsink"):
    """Paper-notes sections 4-5 (mode "paper") and section 7 items 1-2 (mode "reference"), one
    (batch, head, query) at a time, in float64. Returns (edited, selected)."""
    B, H, Qn, K = a.shape
    a = a.double()
    out = a.clone()
    selected = torch.zeros(B, H, Qn, dtype=torch.bool)
    for b in range(B):
        sinks = [j for j in range(K) if S[b, j]]
        image = [j for j in range(K) if I[b, j]]
        nonsink_image = [j for j in image if not S[b, j]]
        targets = nonsink_image if budget == "image_nonsink" else [j for j in range(K) if not I[b, j] and not S[b, j]]
        has_visual_sink = any(S[b, j] for j in image)
        for h in range(H):
            for i in range(Qn):
                if not Q[b, i] or not sinks:
                    continue
                row = a[b, h, i]
                image_att = sum(float(row[j]) for j in image)
                target_att = sum(float(row[j]) for j in targets)
                if target_att <= 0:
                    continue
                if head_selection == "all":
                    chosen = True
                elif mode == "paper":
                    r = sum(float(row[j]) for j in nonsink_image) / image_att if image_att > 0 else 0.0
                    chosen = image_att >= summ and image_att > 0 and r >= rho
                else:  # the reference code: sink fraction <= rho, and only where the sample has a visual sink
                    frac = sum(float(row[j]) for j in image if S[b, j]) / image_att if image_att > 0 else 0.0
                    chosen = image_att >= summ and image_att > 0 and frac <= rho and has_visual_sink
                if not chosen:
                    continue
                selected[b, h, i] = True
                moved = p if mode == "paper" else 1 - p  # the reference code keeps p and moves 1 - p
                W = moved * sum(float(row[j]) for j in sinks)
                for j in sinks:
                    out[b, h, i, j] = (1 - moved) * row[j]
                for j in targets:
                    out[b, h, i, j] = row[j] + W * row[j] / target_att
    return out, selected


def planted_attention(seed=0, B=2, H=4, Qn=6, K=14):
    """Random causal attention with planted sinks: BOS (key 0) and visual sinks in image keys 2..9;
    head 0 parks 0.6 on the sinks, head 1 looks at non-sink image tokens."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(B, K, dtype=torch.bool)
    image[:, 2:10] = True
    sink = torch.zeros(B, K, dtype=torch.bool)
    sink[:, 0] = True
    sink[0, [3, 7]] = True
    sink[1, [5]] = True
    scores = torch.randn(B, H, Qn, K, generator=g)
    scores[:, 0] += 4.0 * sink[:, None, :]
    scores[:, 1] += 2.5 * (image & ~sink)[:, None, :]
    causal = torch.ones(Qn, K, dtype=torch.bool).tril(K - Qn)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    queries = torch.zeros(B, Qn, dtype=torch.bool)
    queries[:, 2:] = True
    return probs, sink, image, queries


CASES = [dict(mode="paper"), dict(mode="reference"), dict(mode="paper", head_selection="all"),
         dict(mode="paper", budget="text"), dict(mode="reference", rho=0.3), dict(mode="paper", rho=0.8, p=0.9)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_equals_literal(case, seed):
    probs, sink, image, queries = planted_attention(seed)
    if seed == 2:  # plain random attention, random masks
        g = torch.Generator().manual_seed(7)
        probs = torch.softmax(torch.randn(probs.shape, generator=g), dim=-1)
        sink = torch.rand(sink.shape, generator=g) < 0.3
    kw = dict(p=case.get("p", 0.6), rho=case.get("rho", 0.5), summ=0.2, mode=case["mode"])
    fast, sel = var_probs(probs, sink, image, queries, head_selection=case.get("head_selection", "image_centric"),
                          budget_target=case.get("budget", "image_nonsink"), **kw)
    slow, slow_sel = literal_var(probs, sink, image, queries, head_selection=case.get("head_selection", "image_centric"),
                                 budget=case.get("budget", "image_nonsink"), **kw)
    assert torch.equal(sel, slow_sel)
    assert sel.any() and (~sel).any()
    assert torch.allclose(fast.double(), slow, atol=1e-6, rtol=0)


def test_rows_sum_to_one_sinks_scale_exactly_budget_proportional_rest_bitwise():
    probs, sink, image, queries = planted_attention(3)
    p = 0.6
    out, sel = var_probs(probs, sink, image, queries, p=p)
    assert torch.allclose(out.sum(-1), torch.ones(out.shape[:3]), atol=1e-6)
    s = sel[..., None] & sink[:, None, None, :]
    assert torch.equal(out[s], probs[s] * (1.0 - p))  # exactly (1 - p)
    n = sel[..., None] & (image & ~sink)[:, None, None, :]
    gain = torch.where(n, out - probs, torch.zeros_like(out))
    budget = p * (probs * sink[:, None, None, :]).sum(-1)
    assert torch.allclose(gain.sum(-1)[sel], budget[sel], atol=1e-6)  # the budget lands on N ...
    ratio = torch.where(n, (out - probs) / probs, torch.nan)  # ... in proportion to a_ij
    for b, h, i in sel.nonzero().tolist():
        r = ratio[b, h, i][~torch.isnan(ratio[b, h, i])]
        assert torch.allclose(r, r[:1].expand_as(r), rtol=1e-5, atol=1e-6)
    other = ~(s | n)
    assert torch.equal(out[other], probs[other])
    assert torch.equal(out[~sel], probs[~sel])


def test_no_sinks_p0_and_random_heads():
    probs, sink, image, queries = planted_attention(4)
    out, sel = var_probs(probs, torch.zeros_like(sink), image, queries)
    assert torch.equal(out, probs) and not sel.any()
    out, sel = var_probs(probs, sink, image, queries, p=0.0)
    assert sel.any() and torch.equal(out, probs)
    _, centric = var_probs(probs, sink, image, queries)
    g = torch.Generator().manual_seed(0)
    draws = [var_probs(probs, sink, image, queries, head_selection="random", generator=g)[1] for _ in range(20)]
    eligible = queries[:, None, :] & ((probs * (image & ~sink)[:, None, None, :]).sum(-1) > 0)
    for d in draws:
        assert torch.equal(d.sum(1), centric.sum(1))  # the same number of heads per (sample, query)
        assert not (d & ~eligible).any()
    assert any(not torch.equal(d, centric) for d in draws)


@pytest.mark.parametrize("dtype,scarce", [(torch.float16, 1.5e-7), (torch.bfloat16, 1e-39), (torch.float32, 1e-40)])
def test_rows_with_almost_no_target_attention_stay_finite(dtype, scarce):
    """A row whose budget targets get less than the dtype's smallest normal number has nowhere to put the budget:
    it is not selected, since its gain p * sink / target would overflow into inf (1.8e6 past float16's 65504 here;
    ~3e39 past float32's and bfloat16's 3.4e38 for subnormal targets, which float32 probabilities inside a model
    can hold when image logits sit ~90 below a sink's). A row whose targets get a little more is selected, stays
    finite and still sums to 1 (head_selection="all", which needs nothing else of a row)."""
    K = 6  # keys: BOS sink, a visual sink, two non-sink image tokens, two text tokens
    sink = torch.tensor([[True, True, False, False, False, False]])
    image = torch.tensor([[False, True, True, True, False, False]])
    rows = torch.tensor([[0.9, 0.0, scarce, scarce, 0.05, 0.05],  # targets 2 * scarce: below the normal range
                         [0.9, 0.0, 2e-3, 2e-3, 0.048, 0.048]])  # targets 4e-3: selected
    probs = rows.to(dtype)[None, :, None, :].expand(1, 2, 1, K).contiguous()  # [batch, head, query, key]
    assert 0 < float(probs[0, 0, 0, 2]) * 2 < torch.finfo(dtype).tiny
    queries = torch.ones(1, 1, dtype=torch.bool)
    out, selected = var_probs(probs, sink, image, queries, head_selection="all")
    assert torch.isfinite(out).all()
    assert selected[0, 1, 0] and not selected[0, 0, 0]
    assert torch.equal(out[~selected], probs[~selected])
    assert torch.allclose(out.float().sum(-1), probs.float().sum(-1), atol=2e-2 if dtype != torch.float32 else 1e-6)
    assert torch.equal(out[0, 1, 0, :2], probs[0, 1, 0, :2] * (1 - 0.6))  # the sinks keep exactly 1 - p


# -- models ------------------------------------------------------------------------------------

from conftest import quiet as _quiet  # noqa: E402


@pytest.fixture(scope="module")
def organism(organism_adapter):
    from sinkscope.eval.tasks import load_samples

    adapter = organism_adapter
    samples = load_samples("demo:pope-adversarial", limit=2) + load_samples("demo:count", limit=1)
    batch = adapter.prepare([s.question for s in samples], [s.image() for s in samples])
    config = calibrate(adapter, batch, VARConfig(sink_score="rms"))  # the ground truth is measured in phi
    truth = json.loads((ORGANISM / "ground_truth.json").read_text())
    return adapter, adapter.forward_inputs(batch), config, truth


class Before(AttentionEdit):
    """Records the probabilities before the edits that follow it (an outer block runs first)."""

    def __init__(self, layers):
        self._layers, self.probs = set(layers), {}

    def layers(self, n_layers):
        return self._layers

    def edit(self, probs, *, layer, query_positions, state):
        self.probs[layer] = probs.clone()
        return probs


def test_calibrate_finds_the_planted_dims_and_a_tau_between(organism):
    adapter, _, config, truth = organism
    assert config.sink_dims == truth["sink_dims"]
    layers = truth["measured"]["layers"][2:]
    assert max(l["phi_other_max"] for l in layers) < config.tau < min(l["phi_sink_min"] for l in layers)
    assert default_layers(adapter.num_layers) == [2, 3, 4]


def test_organism_var_moves_p_of_the_planted_sinks_to_nonsink_image_tokens(organism):
    adapter, inputs, config, truth = organism
    kinds = adapter.token_kinds(inputs["input_ids"], inputs["attention_mask"])
    before = Before([2, 3, 4])
    with torch.no_grad(), edit_attention(adapter, before):
        with var(adapter, config) as run:
            out = adapter.model(**inputs, output_attentions=True)
            sinks = {l: run.sinks(l) for l in run.resolved.layers}
            selected = {l: run.selected(l) for l in run.resolved.layers}
    p = config.p
    start = kinds.visual_mask.float().argmax(1)
    for layer in (2, 3, 4):
        planted = torch.zeros_like(kinds.visual_mask)
        for b in range(planted.shape[0]):
            planted[b, start[b] + torch.tensor(truth["sink_patches"])] = True
        assert torch.equal(sinks[layer] & kinds.visual_mask, planted)  # the visual sinks are the planted ones
        assert torch.equal(sinks[layer] & ~kinds.visual_mask, kinds.bos_mask)  # and BOS is the text sink
        a0, a1, sel = before.probs[layer], out.attentions[layer], selected[layer]
        assert sel.any()
        # output_attentions returns what multiplied V: the edit of the probabilities it was given
        expect, _ = var_probs(a0, sinks[layer], kinds.visual_mask, _queries(kinds), p=p, rho=config.rho,
                              summ=config.summ)
        assert torch.equal(a1, expect)
        s = sinks[layer][:, None, None, :]
        n = (kinds.visual_mask & ~sinks[layer])[:, None, None, :]
        sink_before = (a0 * s).sum(-1)
        assert torch.allclose((a1 * s).sum(-1)[sel], (1 - p) * sink_before[sel], atol=1e-6)
        assert torch.allclose(((a1 - a0) * n).sum(-1)[sel], p * sink_before[sel], atol=1e-6)
        vis = planted[:, None, None, :] & sel[..., None]
        assert torch.equal(a1[vis], a0[vis] * (1 - p))  # each planted sink keeps exactly 1 - p
        assert torch.equal(a1[~sel], a0[~sel])  # unselected heads and queries: bitwise eager
        # selected heads are image-centric: >= summ on the image, non-sink ratio >= rho
        img = (a0 * kinds.visual_mask[:, None, None, :]).sum(-1)
        assert torch.all(img[sel] >= config.summ) and torch.all(((a0 * n).sum(-1) / img)[sel] >= config.rho)
    planted_heads = {tuple(h) for h in truth["sink_heads"]}
    for layer, head in planted_heads:  # the planted sink heads park 0.6 on the sinks: rarely image-centric
        assert selected[layer][:, head].float().mean() < selected[layer].float().mean()


def _queries(kinds):
    pos = torch.arange(kinds.kind.shape[1])[None].expand_as(kinds.kind)
    last = torch.where(kinds.visual_mask, pos, -1).amax(1)
    return kinds.text_mask & (pos > last[:, None])


@pytest.mark.parametrize("edit", ["var", "knockout"])
def test_a_static_cache_gives_the_dynamic_caches_generation(organism, edit):
    """generate with cache_implementation="static" (a KV cache longer than the sequence, its empty slots masked,
    what compiled generation uses): VAR, and knockout of the sinks, edit as with the default dynamic cache (the
    same tokens, scores within float32 rounding) and change the scores of the unedited model."""
    from sinkscope.interventions.knockout import knockout

    adapter, inputs, config, _ = organism
    kinds = adapter.token_kinds(inputs["input_ids"], inputs["attention_mask"])
    context = {"var": lambda: var(adapter, config), "knockout": lambda: knockout(adapter, kinds.bos_mask)}[edit]
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_scores=True)
    with torch.no_grad():
        plain = adapter.model.generate(**inputs, **kw)
        with context():
            dynamic = adapter.model.generate(**inputs, **kw)
        with context():
            static = adapter.model.generate(**inputs, cache_implementation="static", **kw)

    def gap(a, b):  # scores of masked-out tokens are -inf in both
        return max(float((x.clamp_min(-1e4) - y.clamp_min(-1e4)).abs().max()) for x, y in zip(a.scores, b.scores))

    assert torch.equal(static.sequences, dynamic.sequences)
    assert gap(static, dynamic) < 1e-4 < gap(dynamic, plain)


def test_unedited_layers_bitwise_and_p0_exact(organism):
    adapter, inputs, config, _ = organism
    with torch.no_grad():
        base = adapter.model(**inputs, output_attentions=True)
        with var(adapter, config):
            out = adapter.model(**inputs, output_attentions=True)
        with var(adapter, VARConfig(**{**config.__dict__, "p": 0.0}), fallback="eager") as run:
            zero = adapter.model(**inputs)
            assert run.selected(3).any()
        with var(adapter, VARConfig(**{**config.__dict__, "tau": 1e6}), fallback="eager") as run:
            none = adapter.model(**inputs)  # no token is a sink: every layer untouched
            assert not run.sinks(2).any()
    assert torch.equal(out.attentions[0], base.attentions[0]) and torch.equal(out.attentions[1], base.attentions[1])
    assert not torch.equal(out.attentions[2], base.attentions[2])
    assert torch.equal(zero.logits, base.logits)
    assert torch.equal(none.logits, base.logits)


def test_generate_with_cache_first_step_equals_full_forward(organism):
    adapter, inputs, config, _ = organism
    assert (inputs["attention_mask"] == 0).any()  # the batch is padded
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        base = adapter.model.generate(**inputs, **kw)
        with sinkscope.var(adapter, config):
            full = adapter.model(**inputs).logits[:, -1]
            gen = adapter.model.generate(**inputs, **kw, output_logits=True, return_dict_in_generate=True)
            nocache = adapter.model.generate(**inputs, **kw, use_cache=False)
    assert torch.allclose(gen.logits[0], full, atol=1e-5)
    assert torch.equal(gen.sequences, nocache)  # KV cache: sinks reused from prefill, same tokens
    assert gen.sequences.shape == base.shape


def test_enable_disable_restores(organism):
    adapter, inputs, config, _ = organism
    with torch.no_grad():
        base = adapter.model(**inputs).logits
        handle = enable(adapter.model, config)  # a plain HF model works too
        assert adapter.text_attention == "sinkscope_edit"
        on = adapter.model(**inputs).logits
        handle.disable()
        after = adapter.model(**inputs).logits
    assert not torch.equal(on, base) and torch.equal(after, base) and adapter.text_attention == "eager"


def _half_sinks_config(model, adapter, inputs) -> VARConfig:
    """Random weights have no sinks: take every dim as a sink dim and the largest tau (among the phi
    values entering layer 1) at which every row has a sink and a non-sink image token; rho = summ = 0
    so heads get selected."""
    from sinkscope.measures.sinks import phi

    dims = list(range(adapter.hidden_size))
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states[1]
    kinds = adapter.token_kinds(inputs["input_ids"], inputs["attention_mask"])
    values = phi(states, dims)
    for tau in sorted(values[kinds.real_mask].tolist(), reverse=True):
        sink = (values >= tau) & kinds.real_mask
        if sink.any(1).all() and (kinds.visual_mask & ~sink).any(1).all():
            return VARConfig(tau=tau, rho=0.0, summ=0.0, layers=[1], sink_dims=dims)
    raise AssertionError("no tau gives every row a sink and a non-sink image token")


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_generate_on_every_family_batch_of_two(family):
    tiny = tiny_models.build(family)
    adapter = adapter_for_model(tiny.model, tiny.processor)
    batch = _quiet(tiny.inputs, ["what is in the image", "describe"], [[tiny.image(0)], [tiny.image(1)]])
    inputs = adapter.forward_inputs(batch)
    config = _half_sinks_config(tiny.model, adapter, inputs)
    with torch.no_grad(), var(adapter, config) as run:
        full = tiny.model(**inputs).logits[:, -1]
        assert run.sinks(1).any() and run.selected(1).any()
        gen = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=tiny.tokenizer.pad_token_id)
        assert run.selected(1).shape[2] == 1  # the last decode step edited its generated query
    assert gen.sequences.shape[1] == inputs["input_ids"].shape[1] + 3
    assert torch.allclose(gen.logits[0], full, atol=1e-5)


def test_batch_rows_independent_padding_positions_several_images():
    tiny = tiny_models.build("llava")
    adapter = adapter_for_model(tiny.model, tiny.processor)
    questions = ["what is in the image", "compare them", "a"]
    images = [[tiny.image(0)], [tiny.image(1), tiny.image(2)], [tiny.image(3)]]
    batch = adapter.forward_inputs(_quiet(tiny.inputs, questions, images))
    config = _half_sinks_config(tiny.model, adapter, batch)
    with torch.no_grad(), var(adapter, config) as run:
        together = tiny.model(**batch).logits[:, -1]
        assert run.selected(1).any()
        for i in range(3):
            one = adapter.forward_inputs(_quiet(tiny.inputs, [questions[i]], [images[i]]))
            alone = tiny.model(**one).logits[:, -1]
            assert torch.allclose(together[i], alone[0], atol=1e-5)
        kinds = adapter.token_kinds(batch["input_ids"], batch["attention_mask"])
        assert int(kinds.image_index.amax(1)[1]) == 1  # row 1 holds two images


def test_bad_input(organism):
    adapter = organism[0]
    for bad, name in ((dict(p=1.5), "p"), (dict(rho=-0.1), "rho"), (dict(summ=2), "summ"), (dict(tau=-1.0), "tau"),
                      (dict(mode="ref"), "mode"), (dict(head_selection="some"), "head_selection"),
                      (dict(budget_target="bos"), "budget_target")):
        with pytest.raises(SinkscopeError, match=f"VARConfig.{name}"):
            VARConfig(sink_dims=[1], **bad).validate()
    with pytest.raises(SinkscopeError, match="calibrate"):
        with var(adapter, VARConfig(tau=5.0)):
            pass
    with pytest.raises(SinkscopeError, match=r"too small for the paper's tau.*calibrate"):
        with var(adapter, VARConfig(sink_dims=[1, 90], sink_score="rms")):  # phi on a narrow model needs data
            pass
    with var(adapter, VARConfig(sink_dims=[1, 90])) as run:  # auto: the layer-relative score, tau 100, as the CLI
        assert run.resolved.config.sink_score == "layer" and run.resolved.tau == 100.0
    with pytest.raises(SinkscopeError, match=r"0\.\.5"):
        with var(adapter, VARConfig(sink_dims=[1, 90], tau=5.0, layers=[6])):
            pass
    with pytest.raises(SinkscopeError, match="hidden size"):
        with var(adapter, VARConfig(sink_dims=[1, 4096], tau=5.0)):
            pass
    assert adapter.text_attention == "eager"
    assert math.isclose(VARConfig().p, 0.6) and VARConfig().rho == 0.5 and VARConfig().summ == 0.2


class Steps(AttentionEdit):
    """Records, at every forward step, the probabilities of its layers and the step's key masks."""

    def __init__(self, layers):
        self._layers, self.seen = set(layers), []

    def layers(self, n_layers):
        return self._layers

    def edit(self, probs, *, layer, query_positions, state):
        self.seen.append((layer, state.past_length, probs.clone()))
        return probs


def test_decode_steps_edit_the_prompt_keys_as_the_general_path(organism):
    """At a decode step VAR reads and scales only the prompt's keys, with masks built once per prompt; its result
    equals var_probs on the whole row (generated keys: neither sink nor image) and the paper's literal equations."""
    adapter, inputs, config, _ = organism
    layers = [2, 3]
    before, after = Steps(layers), Steps(layers)
    with torch.no_grad(), edit_attention(adapter, before):
        with var(adapter, config) as run, edit_attention(adapter, after):
            adapter.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            sinks = {layer: run.sinks(layer) for layer in layers}
    kinds = adapter.token_kinds(inputs["input_ids"], inputs["attention_mask"])
    decode = [(b, a) for b, a in zip(before.seen, after.seen) if b[1] > 0]
    assert len(decode) == 3 * len(layers)
    n_selected = 0
    for (layer, past, probs), (_, _, edited) in decode:
        n_keys = probs.shape[-1]
        pad = n_keys - sinks[layer].shape[1]
        S = torch.nn.functional.pad(sinks[layer], (0, pad))
        I = torch.nn.functional.pad(kinds.visual_mask, (0, pad))
        Q = torch.ones(probs.shape[0], probs.shape[2], dtype=torch.bool)
        general, sel = var_probs(probs, S, I, Q, p=config.p, rho=config.rho, summ=config.summ)
        literal, literal_sel = literal_var(probs, S, I, Q, p=config.p, rho=config.rho, summ=config.summ)
        assert torch.equal(sel, literal_sel)
        assert torch.allclose(edited, general, atol=1e-6, rtol=0)
        assert torch.allclose(edited.double(), literal, atol=1e-6, rtol=0)
        assert torch.equal(edited[~sel], probs[~sel])  # unselected rows bitwise unchanged
        rows = sel[..., None] & S[:, None, None, :]
        assert torch.equal(edited[rows], probs[rows] * (1 - config.p))  # sinks keep exactly 1 - p
        assert torch.equal(edited[..., -pad:], probs[..., -pad:])  # generated keys untouched
        n_selected += int(sel.sum())
    assert n_selected > 0


SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::masked_select", "aten::equal")


def _reads_back(func, args) -> bool:
    """Whether an op needs a device value on the host: a scalar read, or a shape that depends on the data
    (boolean-mask indexing is `aten::index` with a bool index)."""
    name = func._schema.name
    if name in SYNC_OPS:
        return True
    if name in ("aten::index", "aten::index_put_", "aten::index_put"):
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


def _syncs_in_attention(adapter, inputs, context, new_tokens):
    """Host-sync ops dispatched from sinkscope's attention function and edits, per forward step (0 = prefill)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    inside = ("interventions/attention.py", "interventions/var.py", "interventions/knockout.py")

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.step, self.found = -1, {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if _reads_back(func, args):
                stack = traceback.extract_stack()
                frames = [f"{f.filename}:{f.lineno}" for f in stack if any(f.filename.endswith(s) for s in inside)]
                if frames and not any(f.name == "begin_forward" for f in stack):  # its one sync per prefill is allowed
                    self.found.setdefault(self.step, []).append((func._schema.name, frames[-1]))
            return func(*args, **(kwargs or {}))

    watch = Syncs()

    def count_step(module, args, kwargs):
        watch.step += 1

    with torch.no_grad(), context():
        handle = adapter.model.register_forward_pre_hook(count_step, with_kwargs=True)
        try:
            with watch:
                adapter.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                        pad_token_id=0)
        finally:
            handle.remove()
    return watch.step, watch.found


@pytest.mark.parametrize("which", ["var", "var_random_heads", "knockout"])
def test_attention_edits_never_wait_for_the_device(organism, which):
    """The attention function runs once per layer per step: neither it nor VAR or knockout reads a device value
    back (no .item(), no boolean indexing, no data-dependent shapes), at prefill or at any decode step."""
    from sinkscope.interventions.knockout import knockout

    adapter, inputs, config, _ = organism
    kinds = adapter.token_kinds(inputs["input_ids"], inputs["attention_mask"])
    contexts = {
        "var": lambda: var(adapter, config),
        "var_random_heads": lambda: var(adapter, VARConfig(**{**config.__dict__, "head_selection": "random"})),
        "knockout": lambda: knockout(adapter, kinds.bos_mask),
    }
    steps, found = _syncs_in_attention(adapter, inputs, contexts[which], new_tokens=3)
    assert steps == 2  # prefill and two decode steps were watched
    assert found == {}


def test_a_decode_step_of_var_adds_seven_operations_per_layer(organism, monkeypatch):
    """What VAR adds to a layer at a decode step, counted exactly (the launch-bound proxy of
    benchmarks/dispatch_count.py, where a GPU at batch 1 waits on kernel launches): two small products, a comparison
    and its reduction, one fused division and addition, a select and the in-place product with the row; views,
    which launch nothing, left out. A regression guard: it was 19."""
    from decode_ops import decode_step_ops

    from sinkscope.interventions.var import VAREdit

    adapter, inputs, config, _ = organism
    with torch.no_grad(), var(adapter, config) as run, decode_step_ops(monkeypatch, VAREdit) as count:
        adapter.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    n_layers = len(run.resolved.layers)
    assert count.calls == 2 * n_layers  # two decode steps
    per_layer = {name: n / count.calls for name, n in count.ops.items()}
    assert per_layer == {"bmm": 2, "ge": 1, "all": 1, "addcdiv": 1, "where": 1, "mul_": 1}, per_layer


def test_compiled_var_is_the_same_edit(organism):
    """compile=True fuses each layer's edit with torch.compile (here inductor's C++ backend): at prefill and at every
    decode step it selects the same rows and gives the same probabilities as the unfused edit (sinks still keep
    exactly 1 - p), and generate picks the same tokens."""
    adapter, inputs, config, _ = organism
    layers = list(config.layers or default_layers(adapter.num_layers))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    runs = {}
    with torch.no_grad():
        for compiled in (False, True):
            before, after = Steps(layers), Steps(layers)
            with edit_attention(adapter, before), var(adapter, config, compile=compiled) as run, \
                    edit_attention(adapter, after):
                out = adapter.model.generate(**inputs, **kw)
                sinks = {layer: run.sinks(layer) for layer in layers}
                selected = {layer: run.selected(layer) for layer in layers}  # at the last decode step
            assert (run.edit._compiled is not None) == compiled and getattr(run.edit, "_compiled_ok", False) == compiled
            runs[compiled] = (out.sequences, before.seen, after.seen, sinks, selected)
    (tokens, _, seen, sinks, selected), (tokens_c, seen_before_c, seen_c, sinks_c, selected_c) = runs[False], runs[True]
    assert torch.equal(tokens, tokens_c)
    assert len(seen) == len(seen_c) == 3 * len(layers)  # prefill and two decode steps
    for layer in layers:
        assert torch.equal(sinks[layer], sinks_c[layer]) and torch.equal(selected[layer], selected_c[layer])
    assert any(s.any() for s in selected_c.values())
    for (layer, past, probs), (_, past_c, probs_c), (_, _, raw) in zip(seen, seen_c, seen_before_c):
        assert past == past_c
        # within 2 ulp of 1.0: the fused kernel may round the gain 1 + p * sink / target once (a fused multiply-add)
        assert torch.allclose(probs, probs_c, atol=2.4e-7, rtol=0), (layer, past, float((probs - probs_c).abs().max()))
        sink_keys = torch.nn.functional.pad(sinks_c[layer], (0, raw.shape[-1] - sinks_c[layer].shape[1]))
        moved = (probs_c != raw) & sink_keys[:, None, None, :]
        assert moved.any() and torch.equal(probs_c[moved], raw[moved] * (1 - config.p))  # exactly 1 - p


def test_compile_refuses_random_heads(organism):
    adapter, _, config, _ = organism
    with pytest.raises(SinkscopeError, match="compile=True cannot draw random heads"):
        with var(adapter, VARConfig(**{**config.__dict__, "head_selection": "random"}), compile=True):
            pass


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compiled_var_on_a_tiny_llava(device):
    """compile=True on the device the model sits on (inductor's C++ backend on the CPU, Triton on a GPU; the CUDA
    case runs where a GPU is present): the same selections and probabilities as the unfused edit, prefill and decode."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    tiny = tiny_models.build("llava")
    model = tiny.model.to(device)
    adapter = adapter_for_model(model, tiny.processor)
    batch = tiny.inputs(["what is in the image", "describe"], [[tiny.image(0)], [tiny.image(1)]])
    inputs = {k: v.to(device) for k, v in adapter.forward_inputs(batch).items()}
    layers = list(range(adapter.num_layers))
    config = VARConfig(sink_dims=[0, 1], tau=1.5, sink_score="rms", layers=layers, summ=0.05, rho=0.3)
    seen = {}
    with torch.no_grad():
        for compiled in (None, False, True):  # None: no VAR
            after = Steps(layers)
            with (contextlib.nullcontext() if compiled is None else var(adapter, config, compile=compiled)), \
                    edit_attention(adapter, after):
                adapter.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
            seen[compiled] = after.seen
    assert len(seen[True]) == len(seen[False]) == 3 * len(layers)
    edited = 0
    for (layer, past, probs), (_, _, probs_c), (_, _, plain) in zip(seen[False], seen[True], seen[None]):
        assert torch.allclose(probs, probs_c, atol=1e-6, rtol=0), (device, layer, past)
        edited += int((probs_c[..., : plain.shape[-1]] != plain).any(dim=-1).sum()) if past == 0 else 0
    assert edited > 0  # VAR changed rows at prefill (the decode steps then see different tokens' states)
