"""The sink viewer: `sinkscope view RUN_DIR` writes one self-contained page; a real headless
Chromium (Debian's package, driven by Playwright) opens it, changes sample, layer, head and
text token, and the drawn values must equal the scan's tables and an independent trace.

Run on the planted organism: its sinks exist, so outlines are drawn.
Screenshot: tests/artifacts/viewer.png.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from sinkscope import plots, viewer
from sinkscope.cli import app

ASSETS = Path(__file__).resolve().parent.parent / "sinkscope" / "models" / "embedded" / "assets"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
INSTALL = ("install the browser test's needs: `apt-get install -y chromium` (Debian's package; Playwright's own "
           "browser download is not used) and `pip install -e .[test]` (Playwright for Python)")


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory) -> Path:
    if not (ASSETS / "organism" / "config.json").exists():
        pytest.skip("embedded organism model not built")
    from sinkscope.analyses.scan import ScanConfig, run_scan

    out = tmp_path_factory.mktemp("view") / "scan"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_scan(str(out), ScanConfig(model="organism", data="demo", limit=3, batch_size=3, calibration=3),
                 figures=False, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def page_path(organism_run) -> Path:
    result = CliRunner().invoke(app, ["view", str(organism_run), "--limit", "2"])
    assert result.exit_code == 0, result.output
    path = organism_run / "viewer.html"
    assert path.exists()
    return path


def _table(run: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(run / f"{name}.csv", dtype={"sample": str})


def test_page_is_self_contained(page_path):
    text = page_path.read_text()
    for needle in ("http://", "https://", "<link", "<script src", "<img src", "@import"):
        assert needle not in text, needle  # no network: every script, style and image is inline
    assert text.count("data:image/png;base64,") == 2  # one image per sample, inline
    data = json.loads(text.split('<script id="viewer-data" type="application/json">')[1].split("</script>")[0])
    assert [s["grid"] for s in data["samples"]] == [[8, 8], [8, 8]]
    meta = json.loads((page_path.parent / "run.json").read_text())
    assert data["sink_dims"] == meta["sink_dims"]
    # the score is named as the run used it, and both grids have a colour legend
    assert data["sink_score"] == meta["params"]["sink_score"]
    assert data["sink_score_name"] == plots.score_name(meta["params"]["sink_score"])
    for legend in ('id="attention-legend"', 'id="score-legend"', 'id="attention-max"', 'id="score-max"'):
        assert legend in text, legend


@pytest.mark.parametrize("meta,score", [
    ({"params": {"sink_score": "layer"}}, "layer"),
    ({"params": {"sink_score": "rms"}, "tau": {"method": "gap"}}, "rms"),
    ({"params": {"sink_score": "auto"}, "tau": {"method": "layer-default", "reason": ""}}, "layer"),
    ({"params": {}, "tau": {"method": "given", "reason": "tau=50 given (layer-relative score, no ceiling)"}}, "layer"),
    ({"params": {}, "tau": {"method": "paper", "reason": "the paper's tau"}}, "rms"),
])
def test_viewer_reads_the_score_the_run_used(meta, score):
    assert viewer.sink_score_of_run(meta) == score


def test_page_says_which_score_it_draws():
    data = {"model": "m", "data": "d", "run": "r", "planted": False, "tau": 100.0, "tau_method": "layer-default",
            "sink_dims": [1], "sink_score": "layer", "sink_score_name": plots.score_name("layer"),
            "sink_score_formula": plots.SCORE_FORMULAS["layer"], "layers": 2, "heads": 1, "samples": [],
            "run_nonsink_ratio": None}
    page = viewer.render(data)
    assert '"sink_score_name": "layer-relative score"' in page
    assert "(phi >=" not in page and "phi of each image token" not in page  # no fixed name for the score
    assert "${SCORE} >= ${fmt(DATA.tau)}" in page  # the readout's threshold line names the run's score


def test_view_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(app, ["view", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a run folder" in result.output and "Traceback" not in result.output


def _launch():
    sync_api = pytest.importorskip("playwright.sync_api", reason=f"Playwright is not installed; {INSTALL}")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}; {INSTALL}")
    return sync_api.sync_playwright()


def _readout(page) -> dict:
    ro = page.locator("#readout")
    names = ("sample", "layer", "head", "query", "nonsink-ratio", "image-attention", "table-nonsink-ratio", "sinks",
             "outlines-drawn", "phi", "attention", "legend-attention-max", "legend-score-max")
    return {n: ro.get_attribute(f"data-{n}") for n in names}


def _set_layer(page, layer: int) -> None:
    page.fill("#layer", str(layer))
    page.dispatch_event("#layer", "input")


def test_browser_draws_the_run_tables(organism_run, page_path):
    import torch

    import sinkscope
    from sinkscope.analyses.scan import prepare_batch, text_queries_after_image
    from sinkscope.eval.data import load_data

    tokens = _table(organism_run, "token_stats")
    heads = _table(organism_run, "head_scores_per_sample")
    sink_rows = _table(organism_run, "sink_tokens")
    done = (organism_run / "samples_done.txt").read_text().split()
    sample = done[1]
    layers_with_visual_sinks = sorted(set(sink_rows[(sink_rows["sample"] == sample)
                                                    & (sink_rows["token_kind"] == "visual")]["layer"]))
    assert layers_with_visual_sinks, "the organism's planted visual sinks should be in the scan"

    with _launch() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        errors, requests = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_path.resolve().as_uri())
        page.select_option("#sample", "1")
        page.select_option("#head", "2")
        checked = []
        for layer in (0, layers_with_visual_sinks[0]):
            _set_layer(page, layer)
            got = _readout(page)
            assert (got["sample"], int(got["layer"]), int(got["head"]), got["query"]) == (sample, layer, 2, "mean")
            # phi of each image token == token_stats.csv
            want_phi = tokens[(tokens["sample"] == sample) & (tokens["layer"] == layer)
                              & (tokens["token_kind"] == "visual")].sort_values("position")["phi"].to_numpy()
            np.testing.assert_allclose(json.loads(got["phi"]), want_phi, rtol=1e-4, atol=1e-4)
            # sinks outlined == sink_tokens.csv (visual, this sample and layer), drawn on both panels
            vis_pos = tokens[(tokens["sample"] == sample) & (tokens["layer"] == layer)
                             & (tokens["token_kind"] == "visual")].sort_values("position")["position"].tolist()
            want_sinks = sorted(vis_pos.index(q) for q in sink_rows[(sink_rows["sample"] == sample)
                                                                     & (sink_rows["layer"] == layer)
                                                                     & (sink_rows["token_kind"] == "visual")]["position"])
            assert json.loads(got["sinks"]) == want_sinks
            assert int(got["outlines-drawn"]) == 2 * len(want_sinks)
            # the head's visual non-sink ratio and image attention == head_scores_per_sample.csv
            row = heads[(heads["sample"] == sample) & (heads["layer"] == layer) & (heads["head"] == 2)].iloc[0]
            assert float(got["nonsink-ratio"]) == pytest.approx(row["visual_nonsink_ratio"], abs=1e-5)
            assert float(got["table-nonsink-ratio"]) == pytest.approx(row["visual_nonsink_ratio"], abs=1e-6)
            assert float(got["image-attention"]) == pytest.approx(row["image_attention"], abs=1e-5)
            # the colour legends give the scale each grid is drawn on; the score is named as the run used it
            assert float(got["legend-attention-max"]) == pytest.approx(max(json.loads(got["attention"])), rel=1e-6)
            tau = json.loads((organism_run / "run.json").read_text())["tau"]["value"]
            assert float(got["legend-score-max"]) == pytest.approx(max(tau, *want_phi), rel=1e-5)
            name = json.loads((organism_run / "run.json").read_text())["params"]["sink_score"]
            assert page.locator("#score-heading").inner_text().startswith(plots.score_name(name))
            assert f"({plots.score_name(name)} >= " in page.locator("#readout").inner_text()
            checked.append((layer, len(want_sinks)))
        assert checked[0][1] == 0 and checked[1][1] > 0  # changing the layer changed what is outlined

        # one text token: its drawn attention == an independent trace's probabilities (8-bit storage)
        layer = layers_with_visual_sinks[0]
        page.select_option("#token", "2")
        got = _readout(page)
        adapter = sinkscope.load_model("organism")
        s = next(x for x in load_data("demo", 3) if x.sample_id == sample)
        batch = prepare_batch(adapter, [s])
        cache = sinkscope.Tracer(adapter).run_with_cache(batch)
        queries = torch.nonzero(text_queries_after_image(cache.batch)[0]).flatten()
        visual = torch.nonzero(cache.batch.token_kinds.visual_mask[0]).flatten()
        q = int(queries[2])
        assert int(got["query"]) == q
        want = cache["pattern.%d" % layer][0, 2, q, visual].numpy()
        np.testing.assert_allclose(json.loads(got["attention"]), want, atol=want.max() / 255 / 2 + 1e-7)
        assert float(got["image-attention"]) == pytest.approx(float(want.sum()), abs=1e-5)
        assert "sinks in this layer" in page.locator("#readout").inner_text()

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "viewer.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert all(u.startswith("file://") for u in requests), requests  # no network


def test_kept_queries_are_all_or_evenly_spaced_with_the_last():
    assert viewer.kept_queries(10, 100, 1000).tolist() == list(range(10))  # they fit
    assert viewer.kept_queries(10, 100, 399).tolist() == [0, 4, 9]  # 3 fit: the first, the middle, the last
    assert viewer.kept_queries(10, 100, 10).tolist() == [9]  # not even one fits: the answer position's
    assert viewer.kept_queries(1, 100, 10).tolist() == [0]
    kept = viewer.kept_queries(57, 10, 200)
    assert len(kept) == 20 and kept[0] == 0 and kept[-1] == 56 and (np.diff(kept) > 0).all()


def _page_data(text: str) -> dict:
    return json.loads(text.split('<script id="viewer-data" type="application/json">')[1].split("</script>")[0])


def _decoded(entry: dict, key: str, dtype) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(entry[key]), dtype=dtype)


@pytest.fixture(scope="module")
def budget_pages(organism_run, page_path) -> dict:
    """{queries kept per sample: page path}: the same two samples as page_path within a budget that keeps 3 of
    each sample's queries, and one that keeps only the last."""
    import sinkscope

    full = _page_data(page_path.read_text())
    first = full["samples"][0]
    bytes_per_query = (viewer._b64_size(full["layers"] * full["heads"] * first["n_visual"])
                       + 3 * viewer._b64_size(full["layers"] * full["heads"] * 4))
    adapter = sinkscope.load_model("organism")
    pages = {}
    for kept, max_mb in ((3, 2 * 3.5 * bytes_per_query / 2**20), (1, 1e-6)):
        path = organism_run / f"viewer_{kept}.html"
        logged = []
        viewer.write_viewer(organism_run, path, adapter=adapter, n_samples=2, max_mb=max_mb, log=logged.append)
        assert any(f"attention maps of {kept} of its" in m for m in logged), logged
        pages[kept] = path
    return pages


