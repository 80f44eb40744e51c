"""Half precision: reducers do not overflow on massive activations, and analyses and edits in
bfloat16 / float16 agree with float32 within the dtype's tolerance.

- a planted activation of 3,000 in a float16 state (3,000^2 = 9e6 is far past float16's 65,504)
  gives the right phi, RMS-normalised value and magnitudes (ground truth in float64);
- the scan of the planted organism in bfloat16 finds the planted sink dims and the same sink
  tokens as in float32, with phi and head scores within bfloat16's tolerance;
- each of these with the half-precision model on the GPU too, where CUDA is (the float32 reference on the CPU);
- knockout and VAR on the organism in bfloat16 and on the tiny LLaVA in bfloat16 and float16 (the
  organism's residual stream, 2.8e6, is past float16's range: the model itself cannot run there) change the
  logits as they do in float32, and VAR finds the same sinks and selects the same (head, query) rows.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import quiet
from sinkscope.measures import emergence, massive, sinks

MASSIVE = 3000.0


def _planted(dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """([1, 6, 64] states in `dtype` with x[0, 0, 7] = 3000, the same states in float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 64, generator=g).to(dtype)
    x[0, 0, 7] = MASSIVE
    return x, x.double()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_planted_massive_activation_does_not_overflow(dtype):
    x, ref = _planted(dtype)
    assert not torch.isfinite(x.pow(2).mean(dim=-1)).all() or dtype == torch.bfloat16  # the trap the reducers avoid
    rms = ref.pow(2).mean(dim=-1).sqrt()  # [1, token]
    want_phi = (ref[..., [7]].abs().amax(dim=-1) / rms).float()
    got = sinks.phi(x, [7])
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want_phi, rtol=1e-5, atol=1e-5)
    stored = float(ref[0, 0, 7])  # 3000 as the dtype holds it (bfloat16: 3008)
    assert abs(stored - MASSIVE) <= 16
    assert got[0, 0] == pytest.approx(stored / math.sqrt((ref[0, 0] ** 2).mean().item()), rel=1e-5)
    assert got[0, 0] > 7.9  # the massive token is near the ceiling sqrt(64) = 8
    normed = massive.rms_normalize(x)
    torch.testing.assert_close(normed, (ref / rms[..., None]).float(), rtol=1e-5, atol=1e-5)
    layer_rel = sinks.phi_layer_relative(x, [7])
    assert torch.isfinite(layer_rel).all() and layer_rel[0, 0] > 100
    top = massive.top_activations(x, torch.ones(1, 6, dtype=torch.long), k=1, sample_ids=[0], layer=0)
    assert top.iloc[0]["dim"] == 7 and top.iloc[0]["value"] == pytest.approx(stored)
    assert top.iloc[0]["rms_value"] == pytest.approx(float(want_phi[0, 0]), rel=1e-5)
    mags = massive.sample_magnitudes(x, None, k=1)
    assert mags.iloc[0]["top1"] == pytest.approx(stored)
    ratio = emergence.norm_ratio_to_median(x, position=0)
    norms = ref.norm(dim=-1)[0]
    assert ratio == pytest.approx(float(norms[0] / norms[1:].median()), rel=1e-3)


# ----------------------------------------------------------------------------- the organism


def _organism(dtype: str, device: str | None = None):
    from sinkscope.models import load

    return quiet(load, "organism", dtype=dtype, device=device)


