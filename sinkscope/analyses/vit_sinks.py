"""`sinkscope vit-sinks`: high-norm tokens born in the vision tower, and whether D_sink finds them.

Paper-notes section 8 ("To Sink or Not to Sink", arXiv 2510.08510): the vision encoder emits a
few high-norm tokens that spike in other dims than the language model's sink dims, so
phi-based (D_sink) detection may miss them. For every image token, at two sites:
  - `vit`: the vision features entering the projector (LLaVA-style families, where they map
    one-to-one onto image tokens; recorded when the counts match);
  - `lm_input`: the image token's embedding as the language model receives it (layer 0 input);
its norm over the image's median norm ("high-norm" when >= norm_ratio) and its top dim by
|x_d / RMS(x)|. Then: which high-norm tokens are visual sinks of the language model (phi >= tau
in any layer >= start_layer), i.e. found by D_sink, and which are missed.

Writes: run.json, sink_dims.json, vit_tokens.csv, vit_dims.csv, vit_sinks.csv, vit_norms.png, index.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.common import (AnalysisConfig, InTraceReducer, SinkScores, cluster_bootstrap,
                                      report_step_for, setup, traced_chunks)
from sinkscope.analyses.step_findings import run_meta
from sinkscope.findings import NOTHING_TO_TEST, Finding
from sinkscope.measures import massive
from sinkscope.runfolder import RunFolder


@dataclass
class VitSinksConfig(AnalysisConfig):
    norm_ratio: float = 3.0  # high-norm: norm >= norm_ratio x the image's median token norm


class VitTokenNorms(SinkScores):
    """The vision-sink analysis' in-trace part, torch only (also remotely): phi of every token per layer; at layer 0
    also each token's norm and top dim (argmax_d |x_d / RMS(x)|) [batch, token]; at the projector's input each vision
    feature's norm and top dim [feature] (every image's features in order). No [token, dim] state leaves it."""

    def residual(self, layer: int, states: torch.Tensor) -> dict:
        payload = {"phi": super().residual(layer, states)}
        if layer == 0:  # the image tokens as the language model receives them
            payload.update(self._norms(states))
        return payload

    def site(self, name: str, features: torch.Tensor) -> dict:
        return self._norms(features.reshape(-1, features.shape[-1]))

    def _norms(self, x: torch.Tensor) -> dict:
        x = x.detach().float()
        return {"norm": self.out(x.norm(dim=-1)), "top_dim": self.out(massive.rms_normalize(x, self.eps).abs().argmax(-1))}


class VitReducer(InTraceReducer):
    """Per (site, sample, image token): norm, norm over the image's median, high-norm mark, top dim, max phi and
    whether the language model has it as a visual sink, from VitTokenNorms' payloads (here or after a remote
    trace)."""

    def __init__(self, dims, tau, eps, score, cfg: VitSinksConfig):
        super().__init__(dims, tau, eps, score)
        self.cfg = cfg
        self.rows = pd.DataFrame()

    def in_trace(self, host: bool = True) -> VitTokenNorms:
        return VitTokenNorms(self.dims, self.eps, self.score, self.real, host)

    def begin(self, info) -> None:
        super().begin(info)
        self._sites: dict[str, dict] = {}

    def take(self, kind: str, layer, payload) -> None:
        if kind == "residual":
            self._take_phi(layer, payload["phi"])
            if "norm" in payload:
                self._sites["lm_input"] = payload
        elif kind == "site":
            self._sites[layer] = payload

    def build(self) -> None:
        self.rows = self.frame()

    def frame(self) -> pd.DataFrame:
        late = [l for l in self.phi if l >= self.cfg.start_layer] or list(self.phi)
        phi = torch.stack([self.phi[l] for l in late]).amax(dim=0)  # [batch, token]
        sink_any = torch.stack([self.visual_sink[l] for l in late]).any(dim=0)
        counts = self.visual.sum(dim=1).tolist()
        per_row: dict[str, list] = {}
        lm = self._sites.get("lm_input")
        if lm is not None:
            per_row["lm_input"] = [(lm["norm"][b][self.visual[b]], lm["top_dim"][b][self.visual[b]])
                                   for b in range(len(counts))]
        vit = self._sites.get("vit")
        if vit is not None and vit["norm"].shape[0] == sum(counts):  # one feature per image token (LLaVA-style)
            per_row["vit"] = list(zip(torch.split(vit["norm"], counts), torch.split(vit["top_dim"], counts)))
        rows = []
        for site, pairs in per_row.items():
            for b, sid in enumerate(self.info.sample_ids):
                norm, top_dim = pairs[b]
                if norm.shape[0] == 0:
                    continue
                ratio = norm / norm.median().clamp_min(1e-12)
                vis = torch.nonzero(self.visual[b]).flatten()
                rows.append(pd.DataFrame({
                    "sample": sid, "site": site, "visual_rank": np.arange(norm.shape[0]), "norm": norm.numpy(),
                    "norm_ratio": ratio.numpy(), "high_norm": (ratio >= self.cfg.norm_ratio).numpy(),
                    "top_dim": top_dim.numpy(), "max_phi": phi[b, vis].numpy(), "lm_visual_sink": sink_any[b, vis].numpy(),
                }))
        return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _projector(adapter):
    inner = getattr(adapter.model, "model", None)
    return getattr(inner, "multi_modal_projector", None)


def run_vit_sinks(out: str, cfg: VitSinksConfig, adapter=None, resume: bool = True, log=print, calibration=None,
                  figures: bool = True) -> RunFolder:
    s = setup(out, "vit_sinks", cfg, adapter, resume, log, calibration=calibration)
    projector = _projector(s.adapter)  # its input: the vision features, one per image token in LLaVA-style families
    for _, red in traced_chunks(s, cfg.batch_size, "vit_sinks", lambda: VitReducer(
            s.dims.dims, s.tau.value, s.adapter.rms_norm_eps, cfg.sink_score, cfg), attention=False,
            remote=cfg.remote, per_request=cfg.batches_per_request,
            sites={"vit": projector} if projector is not None else None):
        s.folder.append_rows("vit_tokens", red.rows)
    return summarize_vit(s.folder, cfg, figures)


def summarize_vit(folder: RunFolder, cfg: VitSinksConfig, figures: bool = True) -> RunFolder:
    from sinkscope import plots

    tokens = folder.read("vit_tokens")
    rows, dims = [], []
    for site, g in (tokens.groupby("site") if len(tokens) else []):
        high = g[g["high_norm"].astype(bool)]
        high_norm, sink = g["high_norm"].astype(bool), g["lm_visual_sink"].astype(bool)
        per = pd.DataFrame({"sample": g["sample"], "high": high_norm, "found": high_norm & sink, "sinks": sink})
        arr = per.groupby("sample")[["high", "found", "sinks"]].sum().to_numpy()  # [sample, 3] counts
        share = arr[:, 1].sum() / arr[:, 0].sum() if arr[:, 0].sum() else math.nan
        lo, hi = (cluster_bootstrap(len(arr), lambda i: arr[i, 1].sum() / arr[i, 0].sum() if arr[i, 0].sum() else np.nan,
                                    cfg.n_boot, cfg.seed) if arr[:, 0].sum() else (math.nan, math.nan))
        union = int(((g["high_norm"].astype(bool)) | g["lm_visual_sink"].astype(bool)).sum())
        rows.append({"site": site, "n_tokens": len(g), "n_high_norm": len(high), "n_lm_visual_sinks": int(g["lm_visual_sink"].sum()),
                     "n_both": int((high["lm_visual_sink"].astype(bool)).sum()),
                     "share_found_by_dsink": share, "ci_low": lo, "ci_high": hi,
                     "share_missed_by_dsink": 1 - share if not math.isnan(share) else math.nan,
                     "jaccard": (int(high["lm_visual_sink"].astype(bool).sum()) / union) if union else math.nan})
        if len(high):
            d = high["top_dim"].value_counts().rename_axis("dim").reset_index(name="n_high_norm_tokens")
            d.insert(0, "site", site)
            dims.append(d)
    table = pd.DataFrame(rows)
    folder.write_table("vit_sinks", table)
    dim_table = pd.concat(dims, ignore_index=True) if dims else pd.DataFrame(columns=["site", "dim", "n_high_norm_tokens"])
    folder.write_table("vit_dims", dim_table)
    figs = {}
    if figures and len(tokens):
        figs["norms"] = plots.vit_norms(tokens, cfg.norm_ratio, folder.path / "vit_norms.png", score=cfg.sink_score)
    _write_index(folder, cfg, table, dim_table, figs)
    folder.finish()
    return folder


def dim_lines(table: pd.DataFrame, dim_table: pd.DataFrame, n_samples=None, shown: int = 3) -> list[str]:
    """Markdown bullets, one per site of vit_sinks.csv: the high-norm tokens' largest dimensions with how many tokens
    each one leads (listed with their counts, not ranked into a 'top'), and the Jaccard overlap with the
    language-model visual sinks where there are tokens on both sides; 'no high-norm image tokens found' otherwise.
    n_samples: the images counted (run.json)."""
    from sinkscope.findings import n_clause, num

    lines = ["## High-norm tokens and their dimensions\n"]
    n = f" ({n_clause(n_samples, 'images')})"
    for _, r in table.iterrows():
        if not r["n_high_norm"]:
            lines.append(f"- `{r['site']}`: **no high-norm image tokens found** ({int(r['n_lm_visual_sinks'])} "
                         f"language-model visual sinks){n}.")
            continue
        dims = dim_table[dim_table["site"] == r["site"]]
        counts = ", ".join(f"{int(d['dim'])} ({int(d['n_high_norm_tokens'])})" for _, d in dims.head(shown).iterrows())
        more = f", {len(dims) - shown} more in vit_dims.csv" if len(dims) > shown else ""
        overlap = (f"; Jaccard overlap with the {int(r['n_lm_visual_sinks'])} language-model visual sinks "
                   f"{num(r['jaccard'])}" if r["n_lm_visual_sinks"] else
                   "; no language-model visual sinks to overlap with")
        lines.append(f"- `{r['site']}`: {int(r['n_high_norm'])} high-norm tokens; the dimension of each one's largest "
                     f"|activation| (tokens): {counts}{more}{overlap}{n}.")
    return lines + [""]


def _write_index(folder, cfg, table, dim_table, figs) -> None:
    from sinkscope.analyses.pages import index_head, step_findings_section, tau_text
    from sinkscope.markdown import markdown_table

    meta, lines = index_head(folder, cfg, "ViT-born sinks")
    lines.append(f"{meta.get('n_samples')} samples; language-model sink dims {meta.get('sink_dims')}, tau = "
                 f"{tau_text(meta)}; high-norm: norm >= {cfg.norm_ratio:g}x the "
                 "image's median token norm. CI: 95% percentile bootstrap over samples.\n")
    if table.empty:
        lines.append("No image tokens: nothing to measure (none found).\n")
    else:
        lines += step_findings_section(findings, folder.path)
        lines += dim_lines(table, dim_table, meta.get("n_samples"))
    if "norms" in figs:
        lines.append(f"![norms]({figs['norms']})\n")
    lines.append(markdown_table(table))
    lines.append(markdown_table(dim_table, max_rows=10))
    folder.write_text("index.md", "\n".join(lines))


# ----------------------------------------------------------------------------- the report step

FIGURES: tuple[str, ...] = ()  # the report shows the step's figures in name order


report_step = report_step_for(VitSinksConfig, run_vit_sinks)


def findings(folder: Path) -> list[Finding]:
    """Per site: the share of high-norm image tokens that D_sink finds as language-model visual sinks."""
    table = pd.read_csv(folder / "vit_sinks.csv")
    n = run_meta(folder).get("n_samples")
    out = []
    for _, r in table.iterrows():
        counts = (f"{int(r['n_high_norm'])} high-norm tokens, {int(r['n_lm_visual_sinks'])} language-model visual sinks, "
                  f"{int(r['n_both'])} both")
        name = f"high-norm image tokens at {r['site']} also found by D_sink"
        if not r["n_high_norm"]:
            out.append(Finding("vit_sinks", name, math.nan, n=n, status=NOTHING_TO_TEST,
                               sentence=f"{counts}: no high-norm tokens, nothing to compare."))
        elif not r["n_lm_visual_sinks"]:
            out.append(Finding("vit_sinks", name, float(r["share_found_by_dsink"]), n=n, sentence=(
                f"{counts}: D_sink marks no image token as a sink here, so it finds none of the high-norm tokens.")))
        else:
            out.append(Finding("vit_sinks", name, float(r["share_found_by_dsink"]), float(r["ci_low"]),
                               float(r["ci_high"]), n=n, sentence=f"{counts}."))
    return out or [Finding("vit_sinks", "high-norm image tokens", math.nan, n=n, status=NOTHING_TO_TEST,
                           sentence="None found.")]