def test_a_page_over_its_budget_keeps_evenly_spaced_queries_and_exact_means(page_path, budget_pages):
    """Within --max-mb: the kept queries' maps are those of the full page bit for bit, the means over every query
    are the full page's, and the page shrinks."""
    full = _page_data(page_path.read_text())
    n_layers, n_heads = full["layers"], full["heads"]
    for kept, path in budget_pages.items():
        small = _page_data(path.read_text())
        assert path.stat().st_size < page_path.stat().st_size
        for whole, part in zip(full["samples"], small["samples"]):
            n_queries, n_visual = whole["n_queries"], whole["n_visual"]
            assert len(whole["queries"]) == part["n_queries"] == n_queries > 3
            index = viewer.kept_queries(n_queries, 1, kept)  # the spacing collect used
            assert len(index) == kept and index[-1] == n_queries - 1
            assert part["queries"] == [whole["queries"][i] for i in index]
            shape = (n_layers, n_heads, -1, n_visual)
            np.testing.assert_array_equal(_decoded(part, "attn", np.uint8).reshape(shape),
                                          _decoded(whole, "attn", np.uint8).reshape(shape)[:, :, index])
            for key in ("attn_max", "image_attention", "nonsink_ratio"):
                np.testing.assert_array_equal(_decoded(part, key, np.float32).reshape(n_layers, n_heads, -1),
                                              _decoded(whole, key, np.float32).reshape(n_layers, n_heads, -1)[:, :, index])
            for key, dtype in (("attn_mean", np.uint8), ("attn_mean_max", np.float32),
                               ("image_attention_mean", np.float32), ("nonsink_ratio_mean", np.float32)):
                np.testing.assert_array_equal(_decoded(part, key, dtype), _decoded(whole, key, dtype))
            # the stored means are the means over every query of the per-query values
            per_query = _decoded(whole, "image_attention", np.float32).reshape(n_layers, n_heads, n_queries)
            np.testing.assert_allclose(_decoded(whole, "image_attention_mean", np.float32),
                                       per_query.mean(axis=2).reshape(-1), rtol=1e-6)


