"""Sink-signature edits (sinkscope.interventions.sink_signature): exactness of the pure rewrites, the
invariants on tiny random models (empty mask = unmodified forward bitwise; only the chosen
coordinates change; generate with KV cache and batches), and the planted organism's ground truth
(injecting the planted signature into an ordinary image token makes the planted heads attend to it;
the random-dimension control does not)."""

from __future__ import annotations

import warnings

import pytest
import torch

import tiny_models
from sinkscope.errors import SinkscopeError
from sinkscope.interventions.sink_signature import (SinkSignature, inject_sink, inject_states, random_dim_states,
                                                    remove_sink, remove_states, rescale_states)
from sinkscope.kinds import TokenKinds
from sinkscope.models import adapter_for_model

DIMS = (3, 17)


def _states(batch=2, tokens=6, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, dim, generator=g)


# -- pure rewrites --------------------------------------------------------------------------

def test_inject_sets_chosen_coordinates_only():
    x = _states()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2] = mask[1, [4, 5]] = True
    first = torch.tensor([0, 1])
    out = inject_states(x, mask, first, DIMS, 0.5)
    changed = torch.zeros_like(x, dtype=torch.bool)
    changed[..., list(DIMS)] = mask[..., None].expand(2, 6, 2)
    assert torch.equal(out[~changed], x[~changed])
    assert torch.equal(out[0, 2, list(DIMS)], 0.5 * x[0, 0, list(DIMS)])
    assert torch.equal(out[1, 5, list(DIMS)], 0.5 * x[1, 1, list(DIMS)])
    per_row = inject_states(x, mask, first, DIMS, torch.tensor([0.5, 2.0]))
    assert torch.equal(per_row[1, 4, list(DIMS)], 2.0 * x[1, 1, list(DIMS)])
    assert torch.equal(inject_states(x, torch.zeros_like(mask), first, DIMS, 1.0), x)


def test_remove_to_zero_and_mean():
    x = _states()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 0] = True
    zero = remove_states(x, mask, DIMS, "zero")
    assert torch.all(zero[:, 0][:, list(DIMS)] == 0) and torch.equal(zero[:, 1:], x[:, 1:])
    assert torch.equal(zero[:, 0][:, [d for d in range(32) if d not in DIMS]],
                       x[:, 0][:, [d for d in range(32) if d not in DIMS]])
    ordinary = ~mask
    mean = remove_states(x, mask, DIMS, "mean", ordinary=ordinary)
    expected = x[:, 1:][..., list(DIMS)].reshape(-1, 2).mean(0)
    assert torch.allclose(mean[0, 0, list(DIMS)], expected) and torch.equal(mean[:, 1:], x[:, 1:])
    with pytest.raises(SinkscopeError, match="ordinary"):
        remove_states(x, torch.ones_like(mask), DIMS, "mean", ordinary=torch.zeros_like(mask))
    with pytest.raises(SinkscopeError, match="zero"):
        remove_states(x, mask, DIMS, "median")