def _needs(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA (runs on a GPU machine)")


DEVICES = ["cpu", "cuda"]  # the half-precision model's device; the float32 reference runs on the CPU


def _scan(tmp_path, name, adapter, **over):
    from sinkscope.analyses.scan import ScanConfig, run_scan

    cfg = ScanConfig(model="organism", data="demo", limit=4, batch_size=4, calibration=4, **over)
    return quiet(run_scan, str(tmp_path / name), cfg, adapter=adapter, resume=False, log=lambda m: None,
                 figures=False)


BF16_RTOL = 5e-2  # bfloat16 keeps 8 bits of mantissa (0.4%), compounded over 6 layers: the massive
# tokens' layer-relative scores (up to 1.7e6) move by up to 3.5%


@pytest.mark.parametrize("device", DEVICES)
def test_scan_in_bfloat16_agrees_with_float32(tmp_path, device):
    import json

    _needs(device)
    full = _scan(tmp_path, "f32", _organism("float32"))
    half = _scan(tmp_path, "bf16", _organism("bfloat16", device))
    dims32 = json.loads((full.path / "sink_dims.json").read_text())["dims"]
    dims16 = json.loads((half.path / "sink_dims.json").read_text())["dims"]
    assert dims32 == dims16 == [1, 90]  # the planted dims, found in both
    t32 = pd.read_csv(full.path / "token_stats.csv")
    t16 = pd.read_csv(half.path / "token_stats.csv")
    key = ["sample", "layer", "position"]
    both = t32.merge(t16, on=key, suffixes=("_32", "_16"))
    assert len(both) == len(t32) == len(t16)
    np.testing.assert_allclose(both["phi_16"], both["phi_32"], rtol=BF16_RTOL, atol=0.05)
    np.testing.assert_allclose(both["attention_received_16"], both["attention_received_32"], rtol=BF16_RTOL, atol=2e-3)
    # the planted sinks sit far from tau: every token is a sink in both or in neither
    assert (both["is_sink_16"] == both["is_sink_32"]).all()
    assert both["is_sink_32"].sum() > 0
    h32 = pd.read_csv(full.path / "head_scores.csv")
    h16 = pd.read_csv(half.path / "head_scores.csv")
    heads = h32.merge(h16, on=["layer", "head"], suffixes=("_32", "_16"))
    for col in ("image_attention", "visual_sink_attention", "visual_nonsink_ratio"):
        np.testing.assert_allclose(heads[f"{col}_16"], heads[f"{col}_32"], rtol=BF16_RTOL, atol=5e-3)


def _logits(adapter, batch, context=None):
    import contextlib

    with torch.no_grad(), (context or contextlib.nullcontext()):
        return adapter.model(**adapter.device_inputs(batch)).logits.float().cpu()


def _organism_case(dtype, device="cpu"):
    """(float32 adapter, adapter in dtype, batch, VARConfig calibrated in float32): the planted organism.

    Its residual stream reaches 2.8e6 (past float16's 65,504), so the model itself runs in
    bfloat16 only; float16 is covered on the tiny LLaVA.
    """
    from sinkscope.analyses.scan import prepare_batch
    from sinkscope.eval.tasks import load_samples
    from sinkscope.interventions.var import VARConfig
    from sinkscope.interventions.var import calibrate as var_calibrate

    full = _organism("float32")
    batch = prepare_batch(full, load_samples("demo", 4))
    config = var_calibrate(full, batch)
    assert list(config.sink_dims) == [1, 90]  # the planted dims
    return full, _organism(dtype, device), batch, VARConfig(**{**config.__dict__, "layers": list(range(2, full.num_layers - 1))})


def _tiny_case(dtype, device="cpu"):
    """The same for the tiny random LLaVA: sink dim 0 pinned, tau at the 80th percentile of phi entering layer 1."""
    import copy

    import tiny_models
    from sinkscope.interventions.var import VARConfig
    from sinkscope.models import adapter_for_model

    tiny = tiny_models.build("llava")
    full = adapter_for_model(copy.deepcopy(tiny.model), tiny.processor)
    half = adapter_for_model(copy.deepcopy(tiny.model).to(device, getattr(torch, dtype)), tiny.processor)
    batch = tiny.inputs(["describe the image", "what is in the image ?"], [[tiny.image(0)], [tiny.image(1)]])
    with torch.no_grad():
        states = full.model(**batch, output_hidden_states=True).hidden_states[1]
    tau = float(torch.quantile(sinks.phi(states, [0]).flatten(), 0.8))
    return full, half, batch, VARConfig(sink_dims=[0], tau=tau, layers=[0, 1])


# relative error ||effect_half - effect_32|| / ||effect_32|| of an edit's change of the logits
EFFECT_RTOL = {"bfloat16": 0.15, "float16": 0.03}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model,dtype", [("organism", "bfloat16"), ("tiny", "bfloat16"), ("tiny", "float16")])
def test_knockout_and_var_in_half_precision_agree_with_float32(model, dtype, device):
    from sinkscope.interventions.knockout import knockout
    from sinkscope.interventions.var import var

    _needs(device)
    full, half, batch, config = (_organism_case if model == "organism" else _tiny_case)(dtype, device)
    base32, base16 = _logits(full, batch), _logits(half, batch)
    assert torch.isfinite(base16).all()

    noise = float((base16 - base32).norm())  # what the dtype alone changes in these logits

    def agrees(effect16, effect32) -> None:
        """The edit changes the logits in the half dtype as in float32: same direction, and an error no larger
        than the dtype's tolerance on the effect plus twice its own noise on the unedited logits."""
        assert effect32.norm() > 0
        cos = float(torch.nn.functional.cosine_similarity(effect16.flatten(), effect32.flatten(), dim=0))
        # the direction can only be as sharp as the dtype's noise allows: on CPUs without native bfloat16 dot
        # products (no AVX-512 BF16) the organism's unedited logits move by about as much as the edit does
        # (noise 3.4 against an effect of 3.5), and the cosine is then about 0.94; there "same direction" means
        # clearly positive, and the error bound below carries the rest
        sharp = noise < 0.25 * float(effect32.norm())
        assert cos > (0.95 if sharp else 0.5), (f"{model} {dtype}: the edit's effect points elsewhere (cosine {cos:.3f}, "
                                                f"dtype noise {noise:.3g} vs effect {float(effect32.norm()):.3g})")
        err = float((effect16 - effect32).norm())
        assert err <= EFFECT_RTOL[dtype] * float(effect32.norm()) + 2 * noise, (err, float(effect32.norm()), noise)

    runs = {}
    for name, adapter in (("32", full), ("16", half)):
        with torch.no_grad(), var(adapter, config, fallback="eager") as run:  # eager: the base's path
            logits = adapter.model(**adapter.device_inputs(batch)).logits.float().cpu()
            runs[name] = (logits, {l: run.sinks(l).cpu() for l in config.layers},
                          {l: run.selected(l).cpu() for l in config.layers})
    (var32, sinks32, sel32), (var16, sinks16, sel16) = runs["32"], runs["16"]
    for layer in config.layers:
        assert torch.equal(sinks16[layer], sinks32[layer]), f"layer {layer}: VAR finds other sinks in {dtype}"
        assert (sel16[layer] == sel32[layer]).float().mean() > 0.98  # rows at the rho / summ border may flip
    assert any(s.any() for s in sinks32.values()) and any(s.any() for s in sel32.values())
    agrees(var16 - base16, var32 - base32)

    key_mask = torch.stack([sinks32[l] for l in config.layers]).any(dim=0)
    ko32 = _logits(full, batch, knockout(full, key_mask, fallback="eager"))
    ko16 = _logits(half, batch, knockout(half, key_mask, fallback="eager"))
    agrees(ko16 - base16, ko32 - base32)
