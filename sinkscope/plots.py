"""Every figure sinkscope draws. Functions take tidy frames and a path; they return file names.

PNG always, PDF beside it where cheap. matplotlib's Agg backend: no display needed.
Rules every figure keeps (tests/test_figures.py checks them on a whole report): both axes
labelled, naming the score actually plotted; a log axis where values span decades; a colour
bar on every heat map; readable names, never raw column names; an empty panel says why; a
bar of height 0 carries a value label.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm, Normalize, PowerNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

KIND_COLORS = {"bos": "#d62728", "text": "#1f77b4", "visual": "#2ca02c", "generated": "#9467bd"}
TAB10 = plt.get_cmap("tab10").colors

# ----------------------------------------------------------------------------- names a reader can read

SCORE_NAMES = {"rms": "phi", "layer": "layer-relative score"}
SCORE_FORMULAS = {"rms": "max over sink dims |x_d| / RMS(x)",
                  "layer": "max over sink dims |x_d| / median token RMS of the layer"}

READABLE = {
    # knockout conditions and metrics (ablation.csv)
    "none": "no knockout", "visual_sinks": "visual sinks", "random_visual": "random image tokens (same count)",
    "top_nonsink": "most-attended non-sink image tokens (same count)", "bos": "first token (BOS)",
    "accuracy": "accuracy", "f1": "F1", "logit_diff": "logit difference, correct - other answer",
    "abs_logit_change": "|change of the logit difference|\nagainst no knockout",
    # token classes (contributions.csv)
    "visual_sink": "visual sinks", "visual_nonsink": "visual non-sinks",
    # VAR conditions (var_eval.csv)
    "baseline": "baseline", "var": "VAR", "var_random_heads": "VAR on random heads",
    "var_all_heads": "VAR on all heads", "var_text_budget": "VAR, budget to text",
    # patching sites and sources (patching.csv)
    "all_image": "all image tokens", "random_nonsink": "random non-sink image tokens", "object_tokens": "object tokens",
    "nonsink_image": "non-sink image tokens", "image_centric_heads": "image-centric heads", "other_heads": "other heads",
    "var_full": "VAR on vs off", "var_selected_heads": "heads VAR edited", "var_other_heads": "heads VAR left alone",
    "self": "own image", "other_image": "other image",
    # token roles (role_summary.csv)
    "first": "first token", "delimiter": "delimiters", "text": "other text", "visual": "image tokens",
    # tasks and vision sites
    "all": "all tasks", "lm_input": "language-model input (after the projector)", "vit": "vision tower output",
    # head-score columns
    "visual_nonsink_ratio": "visual non-sink ratio", "visual_sink_attention": "attention to visual sinks",
    "image_attention": "attention to the image", "image_centric": "share of image-centric queries",
}


def score_name(score: str) -> str:
    """Short name of a sink score: 'phi' (rms) or 'layer-relative score' (layer)."""
    return SCORE_NAMES.get(score, f"sink score ({score})")


def score_label(score: str) -> str:
    """Axis label of a sink score: its name and what it computes."""
    formula = SCORE_FORMULAS.get(score)
    return f"{score_name(score)}\n= {formula}" if formula else score_name(score)


def readable(name) -> str:
    """A column or condition name as words."""
    return READABLE.get(str(name), str(name).replace("_", " "))


# ----------------------------------------------------------------------------- shared helpers


def _save(fig, path: Path, pdf: bool = True, tight_layout: bool = True) -> str:
    """Write the figure (PNG, PDF beside it if `pdf`), cropped to what is drawn (legends outside included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight_layout:
        fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    if pdf:
        fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return path.name


def _note(ax, text: str) -> None:
    """Say in an empty panel why it is empty (instead of default 0-1 axes)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def spans_decades(values, decades: float = 2.0) -> bool:
    """True when the positive finite values span at least `decades` powers of ten (a log axis reads better)."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    return len(v) > 1 and v.max() / v.min() >= 10 ** decades


def _thin_ticks(ax, labels, max_labels: int = 16, axis: str = "x") -> None:
    """Ticks at every position, labels on at most `max_labels` of them (no overlapping layer numbers)."""
    labels = [str(x) for x in labels]
    step = max(1, math.ceil(len(labels) / max_labels))
    shown = [lab if i % step == 0 else "" for i, lab in enumerate(labels)]
    if axis == "x":
        ax.set_xticks(range(len(labels)), shown)
    else:
        ax.set_yticks(range(len(labels)), shown)


def _value_labels(ax, bars, values, notes=None, fmt: str = "{:.2f}", ci_high=None) -> None:
    """Write each bar's value (and note) upwards from its base, left of its error bar: a bar of height 0 is still seen.

    ci_high: the error bars' tops; a label on a bar lower than half the axis starts above its error bar instead
    (a long label would otherwise run through it)."""
    top = ax.get_ylim()[1]
    for i, (bar, value) in enumerate(zip(bars, values)):
        text = fmt.format(value) if np.isfinite(value) else "n/a"
        if notes is not None and notes[i]:
            text += f" ({notes[i]})"
        start, x = 0.0, bar.get_x() + 0.3 * bar.get_width()
        if ci_high is not None and np.isfinite(ci_high[i]) and np.isfinite(value) and 0 < value < top / 2:
            start, x = float(ci_high[i]), bar.get_x() + 0.5 * bar.get_width()
        ax.annotate(text, (x, start), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=6, rotation=90)


# ----------------------------------------------------------------------------- the scan


def massive_activation_layers(magnitudes: pd.DataFrame, path: Path, title: str = "") -> str:
    """Sun et al.'s plot: top-1/2/3 |activation| and the median, per layer (log scale)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for col, style, label in (("top1", "-o", "largest"), ("top2", "-s", "2nd largest"), ("top3", "-^", "3rd largest"),
                              ("median", "--", "median")):
        ax.plot(magnitudes["layer"], magnitudes[col], style, label=label, ms=4)
    ax.set_yscale("log")
    ax.set_xlabel("layer (residual stream entering it)")
    ax.set_ylabel("|activation| (mean over samples)")
    ax.set_title(title or "largest activations per layer")
    ax.legend(fontsize=8)
    return _save(fig, path)


def dim_profile(profile: pd.DataFrame, sink_dims: list[int], path: Path, layer: int | None = None,
                score: str = "rms") -> str:
    """|RMS-normalised value| per hidden dim: BOS against the most sink-like image token."""
    if layer is None:
        per_layer = profile.groupby("layer")["visual_phi"].max()
        layer = int(per_layer.idxmax()) if per_layer.notna().any() else int(profile["layer"].median())
    p = profile[profile["layer"] == layer].sort_values("dim")
    rows = [("bos", "first token (BOS)")]
    if p["visual"].notna().any():
        pos = int(p["visual_position"].iloc[0])
        rows.append(("visual", f"image token with the largest {score_name(score)} "
                               f"(position {pos}, {score_name(score)} {p['visual_phi'].iloc[0]:.3g})"))
    if p["text_median"].notna().any():
        rows.append(("text_median", "median over text tokens"))
    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 1.9 * len(rows) + 0.4), sharex=True, squeeze=False)
    for ax, (col, label) in zip(axes[:, 0], rows):
        ax.vlines(p["dim"], 0, p[col].abs(), lw=1.0, color=KIND_COLORS.get(col.split("_")[0], "grey"))
        ax.set_ylim(bottom=0)
        for d in sink_dims:
            ax.axvline(d, color="k", lw=0.6, ls=":")
        ax.set_ylabel("|x_d / RMS(x)|")
        ax.set_xlabel("hidden dimension d")
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"RMS-normalised residual per hidden dimension, entering layer {layer} (dotted: sink dims {sink_dims})",
                 fontsize=9)
    return _save(fig, path)


def phi_vs_attention(tokens: pd.DataFrame, tau: float, path: Path, min_layer: int = 2, score: str = "rms") -> str:
    """Each image token's sink score against the attention it receives from text queries."""
    vis = tokens[(tokens["token_kind"] == "visual") & (tokens["layer"] >= min_layer)]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.set_xlabel(score_label(score))
    ax.set_ylabel("attention received\n(mean over heads and text queries)")
    if len(vis):
        sink = vis["is_sink"].astype(bool).to_numpy()
        phi, received = vis["phi"].to_numpy(), vis["attention_received"].to_numpy()
        # one colour per call (matplotlib's fast marker path: ~7x faster than a colour per point at 57k points),
        # sinks drawn last so none hides under the other tokens; the PDF holds the points as an image (845 -> 38 kB)
        for rows, colour in ((~sink, "#2ca02c"), (sink, "#d62728")):
            ax.scatter(phi[rows], received[rows], s=4, alpha=0.3, c=colour, rasterized=True)
        ax.axvline(tau, color="k", ls=":", lw=0.8)
        if spans_decades(vis["phi"]):
            ax.set_xscale("log")
        if spans_decades(vis["attention_received"], 3):
            ax.set_yscale("log")
        handles = [Line2D([], [], ls="", marker="o", color="#d62728", label=f"visual sink ({int(sink.sum())})"),
                   Line2D([], [], ls="", marker="o", color="#2ca02c", label=f"other image token ({int((~sink).sum())})"),
                   Line2D([], [], ls=":", color="k", label=f"tau = {tau:.3g}")]
        ax.legend(handles=handles, fontsize=7)
        ax.set_title(f"image tokens x layers >= {min_layer}, all samples", fontsize=9)
    else:
        _note(ax, f"no image tokens in layers >= {min_layer}")
    return _save(fig, path)


def head_heatmap(head_scores: pd.DataFrame, column: str, path: Path, title: str = "") -> str:
    """Layer x head heatmap of one head-score column (values in [0, 1]); blank cells have no data."""
    grid = head_scores.pivot(index="layer", columns="head", values=column)
    fig, ax = plt.subplots(figsize=(2.2 + 0.35 * grid.shape[1], 1.4 + 0.22 * grid.shape[0]))
    im = ax.imshow(grid.values, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    _thin_ticks(ax, grid.index, max_labels=16, axis="y")
    values = grid.values.astype(float)
    blank = int(np.isnan(values).sum())
    same = np.isfinite(values).any() and np.nanmax(values) == np.nanmin(values)
    ax.set_title((title or readable(column)) + (f"\n(blank: {blank} heads without data)" if blank else "")
                 + (f"\n(every head: {np.nanmax(values):.3g})" if same else ""), fontsize=9)
    fig.colorbar(im, ax=ax, label=readable(column))
    return _save(fig, path)


ROLE_ORDER = ["first", "delimiter", "text", "visual"]


def phi_by_role(role_summary: pd.DataFrame, tau: float, hidden_size: int, path: Path, score: str = "rms") -> str:
    """The sink score per layer for first / delimiter / other text / image tokens (median and max), with tau
    (and phi's ceiling sqrt(hidden) when the score is phi); log axis when the values span decades."""
    frame = role_summary[role_summary["role"].isin(ROLE_ORDER)]
    roles = [r for r in ROLE_ORDER if r in set(frame["role"])]
    name = score_name(score)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0), sharey=True)
    log = spans_decades(frame[["phi_median", "phi_max"]].to_numpy())
    for ax, column, title in ((axes[0], "phi_median", f"median {name} over the tokens"),
                              (axes[1], "phi_max", f"largest {name} over the tokens")):
        for k, role in enumerate(roles):
            g = frame[frame["role"] == role].sort_values("layer")
            ax.plot(g["layer"], g[column], "o-", ms=3, color=TAB10[k], label=readable(role))
        ax.axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:.3g}")
        if score == "rms":
            ax.axhline(hidden_size ** 0.5, color="grey", ls=":", lw=1,
                       label=f"sqrt(hidden) = {hidden_size ** 0.5:.3g} (phi's ceiling)")
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer (residual stream entering it)")
        ax.set_ylabel(name + (" (log scale)" if log else ""))
        ax.legend(fontsize=7)
    formula = SCORE_FORMULAS.get(score)
    fig.suptitle(f"{name} of the first token, delimiters, other text and image tokens, per layer"
                 + (f"\n{name} = {formula}" if formula else ""), fontsize=10)
    return _save(fig, path)


