"""`sinkscope contributions`: what attended image tokens write into the residual stream.

Evidence 5 of Kang et al. 2025: the OV contribution `|| a_ij v_j W_O ||` (measures/contributions)
of visual sinks against visual non-sinks (and BOS), per layer and head, over text queries after
the image. Sinks get much attention but, their values being drained, write little.

Per (sample, layer, head, token class): mean attention per token, mean ||W_O v_j|| (what a unit
of attention would write) and mean contribution per (query, token). Summary per layer and pooled
over layers >= start_layer: the ratio sink / non-sink of the mean contribution, with a bootstrap
CI over samples.

Writes: run.json, sink_dims.json, contributions_per_sample.csv, contributions.csv,
contribution_heads.csv, figures, index.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.common import (AnalysisConfig, InTraceReducer, SinkScores, cluster_bootstrap,
                                      layer_blocks, output_grams, report_step_for, setup, traced_chunks)
from sinkscope.analyses.step_findings import run_meta
from sinkscope.findings import NOTHING_TO_TEST, Estimate, Finding, effect_clause
from sinkscope.measures import contributions as ov
from sinkscope.runfolder import RunFolder

CLASSES = ("visual_sink", "visual_nonsink", "bos")


@dataclass
class ContributionsConfig(AnalysisConfig):
    pass


class ContributionReducer(InTraceReducer):
    """Per (sample, layer, head, token class) rows of contributions_per_sample, from ContributionLayerReduction's
    payloads (computed here, or inside a remote trace). grams: layer -> (W_O^h)^T W_O^h [head, head_dim, head_dim]
    (`output_grams`), or None where the model runs on a server this process does not hold the weights of (NDIF):
    the in-trace part then makes each layer's grams there, from W_O as the tracer hands it (`output_weight`)."""

    def __init__(self, dims, tau, eps, score, grams: dict | None, n_heads: int | None = None):
        super().__init__(dims, tau, eps, score)
        if grams is None and not n_heads:
            raise ValueError("without grams the reducer needs n_heads, to split W_O by head where the model runs")
        self.grams, self.n_heads = grams, n_heads
        self.rows: list[pd.DataFrame] = []

    def in_trace(self, host: bool = True) -> "ContributionLayerReduction":
        return ContributionLayerReduction(self.dims, self.tau, self.eps, self.score, self.real, self.visual,
                                          self.kinds.bos_mask, self.queries, self.grams, host, defer=not host,
                                          n_heads=self.n_heads)

    def begin(self, info) -> None:
        super().begin(info)
        self._parts: list[dict] = []  # per (layer, class, sample): the columns of its head rows

    def take(self, kind: str, layer: int, payload) -> None:
        """Keep one layer's reductions: phi (residual) or the per-class means (attention); rows in `end`."""
        if kind == "residual":
            self._take_phi(layer, payload)
            return
        if kind != "attention":
            return
        n_queries = self.queries.sum(dim=1)
        for name in CLASSES:
            p = payload[name]
            for b, sid in enumerate(self.info.sample_ids):
                n_tokens = int(p["n_tokens"][b])
                if n_tokens == 0 or int(n_queries[b]) == 0:
                    continue
                n_heads = p["attention"].shape[1]
                self._parts.append({
                    "sample": [sid] * n_heads, "layer": np.full(n_heads, layer, dtype=np.int64),
                    "head": np.arange(n_heads, dtype=np.int64), "token_class": [name] * n_heads,
                    "n_tokens": np.full(n_heads, n_tokens, dtype=np.int64), "attention": p["attention"][b].numpy(),
                    "ov_norm": p["ov_norm"][b].numpy(), "contribution": p["contribution"][b].numpy(),
                })

    def build(self) -> None:
        """One frame of the batch's rows (layer, class, sample, head order), text columns as flat lists."""
        if self._parts:
            self.rows.append(pd.DataFrame({
                name: ([x for part in self._parts for x in part[name]] if name in ("sample", "token_class")
                       else np.concatenate([part[name] for part in self._parts]))
                for name in self._parts[0]}))
        self._parts = []


