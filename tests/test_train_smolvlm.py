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


def test_emergence_tau_is_the_shared_rule_on_the_same_phi():
    """emergence_metrics takes phi's tau from `sinks.sink_threshold` ("rms") on its own phi (layers >= 2, BOS and
    padding left out) and logs which rule gave it; a given tau is passed through the same rule."""
    from scripts.train_smolvlm import (TAU_RULE, TAU_START_LAYER, Encoder, emergence_metrics, emergence_prompts,
                                       pixel_values)
    from sinkscope import world
    from sinkscope.kinds import BOS, PAD, TEXT, VISUAL
    from sinkscope.measures import sinks

    torch.manual_seed(0)
    llm_dir = smollm.ensure_cached(log=lambda m: None)
    model = smolvlm.assemble(smolvlm.build_config(llm_dir, _config().vision), llm_dir).eval()
    encoder = Encoder(smolvlm.build_processor(llm_dir).tokenizer, model.config.image_token_id)
    n = 2
    row = emergence_metrics(model, encoder, n_scenes=n)
    assert row["tau_rule"] == TAU_RULE == "sinks.sink_threshold(rms)"

    # the same prompts and forward pass, phi recomputed here, then the shared rule
    ids, mask = emergence_prompts(encoder, n)
    pixel = torch.stack([pixel_values(world.scene("validation", i).image) for i in range(n)])
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})  # as emergence_metrics runs
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixel, output_hidden_states=True)
    hidden = model.config.text_config.hidden_size
    states = torch.stack(out.hidden_states[:model.config.text_config.num_hidden_layers], 1)
    dims = [int(d) for d in str(row["sink_dims"]).split()] if isinstance(row["sink_dims"], str) else []
    phi = sinks.phi(states, dims) if dims else torch.zeros(states.shape[:3])
    kinds = torch.full(ids.shape, TEXT)
    kinds[ids == encoder.image_token_id] = VISUAL
    kinds[torch.arange(n), mask.float().argmax(1)] = BOS
    kinds[mask == 0] = PAD
    expected = sinks.sink_threshold("rms", hidden, phi[:, TAU_START_LAYER:], token_kinds=kinds, has_dims=bool(dims))
    assert row["tau_method"] == expected.method
    assert row["tau"] == pytest.approx(expected.value, rel=1e-5)
    if dims and hidden < 1600:  # SmolLM2-135M: sqrt(576) = 24 < 40, so the rule reads phi (the gap rule)
        assert row["tau_method"] == "gap"

    given = emergence_metrics(model, encoder, n_scenes=n, tau=5.0)
    assert given["tau"] == 5.0 and given["tau_method"] == (sinks.sink_threshold("rms", hidden, tau=5.0).method
                                                            if dims else "none")


def test_a_run_can_start_from_another_runs_vision_tower(tmp_path):
    """--vision-from: the tower comes from the given folder and stays as it was (frozen after its stage), the
    projector starts fresh; a tower of another architecture is refused with the fix named."""
    from sinkscope.errors import SinkscopeError

    quiet = lambda m: None  # noqa: E731
    first = _config()
    first.stages = [Stage("vision", 2, 1e-3, 4, 1)]
    shared = smolvlm.trained_state_from_dir(train(tmp_path / "vision", first, log=quiet))
    second = _config()
    second.stages = [Stage("instruct", 1, 1e-3, 2, 1)]
    second.vision_from = str(tmp_path / "vision" / "model")
    state = smolvlm.trained_state_from_dir(train(tmp_path / "variant", second, log=quiet))
    tower = [k for k in shared if k.startswith("model.vision_tower.")]
    assert tower and all(torch.equal(state[k], shared[k]) for k in tower)
    projector = [k for k in shared if k.startswith("model.multi_modal_projector.")]
    assert any(not torch.equal(state[k], shared[k]) for k in projector)  # trained by the variant's instruct step

    wider = _config()
    wider.stages = [Stage("instruct", 1, 1e-3, 2, 1)]
    wider.vision = smolvlm.VisionArchitecture(hidden=64, layers=1, heads=2, intermediate=64)
    wider.vision_from = second.vision_from
    with pytest.raises(SinkscopeError, match="vision architecture"):
        train(tmp_path / "wider", wider, log=quiet)