def scan_figures(folder: Path, magnitudes: pd.DataFrame, profile: pd.DataFrame, tokens: pd.DataFrame,
                 head_scores: pd.DataFrame, sink_dims: list[int], tau: float | None = None,
                 score: str = "rms") -> dict[str, str]:
    folder = Path(folder)
    out = {"massive": massive_activation_layers(magnitudes, folder / "massive_activations.png")}
    if profile is not None and len(profile):
        out["profile"] = dim_profile(profile, sink_dims, folder / "dim_profile.png", score=score)
    if tokens is not None and len(tokens) and tau is not None and sink_dims:  # without sink dims phi is 0
        out["phi_attention"] = phi_vs_attention(tokens, tau, folder / "phi_vs_attention.png", score=score)
    if head_scores is not None and len(head_scores):
        out["heads"] = head_heatmap(head_scores, "visual_nonsink_ratio", folder / "head_nonsink_ratio.png",
                                    "visual non-sink ratio (text queries after the image)")
    return out


def image_sinks(image, scores: np.ndarray, sinks: np.ndarray, tau: float, score: str = "rms", title: str = ""):
    """The image beside its image tokens' sink scores on the token grid, visual sinks outlined; returns the Figure.

    scores, sinks: [rows, cols] (float, bool), one cell per image token."""
    rows, cols = scores.shape
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.6))
    axes[0].imshow(image.resize((cols * 32, rows * 32)))
    scores = np.asarray(scores, dtype=float)
    log = spans_decades(scores)
    positive = scores[np.isfinite(scores) & (scores > 0)]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if log else Normalize(vmin=0)
    im = axes[1].imshow(scores, cmap="magma", norm=norm)
    below = np.nanmax(scores) < tau
    fig.colorbar(im, ax=axes[1], label=score_name(score) + (" (log scale)" if log else "")
                 + (f"; all below tau {tau:.3g}" if below else ""))
    for ax, scale in ((axes[0], 32), (axes[1], 1)):
        offset = -0.5 if scale == 1 else 0.0
        for r, c in np.argwhere(sinks):
            ax.add_patch(plt.Rectangle((c * scale + offset, r * scale + offset), scale, scale, fill=False,
                                       edgecolor="cyan", linewidth=2))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("image token column")
        ax.set_ylabel("image token row")
    axes[0].set_title(title or "the image (cyan: visual sinks)", fontsize=9)
    axes[1].set_title(f"{score_name(score)} per image token\n(tau {tau:.3g}; "
                      f"{int(np.asarray(sinks).sum())} tokens at or above it)", fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- training the demo model


def training_curves(log_csv: str | Path, path: str | Path) -> str:
    """Loss and sink metrics over training steps (demo model)."""
    log = pd.read_csv(log_csv)
    layers = sorted(int(c.rsplit("L", 1)[1]) for c in log.columns if c.startswith("bos_attention_L"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(log["global_step"], log["loss"], color="k")
    axes[0].set_yscale("log")
    axes[0].set_title("training loss")
    axes[0].set_ylabel("loss (log)")
    for layer in layers:
        axes[1].plot(log["global_step"], log[f"bos_attention_L{layer}"], label=f"L{layer}")
        axes[2].plot(log["global_step"], log[f"bos_residual_ratio_L{layer}"], label=f"L{layer}")
    axes[1].set_title("mean attention to BOS")
    axes[1].set_ylabel("attention to BOS")
    axes[2].set_title("BOS residual norm / median token norm")
    axes[2].set_ylabel("norm ratio (log)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        _stage_marks(ax, log)
    if layers:
        axes[1].legend(fontsize=7, ncol=2)
    return _save(fig, path, pdf=False)


def _stage_marks(ax, log: pd.DataFrame) -> None:
    change = log["stage"].ne(log["stage"].shift())
    for step, stage in zip(log.loc[change, "global_step"], log.loc[change, "stage"]):
        ax.axvline(step, color="grey", lw=0.5, ls=":")
        ax.text(step, ax.get_ylim()[1], stage, fontsize=6, va="top", rotation=90)


def emergence_curve(curve: pd.DataFrame, path: Path) -> str:
    """Along training: POPE on validation, visual sinks per image, their attention share, image phi."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    axes = axes.ravel()
    x = curve["global_step"]
    axes[0].plot(x, curve["pope_random"], "o-", label="random")
    axes[0].plot(x, curve["pope_adversarial"], "s-", label="adversarial")
    axes[0].set_title("POPE (validation, yes vs no logit)", fontsize=9)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    layer_score = "max_image_layer_score" in curve and curve["max_image_layer_score"].notna().any()
    if layer_score:  # the card's rule; phi saturates on narrow models (its count would be every image token)
        sinks_per_image = curve["visual_sinks_per_image_layer_score"]
        axes[1].plot(x, sinks_per_image, "o-", label="layer-relative score >= 100")
        axes[2].plot(x, curve["visual_sink_attention_layer_score"], "d-", label="to visual sinks (busiest layer)")
    else:
        sinks_per_image = curve["visual_sinks_per_image_max"]
        axes[1].plot(x, sinks_per_image, "s-", label="phi >= tau")
        axes[2].plot(x, curve["visual_sink_attention_max"], "o-", label="to image tokens with phi >= tau (max layer)")
    if (sinks_per_image == 0).all():
        axes[1].set_ylim(-0.5, 5)
        axes[1].text(0.5, 0.55, "0 at every logged step", transform=axes[1].transAxes, ha="center", fontsize=8)
    axes[1].set_title("image tokens counted as sinks (busiest layer >= 2)", fontsize=9)
    axes[1].set_ylabel("visual sinks per image")
    axes[1].legend(fontsize=7)
    axes[2].plot(x, curve["image_attention_mean"], "s-", label="to all image tokens (mean)")
    axes[2].plot(x, curve["first_token_attention_mean"], "^-", label="to the first token (mean)")
    axes[2].set_title("share of text-query attention", fontsize=9)
    axes[2].set_ylabel("attention share")
    axes[2].legend(fontsize=7)
    if layer_score:
        axes[3].plot(x, curve["max_image_layer_score"], "o-", label="largest image-token score")
        axes[3].axhline(100.0, color="k", ls="--", lw=1, label="tau = 100")
        axes[3].set_title("largest image-token score: max over sink dims |x_d| / median token RMS", fontsize=9)
        axes[3].set_ylabel("layer-relative sink score")
    else:
        axes[3].plot(x, curve["max_image_phi"], "o-", label="largest image phi")
        axes[3].axhline(float(curve["tau"].iloc[0]), color="k", ls="--", lw=1, label="tau")
        axes[3].set_title("largest image-token phi", fontsize=9)
        axes[3].set_ylabel(score_label("rms"))
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    for ax in axes:
        ax.set_xlabel("training step (all stages; first logged: start of instruct)")
        for stage, group in curve.groupby("stage", sort=False):
            ax.axvline(group["global_step"].min(), color="grey", lw=0.5)
    return _save(fig, path)


# ----------------------------------------------------------------------------- analyses (issue 7)


def _grid_shape(n: int) -> tuple[int, int]:
    g = int(round(n ** 0.5))
    return (g, g) if g * g == n else (1, n)


def attention_maps(maps: pd.DataFrame, path: Path, layer: int, sample=None, max_heads: int = 16) -> str:
    """Text-to-image attention of each word (rows) and head (columns, last = head mean) on the image grid; x = sink.

    One colour scale for every panel (square-root stretched), so heads compare; panels wrap into
    blocks of rows when one row would be too wide; heads beyond `max_heads` are left out and the title says so."""
    sample = sample if sample is not None else maps["sample"].iloc[0]
    m = maps[(maps["sample"] == sample) & (maps["layer"] == layer)]
    all_heads = [h for h in dict.fromkeys(m["head"]) if str(h) != "mean"]
    panels = all_heads[:max_heads] + (["mean"] if (m["head"].astype(str) == "mean").any() else [])
    words = list(dict.fromkeys(m["query_position"]))
    n_blocks = 1  # wrap the panels into blocks of rows until the figure is at most 3x as wide as high
    while (1.3 * math.ceil(len(panels) / n_blocks) + 1.6) > 3 * (1.3 * n_blocks * len(words) + 1.0):
        n_blocks += 1
    per_row = math.ceil(len(panels) / n_blocks)
    vmax = float(m["attention"].max()) if len(m) else 1.0
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=vmax if vmax > 0 else 1.0)
    fig, axes = plt.subplots(n_blocks * len(words), per_row,
                             figsize=(1.3 * per_row + 1.6, 1.3 * n_blocks * len(words) + 1.0), squeeze=False)
    im = None
    for k, head in enumerate(panels):
        block, c = divmod(k, per_row)
        for r, qpos in enumerate(words):
            ax = axes[block * len(words) + r, c]
            g = m[(m["query_position"] == qpos) & (m["head"].astype(str) == str(head))].sort_values("visual_rank")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("mean of heads" if str(head) == "mean" else f"head {head}", fontsize=8)
            if c == 0:
                word = repr(str(g["query_token"].iloc[0]))[:14] if len(g) else "?"
                ax.set_ylabel(f"{word}\n(pos {qpos})", fontsize=8)
            if not len(g):
                _note(ax, "no data")
                continue
            shape = _grid_shape(len(g))
            im = ax.imshow(g["attention"].to_numpy().reshape(shape), cmap="magma", norm=norm)
            sink = np.nonzero(g["is_sink"].astype(bool).to_numpy())[0]
            ax.scatter(sink % shape[1], sink // shape[1], marker="x", c="cyan", s=14, lw=1)
    for k in range(len(panels), n_blocks * per_row):  # unused places in the last block
        block, c = divmod(k, per_row)
        for r in range(len(words)):
            axes[block * len(words) + r, c].set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention to the image token")
    shown = (f"all {len(all_heads)} heads" if len(all_heads) <= max_heads
             else f"heads {all_heads[0]}-{all_heads[max_heads - 1]} of {len(all_heads)} shown, the rest left out")
    fig.suptitle(f"text-to-image attention, layer {layer}, sample {sample}; {shown} (x: visual sink)", fontsize=9)
    fig.supxlabel("image token grid (one panel per head)", fontsize=8)
    fig.supylabel("text query after the image", fontsize=8)
    return _save(fig, path, pdf=False, tight_layout=False)  # the shared colour bar placed its own axes


CLASS_COLORS = {"visual_sink": "#d62728", "visual_nonsink": "#2ca02c", "bos": "#7f7f7f"}


def contribution_by_class(per_sample: pd.DataFrame, path: Path) -> str:
    """Per layer: attention, ||W_O v|| and contribution of visual sinks, non-sinks and BOS (mean, 95% CI over rows)."""
    import seaborn as sns

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.0))
    present = set(per_sample["token_class"])
    order = [c for c in CLASS_COLORS if c in present]
    layers = sorted(per_sample["layer"].unique())
    palette = {readable(c): CLASS_COLORS[c] for c in order}
    data = per_sample.assign(token_class=per_sample["token_class"].map(readable))
    for ax, column, title, ylabel in zip(
            axes, ("attention", "ov_norm", "contribution"),
            ("attention per token", "value norm ||W_O v|| (per unit attention)", "contribution a ||W_O v||"),
            ("attention from a text query", "||W_O v||", "a ||W_O v||")):
        sns.barplot(data=data, x="layer", y=column, hue="token_class", hue_order=[readable(c) for c in order],
                    palette=palette, errorbar=("ci", 95), ax=ax)
        log = spans_decades(data[column])
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
        ax.set_xlabel("layer")
        _thin_ticks(ax, layers, max_labels=10)
        handles, labels = ax.get_legend_handles_labels()
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(order))
    missing = [readable(c) for c in CLASS_COLORS if c not in present]
    note = f"; no {', '.join(missing)} in these samples" if missing else ""
    fig.suptitle(f"what attended tokens write into the residual stream (text queries after the image; "
                 f"mean, 95% CI){note}", fontsize=9)
    return _save(fig, path, pdf=False)


def location_shares(table: pd.DataFrame, path: Path) -> str:
    """Per layer: share of visual sinks on background (with its CI from the enrichment) against the base rate."""
    t = table[table["layers"].astype(str).str.isnumeric()].copy()
    fig, ax = plt.subplots(figsize=(max(5.5, 1.5 + 0.25 * len(t)), 3.6))
    x = np.arange(len(t))
    share = t["sink_background_share"].to_numpy(dtype=float)
    base = t["background_base_rate"].to_numpy(dtype=float)
    low = np.clip(t["ci_low"].to_numpy(dtype=float) * base, 0, 1)  # a share's CI stays within [0, 1]
    high = np.clip(t["ci_high"].to_numpy(dtype=float) * base, 0, 1)
    err = np.vstack([share - low, high - share])
    has = np.isfinite(share)
    if has.any():
        ax.bar(x[has] - 0.2, share[has], 0.4, yerr=np.nan_to_num(np.abs(err[:, has])), color="#d62728",
               label="visual sinks (95% CI)")
    ax.bar(x + 0.2, base, 0.4, color="#7f7f7f", label="all image tokens (base rate)")
    if (~has).any():
        ax.plot(x[~has] - 0.2, np.zeros((~has).sum()), "x", color="#d62728", ms=7, mew=1.5, clip_on=False,
                label="layer without visual sinks")
    _thin_ticks(ax, t["layers"], max_labels=16)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of tokens on background")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    title = "where visual sinks lie: background share against the base rate"
    if not has.any():
        title += "\n(no visual sinks in any layer: only the base rate is shown)"
    ax.set_title(title, fontsize=9)
    return _save(fig, path, pdf=False)


def vit_norms(tokens: pd.DataFrame, norm_ratio: float, path: Path, score: str = "rms") -> str:
    """Per site: image-token norm ratio against the language model's largest sink score; red = visual sink of the LM."""
    sites = list(dict.fromkeys(tokens["site"]))
    fig, axes = plt.subplots(1, len(sites), figsize=(4.8 * len(sites) + 0.4, 3.8), squeeze=False)
    log_x = spans_decades(tokens["norm_ratio"], 1.5)  # one scale for every panel, so sites compare
    log_y = spans_decades(tokens["max_phi"])
    for ax, site in zip(axes[0], sites):
        t = tokens[tokens["site"] == site]
        sink = t["lm_visual_sink"].astype(bool).to_numpy()
        ax.scatter(t["norm_ratio"], t["max_phi"], s=5, alpha=0.4, c=np.where(sink, "#d62728", "#2ca02c"))
        ax.axvline(norm_ratio, color="k", ls=":", lw=0.8)
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 0.5, 1, 2, 5, 10 ...
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log range overlap
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("token norm / the image's median token norm" + (" (log scale)" if log_x else ""))
        ax.set_ylabel(f"largest {score_name(score)}\nin the language model" + (" (log scale)" if log_y else ""))
        ax.set_title(readable(site), fontsize=9)
        handles = [Line2D([], [], ls="", marker="o", color="#d62728", label=f"visual sink in the LM ({int(sink.sum())})"),
                   Line2D([], [], ls="", marker="o", color="#2ca02c", label=f"not a sink ({int((~sink).sum())})"),
                   Line2D([], [], ls=":", color="k", label=f"high norm: >= {norm_ratio:g}x median")]
        ax.legend(handles=handles, fontsize=7)
    formula = SCORE_FORMULAS.get(score)
    fig.suptitle(f"high-norm image tokens against the language model's {score_name(score)}"
                 + (f" ({formula}; largest over layers)" if formula else ""), fontsize=9)
    return _save(fig, path, pdf=False)


KNOCKOUT_COLORS = dict(zip(["none", "visual_sinks", "random_visual", "top_nonsink", "bos"], TAB10))


def ablation_curves(table: pd.DataFrame, path: Path) -> str:
    """Each metric against tau, one line per knockout condition (CI bands); `none` and `bos` as flat lines.

    Points where no token was knocked out (n_tokens 0) are drawn hollow; the legend says when a
    condition knocked out nothing at any tau."""
    metrics = list(dict.fromkeys(table["metric"]))
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols + 2.6, 3.2 * nrows + 0.6), squeeze=False)
    handles = {}
    for ax, metric in zip(axes.ravel(), metrics):
        t = table[table["metric"] == metric]
        swept = t[t["tau"].notna()]
        for condition, g in swept.groupby("condition", sort=False):
            g = g.sort_values("tau")
            color = KNOCKOUT_COLORS.get(condition, "grey")
            empty = g["n_tokens"].fillna(0).to_numpy() == 0 if "n_tokens" in g else np.zeros(len(g), bool)
            label = readable(condition) + (" (0 tokens at every tau: nothing knocked out)" if empty.all() else "")
            ax.plot(g["tau"], g["value"], "-", color=color)
            ax.plot(g["tau"][~empty], g["value"][~empty], "o", color=color)
            ax.plot(g["tau"][empty], g["value"][empty], "o", mfc="white", color=color)
            ax.fill_between(g["tau"], g["ci_low"], g["ci_high"], color=color, alpha=0.15)
            handles.setdefault(condition, Line2D([], [], color=color, marker="o", mfc="white" if empty.all() else color,
                                                 label=label))
        for _, r in t[t["tau"].isna()].iterrows():
            color = KNOCKOUT_COLORS.get(r["condition"], "grey")
            ax.axhline(r["value"], color=color, ls="--", lw=1)
            handles.setdefault(r["condition"], Line2D([], [], color=color, ls="--", label=readable(r["condition"])))
        ax.set_xlabel("tau (sink threshold)")
        ax.set_ylabel(readable(metric))
        if metric in ("accuracy", "f1"):
            ax.set_ylim(-0.02, 1.05)
        ax.set_title(readable(metric).split("\n")[0], fontsize=9)
    for ax in axes.ravel()[len(metrics):]:
        ax.set_visible(False)
    fig.legend(handles=list(handles.values()), title="keys knocked out", fontsize=7, title_fontsize=8,
               loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3)
    fig.suptitle("knockout of attention from text queries to each key set (hollow: 0 tokens knocked out)",
                 fontsize=9)
    return _save(fig, path, pdf=False)


# ----------------------------------------------------------------------------- VAR evaluation and patching (issue 8)


def _errorbars(ax, x, value, low, high, **kw):
    yerr = np.vstack([np.clip(value - low, 0, None), np.clip(high - value, 0, None)])
    ax.errorbar(x, value, yerr=np.nan_to_num(yerr), fmt="o", capsize=3, **kw)


def _site_label(site, source) -> str:
    if source == "self":
        return f"{readable(site)}\n(own image: must be 0)"
    return f"{readable(site)}\n({readable(source)})"


def patching_effects(table: pd.DataFrame, path: Path) -> str:
    """Left: effect of each site patched in every layer at once (95% CI), the full image swap dashed.
    Right: effect per single layer for the residual and head sites (CI bands), or why there is none."""
    both = table[table["layer"] == -1].reset_index(drop=True)
    per_layer = table[table["layer"] >= 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.3, 1]})
    ax = axes[0]
    for i, r in both.iterrows():
        _errorbars(ax, np.array([i]), np.array([r["effect"]]), np.array([r["ci_low"]]), np.array([r["ci_high"]]),
                   color=TAB10[i % 10])
    ax.set_xticks(range(len(both)))
    ax.set_xticklabels([_site_label(r["site"], r["source"]) for _, r in both.iterrows()], rotation=45, ha="right",
                       fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    swap = both[both["source"] == "other_image"]["full_effect"]
    if len(swap):
        ax.axhline(float(swap.mean()), color="grey", ls="--", lw=1, label="whole image swapped")
        ax.legend(fontsize=7)
    ax.set_xlabel("site patched (source)")
    ax.set_ylabel("change of the correct answer's\nlogit difference (95% CI)")
    ax.set_title("every layer at once", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if not len(both):
        _note(ax, "no site was patched in every layer at once in this run")
    ax = axes[1]
    ax.set_title("one layer at a time", fontsize=9)
    if len(per_layer):
        for i, (site, g) in enumerate(per_layer.groupby("site", sort=False)):
            g = g.sort_values("layer")
            c = TAB10[i % 10]
            ax.plot(g["layer"], g["effect"], "o-", color=c, label=readable(site), ms=3)
            ax.fill_between(g["layer"], g["ci_low"], g["ci_high"], color=c, alpha=0.15)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("layer patched (alone)")
        ax.set_ylabel("change of the correct answer's\nlogit difference")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    else:
        _note(ax, "no single layer was patched in this run\n(the report patches every layer at once;\n"
                  "`sinkscope patch --layers 2,3` patches layers one at a time)")
    fig.suptitle("activation patching from an image with the other answer", fontsize=9)
    return _save(fig, path, pdf=False)


def var_eval_bars(table: pd.DataFrame, path: Path, metric: str = "accuracy") -> str:
    """`metric` per condition and task on the test split, 95% CIs (accuracy CIs from var_eval.csv).

    Every bar carries its value (a bar of height 0 is still seen) and, where answers could not
    be parsed, how many."""
    tasks = list(dict.fromkeys(table["task"]))
    conditions = list(dict.fromkeys(table["condition"]))
    fig, ax = plt.subplots(figsize=(3.2 + 1.7 * len(tasks), 4.0))
    width = 0.8 / max(len(conditions), 1)
    for k, condition in enumerate(conditions):
        t = table[table["condition"] == condition].set_index("task").reindex(tasks)
        x = np.arange(len(tasks)) + (k - (len(conditions) - 1) / 2) * width
        values = t[metric].to_numpy(float)
        bars = ax.bar(x, np.nan_to_num(values), width, color=TAB10[k % 10], label=readable(condition), alpha=0.85)
        lo, hi = (f"{metric}_ci_low", f"{metric}_ci_high") if f"{metric}_ci_low" in t else ("ci_low", "ci_high")
        if metric == "accuracy" or lo != "ci_low":
            _errorbars(ax, x, values, t[lo].to_numpy(float), t[hi].to_numpy(float), color="k", ms=0, lw=0.8)
        notes = [[] for _ in tasks]
        if metric == "accuracy" and "yes_ratio" in t:  # accuracy 0.5 from answering "no" to all reads differently
            for note, y in zip(notes, t["yes_ratio"]):
                note += [f"yes {y:.2f}"] if y == y else []
        if "n_unparseable" in t and "n" in t:
            for note, u, n in zip(notes, t["n_unparseable"], t["n"]):
                note += [f"{int(u)}/{int(n)} unparsed"] if u == u and u > 0 else []
        ax.set_ylim(0, 1.05)
        _value_labels(ax, bars, values, [", ".join(note) for note in notes],
                      ci_high=t[hi].to_numpy(float) if metric == "accuracy" or lo != "ci_low" else None)
    n = table.drop_duplicates("task").set_index("task")["n"] if "n" in table else None
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([readable(t) + (f"\n(n = {int(n[t])})" if n is not None and n[t] == n[t] else "")
                        for t in tasks], fontsize=8)
    ax.set_xlabel("task (test split)")
    ax.set_ylabel(f"{readable(metric)} (95% CI)" if metric == "accuracy" or f"{metric}_ci_low" in table
                  else readable(metric))
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="condition", title_fontsize=8)
    ax.set_title(f"VAR and its controls: {readable(metric)} on the test split"
                 + ("\n(bar labels: value, share of yes answers, unparsed answers)" if metric == "accuracy" else ""),
                 fontsize=9)
    return _save(fig, path, pdf=False)


def var_sweep_heatmap(sweep: pd.DataFrame, path: Path, metric: str = "f1", chosen: tuple[float, float] | None = None) -> str:
    """Validation `metric` (all tasks pooled) over the (p, rho) grid; the chosen cell outlined, baseline in the title."""
    import seaborn as sns

    grid = sweep[sweep["condition"] == "var"].pivot_table(index="rho", columns="p", values=metric, aggfunc="mean")
    fig, ax = plt.subplots(figsize=(3.0 + 0.9 * grid.shape[1], 2.0 + 0.6 * grid.shape[0]))
    values = grid.to_numpy(float)
    lo, hi = (float(np.nanmin(values)), float(np.nanmax(values))) if np.isfinite(values).any() else (0.0, 1.0)
    if hi - lo < 0.05:  # a tied grid: a narrow band inside the metric's range [0, 1], not -0.1 to 0.1
        lo, hi = max(0.0, lo - 0.025), min(1.0, hi + 0.025)
        lo, hi = (lo, lo + 0.05) if hi - lo < 0.05 else (lo, hi)
    sns.heatmap(grid, annot=True, fmt=".3f", cmap="viridis", vmin=lo, vmax=hi, ax=ax,
                cbar_kws={"label": f"validation {readable(metric)}"})
    base = sweep[sweep["condition"] == "baseline"][metric]
    title = (f"VAR on the validation split (baseline {float(base.mean()):.3f})" if len(base)
             else "VAR on the validation split")
    if np.isfinite(values).any() and np.nanmax(values) == np.nanmin(values):
        title += "\nevery cell ties: the data do not choose p or rho"
    ax.set_title(title + "\n(red: chosen p, rho)" if chosen is not None else title, fontsize=9)
    ax.set_xlabel("p (share of sink attention moved)")
    ax.set_ylabel("rho (image-centric threshold)")
    if chosen is not None and chosen[1] in list(grid.index) and chosen[0] in list(grid.columns):
        i, j = list(grid.index).index(chosen[1]), list(grid.columns).index(chosen[0])
        ax.add_patch(plt.Rectangle((j, i), 1, 1, fill=False, edgecolor="red", lw=2))
    return _save(fig, path, pdf=False)


def dose_response(table: pd.DataFrame, path: Path, metric: str = "attention") -> str:
    """Sink-signature injection: `metric` of the injected tokens against the scale, one panel per token
    group, a line per layer band (solid: injected; dashed: random-dim control; dotted: rescale control;
    flat grey: no injection), 95% CIs shaded. Takes `inject.csv` (sinkscope.analyses.inject)."""
    from matplotlib.lines import Line2D

    colors = plt.get_cmap("tab10").colors
    names = {"background": "background image", "object": "object image", "text": "text", "inject": "injected",
             "random_dim": "random-dim control", "rescale": "rescale control"}
    t = table[(table["metric"] == metric) & (table["band"] != "answer")]
    groups = list(dict.fromkeys(t["group"])) or ["(none)"]
    bands = sorted(t["band"].unique(), key=lambda b: int(str(b).split()[1].split("-")[0]))
    fig, axes = plt.subplots(len(groups), 1, figsize=(7.5, 2.9 * len(groups) + 0.6), squeeze=False, sharex=True,
                             sharey=True)
    ylabel = (f"{metric.replace('_', ' ')} per injected token\n(text queries after the image,\nmean over heads)"
              if metric.startswith("attention") else metric.replace("_", " "))
    styles = {"inject": "-", "random_dim": "--", "rescale": ":"}
    scales = sorted(s for s in t["scale"].dropna().unique())
    positive = [s for s in scales if s > 0]
    linthresh = min(positive) if positive else 1e-3
    for ax, group in zip(axes[:, 0], groups):
        g = t[t["group"] == group]
        if g.empty:
            ax.text(0.5, 0.5, "no tokens of this group", ha="center", va="center", transform=ax.transAxes)
        for k, band in enumerate(bands):
            color = colors[k % 10]
            for treatment, style in styles.items():
                r = g[(g["band"] == band) & (g["treatment"] == treatment)].sort_values("scale")
                if r.empty:
                    continue
                ax.plot(r["scale"], r["value"], style, marker="o", ms=3, color=color, lw=1.2)
                ax.fill_between(r["scale"], r["ci_low"], r["ci_high"], color=color, alpha=0.12, lw=0)
            none = g[(g["band"] == band) & (g["treatment"] == "none")]
            if len(none):
                ax.axhline(float(none["value"].iloc[0]), color=color, lw=2.5, alpha=0.25)
        ax.set_xscale("symlog", linthresh=linthresh)
        if scales:
            ax.set_xlim(-0.3 * linthresh, max(scales) * 1.3)  # no negative scales: start the axis at 0
        ax.set_title(f"{names.get(group, group)} tokens", fontsize=9)
        ax.set_xlabel("scale (x first token's sink dims; symlog)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[k % 10], lw=2, label=str(b)) for k, b in enumerate(bands)]
    handles += [Line2D([], [], color="k", ls=s, label=names.get(n, n)) for n, s in styles.items()]
    handles.append(Line2D([], [], color="k", lw=2.5, alpha=0.25, label="no injection"))
    axes[0][0].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Writing the sink signature into tokens: dose response", fontsize=10)
    return _save(fig, path, pdf=False)


def readout_shares(table: pd.DataFrame, path: Path) -> str:
    """Per task, per layer: how selectively the answer position attends to the asked object (its share of
    the attention to object tokens over its share of the object tokens; 1 = uniform), for right answers and
    binding errors, and to the object whose value a binding error names.

    table: rows of task, outcome, layer, n, asked_selectivity, named_selectivity (+ _low/_high CIs).
    """
    tasks = list(dict.fromkeys(table.task))
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5.2 * max(len(tasks), 1), 3.6), sharey=True, squeeze=False)
    styles = [("correct", "asked_selectivity", "asked object, right answers", "#2ca02c"),
              ("binding error", "asked_selectivity", "asked object, binding errors", "#1f77b4"),
              ("binding error", "named_selectivity", "object the error names, binding errors", "#d62728")]
    for ax, task in zip(axes[0], tasks):
        t = table[table.task == task]
        counts = t.groupby("outcome").n.first()
        for outcome, col, label, colour in styles:
            g = t[t.outcome == outcome].sort_values("layer")
            if g.empty:
                continue
            ax.plot(g.layer, g[col], color=colour, label=label)
            ax.fill_between(g.layer, g[col + "_low"], g[col + "_high"], color=colour, alpha=0.2, linewidth=0)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="uniform over object tokens")
        ax.set_title(f"{readable(task)} (right answers n {int(counts.get('correct', 0))}, "
                     f"binding errors n {int(counts.get('binding error', 0))})", fontsize=10)
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("answer position's attention to the object\nper token, relative to uniform (heads averaged)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[0][-1].legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=7,
                       loc="upper left", bbox_to_anchor=(1.02, 1), title="shaded: 95% bootstrap CI", title_fontsize=7)
    return _save(fig, path)


