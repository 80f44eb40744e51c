"""Bad data input: unreadable images and jsonl rows pointing at missing images are left out of a
run, which continues and reports them (which and why) in run.json and index.md, and loses
nothing else; a malformed jsonl line is an error naming its line number."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sinkscope.analyses.scan import ScanConfig, run_scan
from sinkscope.errors import SinkscopeError
from sinkscope.eval import tasks
from sinkscope.eval.tasks import load_samples

ASSETS = Path(__file__).resolve().parent.parent / "sinkscope" / "models" / "embedded" / "assets"
GOOD = ("a", "c", "d")


def _images(folder: Path) -> Path:
    from sinkscope import world

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(GOOD):
        world.scene("test", i).pil().save(folder / f"{name}.png")
    return folder


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(names, image_dir="imgs"):
    return [{"question_id": n, "image": f"{image_dir}/{n}.png", "text": f"is there a red circle ? {n}", "label": "no"}
            for n in names]


def _scan(out: Path, data: str, **kw) -> Path:
    if not (ASSETS / "tiny" / "config.json").exists():
        pytest.skip("embedded tiny model not built")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_scan(str(out), ScanConfig(model="tiny", data=data, limit=None, batch_size=2, calibration=2, **kw),
                 figures=False, log=lambda m: None)
    return out


def _tables(run: Path, table: str) -> pd.DataFrame:
    t = pd.read_csv(run / f"{table}.csv", dtype={"sample": str})
    keys = [c for c in ("sample", "layer", "position", "head", "rank") if c in t]
    return t.sort_values(keys).reset_index(drop=True)


def test_folder_with_unreadable_images(tmp_path):
    folder = _images(tmp_path / "imgs")
    (folder / "b.png").write_bytes(b"\x89PNG not really an image" * 10)
    (folder / "e.jpg").write_bytes(b"")
    samples = load_samples(str(folder))
    assert [s.sample_id for s in samples] == list(GOOD)
    reasons = {s["sample"]: s["reason"] for s in samples.skipped}
    assert set(reasons) == {"b", "e"}
    assert "b.png" in reasons["b"] and "cannot be read" in reasons["b"]
    assert "e.jpg" in reasons["e"] and "empty" in reasons["e"]
    assert samples[:2].skipped == samples.skipped  # slicing keeps the record


def test_malformed_jsonl_line_names_its_number(tmp_path):
    _images(tmp_path / "imgs")
    path = tmp_path / "pope.jsonl"
    lines = [json.dumps(r) for r in _rows(GOOD)]
    path.write_text("\n".join(lines[:2] + ['{"question_id": 9, "image": "imgs/a.png", "text": '] + lines[2:]) + "\n")
    with pytest.raises(SinkscopeError, match=r"pope\.jsonl:3 is not valid JSON.*line 3"):
        load_samples(str(path))
    path.write_text("\n".join(lines[:1] + ["[1, 2]"] + lines[1:]) + "\n")
    with pytest.raises(SinkscopeError, match=r"pope\.jsonl:2 must be a JSON object"):
        load_samples(str(path))
    from sinkscope.eval.data import load_data  # the analyses' entry point says the same

    with pytest.raises(SinkscopeError, match=r"pope\.jsonl:2"):
        load_data(str(path))


def test_scan_skips_missing_and_unreadable_images_and_loses_nothing_else(tmp_path):
    _images(tmp_path / "imgs")
    (tmp_path / "imgs" / "b.png").write_bytes(b"\x89PNG not really an image" * 10)
    bad = _jsonl(tmp_path / "pope.jsonl", _rows(["a", "missing", "c", "b", "d"]))
    clean = _jsonl(tmp_path / "clean.jsonl", _rows(GOOD))
    run = _scan(tmp_path / "bad_run", str(bad))
    ref = _scan(tmp_path / "clean_run", str(clean))

    meta = json.loads((run / "run.json").read_text())
    skipped = {s["sample"]: s for s in meta["skipped"]}
    assert set(skipped) == {"missing", "b"} and meta["n_samples"] == 3 and meta.get("finished")
    assert skipped["missing"]["source"].endswith("pope.jsonl:2") and "does not exist" in skipped["missing"]["reason"]
    assert skipped["b"]["source"].endswith("pope.jsonl:4") and "cannot be read" in skipped["b"]["reason"]
    index = (run / "index.md").read_text()
    assert "## Skipped samples" in index and "missing.png does not exist" in index and "b.png" in index
    assert "Skipped samples" not in (ref / "index.md").read_text()
    assert sorted((run / "samples_done.txt").read_text().split()) == sorted(GOOD)
    for table in ("token_stats", "head_scores_per_sample", "sink_tokens", "massive_activations"):
        got, want = _tables(run, table), _tables(ref, table)
        assert list(got["sample"]) == list(want["sample"]), table
        num = [c for c in want.columns if pd.api.types.is_float_dtype(want[c])]
        np.testing.assert_allclose(got[num].to_numpy(float), want[num].to_numpy(float), rtol=1e-4, atol=1e-5,
                                   err_msg=table)


def test_image_that_fails_only_when_decoded_is_skipped_at_run_time(tmp_path, monkeypatch):
    """An image that passes the load-time check but cannot be decoded: its batch runs without it."""
    _images(tmp_path / "imgs")
    (tmp_path / "imgs" / "b.png").write_bytes(b"\x89PNG not really an image" * 10)
    monkeypatch.setattr(tasks, "image_problem", lambda path: None)  # the check lets everything through
    data = _jsonl(tmp_path / "pope.jsonl", _rows(["a", "b", "c", "d"]))
    run = _scan(tmp_path / "run", str(data))
    meta = json.loads((run / "run.json").read_text())
    assert [s["sample"] for s in meta["skipped"]] == ["b"] and "cannot be read" in meta["skipped"][0]["reason"]
    assert meta["n_samples"] == 3
    assert sorted((run / "samples_done.txt").read_text().split()) == sorted(GOOD)
    assert "## Skipped samples" in (run / "index.md").read_text()


def test_demo_samples_start_where_asked_and_a_start_for_a_file_is_refused(tmp_path):
    later = load_samples("demo:position", 5, start=200)
    assert [s.meta["scene"] for s in later] == list(range(200, 205))
    assert load_samples("demo:position", 5)[0].meta["scene"] == 0
    (tmp_path / "q.jsonl").write_text("")
    with pytest.raises(SinkscopeError, match="demo data only"):
        load_samples(str(tmp_path / "q.jsonl"), 5, start=3)
