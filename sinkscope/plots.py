"""Every figure sinkscope draws. Functions take tidy frames and a path; they return file names.

PNG always, PDF beside it where cheap. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

KIND_COLORS = {"bos": "#d62728", "text": "#1f77b4", "visual": "#2ca02c", "generated": "#9467bd"}


def _save(fig, path: Path, pdf: bool = True) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    if pdf:
        fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)
    return path.name


def massive_activation_layers(magnitudes: pd.DataFrame, path: Path, title: str = "") -> str:
    """Sun et al.'s plot: top-1/2/3 |activation| and the median, per layer (log scale)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for col, style in (("top1", "-o"), ("top2", "-s"), ("top3", "-^"), ("median", "--")):
        ax.plot(magnitudes["layer"], magnitudes[col], style, label=col, ms=4)
    ax.set_yscale("log")
    ax.set_xlabel("layer (residual stream entering it)")
    ax.set_ylabel("|activation|")
    ax.set_title(title or "largest activations per layer")
    ax.legend(fontsize=8)
    return _save(fig, path)


def dim_profile(profile: pd.DataFrame, sink_dims: list[int], path: Path, layer: int | None = None) -> str:
    """|RMS-normalised value| per hidden dim: BOS against the most sink-like image token."""
    if layer is None:
        per_layer = profile.groupby("layer")["visual_phi"].max()
        layer = int(per_layer.idxmax()) if per_layer.notna().any() else int(profile["layer"].median())
    p = profile[profile["layer"] == layer].sort_values("dim")
    rows = [("bos", "BOS token")]
    if p["visual"].notna().any():
        pos = int(p["visual_position"].iloc[0])
        rows.append(("visual", f"most sink-like image token (position {pos}, phi {p['visual_phi'].iloc[0]:.1f})"))
    if p["text_median"].notna().any():
        rows.append(("text_median", "median text token"))
    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 1.9 * len(rows)), sharex=True, squeeze=False)
    for ax, (col, label) in zip(axes[:, 0], rows):
        ax.bar(p["dim"], p[col].abs(), width=1.0, color=KIND_COLORS.get(col.split("_")[0], "grey"))
        for d in sink_dims:
            ax.axvline(d, color="k", lw=0.6, ls=":")
        ax.set_ylabel("|x/RMS(x)|")
        ax.set_title(label, fontsize=9)
    axes[-1, 0].set_xlabel(f"hidden dimension (layer {layer}; dotted: sink dims {sink_dims})")
    return _save(fig, path)


def phi_vs_attention(tokens: pd.DataFrame, tau: float, path: Path, min_layer: int = 2) -> str:
    """Each image token's phi against the attention it receives from text queries."""
    vis = tokens[(tokens["token_kind"] == "visual") & (tokens["layer"] >= min_layer)]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if len(vis):
        ax.scatter(vis["phi"], vis["attention_received"], s=4, alpha=0.3, c=np.where(vis["is_sink"], "#d62728", "#2ca02c"))
        ax.axvline(tau, color="k", ls=":", lw=0.8, label=f"tau = {tau:.3g}")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no image tokens", ha="center", transform=ax.transAxes)
    ax.set_xlabel("phi (max |x_d / RMS(x)| over sink dims)")
    ax.set_ylabel("attention received\n(mean over heads and text queries)")
    ax.set_title(f"image tokens, layers >= {min_layer}", fontsize=9)
    return _save(fig, path)