def probe_accuracies(table: pd.DataFrame, path: Path) -> str:
    """Linear-probe accuracy of each object patch's shape and colour, from the vision features to the LLM's
    last layer; solid: all object patches, dashed: small objects in multi-object scenes, dotted: the majority
    class rate.

    table: rows of site ("vision" | "layer L"), target, subset, accuracy, n, majority (`analyses/demo_probe.py`).
    """
    sites = list(dict.fromkeys(table.site))
    x = np.arange(len(sites))
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colours = {"shape": "#9467bd", "colour": "#ff7f0e"}
    for target, colour in colours.items():
        for subset, style in (("all", "-"), ("small object, multi-object scene", "--")):
            g = table[(table.target == target) & (table.subset == subset)].set_index("site").loc[sites]
            ax.plot(x, g.accuracy, style, color=colour, marker="o", markersize=3,
                    label=f"{target}, {'all object patches' if subset == 'all' else subset} (n {int(g.n.iloc[0])})")
        base = table[(table.target == target) & (table.subset == "all")].majority.iloc[0]
        ax.axhline(base, color=colour, linestyle=":", linewidth=1, label=f"{target}, majority class")
    ax.set_xticks(x, ["vision\nfeatures" if s == "vision" else s.replace("layer ", "L") for s in sites], fontsize=8)
    ax.set_xlabel("where the image tokens are read (L0: the LLM's input, after the projector)")
    ax.set_ylabel("held-out probe accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2)  # below: the axes keep the width
    return _save(fig, path)
