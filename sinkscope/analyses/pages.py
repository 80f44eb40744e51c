"""Pages of the analyses' run folders: a step's findings section (by the report's rule) and the scan's index.md.

It imports no analysis: a step hands in its own `findings` reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from sinkscope.findings import Finding, findings_section
from sinkscope.markdown import PLANTED_BANNER, fmt_cell, markdown_table, skipped_section


def _role_section(role_summary, text_sinks, figs, tokens) -> list[str]:
    """First token, delimiters, other text, image tokens: their phi and which text tokens are sinks."""
    if role_summary is None or len(role_summary) == 0:
        return []
    lines = ["## First token, delimiters, other text, image tokens\n"]
    first = tokens[tokens["role"] == "first"]["token"] if "role" in tokens else None
    if first is not None and len(first):
        names = ", ".join(f"`{t!r}`" for t in first.value_counts().index[:3])
        lines.append(f"The first token of the prompts is {names}: the canonical text sink whether or not the "
                     "tokenizer calls it BOS. Delimiters are special tokens and tokens made only of whitespace "
                     "or punctuation.\n")
    pivot = role_summary.groupby("role").agg(sinks_per_sample=("sinks_per_sample", "max"),
                                             median_phi=("phi_median", "mean"), max_phi=("phi_max", "max"))
    lines.append("Per role, over layers: most sinks per sample in one layer, mean of the per-layer median phi, "
                 "largest phi.\n")
    lines.append(markdown_table(pivot.reset_index()))
    if "roles" in figs:
        lines.append(f"![sink score by token role]({figs['roles']})\n")
    if text_sinks is not None and len(text_sinks):
        lines.append("Text tokens that are sinks (delimiter sinks and others), most frequent first:\n")
        lines.append(markdown_table(text_sinks, max_rows=10))
    else:
        lines.append("No text token other than the first is a sink at this threshold.\n")
    return lines


def index_head(folder, cfg, title: str) -> tuple[dict, list[str]]:
    """The run's meta and the first lines of an analysis' index.md: "# title: `model` on `data`" and, for a planted
    model, the banner that says so."""
    meta = folder.meta
    lines = [f"# {title}: `{cfg.model}` on `{cfg.data}`\n"]
    if meta.get("planted"):
        lines.append(PLANTED_BANNER)
    return meta, lines


def tau_text(meta: dict) -> str:
    """The run's tau as an index.md shows it: 3 significant digits, nan when the run recorded none."""
    return f"{meta.get('tau', {}).get('value', float('nan')):.3g}"


def step_findings_section(read_findings: Callable[[Path], list[Finding]], folder) -> list[str]:
    """The findings section of a step's own index.md: the same findings, by the same rule (sinkscope.findings), that
    the report's index.md lists for that step (the step module's `findings` reader, passed in as `read_findings`, run
    on the tables the step wrote to `folder`), without the step's name in each line."""
    try:
        step_findings = read_findings(Path(folder))
    except (OSError, KeyError, ValueError) as err:
        return ["## Findings\n", f"_The findings could not be read from the step's tables: {err}._\n"]
    return findings_section(step_findings, with_step=False)


