"""Family adapters on tiny random models of every family (built offline, see tiny_models.py).

(a) structure: sizes, head_dim, eps, and that final_norm / unembed / attention(i) are the
    modules the forward actually runs; (b) two images in one prompt: token kinds agree with
    the placeholder ids, the processor and the model's own per-image feature counts, and the
    forward accepts the inputs; (c) padded batches; (d) registry; (e) load() from disk.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import FAMILIES, HEADS, HIDDEN, KV_HEADS, LAYERS

from sinkscope.models import BOS, GENERATED, PAD, TEXT, SinkscopeError, UnsupportedModelError, load
from sinkscope.models.gemma3 import Gemma3Adapter
from sinkscope.models.llava import LlavaAdapter
from sinkscope.models.llava_next import LlavaNextAdapter
from sinkscope.models.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from sinkscope.models.registry import adapter_for_config, adapter_for_model, supported

EXPECTED = {"llava": LlavaAdapter, "llava_next": LlavaNextAdapter, "qwen2_vl": Qwen2VLAdapter,
            "qwen2_5_vl": Qwen2_5_VLAdapter, "gemma3": Gemma3Adapter}
DIFFERENT_SIZES = ("llava_next", "qwen2_vl", "qwen2_5_vl")  # families whose token count depends on image size
QWEN = ("qwen2_vl", "qwen2_5_vl")


def _adapter(tiny):
    return adapter_for_model(tiny.model, tiny.processor)


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", None) or norm.eps)


def _model_image_token_counts(tiny, batch) -> list[int]:
    """Features per image as the model computes them (its get_image_features)."""
    kwargs = {k: batch[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in batch}
    with torch.no_grad():
        feats = tiny.model.model.get_image_features(**kwargs, return_dict=True).pooler_output
    return [int(f.shape[0]) for f in feats]


def _first_token(tiny) -> int:
    """What BOS should be: the tokenizer's BOS, or <|im_start|> for Qwen (which has none)."""
    tok = tiny.tokenizer
    return tok.convert_tokens_to_ids("<|im_start|>") if tiny.family in QWEN else tok.bos_token_id


@pytest.fixture(scope="session")
def two_image_batch(tiny):
    """One chat prompt with image(0) then image(1), through adapter.prepare (template + processor)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _adapter(tiny).prepare(["describe both images"], [[tiny.image(0), tiny.image(1)]])


@pytest.fixture(scope="session")
def padded_batch(tiny):
    """Two chat prompts of different lengths (two images / one image), left-padded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _adapter(tiny).prepare(["describe both images", "what ?"],
                                      [[tiny.image(0), tiny.image(1)], [tiny.image(1)]])


def _forward(tiny, adapter, batch):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Qwen's vision tower warns that sdpa gives no attentions
        return tiny.model(**adapter.forward_inputs(batch), output_attentions=True, output_hidden_states=True)


# -- (a) structure --------------------------------------------------------------------------------

