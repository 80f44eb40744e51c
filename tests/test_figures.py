"""Figures a reader can read, checked through matplotlib's objects (not pixels).

`figure_problems` lists what makes a figure unreadable: an axes without x or y label (unless
it is a colour bar, a panel of a grid with shared figure labels, or carries a text note), a
heat map without colour bar, an empty axes without a note saying why, a linear axis over data
spanning 3+ decades, a bar of height 0 without a value label, raw column names
(snake_case) in any text, overlapping tick labels, a figure wider than 4x its height, text
below 6 pt. It is tested on planted bad figures first, then run on every figure of a report
on the planted organism (all steps, a few samples), on figures drawn from planted tables that
hit the edge cases (nothing to knock out, no single-layer patching, all-zero bars, scores
spanning decades), and on the quickstart notebook's figure.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.collections import QuadMesh  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.text import Annotation  # noqa: E402

from sinkscope import plots  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "sinkscope" / "models" / "embedded" / "assets"
SNAKE = re.compile(r"\b[a-z][a-z0-9]+_[a-z0-9_]+\b")  # raw column names; x_d or W_O pass (one letter)
LOG_DECADES = 3


# ----------------------------------------------------------------------------- the checker


def _data_artists(ax) -> list:
    """What an axes shows besides reference lines (axhline/axvline live in axes coordinates)."""
    lines = [ln for ln in ax.lines if ln.get_transform() is ax.transData and ln.get_visible()]
    return lines + [c for c in ax.collections if c.get_visible()] + list(ax.images) + \
        [p for p in ax.patches if p.get_visible()]


def _texts(fig) -> list:
    out = [t for t in fig.texts]
    for ax in fig.axes:
        out += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label] + list(ax.texts)
        out += list(ax.get_xticklabels()) + list(ax.get_yticklabels())
        legend = ax.get_legend()
        if legend is not None:
            out += list(legend.get_texts()) + [legend.get_title()]
    for legend in fig.legends:
        out += list(legend.get_texts()) + [legend.get_title()]
    return [t for t in out if t.get_visible() and t.get_text().strip()]


def _overlapping_ticks(ax, renderer) -> list[str]:
    found = []
    for axis, labels in (("x", ax.get_xticklabels()), ("y", ax.get_yticklabels())):
        shown = [t for t in labels if t.get_visible() and t.get_text().strip() and t.get_rotation() in (0.0, 90.0)]
        boxes = [t.get_window_extent(renderer) for t in shown]
        key = (lambda b: b.x0) if axis == "x" else (lambda b: b.y0)
        order = sorted(range(len(boxes)), key=lambda i: key(boxes[i]))
        for a, b in zip(order, order[1:]):
            if boxes[a].overlaps(boxes[b]):
                found.append(f"{axis} tick labels {shown[a].get_text()!r} and {shown[b].get_text()!r} overlap")
                break
    return found


def _linear_axis_spans_decades(ax) -> list[str]:
    found = []
    xs, ys = [], []
    for ln in ax.lines:
        if ln.get_transform() is ax.transData:
            xs.append(np.asarray(ln.get_xdata(), float))
            ys.append(np.asarray(ln.get_ydata(), float))
    for c in ax.collections:
        if type(c).__name__ == "PathCollection":  # scatter
            offsets = np.asarray(c.get_offsets(), float)
            if offsets.size:
                xs.append(offsets[:, 0])
                ys.append(offsets[:, 1])
    for name, values, scale in (("x", xs, ax.get_xscale()), ("y", ys, ax.get_yscale())):
        if scale != "linear" or not values:
            continue
        v = np.concatenate(values)
        # a magnitude (never negative) over decades wants a log axis; a signed effect around 0 does not
        if not (v[np.isfinite(v)] < 0).any() and plots.spans_decades(v, LOG_DECADES):
            found.append(f"linear {name} axis over data spanning >= {LOG_DECADES} decades")
    return found


def _unlabelled_zero_bars(ax) -> list[str]:
    found = []
    text_x = []
    for t in ax.texts:
        if isinstance(t, Annotation) and t.xycoords == "data":  # a label anchored to a point of the data
            text_x.append(float(t.xy[0]))
        elif t.get_transform() is ax.transData:
            text_x.append(float(t.get_position()[0]))
    marker_x = [float(x) for ln in ax.lines if ln.get_transform() is ax.transData and ln.get_marker() not in ("None", "", None)
                for x in np.asarray(ln.get_xdata(), float)]
    for container in ax.containers:
        if not isinstance(container, BarContainer):
            continue
        for bar in container:
            if abs(bar.get_height()) > 0:
                continue
            x0, x1 = bar.get_x(), bar.get_x() + bar.get_width()
            if not any(x0 <= x <= x1 for x in text_x + marker_x):
                found.append(f"a bar of height 0 at x {x0:.2f} has no value label or marker")
    return found


def figure_problems(fig, name: str = "figure") -> list[str]:
    """Everything that makes `fig` hard to read (empty list: none found)."""
    if not hasattr(fig.canvas, "get_renderer"):  # pyplot closed it (plots._save does): give it a canvas again
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems = []
    mappables = [m for ax in fig.axes for m in list(ax.images) + [c for c in ax.collections if isinstance(c, QuadMesh)]
                 if np.ndim(m.get_array()) == 2]  # a heat map; an RGB picture needs no colour bar
    with_bar = [m for m in mappables if getattr(m, "colorbar", None) is not None]
    colorbar_axes = {m.colorbar.ax for m in with_bar}
    for m in mappables:
        if m not in with_bar and not any(m.norm is b.norm for b in with_bar):
            problems.append(f"{name}: a heat map in {m.axes.get_title()!r} has no colour bar")
    sup_x = fig._supxlabel is not None and fig._supxlabel.get_text().strip()
    sup_y = fig._supylabel is not None and fig._supylabel.get_text().strip()
    for ax in fig.axes:
        if not ax.get_visible() or ax in colorbar_axes:
            continue
        where = f"{name}: axes {ax.get_title()!r}"
        note = any(t.get_text().strip() and t.get_transform() is ax.transAxes for t in ax.texts)
        if not _data_artists(ax) and not note:
            problems.append(f"{where} is empty and says nothing about why")
        if not note:
            if not (ax.get_xlabel().strip() or sup_x):
                problems.append(f"{where} has no x label")
            if not (ax.get_ylabel().strip() or sup_y):
                problems.append(f"{where} has no y label")
        problems += [f"{where}: {p}" for p in _linear_axis_spans_decades(ax) + _unlabelled_zero_bars(ax)
                     + _overlapping_ticks(ax, renderer)]
    for t in _texts(fig):
        raw = SNAKE.findall(t.get_text())
        if raw:
            problems.append(f"{name}: raw column names {raw} in {t.get_text()!r}")
        if t.get_fontsize() < 6:
            problems.append(f"{name}: text {t.get_text()[:30]!r} is {t.get_fontsize():.1f} pt")
    w, h = fig.get_size_inches()
    if w / h > 4:
        problems.append(f"{name}: {w:.1f} x {h:.1f} in, wider than 4x its height")
    return problems


# ----------------------------------------------------------------------------- the checker finds what it should


def _planted(kind: str):
    fig, ax = plt.subplots(figsize=(4, 3))
    if kind != "no labels":
        ax.set_xlabel("layer")
        ax.set_ylabel("score")
    if kind == "no labels":
        ax.plot([0, 1, 2], [1, 2, 3])
    elif kind == "no colour bar":
        ax.imshow(np.arange(9.0).reshape(3, 3))
    elif kind == "empty":
        ax.axhline(0)
    elif kind == "decades":
        ax.plot([0, 1, 2], [1, 10, 4000])
    elif kind == "zero bar":
        ax.bar([0, 1], [0.5, 0.0])
    elif kind == "raw names":
        ax.plot([0, 1], [0, 1])
        ax.set_title("abs_logit_change")
    elif kind == "overlapping ticks":
        ax.plot(range(40), range(40))
        ax.set_xticks(range(40), [f"{i}" for i in range(40)], fontsize=12)
    elif kind == "too wide":
        ax.plot([0, 1], [0, 1])
        fig.set_size_inches(18, 3.4)
    elif kind == "good":
        ax.plot([0, 1, 2], [1, 2, 3])
        ax.plot([0, 1, 2], [-7.0, 1e-6, 0.5])  # a signed effect: decades of |value| do not ask for a log axis
        ax.bar([3], [0.0])
        ax.text(3, 0, "0.00")
        im = ax.imshow(np.ones((2, 2)), extent=(4, 5, 0, 1))
        fig.colorbar(im, ax=ax, label="value")
    return fig


@pytest.mark.parametrize("kind,expect", [
    ("no labels", "no x label"), ("no colour bar", "no colour bar"), ("empty", "is empty"),
    ("decades", "spanning >= 3 decades"), ("zero bar", "height 0"), ("raw names", "raw column names"),
    ("overlapping ticks", "overlap"), ("too wide", "wider than 4x"),
])
def test_checker_finds_planted_problems(kind, expect):
    fig = _planted(kind)
    problems = figure_problems(fig, kind)
    plt.close(fig)
    assert any(expect in p for p in problems), problems


def test_checker_passes_a_readable_figure():
    fig = _planted("good")
    assert figure_problems(fig, "good") == []
    plt.close(fig)


# ----------------------------------------------------------------------------- every figure of a report


@pytest.fixture(scope="module")
def organism_report_figures(tmp_path_factory):
    """Every figure a report on the organism draws (all steps, 4 samples), collected as it is saved."""
    if not (ASSETS / "organism" / "config.json").exists():
        pytest.skip("embedded organism model not built")
    from sinkscope.analyses.report import ReportConfig, run_report

    out = tmp_path_factory.mktemp("figures") / "report"
    drawn: dict[str, object] = {}
    save = plots._save

    def keep(fig, path, *args, **kwargs):
        drawn[str(Path(path).relative_to(out))] = fig
        return save(fig, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setattr(plots, "_save", keep)
        run_report(out, ReportConfig(model="organism", limit=4, viewer_samples=1), log=lambda m: None)
    return out, drawn


@pytest.mark.slow
def test_every_report_figure_is_readable(organism_report_figures):
    out, drawn = organism_report_figures
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written and sorted(drawn) == written  # every PNG of the report went through the checker
    for step in ("scan", "heads", "ablate", "contributions", "location", "vit_sinks", "var_eval", "patching"):
        assert any(name.startswith(step + "/") for name in written), f"no figure from {step}"
    problems = [p for name, fig in drawn.items() for p in figure_problems(fig, name)]
    assert problems == [], "\n".join(problems)


@pytest.mark.slow
def test_report_figures_name_the_score_used(organism_report_figures):
    import json

    out, drawn = organism_report_figures
    score = json.loads((out / "scan" / "run.json").read_text())["params"]["sink_score"]
    other = {"rms": "layer", "layer": "rms"}[score]
    for name in ("scan/phi_by_role.png", "scan/phi_vs_attention.png", "heads/phi_vs_attention.png",
                 "vit_sinks/vit_norms.png"):
        fig = drawn[name]
        labels = " ".join(ax.get_xlabel() + " " + ax.get_ylabel() for ax in fig.axes)
        text = " ".join(t.get_text() for t in _texts(fig))
        assert plots.score_name(score) in labels, (name, labels)  # the axis names the score plotted ...
        assert plots.SCORE_FORMULAS[score] in text, (name, text)  # ... and the figure says what it computes
        assert plots.score_name(other) not in text, (name, text)


# ----------------------------------------------------------------------------- edge cases, from planted tables


def _check(fig_or_draw, tmp_path, monkeypatch) -> tuple[object, list[str]]:
    drawn = []
    save = plots._save

    def keep(fig, path, *args, **kwargs):
        drawn.append(fig)
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(plots, "_save", keep)
    fig_or_draw(tmp_path)
    assert len(drawn) == 1
    return drawn[0], figure_problems(drawn[0])


def _roles(first_max: float) -> pd.DataFrame:
    rows = []
    for layer in range(6):
        for role, value in (("first", first_max if layer > 1 else 2.0), ("delimiter", 3.0), ("text", 1.0),
                            ("visual", 0.8)):
            rows.append({"layer": layer, "role": role, "phi_median": value, "phi_max": value * 1.1})
    return pd.DataFrame(rows)


def test_phi_by_role_log_axis_and_score_name(tmp_path, monkeypatch):
    fig, problems = _check(lambda d: plots.phi_by_role(_roles(4000.0), 100.0, 576, d / "r.png", score="layer"),
                           tmp_path, monkeypatch)
    assert problems == []
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"  # 0.8 to 4400: four decades
    assert ax.get_ylabel() == "layer-relative score (log scale)"
    assert plots.SCORE_FORMULAS["layer"] in fig._suptitle.get_text()
    assert not any("sqrt(hidden)" in t.get_text() for t in ax.get_legend().get_texts())  # phi's ceiling only for phi
    fig, problems = _check(lambda d: plots.phi_by_role(_roles(22.0), 20.0, 4096, d / "r.png", score="rms"),
                           tmp_path, monkeypatch)
    assert problems == [] and fig.axes[0].get_yscale() == "linear"  # 0.8 to 24: no decades to span
    assert fig.axes[0].get_ylabel().startswith("phi")
    assert any("sqrt(hidden) = 64" in t.get_text() for t in fig.axes[0].get_legend().get_texts())


def _maps(n_heads: int) -> pd.DataFrame:
    rows = []
    for head in [*range(n_heads), "mean"]:
        for qpos, word in ((70, "is"), (71, "there")):
            for rank in range(16):
                rows.append({"sample": "s0", "layer": 3, "head": str(head), "query_position": qpos, "query_token": word,
                             "visual_rank": rank, "attention": (rank + 1) / 400, "is_sink": rank == 5})
    return pd.DataFrame(rows)


def test_attention_maps_show_every_head_or_say_which_are_left_out(tmp_path, monkeypatch):
    fig, problems = _check(lambda d: plots.attention_maps(_maps(9), d / "m.png", layer=3), tmp_path, monkeypatch)
    assert problems == []
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"head {h}" for h in range(9)] + ["mean of heads"]
    assert "all 9 heads" in fig._suptitle.get_text()
    fig, problems = _check(lambda d: plots.attention_maps(_maps(20), d / "m.png", layer=3, max_heads=16),
                           tmp_path, monkeypatch)
    assert problems == []
    assert sum(ax.get_title().startswith("head ") for ax in fig.axes) == 16
    assert "of 20 shown, the rest left out" in fig._suptitle.get_text()


def _ablation(n_tokens: float) -> pd.DataFrame:
    rows = []
    for metric in ("accuracy", "f1", "logit_diff", "abs_logit_change"):
        rows.append({"condition": "none", "tau": np.nan, "n_tokens": 0.0, "metric": metric, "value": 0.5,
                     "ci_low": 0.4, "ci_high": 0.6})
        for condition in ("visual_sinks", "random_visual"):
            for tau in (75.0, 100.0, 150.0):
                rows.append({"condition": condition, "tau": tau, "n_tokens": n_tokens, "metric": metric, "value": 0.5,
                             "ci_low": 0.4, "ci_high": 0.6})
    return pd.DataFrame(rows)


def test_ablation_says_when_nothing_was_knocked_out(tmp_path, monkeypatch):
    fig, problems = _check(lambda d: plots.ablation_curves(_ablation(0.0), d / "a.png"), tmp_path, monkeypatch)
    assert problems == []
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "visual sinks (0 tokens at every tau: nothing knocked out)" in legend
    fig, _ = _check(lambda d: plots.ablation_curves(_ablation(3.0), d / "a.png"), tmp_path, monkeypatch)
    assert "visual sinks" in [t.get_text() for t in fig.legends[0].get_texts()]


def _patching(per_layer: bool) -> pd.DataFrame:
    rows = [{"source": "self", "target": "clean", "site": "all_image", "layer": -1, "effect": 0.0, "ci_low": 0.0,
             "ci_high": 0.0, "full_effect": 0.0},
            {"source": "other_image", "target": "clean", "site": "visual_sinks", "layer": -1, "effect": -0.1,
             "ci_low": -0.3, "ci_high": 0.1, "full_effect": -2.0}]
    if per_layer:
        rows += [{"source": "other_image", "target": "clean", "site": "visual_sinks", "layer": layer, "effect": -0.1,
                  "ci_low": -0.2, "ci_high": 0.0, "full_effect": -2.0} for layer in range(4)]
    return pd.DataFrame(rows)


def test_patching_panel_without_single_layers_says_why(tmp_path, monkeypatch):
    fig, problems = _check(lambda d: plots.patching_effects(_patching(False), d / "p.png"), tmp_path, monkeypatch)
    assert problems == []
    right = fig.axes[1]
    assert not plots_data(right) and "no single layer was patched" in right.texts[0].get_text()
    fig, problems = _check(lambda d: plots.patching_effects(_patching(True), d / "p.png"), tmp_path, monkeypatch)
    assert problems == [] and plots_data(fig.axes[1])


def plots_data(ax) -> list:
    return [ln for ln in ax.lines if ln.get_transform() is ax.transData and len(ln.get_xdata()) > 0]


def test_var_bars_of_height_zero_carry_their_value(tmp_path, monkeypatch):
    table = pd.DataFrame([
        {"condition": c, "task": t, "accuracy": acc, "ci_low": max(acc - 0.1, 0), "ci_high": min(acc + 0.1, 1),
         "f1": 0.0, "yes_ratio": 0.0, "n": 16, "n_unparseable": 16 if c == "var_all_heads" else 0}
        for t in ("all", "pope-random") for c, acc in (("baseline", 0.5), ("var", 0.5), ("var_all_heads", 0.0))])
    fig, problems = _check(lambda d: plots.var_eval_bars(table, d / "v.png", "accuracy"), tmp_path, monkeypatch)
    assert problems == []
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels.count("0.00 (yes 0.00, 16/16 unparsed)") == 2 and labels.count("0.50 (yes 0.00)") == 4
    fig, problems = _check(lambda d: plots.var_eval_bars(table, d / "v.png", "f1"), tmp_path, monkeypatch)
    assert problems == [] and sum(t.get_text() == "0.00" for t in fig.axes[0].texts) == 4


def test_location_without_sinks_says_so(tmp_path, monkeypatch):
    table = pd.DataFrame([{"layers": str(layer), "sink_background_share": np.nan, "background_base_rate": 0.82,
                           "ci_low": np.nan, "ci_high": np.nan} for layer in range(30)])
    fig, problems = _check(lambda d: plots.location_shares(table, d / "l.png"), tmp_path, monkeypatch)
    assert problems == []
    assert "no visual sinks in any layer" in fig.axes[0].get_title()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["layer without visual sinks", "all image tokens (base rate)"]  # no key for bars not drawn


def test_contributions_thin_layer_ticks_and_name_missing_classes(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    per = pd.DataFrame([{"layer": layer, "token_class": cls, "attention": rng.uniform(1e-3, 1),
                         "ov_norm": rng.uniform(1, 50), "contribution": rng.uniform(1e-2, 10)}
                        for layer in range(30) for cls in ("visual_nonsink", "bos") for _ in range(3)])
    fig, problems = _check(lambda d: plots.contribution_by_class(per, d / "c.png"), tmp_path, monkeypatch)
    assert problems == []
    assert "no visual sinks in these samples" in fig._suptitle.get_text()


def test_sweep_heatmap_says_when_the_grid_ties(tmp_path, monkeypatch):
    sweep = pd.DataFrame([{"condition": "var", "p": p, "rho": rho, "f1": 0.0} for p in (0.3, 0.6) for rho in (0.5, 0.8)]
                         + [{"condition": "baseline", "p": np.nan, "rho": np.nan, "f1": 0.0}])
    fig, problems = _check(lambda d: plots.var_sweep_heatmap(sweep, d / "s.png", "f1", (0.6, 0.5)), tmp_path, monkeypatch)
    assert problems == []
    assert "every cell ties" in fig.axes[0].get_title()


def test_quickstart_figure_is_readable():
    from PIL import Image

    scores = np.arange(16.0).reshape(4, 4)
    fig = plots.image_sinks(Image.new("RGB", (64, 64)), scores, scores >= 14, tau=14.0, score="layer",
                            title="organism: visual sinks at layer 3")
    assert figure_problems(fig, "quickstart") == []
    assert "layer-relative score" in fig.axes[1].get_title()
    plt.close(fig)


def test_training_figures_are_readable(tmp_path, monkeypatch):
    steps = np.arange(0, 200, 20)
    stage = np.where(steps < 100, "vision", "instruct")
    curve = pd.DataFrame({
        "global_step": steps, "stage": stage, "pope_random": np.linspace(0.5, 0.8, len(steps)),
        "pope_adversarial": np.linspace(0.5, 0.7, len(steps)), "visual_sinks_per_image_max": np.arange(len(steps)),
        "visual_sinks_per_image_layer_score": np.zeros(len(steps)), "visual_sink_attention_max": np.full(len(steps), 0.1),
        "visual_sink_attention_layer_score": np.zeros(len(steps)), "image_attention_mean": np.full(len(steps), 0.2),
        "first_token_attention_mean": np.full(len(steps), 0.6), "max_image_layer_score": np.linspace(5, 40, len(steps)),
        "max_image_phi": np.linspace(5, 20, len(steps)), "tau": 16.0})
    fig, problems = _check(lambda d: plots.emergence_curve(curve, d / "e.png"), tmp_path, monkeypatch)
    assert problems == []
    log = pd.DataFrame({"global_step": steps, "stage": stage, "loss": np.geomspace(5, 0.05, len(steps)),
                        **{f"bos_attention_L{i}": np.linspace(0.1, 0.6, len(steps)) for i in (1, 2)},
                        **{f"bos_residual_ratio_L{i}": np.geomspace(1, 500, len(steps)) for i in (1, 2)}})
    log.to_csv(tmp_path / "log.csv", index=False)
    fig, problems = _check(lambda d: plots.training_curves(d / "log.csv", d / "t.png"), tmp_path, monkeypatch)
    assert problems == []