def test_controls_match_added_magnitude_and_norm():
    x = _states()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 3] = True
    ref = inject_states(x * 1.0, mask, torch.tensor([0, 0]), DIMS, 1.0)
    ref[:, 0] *= 1  # the first token itself is not chosen
    rnd = random_dim_states(x, mask, ref, dim=9)
    added = (ref - x).norm(dim=-1)
    assert torch.allclose(rnd[:, 3, 9] - x[:, 3, 9], added[:, 3])
    other = [d for d in range(32) if d != 9]
    assert torch.equal(rnd[..., other], x[..., other]) and torch.equal(rnd[:, :3], x[:, :3])
    res = rescale_states(x, mask, ref)
    assert torch.allclose(res[:, 3].norm(dim=-1), ref[:, 3].norm(dim=-1), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(res[:, 3], x[:, 3], dim=-1)
    assert torch.allclose(cos, torch.ones(2), atol=1e-6) and torch.equal(res[:, 4:], x[:, 4:])


# -- tiny models: invariants ------------------------------------------------------------------

@pytest.fixture(scope="module")
def llava():
    tiny = tiny_models.build("llava")
    adapter = adapter_for_model(tiny.model, tiny.processor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = tiny.inputs(["what is in the image", "describe"], [[tiny.image(0)], [tiny.image(1)]])
    inputs = adapter.forward_inputs(batch)
    kinds = adapter.token_kinds(inputs["input_ids"], inputs["attention_mask"])
    return tiny, adapter, inputs, kinds


def _image_mask(kinds: TokenKinds, which=(0, 2)) -> torch.Tensor:
    pos = torch.arange(kinds.kind.shape[1])[None].expand_as(kinds.kind)
    start = torch.where(kinds.visual_mask, pos, 10 ** 6).amin(1)
    mask = torch.zeros_like(kinds.visual_mask)
    for k in which:
        mask[torch.arange(mask.shape[0]), start + k] = True
    return mask


def _capture(adapter, layer, store):
    def hook(module, args, kwargs):
        store.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
    return adapter.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)


def test_empty_mask_is_unmodified_forward_bitwise(llava):
    tiny, adapter, inputs, kinds = llava
    sig = SinkSignature(DIMS, 1, tau=2.0)
    with torch.no_grad():
        base = tiny.model(**inputs, output_attentions=True)
        with inject_sink(adapter, torch.zeros_like(kinds.visual_mask), scale=1.0, signature=sig):
            out = tiny.model(**inputs, output_attentions=True)
        with remove_sink(adapter, torch.zeros_like(kinds.visual_mask), to="mean", signature=sig):
            rem = tiny.model(**inputs)
    assert torch.equal(out.logits, base.logits) and torch.equal(rem.logits, base.logits)
    assert all(torch.equal(a, b) for a, b in zip(out.attentions, base.attentions))
    assert adapter.text_attention == "eager"  # restored


@pytest.mark.parametrize("kind", ["inject", "random_dim", "rescale", "remove"])
def test_only_chosen_coordinates_change(llava, kind):
    tiny, adapter, inputs, kinds = llava
    sig = SinkSignature(DIMS, 1, tau=2.0)
    mask = _image_mask(kinds)
    before, after = [], []
    with torch.no_grad():
        h = _capture(adapter, 1, before)
        tiny.model(**inputs)
        h.remove()
        if kind == "remove":
            context = remove_sink(adapter, mask, to="zero", signature=sig)
        else:
            context = inject_sink(adapter, mask, scale=0.7, signature=sig,
                                  control=None if kind == "inject" else kind, control_dim=5)
        with context:
            h = _capture(adapter, 1, after)  # registered after the edit's hook: sees the edited state
            tiny.model(**inputs)
            h.remove()
    x, y = before[0], after[0]
    changed = (x != y)
    assert not changed[~mask].any(), "a token outside the mask changed"
    if kind in ("inject", "remove"):
        others = [d for d in range(x.shape[-1]) if d not in DIMS]
        assert not changed[..., others].any(), "a coordinate outside the sink dims changed"
        rows = torch.arange(2)
        first = kinds.bos_mask.float().argmax(1)
        want = 0.7 * x[rows, first][:, list(DIMS)] if kind == "inject" else torch.zeros(2, 2)
        for b in range(2):
            assert torch.equal(y[b][mask[b]][:, list(DIMS)], want[b].expand(int(mask[b].sum()), 2))
    elif kind == "random_dim":
        assert not changed[..., [d for d in range(x.shape[-1]) if d != 5]].any()
        assert changed[mask][:, 5].all()
    else:
        assert changed[mask].any()


def test_generate_with_kv_cache_and_batch_equals_full_forward(llava):
    """Greedy generate under an injection (prefill edited, KV cache reused) gives the logits a full
    forward over the generated sequence gives with the same injection (no cache)."""
    tiny, adapter, inputs, kinds = llava
    sig = SinkSignature(DIMS, 1, tau=2.0)
    mask = _image_mask(kinds, (1, 3))
    with torch.no_grad():
        with inject_sink(adapter, mask, scale=3.0, signature=sig):
            gen = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True, pad_token_id=tiny.tokenizer.pad_token_id)
        plain = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, pad_token_id=tiny.tokenizer.pad_token_id)
        seq = gen.sequences
        t = inputs["input_ids"].shape[1]
        full_mask = torch.nn.functional.pad(mask, (0, seq.shape[1] - t), value=False)
        attn = torch.nn.functional.pad(inputs["attention_mask"], (0, seq.shape[1] - t), value=1)
        full_inputs = {**inputs, "input_ids": seq, "attention_mask": attn}
        with inject_sink(adapter, full_mask, scale=3.0, signature=sig):
            full = tiny.model(**full_inputs).logits
    steps = torch.stack(gen.logits, dim=1)  # [batch, new, vocab]
    assert torch.allclose(steps, full[:, t - 1: seq.shape[1] - 1], atol=1e-4)
    assert not torch.allclose(torch.stack(plain.logits, 1), steps, atol=1e-4), "the injection changed nothing"


