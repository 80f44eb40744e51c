"""Shared fixtures: tiny random LMMs of every supported family (see tests/tiny_models.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session", params=tiny_models.FAMILIES)
def tiny(request) -> tiny_models.Tiny:
    """One tiny model + real processor per family (shared: do not modify the model)."""
    return tiny_models.build(request.param)


@pytest.fixture(scope="session")
def tiny_llava() -> tiny_models.Tiny:
    return tiny_models.build("llava")