def test_structure(tiny):
    ad = _adapter(tiny)
    assert type(ad) is EXPECTED[tiny.family] and ad.family == tiny.family
    assert tiny.model.__class__ is ad.model_class()
    tc = tiny.model.config.get_text_config()
    assert ad.num_layers == LAYERS == tc.num_hidden_layers
    assert (ad.hidden_size, ad.num_heads, ad.num_kv_heads) == (HIDDEN, HEADS, KV_HEADS)
    assert ad.head_dim == (16 if tiny.family == "gemma3" else HIDDEN // HEADS)  # Gemma 3 sets head_dim explicitly
    for i in range(ad.num_layers):
        attn = ad.attention(i)
        assert attn is ad.layers[i].self_attn and attn.layer_idx == i
        assert attn.head_dim == ad.head_dim
        assert attn.q_proj.out_features == ad.num_heads * ad.head_dim
        assert attn.k_proj.out_features == ad.num_kv_heads * ad.head_dim
    assert ad.rms_norm_eps == _eps(ad.final_norm) == _eps(ad.layers[0].input_layernorm) == tc.rms_norm_eps
    assert ad.unembed is tiny.model.get_output_embeddings()
    assert ad.unembed.out_features == tc.vocab_size
    assert ad.image_token_ids == (tiny.image_token_id,)
    if tiny.family == "gemma3":  # stored as image_token_index (image_token_id is an alias)
        assert ad.image_token_ids == (tiny.model.config.image_token_index,)
    assert ad.text_attention == "eager"
    d = ad.describe()
    assert d["family"] == tiny.family and d["layers"] == LAYERS and d["image_token_ids"] == [tiny.image_token_id]


def test_modules_are_those_the_forward_uses(tiny, two_image_batch):
    """final_norm takes the last layer's output, unembed turns its output into the logits,
    and attention(i) returns the probabilities the model reports for layer i."""
    ad = _adapter(tiny)
    seen: dict = {}
    hooks = [ad.layers[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("last", o)),
             ad.final_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", (i[0], o))),
             ad.unembed.register_forward_hook(lambda m, i, o: seen.__setitem__("unembed", (i[0], o)))]
    hooks += [ad.attention(k).register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(("attn", k), o[1]))
              for k in range(ad.num_layers)]
    try:
        out = _forward(tiny, ad, two_image_batch)
    finally:
        for h in hooks:
            h.remove()
    last = seen["last"][0] if isinstance(seen["last"], tuple) else seen["last"]
    norm_in, norm_out = seen["norm"]
    assert torch.equal(norm_in, last)
    assert torch.equal(seen["unembed"][0], norm_out)
    assert torch.equal(seen["unembed"][1], out.logits)
    torch.testing.assert_close(ad.unembed(ad.final_norm(last)), out.logits)
    for k in range(ad.num_layers):
        assert torch.equal(seen[("attn", k)], out.attentions[k])


# -- (b) two images in one prompt -----------------------------------------------------------------

def test_two_images_token_kinds(tiny, two_image_batch):
    ad, b = _adapter(tiny), two_image_batch
    ids, mask = b["input_ids"], b["attention_mask"]
    kinds = ad.token_kinds(ids, mask)
    assert torch.equal(kinds.visual_mask, ids == tiny.image_token_id)

    idx = kinds.image_index[0]
    vis = kinds.visual_mask[0]
    assert set(idx[vis].tolist()) == {0, 1} and (idx[~vis] == -1).all()
    assert (idx == 0).nonzero().max() < (idx == 1).nonzero().min()
    counts = [int((idx == k).sum()) for k in (0, 1)]
    assert counts == _model_image_token_counts(tiny, b)  # the model's own rule, per image
    if tiny.family in DIFFERENT_SIZES:
        assert counts[0] != counts[1], "the two test images should differ in token count"

    # BOS: the first real token, and only it
    assert kinds.bos_mask[0].nonzero().flatten().tolist() == [0]
    assert int(ids[0, 0]) == _first_token(tiny)
    if tiny.tokenizer.bos_token_id is not None:  # template BOS + tokenizer BOS leave exactly one
        assert int((ids[0] == tiny.tokenizer.bos_token_id).sum()) == 1
    assert ((kinds.kind[0] == TEXT) | vis | kinds.bos_mask[0]).all()

    if tiny.family == "gemma3":  # boi / eoi frame the image but are text; token_type_ids marks the image
        cfg = tiny.model.config
        for tid in (cfg.boi_token_index, cfg.eoi_token_index):
            assert int((ids[0] == tid).sum()) == 2 and (kinds.kind[ids == tid] == TEXT).all()
        assert torch.equal(b["token_type_ids"].bool(), kinds.visual_mask)
    if tiny.family in QWEN:  # vision_start / vision_end are text; mm_token_type_ids marks the image
        cfg = tiny.model.config
        for tid in (cfg.vision_start_token_id, cfg.vision_end_token_id):
            assert int((ids[0] == tid).sum()) == 2 and (kinds.kind[ids == tid] == TEXT).all()
        assert torch.equal(b["mm_token_type_ids"] == 1, kinds.visual_mask)
        assert b["image_grid_thw"].shape == (2, 3)