def test_sinks_target_and_bad_input(llava):
    tiny, adapter, inputs, kinds = llava
    x = []
    with torch.no_grad():
        h = _capture(adapter, 1, x)
        tiny.model(**inputs)
        h.remove()
    from sinkscope.measures.sinks import phi
    score = phi(x[0], list(DIMS))
    tau = float(score[kinds.real_mask].median())  # about half the real tokens are "sinks" by this rule
    sig = SinkSignature(DIMS, 1, tau=tau)
    with torch.no_grad(), remove_sink(adapter, "sinks", to="zero", signature=sig) as session:
        tiny.model(**inputs)
        edited = session.memory(session.edits[-1])["masks"][1]
    assert torch.equal(edited, (score >= tau) & kinds.real_mask)
    with pytest.raises(SinkscopeError, match="prompt is"):
        with inject_sink(adapter, torch.zeros(1, 3, dtype=torch.bool), signature=sig):
            tiny.model(**inputs)
    with pytest.raises(SinkscopeError, match="out of range"):
        with inject_sink(adapter, _image_mask(kinds), layer=9, signature=sig):
            pass
    with pytest.raises(SinkscopeError, match="outside the sink dims"):
        inject_sink(adapter, _image_mask(kinds), signature=sig, control="random_dim", control_dim=3).__enter__()
    with pytest.raises(SinkscopeError, match="signature"):
        inject_sink(adapter, _image_mask(kinds)).__enter__()
    assert adapter.text_attention == "eager"


# -- the planted organism: ground truth ---------------------------------------------------------

def test_organism_planted_heads_attend_to_injected_token(organism_adapter):
    """PLANTED ground truth (sinkscope/models/embedded/organism.py): the planted heads key on the planted sink dims,
    so writing the first token's sink-dim values into an ordinary image token makes them attend to it;
    the same added magnitude along a random non-sink dim does not."""
    from sinkscope.models.embedded.organism import GroundTruth
    from sinkscope.eval.tasks import load_samples
    from conftest import ORGANISM_ASSET

    adapter = organism_adapter
    truth = GroundTruth.load(ORGANISM_ASSET / "ground_truth.json")
    samples = load_samples("demo:pope-adversarial", 4)
    batch = adapter.prepare([s.question for s in samples], [s.image() for s in samples])
    inputs = adapter.forward_inputs(batch)
    kinds = adapter.token_kinds(inputs["input_ids"], inputs["attention_mask"])
    sig = SinkSignature.discover(adapter, batch)
    assert sorted(sig.dims) == sorted(truth.sink_dims) and sig.layer == truth.massive_from_layer
    ordinary = next(p for p in range(64) if p not in truth.sink_patches)
    mask = _image_mask(kinds, (ordinary,))
    pos = torch.arange(kinds.kind.shape[1])[None]
    last = torch.where(kinds.visual_mask, pos, -1).amax(1)
    queries = kinds.text_mask & (pos > last[:, None])

    def received(out, layer, head):  # mean over text queries after the image, over the injected tokens
        p = out.attentions[layer][:, head].float()
        per_key = (p * queries[:, :, None]).sum(1) / queries.sum(1)[:, None]
        return float(per_key[mask].mean())

    with torch.no_grad():
        base = adapter.model(**inputs, output_attentions=True)
        with inject_sink(adapter, mask, scale=1.0, signature=sig):
            inj = adapter.model(**inputs, output_attentions=True)
        rng = torch.Generator().manual_seed(0)
        control_dim = int(next(d for d in torch.randperm(adapter.hidden_size, generator=rng).tolist() if d not in sig.dims))
        with inject_sink(adapter, mask, scale=1.0, signature=sig, control="random_dim", control_dim=control_dim):
            ctl = adapter.model(**inputs, output_attentions=True)
    uniform = 1.0 / float(kinds.real_mask.sum(1).float().mean())
    for layer, head in truth.sink_heads:
        b, i, c = received(base, layer, head), received(inj, layer, head), received(ctl, layer, head)
        assert b < 2 * uniform, (layer, head, b)
        assert i > 10 * b and i > 0.05, f"planted head {layer}.{head}: injected token receives {i:.3g} (baseline {b:.3g})"
        assert c < 2 * uniform, f"planted head {layer}.{head}: random-dim control receives {c:.3g}"