def head_heatmap(head_scores: pd.DataFrame, column: str, path: Path, title: str = "") -> str:
    """Layer x head heatmap of one head-score column."""
    grid = head_scores.pivot(index="layer", columns="head", values=column)
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * grid.shape[1], 1.0 + 0.3 * grid.shape[0]))
    im = ax.imshow(grid.values, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_title(title or column, fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def training_curves(log_csv: str | Path, path: str | Path) -> str:
    """Loss and sink metrics over training steps (demo model)."""
    log = pd.read_csv(log_csv)
    layers = sorted(int(c.rsplit("L", 1)[1]) for c in log.columns if c.startswith("bos_attention_L"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(log["global_step"], log["loss"], color="k")
    axes[0].set_yscale("log")
    axes[0].set_title("training loss")
    for layer in layers:
        axes[1].plot(log["global_step"], log[f"bos_attention_L{layer}"], label=f"L{layer}")
        axes[2].plot(log["global_step"], log[f"bos_residual_ratio_L{layer}"], label=f"L{layer}")
    axes[1].set_title("mean attention to BOS")
    axes[2].set_title("BOS residual norm / median token norm")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        _stage_marks(ax, log)
    axes[1].legend(fontsize=7, ncol=2)
    return _save(fig, path, pdf=False)


def _stage_marks(ax, log: pd.DataFrame) -> None:
    change = log["stage"].ne(log["stage"].shift())
    for step, stage in zip(log.loc[change, "global_step"], log.loc[change, "stage"]):
        ax.axvline(step, color="grey", lw=0.5, ls=":")
        ax.text(step, ax.get_ylim()[1], stage, fontsize=6, va="top", rotation=90)


ROLE_ORDER = ["first", "delimiter", "text", "visual"]


def phi_by_role(role_summary: pd.DataFrame, tau: float, hidden_size: int, path: Path) -> str:
    """phi per layer for first / delimiter / other text / image tokens (median and max), with tau and sqrt(hidden)."""
    import seaborn as sns

    frame = role_summary[role_summary["role"].isin(ROLE_ORDER)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, column, title in ((axes[0], "phi_median", "median phi"), (axes[1], "phi_max", "max phi")):
        sns.lineplot(data=frame, x="layer", y=column, hue="role", hue_order=[r for r in ROLE_ORDER if r in set(frame.role)],
                     marker="o", ax=ax)
        ax.axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:.3g}")
        ax.axhline(hidden_size ** 0.5, color="grey", ls=":", lw=1, label=f"sqrt(hidden) = {hidden_size ** 0.5:.3g}")
        ax.set_title(title)
        ax.set_ylabel("phi = max over sink dims |x_d / RMS(x)|")
        ax.legend(fontsize=7)
    fig.suptitle("phi of the first token, delimiters, other text and image tokens, per layer")
    return _save(fig, path)


def scan_figures(folder: Path, magnitudes: pd.DataFrame, profile: pd.DataFrame, tokens: pd.DataFrame,
                 head_scores: pd.DataFrame, sink_dims: list[int], tau: float | None = None) -> dict[str, str]:
    folder = Path(folder)
    out = {"massive": massive_activation_layers(magnitudes, folder / "massive_activations.png")}
    if profile is not None and len(profile):
        out["profile"] = dim_profile(profile, sink_dims, folder / "dim_profile.png")
    if tokens is not None and len(tokens) and tau is not None and sink_dims:  # without sink dims phi is 0
        out["phi_attention"] = phi_vs_attention(tokens, tau, folder / "phi_vs_attention.png")
    if head_scores is not None and len(head_scores):
        out["heads"] = head_heatmap(head_scores, "visual_nonsink_ratio", folder / "head_nonsink_ratio.png",
                                    "visual non-sink ratio (text queries after the image)")
    return out


def emergence_curve(curve: pd.DataFrame, path: Path) -> str:
    """Along training: POPE on validation, visual sinks per image, their attention share, image phi."""
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    x = curve["global_step"]
    axes[0].plot(x, curve["pope_random"], "o-", label="random")
    axes[0].plot(x, curve["pope_adversarial"], "s-", label="adversarial")
    axes[0].set_title("POPE (validation, yes vs no logit)")
    axes[0].legend(fontsize=7)
    axes[1].plot(x, curve["visual_sinks_per_image_max"], "s-", label="phi >= scaled paper tau (saturated)")
    if "visual_sinks_per_image_layer_score" in curve:
        axes[1].plot(x, curve["visual_sinks_per_image_layer_score"], "o-", label="layer-relative score >= 100")
    axes[1].set_title("image tokens counted as sinks (busiest layer)")
    axes[1].legend(fontsize=7)
    axes[2].plot(x, curve["visual_sink_attention_max"], "o-", label="to image tokens with phi >= tau (max layer)")
    if "visual_sink_attention_layer_score" in curve:
        axes[2].plot(x, curve["visual_sink_attention_layer_score"], "d-", label="to visual sinks, layer score (max layer)")
    axes[2].plot(x, curve["image_attention_mean"], "s-", label="to all image tokens (mean)")
    axes[2].plot(x, curve["first_token_attention_mean"], "^-", label="to the first token (mean)")
    axes[2].set_title("share of text-query attention")
    axes[2].legend(fontsize=7)
    if "max_image_layer_score" in curve and curve["max_image_layer_score"].notna().any():
        axes[3].plot(x, curve["max_image_layer_score"], "o-", label="largest image score")
        axes[3].axhline(100.0, color="k", ls="--", lw=1, label="tau = 100")
        axes[3].set_title("largest image-token layer-relative score")
    else:
        axes[3].plot(x, curve["max_image_phi"], "o-", label="largest image phi")
        axes[3].axhline(float(curve["tau"].iloc[0]), color="k", ls="--", lw=1, label="tau")
        axes[3].set_title("largest image-token phi")
    axes[3].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("training step")
        for stage, group in curve.groupby("stage", sort=False):
            ax.axvline(group["global_step"].min(), color="grey", lw=0.5)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- analyses (issue 7)


def _grid_shape(n: int) -> tuple[int, int]:
    g = int(round(n ** 0.5))
    return (g, g) if g * g == n else (1, n)


def attention_maps(maps: pd.DataFrame, path: Path, layer: int, sample=None, max_heads: int = 8) -> str:
    """Text-to-image attention of each word (rows) and head (columns, last = head mean) on the image grid; x = sink."""
    sample = sample if sample is not None else maps["sample"].iloc[0]
    m = maps[(maps["sample"] == sample) & (maps["layer"] == layer)]
    heads = [h for h in dict.fromkeys(m["head"]) if h != "mean"][:max_heads] + ["mean"]
    words = list(dict.fromkeys(m["query_position"]))
    fig, axes = plt.subplots(len(words), len(heads), figsize=(1.6 * len(heads) + 0.6, 1.6 * len(words) + 0.6),
                             squeeze=False)
    for r, qpos in enumerate(words):
        for c, head in enumerate(heads):
            ax = axes[r, c]
            g = m[(m["query_position"] == qpos) & (m["head"] == head)].sort_values("visual_rank")
            shape = _grid_shape(len(g))
            ax.imshow(g["attention"].to_numpy().reshape(shape), cmap="magma")
            sink = np.nonzero(g["is_sink"].astype(bool).to_numpy())[0]
            ax.scatter(sink % shape[1], sink // shape[1], marker="x", c="cyan", s=14, lw=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if c == 0:
                ax.set_ylabel(repr(str(g["query_token"].iloc[0]))[:12] if len(g) else "", fontsize=8)
    fig.suptitle(f"text-to-image attention, layer {layer}, sample {sample} (x: visual sink)", fontsize=9)
    return _save(fig, path, pdf=False)


CLASS_COLORS = {"visual_sink": "#d62728", "visual_nonsink": "#2ca02c", "bos": "#7f7f7f"}


def contribution_by_class(per_sample: pd.DataFrame, path: Path) -> str:
    """Per layer: attention, ||W_O v|| and contribution of visual sinks, non-sinks and BOS (mean, 95% CI over rows)."""
    import seaborn as sns

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    order = [c for c in CLASS_COLORS if c in set(per_sample["token_class"])]
    for ax, column, title in zip(axes, ("attention", "ov_norm", "contribution"),
                                 ("attention per token", "||W_O v|| (per unit attention)", "contribution a ||W_O v||")):
        sns.barplot(data=per_sample, x="layer", y=column, hue="token_class", hue_order=order,
                    palette=CLASS_COLORS, errorbar=("ci", 95), ax=ax)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("what attended tokens write into the residual stream (text queries after the image)", fontsize=9)
    return _save(fig, path, pdf=False)


def location_shares(table: pd.DataFrame, path: Path) -> str:
    """Per layer: share of visual sinks on background (with its CI from the enrichment) against the base rate."""
    t = table[table["layers"].str.isnumeric()].copy()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    x = np.arange(len(t))
    share = t["sink_background_share"].to_numpy(dtype=float)
    base = t["background_base_rate"].to_numpy(dtype=float)
    err = np.vstack([share - t["ci_low"].to_numpy(dtype=float) * base, t["ci_high"].to_numpy(dtype=float) * base - share])
    ax.bar(x - 0.2, np.nan_to_num(share), 0.4, yerr=np.nan_to_num(np.abs(err)), color="#d62728", label="visual sinks")
    ax.bar(x + 0.2, base, 0.4, color="#7f7f7f", label="all image tokens (base rate)")
    ax.set_xticks(x, t["layers"])
    ax.set_xlabel("layer")
    ax.set_ylabel("share on background")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path, pdf=False)


def vit_norms(tokens: pd.DataFrame, norm_ratio: float, path: Path) -> str:
    """Per site: image-token norm ratio against the language model's max phi; red = visual sink of the LM."""
    sites = list(dict.fromkeys(tokens["site"]))
    fig, axes = plt.subplots(1, len(sites), figsize=(4.6 * len(sites), 3.4), squeeze=False)
    for ax, site in zip(axes[0], sites):
        t = tokens[tokens["site"] == site]
        ax.scatter(t["norm_ratio"], t["max_phi"], s=5, alpha=0.4,
                   c=np.where(t["lm_visual_sink"].astype(bool), "#d62728", "#2ca02c"))
        ax.axvline(norm_ratio, color="k", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"norm / image median ({site})")
        ax.set_ylabel("max phi in the language model")
    return _save(fig, path, pdf=False)


def ablation_curves(table: pd.DataFrame, path: Path) -> str:
    """Each metric against tau, one line per knockout condition (CI bands); `none` and `bos` as flat lines."""
    import seaborn as sns

    metrics = list(dict.fromkeys(table["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.4), squeeze=False)
    palette = dict(zip(["none", "visual_sinks", "random_visual", "top_nonsink", "bos"], sns.color_palette("tab10", 5)))
    for ax, metric in zip(axes[0], metrics):
        t = table[table["metric"] == metric]
        swept = t[t["tau"].notna()]
        for condition, g in swept.groupby("condition"):
            g = g.sort_values("tau")
            ax.plot(g["tau"], g["value"], "o-", color=palette.get(condition), label=condition)
            ax.fill_between(g["tau"], g["ci_low"], g["ci_high"], color=palette.get(condition), alpha=0.15)
        for _, r in t[t["tau"].isna()].iterrows():
            ax.axhline(r["value"], color=palette.get(r["condition"]), ls="--", lw=1, label=r["condition"])
        ax.set_xlabel("tau (sink threshold)")
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("knockout of attention from text queries to each key set", fontsize=9)
    return _save(fig, path, pdf=False)


# ----------------------------------------------------------------------------- VAR evaluation and patching (issue 8)


def _errorbars(ax, x, value, low, high, **kw):
    yerr = np.vstack([np.clip(value - low, 0, None), np.clip(high - value, 0, None)])
    ax.errorbar(x, value, yerr=np.nan_to_num(yerr), fmt="o", capsize=3, **kw)


def patching_effects(table: pd.DataFrame, path: Path) -> str:
    """Left: effect of each site patched in every layer at once (95% CI), the full image swap dashed.
    Right: effect per single layer for the residual and head sites (CI bands)."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", font_scale=0.8)
    both = table[table["layer"] == -1].reset_index(drop=True)
    per_layer = table[table["layer"] >= 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
    ax = axes[0]
    colors = sns.color_palette("tab10", max(len(both), 1))
    for i, r in both.iterrows():
        _errorbars(ax, np.array([i]), np.array([r["effect"]]), np.array([r["ci_low"]]), np.array([r["ci_high"]]),
                   color=colors[i])
    ax.set_xticks(range(len(both)))
    ax.set_xticklabels([f"{r['site']}\n({r['source']})" for _, r in both.iterrows()], rotation=45, ha="right", fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    swap = both[both["source"] == "other_image"]["full_effect"]
    if len(swap):
        ax.axhline(float(swap.mean()), color="grey", ls="--", lw=1, label="whole image swapped")
        ax.legend(fontsize=7)
    ax.set_ylabel("change of the correct answer's logit difference")
    ax.set_title("every layer at once", fontsize=9)
    ax = axes[1]
    for i, (site, g) in enumerate(per_layer.groupby("site", sort=False)):
        g = g.sort_values("layer")
        c = sns.color_palette("tab10", 10)[i % 10]
        ax.plot(g["layer"], g["effect"], "o-", color=c, label=site, ms=3)
        ax.fill_between(g["layer"], g["ci_low"], g["ci_high"], color=c, alpha=0.15)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("layer patched (alone)")
    ax.set_title("one layer at a time", fontsize=9)
    if len(per_layer):
        ax.legend(fontsize=7)
    fig.suptitle("activation patching from an image with the other answer", fontsize=9)
    out = _save(fig, path, pdf=False)
    sns.reset_orig()
    return out


def var_eval_bars(table: pd.DataFrame, path: Path, metric: str = "accuracy") -> str:
    """`metric` per condition and task on the test split, 95% CIs (accuracy CIs from var_eval.csv)."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", font_scale=0.8)
    tasks = list(dict.fromkeys(table["task"]))
    conditions = list(dict.fromkeys(table["condition"]))
    fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(tasks), 3.6))
    width = 0.8 / max(len(conditions), 1)
    colors = sns.color_palette("tab10", len(conditions))
    for k, condition in enumerate(conditions):
        t = table[table["condition"] == condition].set_index("task").reindex(tasks)
        x = np.arange(len(tasks)) + (k - (len(conditions) - 1) / 2) * width
        ax.bar(x, t[metric], width, color=colors[k], label=condition, alpha=0.85)
        lo, hi = (f"{metric}_ci_low", f"{metric}_ci_high") if f"{metric}_ci_low" in t else ("ci_low", "ci_high")
        if metric == "accuracy" or lo != "ci_low":
            _errorbars(ax, x, t[metric].to_numpy(float), t[lo].to_numpy(float), t[hi].to_numpy(float),
                       color="k", ms=0, lw=0.8)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, fontsize=8)
    ax.set_ylabel(f"{metric} (test split)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2)
    out = _save(fig, path, pdf=False)
    sns.reset_orig()
    return out


def var_sweep_heatmap(sweep: pd.DataFrame, path: Path, metric: str = "f1", chosen: tuple[float, float] | None = None) -> str:
    """Validation `metric` (all tasks pooled) over the (p, rho) grid; the chosen cell outlined, baseline in the title."""
    import seaborn as sns

    grid = sweep[sweep["condition"] == "var"].pivot_table(index="rho", columns="p", values=metric, aggfunc="mean")
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * grid.shape[1], 1.2 + 0.6 * grid.shape[0]))
    sns.heatmap(grid, annot=True, fmt=".3f", cmap="viridis", ax=ax, cbar_kws={"label": f"validation {metric}"})
    base = sweep[sweep["condition"] == "baseline"][metric]
    title = f"VAR on the validation split (baseline {float(base.mean()):.3f})" if len(base) else "VAR on the validation split"
    ax.set_title(title, fontsize=9)
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
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups) + 1.6, 3.4), squeeze=False, sharey=True)
    styles = {"inject": "-", "random_dim": "--", "rescale": ":"}
    scales = sorted(s for s in t["scale"].dropna().unique())
    positive = [s for s in scales if s > 0]
    linthresh = min(positive) if positive else 1e-3
    for ax, group in zip(axes[0], groups):
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
        ax.set_title(f"{names.get(group, group)} tokens", fontsize=9)
        ax.set_xlabel("scale (x first token's sink dims; symlog)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric.replace('_', ' ')} received per injected token\n(text queries after the image, mean over heads)"
                          if metric.startswith("attention") else metric.replace('_', ' '))
    handles = [Line2D([], [], color=colors[k % 10], lw=2, label=str(b)) for k, b in enumerate(bands)]
    handles += [Line2D([], [], color="k", ls=s, label=names.get(n, n)) for n, s in styles.items()]
    handles.append(Line2D([], [], color="k", lw=2.5, alpha=0.25, label="no injection"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Writing the sink signature into tokens: dose response", fontsize=10)
    return _save(fig, path, pdf=False)