def test_two_images_forward(tiny, two_image_batch):
    ad, b = _adapter(tiny), two_image_batch
    fwd = ad.forward_inputs(b)
    assert set(fwd) == set(b), f"forward_inputs dropped {set(b) - set(fwd)}"
    if tiny.family in QWEN:
        assert {"mm_token_type_ids", "image_grid_thw"} <= set(fwd)
    out = _forward(tiny, ad, b)
    T = b["input_ids"].shape[1]
    assert len(out.attentions) == LAYERS
    # causal, except that Gemma 3 image tokens see their whole image (needs token_type_ids)
    image_rows = b["token_type_ids"][0].bool() if tiny.family == "gemma3" else torch.zeros(T, dtype=torch.bool)
    for a in out.attentions:
        assert a.shape == (1, HEADS, T, T)
        torch.testing.assert_close(a.sum(-1), torch.ones(1, HEADS, T))
        future = a[0].triu(1)
        assert torch.all(future[:, ~image_rows] == 0)
        assert bool(image_rows.any()) == bool((future[:, image_rows] > 0).any())


def test_qwen_video_tokens_are_visual():
    import tiny_models

    tiny = tiny_models.build("qwen2_vl")
    ad, cfg = _adapter(tiny), tiny.model.config
    s, e, img, vid = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id
    ids = torch.tensor([[s, img, img, e, s, vid, vid, vid, e, 30]])
    kinds = ad.token_kinds(ids)
    assert kinds.visual_mask[0].tolist() == [False, True, True, False, False, True, True, True, False, False]
    assert kinds.image_index[0].tolist() == [-1, 0, 0, -1, -1, 1, 1, 1, -1, -1]
    assert kinds.kind[0, 0] == BOS


# -- (c) padding ----------------------------------------------------------------------------------

def test_padding(tiny, padded_batch):
    ad, b = _adapter(tiny), padded_batch
    ids, mask = b["input_ids"], b["attention_mask"]
    assert (mask[1] == 0).any() and (mask[0] == 1).all()  # row 1 is shorter, left-padded
    kinds = ad.token_kinds(ids, mask)
    assert (kinds.kind[mask == 0] == PAD).all() and (kinds.kind[mask == 1] != PAD).all()
    assert torch.equal(kinds.real_mask, mask.bool())
    first_real = mask.argmax(1)
    for r in range(2):
        assert kinds.bos_mask[r].nonzero().flatten().tolist() == [int(first_real[r])]
        assert int(ids[r, first_real[r]]) == _first_token(tiny)
    assert torch.equal(kinds.visual_mask, (ids == tiny.image_token_id) & mask.bool())
    assert set(kinds.image_index[0][kinds.visual_mask[0]].tolist()) == {0, 1}
    assert set(kinds.image_index[1][kinds.visual_mask[1]].tolist()) == {0}
    per_image = [int((kinds.image_index[r] == k).sum()) for r, n in ((0, 2), (1, 1)) for k in range(n)]
    assert per_image == _model_image_token_counts(tiny, b)

    # the same rows right-padded: the same kinds, moved
    n_pad = (mask == 0).sum(1)
    right_ids = torch.stack([torch.roll(t, -int(n_pad[r])) for r, t in enumerate(ids)])
    right_mask = torch.stack([torch.roll(m, -int(n_pad[r])) for r, m in enumerate(mask)])
    right = ad.token_kinds(right_ids, right_mask)
    for r in range(2):
        assert torch.equal(right.kind[r], torch.roll(kinds.kind[r], -int(n_pad[r])))
        assert torch.equal(right.image_index[r], torch.roll(kinds.image_index[r], -int(n_pad[r])))

    # generated tokens after the prompt
    gen = ad.token_kinds(ids, mask, prompt_length=ids.shape[1] - 1)
    assert (gen.kind[:, -1] == GENERATED).all() and (gen.kind[:, :-1] == kinds.kind[:, :-1]).all()

    out = _forward(tiny, ad, b)
    T = ids.shape[1]
    assert all(a.shape == (2, HEADS, T, T) for a in out.attentions)
    assert torch.isfinite(out.logits[mask.bool()]).all()


