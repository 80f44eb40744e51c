"""Training the demo (vision tower, projector, LoRA on the pretrained SmolLM2): a few steps, resumed exactly."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
import torch

from sinkscope.models.embedded import smollm, smolvlm
from scripts.train_smolvlm import RecipeConfig, Stage, export_checkpoint, train

pytestmark = pytest.mark.skipif(importlib.util.find_spec(smollm.PACKAGE) is None,
                                reason=f"{smollm.PACKAGE_SPEC} is not installed (`make setup` installs it)")


def _config() -> RecipeConfig:
    return RecipeConfig(stages=[Stage("vision", 3, 1e-3, 4, 1), Stage("align", 1, 1e-3, 2, 1),
                                Stage("instruct", 2, 1e-3, 2, 1)],
                        vision=smolvlm.VisionArchitecture(hidden=32, layers=1, heads=2, intermediate=64),
                        lora_rank=2, metric_scenes=2, metrics_every=100, checkpoint_every=1, max_turns=2, threads=1,
                        dtype="float32")  # bitwise replay is checked in float32


def test_a_short_recipe_trains_resumes_exactly_and_ships_only_trained_parts(tmp_path, monkeypatch):
    quiet = lambda m: None  # noqa: E731
    whole = train(tmp_path / "whole", _config(), log=quiet)
    state = smolvlm.trained_state_from_dir(whole)
    assert any(".lora_" in k for k in state) and any(k.startswith("model.vision_tower.") for k in state)
    assert not any(k.startswith("model.language_model.") and ".lora_" not in k for k in state)  # no LLM weights

    calls = {"n": 0}
    step = torch.optim.AdamW.step

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # inside the instruct stage
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "split", _config(), log=quiet)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    resumed = train(tmp_path / "split", _config(), log=quiet)
    other = smolvlm.trained_state_from_dir(resumed)
    assert set(other) == set(state)
    for key in state:
        assert torch.equal(other[key], state[key]), key
    log = pd.read_csv(tmp_path / "split" / "emergence.csv")
    assert log["global_step"].is_unique and {"pope_random", "visual_sinks_layer_score_L2"} <= set(log.columns)
    exported = export_checkpoint(tmp_path / "split", log=quiet)  # the same parts, from the last checkpoint
    assert all(torch.equal(smolvlm.trained_state_from_dir(exported)[k], state[k]) for k in state)
