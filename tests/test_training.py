"""The demo training recipe on a small architecture, in seconds.

(a) a few optimiser steps on one fixed batch lower the loss (the model and the labels are wired);
(b) `train` runs all three stages end to end: checkpoint/, train_log.csv with the sink metrics,
    model/ loadable by sinkscope.models.load;
(c) determinism: two fresh runs with one seed give identical weights;
(d) resume: a second call with more stages continues from the checkpoint, and a run stopped
    mid-stage resumes from its last checkpoint; both end with the uninterrupted run's weights and
    a log with one row per logged step.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from scripts import train_tiny as demo_train
from sinkscope.models.embedded.modeling import DemoArchitecture, build_model
from scripts.train_tiny import StageConfig, TrainConfig, make_batch

SMALL = dict(text_layers=2, text_hidden=64, text_intermediate=128, text_heads=2, text_kv_heads=2,
             vision_layers=1, vision_hidden=32, vision_intermediate=64, vision_heads=2)
STAGES = [("text", 3), ("align", 2), ("finetune", 3)]
TOTAL = sum(n for _, n in STAGES)


def _config(stages=STAGES, seed: int = 0) -> TrainConfig:
    return TrainConfig(seed=seed, stages=[StageConfig(name, steps, 1e-3, 4) for name, steps in stages],
                       metrics_every=2, checkpoint_every=2, architecture=DemoArchitecture(**SMALL))


def _train(out: Path, config: TrainConfig, logs: list[str] | None = None, log=None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return demo_train.train(out, config, log=log or (logs.append if logs is not None else (lambda m: None)))


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# -- (a) the loss goes down --------------------------------------------------------------------


def test_few_steps_on_one_batch_lower_the_loss():
    model = build_model(DemoArchitecture(**SMALL), seed=0)
    model.train()
    batch = make_batch("finetune", "train", list(range(8)))
    assert (batch["labels"] != demo_train.IGNORE).any()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_text_stage_labels_every_token_but_images():
    ids, labels = demo_train.text_example("train", 0)
    assert ids[0] == demo_train.BOS_ID and labels[0] == demo_train.IGNORE
    assert demo_train.IMAGE_ID not in ids
    assert labels[1:] == ids[1:]
    ids, labels = demo_train.image_example("train", 0, captions_only=True)
    assert ids.count(demo_train.IMAGE_ID) == 64
    assert all(lab == demo_train.IGNORE for i, lab in zip(ids, labels) if i == demo_train.IMAGE_ID)


# -- (b)-(d) the recipe --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "full"
    logs: list[str] = []
    final = _train(out, _config(), logs)
    assert final == out / "model"
    assert not any("resuming" in m for m in logs)
    return out


def _progress(out: Path) -> dict:
    return json.loads((out / "checkpoint" / "progress.json").read_text())


def test_train_end_to_end(full_run):
    out = full_run
    for name in ("model.safetensors", "optimizer.pt", "progress.json"):
        assert (out / "checkpoint" / name).exists(), name
    assert not list((out / "checkpoint").glob("*.tmp"))
    progress = _progress(out)
    assert progress["global_step"] == TOTAL and progress["stage_index"] == len(STAGES)
    assert progress["next_sample"] == 4 * TOTAL  # each step draws the next 4 training scenes
    config = json.loads((out / "train_config.json").read_text())
    assert config["architecture"]["text_layers"] == 2 and [s["name"] for s in config["stages"]] == [
        "text", "align", "finetune"]

    log = pd.read_csv(out / "train_log.csv")
    layers = SMALL["text_layers"]
    for column in ["global_step", "stage", "loss", "lr", "sink_0.3", "answer_token_accuracy"] + [
            f"{m}_L{i}" for i in range(layers) for m in ("bos_attention", "bos_attention_max_head",
                                                         "bos_residual_ratio", "bos_value_ratio",
                                                         "top_activation_ratio", "top_activation_dim")]:
        assert column in log.columns, column
    assert f"bos_attention_L{layers}" not in log.columns
    # logged every 2 steps and at the end of each stage
    assert log["global_step"].tolist() == [2, 3, 4, 5, 6, 8]
    assert log["stage"].tolist() == ["text", "text", "align", "align", "finetune", "finetune"]
    assert log["loss"].gt(0).all() and log["sink_0.3"].between(0, 1).all()
    assert log[[f"bos_attention_L{i}" for i in range(layers)]].stack().between(0, 1).all()

    from sinkscope.models import load

    adapter = load(str(out / "model"))
    assert adapter.family == "llava" and adapter.num_layers == layers and adapter.hidden_size == 64
    assert adapter.text_attention == "eager"
    from sinkscope import world

    batch = adapter.prepare(["how many objects are there ?"], [world.scene("test", 0).pil()])
    ids = batch["input_ids"][0]
    assert ids[0] == demo_train.BOS_ID and int((ids == demo_train.IMAGE_ID).sum()) == 64
    with torch.no_grad():
        logits = adapter.model(**adapter.forward_inputs(batch)).logits
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights(full_run, tmp_path):
    _train(tmp_path / "again", _config())
    _assert_same_weights(full_run / "model", tmp_path / "again" / "model")
    # and another seed gives other weights
    other = build_model(DemoArchitecture(**SMALL), seed=1).state_dict()
    first = build_model(DemoArchitecture(**SMALL), seed=0).state_dict()
    assert not all(torch.equal(other[k], first[k]) for k in first)


def test_more_stages_continue_from_the_checkpoint(full_run, tmp_path):
    out = tmp_path / "run"
    _train(out, _config(STAGES[:2]))
    assert _progress(out)["global_step"] == 5
    logs: list[str] = []
    _train(out, _config(), logs)
    assert any("resuming from global step 5" in m for m in logs), logs
    assert _progress(out)["global_step"] == TOTAL  # continued, did not restart from 0
    log = pd.read_csv(out / "train_log.csv")
    assert log["global_step"].tolist() == [2, 3, 4, 5, 6, 8]
    _assert_same_weights(full_run / "model", out / "model")


class _Stop(Exception):
    pass


def test_resume_after_a_stop_mid_stage(full_run, tmp_path):
    out = tmp_path / "run"

    def stop_at_last_step(message: str) -> None:
        if message.startswith("[finetune] step 8 "):
            raise _Stop(message)

    with pytest.raises(_Stop):
        _train(out, _config(), log=stop_at_last_step)
    progress = _progress(out)  # last checkpoint: mid-way through the finetune stage
    assert progress["global_step"] == 6 and progress["stage_index"] == 2 and progress["step_in_stage"] == 1
    assert not (out / "model").exists()
    logs: list[str] = []
    _train(out, _config(), logs)
    assert any("resuming from global step 6" in m for m in logs), logs
    assert _progress(out)["global_step"] == TOTAL
    log = pd.read_csv(out / "train_log.csv")
    assert log["global_step"].tolist() == [2, 3, 4, 5, 6, 8]  # the step logged before the stop: once
    _assert_same_weights(full_run / "model", out / "model")
    full_log = pd.read_csv(full_run / "train_log.csv")
    pd.testing.assert_frame_equal(log.drop(columns="seconds"), full_log.drop(columns="seconds"),
                                  check_exact=False, rtol=1e-5, atol=1e-6)
