"""Every analysis runs on the tiny random model of every supported family and on a tiny text-only
LLaMA (a random model has no sinks: 'none found', never a crash or a division by zero), and bad
input gives errors that name the fix."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sinkscope.analyses.contributions import ContributionsConfig, run_contributions
from sinkscope.analyses.heads import HeadsConfig, run_heads
from sinkscope.analyses.location import LocationConfig, run_location
from sinkscope.analyses.vit_sinks import VitSinksConfig, run_vit_sinks
from sinkscope.errors import SinkscopeError
from sinkscope.models import adapter_for_model
from tiny_text_models import build_text, write_prompts

ANALYSES = {
    "heads": (HeadsConfig, run_heads, "head_scores"),
    "contributions": (ContributionsConfig, run_contributions, "contributions"),
    "location": (LocationConfig, run_location, "location"),
    "vit_sinks": (VitSinksConfig, run_vit_sinks, "vit_sinks"),
}


def _run(name, out, adapter, **kw):
    cfg_cls, runner, table = ANALYSES[name]
    cfg = cfg_cls(**{"model": adapter.name, "data": "demo", "limit": 2, "batch_size": 2, "calibration": 2,
                     "n_boot": 20, **kw})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = runner(str(out), cfg, adapter=adapter, log=lambda m: None, figures=True)
    assert json.loads((folder.path / "run.json").read_text())["finished"]
    assert (folder.path / "index.md").read_text().startswith("# ")
    return folder, table


@pytest.mark.parametrize("name", list(ANALYSES))
def test_every_analysis_on_every_family(tiny, name, tmp_path):
    adapter = adapter_for_model(tiny.model, tiny.processor, name=f"tiny-{tiny.family}")
    folder, table = _run(name, tmp_path / name, adapter)
    assert (folder.path / f"{table}.csv").exists()


@pytest.mark.parametrize("name", list(ANALYSES))
def test_every_analysis_on_a_text_only_llama(name, tmp_path):
    model, tok = build_text("llama")
    adapter = adapter_for_model(model, tok, "tiny-text-llama")
    prompts = write_prompts(tmp_path / "prompts.txt", 4)
    folder, _ = _run(name, tmp_path / name, adapter, data=str(prompts))
    text = (folder.path / "index.md").read_text().lower()
    if name != "heads":
        assert "none found" in text or "no high-norm" in text or "no image" in text or "no visual" in text, text[:600]


def test_no_sinks_gives_none_found_not_nan_crash(tiny_llava, tmp_path):
    adapter = adapter_for_model(tiny_llava.model, tiny_llava.processor, name="tiny-llava")
    for name in ("contributions", "location"):
        folder, _ = _run(name, tmp_path / name, adapter, tau=1e6)  # nothing reaches tau: no visual sink
        assert "no visual sinks found" in (folder.path / "index.md").read_text().lower()


# -- bad input --------------------------------------------------------------------------------------


def test_empty_mask_folder(tmp_path):
    (tmp_path / "masks").mkdir()
    with pytest.raises(SinkscopeError, match="holds no PNG"):
        run_location(str(tmp_path / "out"), LocationConfig(model="tiny", masks=str(tmp_path / "masks")))
    with pytest.raises(SinkscopeError, match="not a folder"):
        run_location(str(tmp_path / "out"), LocationConfig(model="tiny", masks=str(tmp_path / "nope")))


def _image_folder(tmp_path, mask_size):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / "a.png")
    m = np.zeros(mask_size[::-1], dtype=np.uint8)
    m[: mask_size[1] // 2] = 7  # top half: object
    Image.fromarray(m).save(masks / "a.png")
    return images, masks


def test_mask_of_wrong_size(tiny_llava, tmp_path):
    images, masks = _image_folder(tmp_path, (16, 16))
    adapter = adapter_for_model(tiny_llava.model, tiny_llava.processor, name="tiny-llava")
    with pytest.raises(SinkscopeError, match="resize the mask"):
        run_location(str(tmp_path / "out"), LocationConfig(model="tiny-llava", data=str(images), masks=str(masks),
                                                           calibration=1), adapter=adapter, log=lambda m: None)


def test_mask_folder_end_to_end(tiny_llava, tmp_path):
    images, masks = _image_folder(tmp_path, (32, 32))
    adapter = adapter_for_model(tiny_llava.model, tiny_llava.processor, name="tiny-llava")
    folder = run_location(str(tmp_path / "out"), LocationConfig(model="tiny-llava", data=str(images), masks=str(masks),
                                                                calibration=1, n_boot=20), adapter=adapter,
                          log=lambda m: None, figures=False)
    per = pd.read_csv(folder.path / "location_per_sample.csv")
    assert (per["n_visual"] == 4).all() and (per["n_background"] == 2).all()  # 2x2 grid, bottom half background


def test_missing_mask_for_an_image(tiny_llava, tmp_path):
    images, masks = _image_folder(tmp_path, (32, 32))
    (masks / "a.png").rename(masks / "b.png")
    adapter = adapter_for_model(tiny_llava.model, tiny_llava.processor, name="tiny-llava")
    with pytest.raises(SinkscopeError, match="add a.png"):
        run_location(str(tmp_path / "out"), LocationConfig(model="tiny-llava", data=str(images), masks=str(masks),
                                                           calibration=1), adapter=adapter, log=lambda m: None)


def test_cli_bad_masks_exits_cleanly(tmp_path):
    from typer.testing import CliRunner

    from sinkscope.cli import app

    (tmp_path / "m").mkdir()
    result = CliRunner().invoke(app, ["location", "--model", "tiny", "--masks", str(tmp_path / "m"), "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 2 and "holds no PNG" in result.output


def test_location_keeps_the_datas_skipped_samples_as_records(tiny_llava, tmp_path):
    """An unreadable image skipped when the data loads is listed in run.json (setup's records) and on the page,
    beside the location's own skips; it does not break the run."""
    import json

    images, masks = _image_folder(tmp_path, (32, 32))
    (images / "broken.png").write_bytes(b"not a png")
    adapter = adapter_for_model(tiny_llava.model, tiny_llava.processor, name="tiny-llava")
    folder = run_location(str(tmp_path / "out"), LocationConfig(model="tiny-llava", data=str(images), masks=str(masks),
                                                                calibration=1, n_boot=20), adapter=adapter,
                          log=lambda m: None, figures=False)
    skipped = json.loads((folder.path / "run.json").read_text())["skipped"]
    assert [r["sample"] for r in skipped] == ["broken"] and skipped[0]["reason"]
    assert "1 samples skipped: broken:" in (folder.path / "index.md").read_text()