class ContributionLayerReduction(SinkScores):
    """The contribution analysis' per-layer reductions, torch only (inside the trace, also remotely).

    values -> kept for the layer's attention; attention -> per token class (visual sink, visual non-sink, BOS):
    the mean attention, mean ||W_O v_j|| and mean contribution a_ij ||W_O v_j|| per (query, token) over the text
    queries after the image [batch, head], and the class's token count [batch]. No [head, query, key] map leaves
    it, and nothing moves to the host but those means: they are computed on the device of the layer's probabilities.
    It carries each layer's (W_O^h)^T W_O^h ([head, head_dim, head_dim] float64, `output_grams`: all the norms need
    of W_O, and what a remote request uploads: 128 MB at 7B where W_O would be 2 GB). grams None (a model NDIF
    serves): `needs_output_weight`, and the tracer hands each layer's W_O to `output_weight` where the model runs,
    before the layer's values, so the grams are made there and nothing of W_O travels.
    """

    def __init__(self, dims, tau, eps, score, real, visual, bos, queries, grams: dict | None, host: bool = True,
                 defer: bool = False, n_heads: int | None = None):
        super().__init__(dims, eps, score, real, host)
        self.tau, self.visual, self.bos, self.queries = tau, visual, bos, queries
        self.needs_output_weight = grams is None
        self.grams, self.defer, self.n_heads = ({} if grams is None else grams), defer, n_heads
        self._values: dict = {}
        self._kept: dict[int, tuple] = {}  # deferred: layer -> (phi, received, norms), where the layer ran
        self.n_queries = queries.sum(dim=-1)  # [batch], on the host

    def masks(self) -> dict[str, torch.Tensor]:
        return {"real": self.real, "visual": self.visual, "bos": self.bos, "queries": self.queries,
                "n_queries": self.n_queries}

    def output_weight(self, layer, weight):
        """W_O of `layer` [hidden, heads * head_dim] where the model runs: its grams for the layer's norms."""
        self.grams[layer] = ov.ov_grams(weight.detach(), self.n_heads)
        return None

    def values(self, layer, v):
        self._values[layer] = v.detach()  # stays on its layer's device until the layer's attention
        return None

    def attention(self, layer, probs):
        """The two reductions that need the layer's own tensors: || W_O^h v_j || and the attention each key gets
        from the queries, [batch, head, key] each (no [head, query, key] tensor is made beyond the probabilities).
        Per layer (remote), the class means follow and come back; deferred (here), they wait for `finish()`."""
        device = probs.device
        norms = ov.ov_norms_from_grams(self._values.pop(layer).to(device), self.grams[layer])  # [batch, head, key]
        received = ov.received_by_key(probs.detach(), self.on(device)["queries"])  # [batch, head, key]
        if self.defer:
            self._kept[layer] = (self.phi[layer], received, norms)
            return None
        return self._class_block(self.phi[layer][:, None], received[:, None], norms[:, None])[0]

    def finish(self) -> list[tuple[str, int, dict]]:
        """The kept layers' payloads, ("attention", layer, payload), reduced in blocks of layers on one device."""
        out = []
        received = {layer: kept[1] for layer, kept in self._kept.items()}
        for layers in layer_blocks(sorted(received), received):
            device = received[layers[0]].device
            block = [torch.stack([self._kept[layer][i].to(device) for layer in layers], dim=1) for i in range(3)]
            out += [("attention", layer, payload) for layer, payload in zip(layers, self._class_block(*block))]
        self._kept = {}
        return out

    def _class_block(self, phi: torch.Tensor, received: torch.Tensor, norms: torch.Tensor) -> list[dict]:
        """phi [batch, layer, key], received and norms [batch, layer, head, key] -> each layer's payload: per token
        class (CLASSES), the means [batch, head] and the token count [batch], contiguous slices of two tensors."""
        there = self.on(received.device)
        sink = (phi >= self.tau) & there["real"][:, None, :]  # [batch, layer, key]
        visual, bos = there["visual"][:, None, :], there["bos"][:, None, :]
        keys = torch.stack(torch.broadcast_tensors(sink & visual, visual & ~sink, bos), dim=2)  # [b, layer, class, key]
        out = ov.class_means_of_received(received, norms, keys, there["n_queries"])
        means = torch.stack([out["attention"], out["contribution"], out["ov_norm"]])  # [3, batch, layer, class, head]
        means = self.out(means.permute(2, 3, 0, 1, 4).contiguous())  # [layer, class, 3, batch, head]: one transfer
        counts = self.out(out["n_tokens"].permute(1, 2, 0).contiguous())  # [layer, class, batch]
        return [{name: {"attention": means[i, c, 0], "contribution": means[i, c, 1], "ov_norm": means[i, c, 2],
                        "n_tokens": counts[i, c]} for c, name in enumerate(CLASSES)} for i in range(phi.shape[1])]