def test_view_refuses_a_budget_that_is_not_positive(organism_run):
    result = CliRunner().invoke(app, ["view", str(organism_run), "--max-mb", "0"])
    assert result.exit_code == 2 and "--max-mb must be a number of megabytes > 0" in result.output
    assert "Traceback" not in result.output


def test_the_cli_budget_default_is_the_viewers():
    import inspect

    from sinkscope import cli

    assert inspect.signature(cli.view).parameters["max_mb"].default.default == viewer.DEFAULT_MAX_MB


def test_browser_mean_view_over_every_query_when_one_map_is_kept(organism_run, budget_pages):
    """A page that kept one query's maps: the token list offers the mean and that query, says why, and the mean
    view's non-sink ratio and image attention are still the scan table's (a mean over every query)."""
    heads = _table(organism_run, "head_scores_per_sample")
    sample = (organism_run / "samples_done.txt").read_text().split()[0]
    with _launch() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(budget_pages[1].resolve().as_uri())
        page.select_option("#head", "1")
        _set_layer(page, 1)
        got = _readout(page)
        assert (got["sample"], got["query"]) == (sample, "mean")
        row = heads[(heads["sample"] == sample) & (heads["layer"] == 1) & (heads["head"] == 1)].iloc[0]
        assert float(got["nonsink-ratio"]) == pytest.approx(row["visual_nonsink_ratio"], abs=1e-5)
        assert float(got["image-attention"]) == pytest.approx(row["image_attention"], abs=1e-5)
        options = page.locator("#token option").all_inner_texts()
        assert len(options) == 2 and options[0].startswith(f"mean over the {int(row['n_queries'])} text queries")
        assert "Attention maps of 1 of this sample's" in page.locator("#sample-note").inner_text()
        page.select_option("#token", "0")
        assert int(_readout(page)["query"]) >= 0
        browser.close()
    assert not errors, errors
