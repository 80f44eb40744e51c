"""Shared fixtures: tiny random LMMs of every supported family (see tests/tiny_models.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread; more threads on a shared 2-core machine oversubscribe."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", params=tiny_models.FAMILIES)
def tiny(request) -> tiny_models.Tiny:
    """One tiny model + real processor per family (shared: do not modify the model)."""
    return tiny_models.build(request.param)


@pytest.fixture(scope="session")
def tiny_llava() -> tiny_models.Tiny:
    return tiny_models.build("llava")


ORGANISM_ASSET = Path(__file__).resolve().parent.parent / "sinkscope" / "models" / "embedded" / "assets" / "organism"


def quiet(fn, *args, **kwargs):
    """Call fn with warnings silenced (model loading warns about optional packages)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="session")
def organism_adapter():
    """The shipped planted organism, loaded once (interventions restore it; do not modify it)."""
    from sinkscope.models import load

    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built (python -m sinkscope.models.embedded.organism)")
    return quiet(load, "organism")


def feed_layers_split_across_devices(part, batch: int, seed: int) -> None:
    """Hand an in-trace part 5 layers of random states [batch, 9, 16] and probabilities [batch, 4, 9, 9] as a model
    split across devices leaves them: layers 0-1 on the CPU, 2-4 on the meta device, and residual states 0-2 on the
    CPU (a layer's input may still sit where the previous layer left it)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for layer in range(5):
        states = torch.randn(batch, 9, 16, generator=g)
        probs = torch.softmax(torch.randn(batch, 4, 9, 9, generator=g), dim=-1)
        part.residual(layer, states if layer < 3 else states.to("meta"))
        part.attention(layer, probs if layer < 2 else probs.to("meta"))