def ratio_with_ci(per_sample: pd.DataFrame, n_boot: int, seed: int, num: str = "visual_sink",
                  den: str = "visual_nonsink", column: str = "contribution") -> dict:
    """Ratio of the mean `column` of two token classes (means over samples, layers, heads), CI over samples.

    per_sample: rows of contributions_per_sample (already restricted to the layers wanted). NaN
    ratio where either class is absent (e.g. no visual sinks: none found)."""
    piv = per_sample.groupby(["sample", "token_class"])[column].mean().unstack()
    if num not in piv or den not in piv:
        return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_samples": 0,
                "num_mean": math.nan, "den_mean": math.nan}
    piv = piv[[num, den]].dropna()
    a, b = piv[num].to_numpy(), piv[den].to_numpy()
    if len(a) == 0 or b.mean() <= 0:
        return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_samples": len(a),
                "num_mean": float(a.mean()) if len(a) else math.nan, "den_mean": float(b.mean()) if len(b) else math.nan}
    lo, hi = cluster_bootstrap(len(a), lambda i: float(a[i].mean() / b[i].mean()) if b[i].mean() > 0 else np.nan,
                               n_boot, seed)
    return {"value": float(a.mean() / b.mean()), "ci_low": lo, "ci_high": hi, "n_samples": len(a),
            "num_mean": float(a.mean()), "den_mean": float(b.mean())}


def run_contributions(out: str, cfg: ContributionsConfig, adapter=None, resume: bool = True, log=print, calibration=None,
                      figures: bool = True) -> RunFolder:
    s = setup(out, "contributions", cfg, adapter, resume, log, calibration=calibration)
    adapter = s.adapter
    # a remote-local request uploads the grams; a model NDIF serves has its weights there, where they are made
    grams = None if adapter.hosted is not None else output_grams(adapter, host=bool(cfg.remote))
    for _, red in traced_chunks(s, cfg.batch_size, "contributions", lambda: ContributionReducer(
            s.dims.dims, s.tau.value, adapter.rms_norm_eps, cfg.sink_score, grams, adapter.num_heads), values=True,
            remote=cfg.remote, per_request=cfg.batches_per_request):
        if red.rows:
            s.folder.append_rows("contributions_per_sample", pd.concat(red.rows, ignore_index=True))
    return summarize_contributions(s.folder, cfg, figures)


def summarize_contributions(folder: RunFolder, cfg: ContributionsConfig, figures: bool = True) -> RunFolder:
    from sinkscope import plots

    per = folder.read("contributions_per_sample")
    rows = []
    if len(per):
        groups = [(f">= {cfg.start_layer}", per[per["layer"] >= cfg.start_layer])] + \
                 [(str(l), g) for l, g in per.groupby("layer")]
        for layers, g in groups:
            for column in ("contribution", "attention", "ov_norm"):
                r = ratio_with_ci(g, cfg.n_boot, cfg.seed, column=column)
                rows.append({"layers": layers, "measure": column, "ratio_sink_over_nonsink": r["value"],
                             "ci_low": r["ci_low"], "ci_high": r["ci_high"], "visual_sink_mean": r["num_mean"],
                             "visual_nonsink_mean": r["den_mean"], "n_samples": r["n_samples"]})
    summary = pd.DataFrame(rows, columns=["layers", "measure", "ratio_sink_over_nonsink", "ci_low", "ci_high",
                                          "visual_sink_mean", "visual_nonsink_mean", "n_samples"])
    folder.write_table("contributions", summary)
    heads = (per.groupby(["layer", "head", "token_class"])[["attention", "ov_norm", "contribution"]].mean().reset_index()
             if len(per) else pd.DataFrame())
    folder.write_table("contribution_heads", heads)
    figs = {}
    if figures and len(per):
        figs["bars"] = plots.contribution_by_class(per, folder.path / "contributions.png")
    _write_index(folder, cfg, summary, heads, figs)
    folder.finish()
    return folder