def write_scan_index(folder, dims, tau, adapter, magnitudes, summary, head_scores, tokens, figs, read_findings,
                     role_summary=None, text_sinks=None) -> None:
    meta = folder.meta
    model = meta.get("model", {})
    params = meta.get("params", {})
    planted = bool(meta.get("planted"))
    lines = [f"# Sink scan: `{params.get('model')}` on `{params.get('data')}`\n"]
    if planted:
        lines.append(PLANTED_BANNER)
    lines.append(
        f"{meta.get('n_samples')} samples; model {model.get('architecture')} with {model.get('layers')} layers, "
        f"hidden size {model.get('hidden_size')}, {model.get('heads')} heads. Started {meta.get('started')}.\n"
    )
    lines += step_findings_section(read_findings, folder.path)
    # massive activations
    top = magnitudes.sort_values("top1", ascending=False).iloc[0]
    lines.append("## Massive activations\n")
    lines.append(
        f"The largest activation, averaged over samples, is {fmt_cell(float(top['top1']))} at layer {int(top['layer'])}, "
        f"{fmt_cell(float(top['top1_over_median']))}x the median |activation| of that layer. Sun et al.'s criterion for "
        "*massive* is |x| > 100 and about 1000x the median; "
        + ("it is met.\n" if top["top1"] > 100 and top["top1_over_median"] >= 1000 else
           "it is **not** met in this model, so what follows concerns the largest activations it has, "
           "on a scale relative to its own width.\n")
    )
    if "massive" in figs:
        lines.append(f"![largest activations per layer]({figs['massive']})\n")
    lines.append(markdown_table(magnitudes))
    # sink dims
    lines.append("## Sink dimensions\n")
    if dims.dims:
        lines.append(f"Sink dims **{dims.dims}** ({dims.method}). {dims.reason}\n")
    else:
        lines.append(f"**No sink dimension found** ({dims.method}). {dims.reason}\n")
    refs = dims.references()
    lines.append("Published dims for comparison (other models; shared dims are only meaningful for the same backbone): "
                 + "; ".join(f"{k}: {v['dims']}" for k, v in refs.items()) + ".\n")
    if "profile" in figs:
        lines.append(f"![per-dimension profile]({figs['profile']})\n")
    # sink tokens
    lines.append("## Sink tokens\n")
    lines.append(f"Threshold tau = {fmt_cell(tau.value)} ({tau.method}): {tau.reason}\n")
    if summary is not None and not summary.empty:
        vis = summary[summary["token_kind"] == "visual"]
        if vis.empty:
            lines.append("The prompts hold no image tokens: visual measures have nothing to measure (none found).\n")
        else:
            n_vis = int(vis["n_sinks"].sum())
            lines.append(
                f"Visual sink tokens over all layers: {n_vis} "
                f"({fmt_cell(float(vis['sinks_per_sample'].max()))} per image at most in one layer).\n"
            )
            if n_vis == 0:
                lines.append("**No visual sink tokens appear in this model at this threshold.**\n")
            elif "sink_background_share" in vis and vis["sink_background_share"].notna().any():
                v = vis.dropna(subset=["sink_background_share"])
                share = float((v["sink_background_share"] * v["n_sinks"]).sum() / max(v["n_sinks"].sum(), 1))
                base = float(v["background_base_rate"].mean())
                lines.append(
                    f"{fmt_cell(100 * share)}% of visual sinks lie on background patches, against a base rate of "
                    f"{fmt_cell(100 * base)}% of all image tokens (pooled over layers, without a CI: whether sinks favour "
                    "background is the `location` step's finding, tested against the base rate with a CI; the paper "
                    "reports 1.04-1.09x on COCO/VOC).\n"
                )
        cols = ["layer", "token_kind", "n_tokens", "n_sinks", "sinks_per_sample", "mean_phi", "max_phi",
                "mean_attention_received", "sink_attention_received"]
        lines.append(markdown_table(summary[[c for c in cols if c in summary]]))
    if "phi_attention" in figs:
        lines.append(f"![sink score against attention received]({figs['phi_attention']})\n")
    lines += _role_section(role_summary, text_sinks, figs, tokens)
    # heads
    lines.append("## Heads\n")
    if head_scores is not None and not head_scores.empty:
        n_centric = int((head_scores["image_centric"] > 0.5).sum())
        lines.append(
            f"Heads image-centric (visual non-sink ratio >= rho = {params.get('rho')} with image attention >= "
            f"{params.get('summ')}) for most text queries: {n_centric} of {len(head_scores)}.\n"
        )
        if "heads" in figs:
            lines.append(f"![head ratios]({figs['heads']})\n")
        lines.append(markdown_table(head_scores.sort_values("visual_nonsink_ratio"), max_rows=12))
    else:
        lines.append("No text queries after an image: no head scores.\n")
    lines.extend(skipped_section(meta.get("skipped")))
    lines.append("## Files\n")
    lines.append(
        "`run.json` (parameters, versions, commit, times), `sink_dims.json`, `massive_activations.csv`, "
        "`layer_magnitudes.csv`, `sink_tokens.csv`, `token_stats.csv` (every token: phi, attention received), "
        "`sink_summary.csv`, `role_summary.csv` (phi of first / delimiter / text / image tokens per layer), "
        "`text_sink_tokens.csv`, `head_scores.csv`, `dim_profile.csv`.\n"
    )
    folder.write_text("index.md", "\n".join(lines))