# -- (d) registry ---------------------------------------------------------------------------------

def test_registry_picks_adapter(tiny):
    cfg = tiny.model.config
    assert adapter_for_config(cfg) is EXPECTED[tiny.family]  # by model_type (fresh configs have no architectures)
    by_arch = copy.deepcopy(cfg)
    by_arch.architectures = [type(tiny.model).__name__]
    assert adapter_for_config(by_arch) is EXPECTED[tiny.family]
    assert type(adapter_for_model(tiny.model)) is EXPECTED[tiny.family]


def test_registry_unknown_model():
    from transformers import BertConfig

    assert set(supported()) == set(FAMILIES) | {"causal_lm"}  # LMM families + plain causal LMs
    with pytest.raises(UnsupportedModelError) as err:
        adapter_for_config(BertConfig(architectures=["BertForMaskedLM"]))
    msg = str(err.value)
    assert "BertForMaskedLM" in msg
    for fam, archs in supported().items():
        assert fam in msg and all(a in msg for a in archs)
    with pytest.raises(UnsupportedModelError, match="bert"):
        adapter_for_config(BertConfig())


# -- (e) load() -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory, tiny_llava):
    path = tmp_path_factory.mktemp("tiny_llava")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_llava.model.save_pretrained(path)
        tiny_llava.processor.save_pretrained(path)
    assert (path / "model.safetensors").exists()
    return path


def test_load_round_trip(saved_llava, tiny_llava):
    from transformers import LlavaForConditionalGeneration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = load(str(saved_llava))
        default = LlavaForConditionalGeneration.from_pretrained(saved_llava).config.vision_config._attn_implementation
    assert type(ad) is LlavaAdapter and ad.name == str(saved_llava)
    assert type(ad.processor).__name__ == "LlavaProcessor"
    assert not ad.model.training
    assert ad.text_attention == "eager" == ad.model.config.text_config._attn_implementation
    assert default != "eager"  # so the next line would catch us switching the vision tower
    assert ad.model.config.vision_config._attn_implementation == default
    assert ad.model.model.vision_tower.config._attn_implementation == default
    batch = ad.prepare(["what is in the image ?"], [tiny_llava.image(0)])
    with torch.no_grad():
        got = ad.model(**ad.forward_inputs(batch)).logits
        want = tiny_llava.model(**ad.forward_inputs(batch)).logits
    torch.testing.assert_close(got, want)


def test_load_bad_paths(tmp_path):
    with pytest.raises(SinkscopeError, match="does not exist"):
        load("/nonexistent/model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SinkscopeError, match="no config.json"):
        load(str(empty))
    afile = tmp_path / "weights.safetensors"
    afile.write_bytes(b"")
    with pytest.raises(SinkscopeError, match="is a file"):
        load(str(afile))


def test_load_refuses_pickle_weights(tmp_path, tiny_llava):
    """A directory with only pytorch_model.bin loads in plain transformers but not in sinkscope."""
    from transformers import LlavaForConditionalGeneration

    tiny_llava.model.config.save_pretrained(tmp_path)
    torch.save(tiny_llava.model.state_dict(), tmp_path / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlavaForConditionalGeneration.from_pretrained(tmp_path)  # the checkpoint itself is fine
        with pytest.raises(SinkscopeError, match="safetensors"):
            load(str(tmp_path), load_processor=False)


def test_missing_processor_is_explained(tmp_path, tiny_llava):
    """Weights without a processor still load; asking for a prompt then says what is missing."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_llava.model.save_pretrained(tmp_path)
        adapter = load(str(tmp_path))
    assert adapter.processor is None and adapter.processor_error
    with pytest.raises(SinkscopeError, match="no processor was loaded"):
        adapter.prepare(["is there a cat ?"], [tiny_llava.image(0)])