def ov_norm_line(r: pd.Series, start_layer: int) -> str:
    """The per-unit-of-attention ratio (||W_O v|| of visual sinks over other image tokens, a contributions.csv row)
    by the findings rule: more or less than 1 only where its 95% CI excludes 1; '' when no sample holds both
    classes (the findings already say there is nothing to compare)."""
    from sinkscope.findings import Estimate, effect_clause, n_clause

    n = 0 if pd.isna(r["n_samples"]) else int(r["n_samples"])
    if not n or not np.isfinite(float(r["ratio_sink_over_nonsink"])):
        return ""
    est = Estimate(float(r["ratio_sink_over_nonsink"]), float(r["ci_low"]), float(r["ci_high"]), n)
    _, clause = effect_clause(est, "a visual sink would write more than another image token",
                              "a visual sink would write less than another image token", null=1.0)
    return f"Per unit of attention (||W_O v||), layers >= {start_layer}, ratio against 1: {clause} ({n_clause(n)}).\n"


def _write_index(folder, cfg, summary, heads, figs) -> None:
    from sinkscope.analyses.pages import index_head, step_findings_section, tau_text
    from sinkscope.markdown import markdown_table

    meta, lines = index_head(folder, cfg, "OV contributions")
    lines.append(f"{meta.get('n_samples')} samples; sink dims {meta.get('sink_dims')}, tau = "
                 f"{tau_text(meta)}. Contribution of key j to query i in head h: "
                 "a_ij ||W_O^h v_j|| (residual-stream units), averaged over text queries after the image, heads and "
                 "each class's tokens. CIs: 95% percentile bootstrap over samples.\n")
    pooled = summary[(summary["layers"] == f">= {cfg.start_layer}")].set_index("measure") if len(summary) else summary
    if pooled.empty or pooled["n_samples"].max() == 0 or math.isnan(pooled.loc["contribution", "ratio_sink_over_nonsink"]):
        lines.append("**No visual sinks found** in layers >= {0}: there is no sink / non-sink ratio to report.\n"
                     .format(cfg.start_layer))
    lines += step_findings_section(findings, folder.path)
    ov_norm = ov_norm_line(pooled.loc["ov_norm"], cfg.start_layer) if "ov_norm" in pooled.index else ""
    if ov_norm:
        lines.append(ov_norm)
    if "bars" in figs:
        lines.append(f"![contributions]({figs['bars']})\n")
    lines.append(markdown_table(summary, max_rows=60))
    lines.append("Tables: `contributions.csv`, `contribution_heads.csv`, `contributions_per_sample.csv`.\n")
    folder.write_text("index.md", "\n".join(lines))


# ----------------------------------------------------------------------------- the report step

FIGURES: tuple[str, ...] = ()  # the report shows the step's figures in name order


report_step = report_step_for(ContributionsConfig, run_contributions)


RATIO_MEANINGS = {
    "contribution": ("visual sinks write more into the residual stream (|| a_ij x_j W_OV ||) than other image tokens",
                     "visual sinks write less into the residual stream (|| a_ij x_j W_OV ||) than other image tokens "
                     "(evidence 5)"),
    "attention": ("visual sinks receive more attention than other image tokens",
                  "visual sinks receive less attention than other image tokens"),
}


def findings(folder: Path) -> list[Finding]:
    """The sink / non-sink ratios of contribution and attention, each against 1."""
    table = pd.read_csv(folder / "contributions.csv")
    out = []
    for measure, (above, below) in RATIO_MEANINGS.items():
        rows = table[table["measure"] == measure].head(1)
        r = rows.iloc[0] if len(rows) else None
        name = f"sink / non-sink {measure} ratio" + (f", layers {r['layers']}" if r is not None else "")
        if r is None or not np.isfinite(float(r["ratio_sink_over_nonsink"])):
            n = run_meta(folder).get("n_samples")
            out.append(Finding("contributions", name, math.nan, status=NOTHING_TO_TEST, n=n, sentence=(
                f"No sample of {n} holds both visual sinks and other image tokens: nothing to compare.")))
            continue
        est = Estimate(float(r["ratio_sink_over_nonsink"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
        status, clause = effect_clause(est, above, below, null=1.0)
        out.append(Finding("contributions", name, est.value, est.ci_low, est.ci_high, n=est.n, status=status,
                           sentence=f"Ratio against 1: {clause}."))
    return out