def test_nested_blocks_rewrite_once(llava):
    """A block nested inside another edit block runs the outer edits through the outer session; the sink edit applies once
    (the random-dim control adds its magnitude once, not twice)."""
    from sinkscope.interventions.knockout import knockout

    tiny, adapter, inputs, kinds = llava
    sig = SinkSignature(DIMS, 1, tau=2.0)
    mask = _image_mask(kinds)
    with torch.no_grad():
        with inject_sink(adapter, mask, scale=1.0, signature=sig, control="random_dim", control_dim=5):
            alone = tiny.model(**inputs).logits
            with knockout(adapter, torch.zeros_like(kinds.visual_mask)):
                nested = tiny.model(**inputs).logits
    assert torch.equal(alone, nested)


def test_remove_to_a_given_mean_per_layer(llava):
    tiny, adapter, inputs, kinds = llava
    sig = SinkSignature(DIMS, 1, tau=2.0)
    mask = _image_mask(kinds)
    vector = torch.tensor([5.0, -7.0])
    seen, untouched = [], []
    with torch.no_grad():
        with remove_sink(adapter, mask, to="chosen_mean", signature=sig, mean={1: vector}):
            h = _capture(adapter, 1, seen)
            tiny.model(**inputs)
            h.remove()
        base = tiny.model(**inputs).logits
        with remove_sink(adapter, mask, to="chosen_mean", signature=sig, mean={0: vector}):  # no vector for layer 1
            out = tiny.model(**inputs).logits
    assert torch.equal(seen[0][mask][:, list(DIMS)], vector.expand(int(mask.sum()), 2))
    assert torch.equal(out, base)


def test_remove_under_generate_equals_full_forward(llava):
    """remove_sink at prefill, then decode steps from the KV cache: the same logits as a full forward with the
    removal (to zero, and to a given mean: a mean over ordinary tokens would also average the generated ones)."""
    tiny, adapter, inputs, kinds = llava
    sig = SinkSignature(DIMS, 1, tau=2.0)
    mask = _image_mask(kinds, (0, 1, 2))
    for to, mean in (("zero", None), ("mean", torch.tensor([3.0, -2.0]))):
        with torch.no_grad():
            with remove_sink(adapter, mask, to=to, signature=sig, mean=mean):
                gen = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True, pad_token_id=tiny.tokenizer.pad_token_id)
            seq, t = gen.sequences, inputs["input_ids"].shape[1]
            attn = torch.nn.functional.pad(inputs["attention_mask"], (0, seq.shape[1] - t), value=1)
            with remove_sink(adapter, torch.nn.functional.pad(mask, (0, seq.shape[1] - t), value=False), to=to,
                             signature=sig, mean=mean):
                full = tiny.model(**{**inputs, "input_ids": seq, "attention_mask": attn}).logits
            plain = tiny.model(**inputs).logits
        assert torch.allclose(torch.stack(gen.logits, 1), full[:, t - 1: seq.shape[1] - 1], atol=1e-4), to
        assert not torch.allclose(gen.logits[0], plain[:, -1], atol=1e-4), f"removal to {to} changed nothing"
