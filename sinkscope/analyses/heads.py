"""`sinkscope heads`: which heads attend to visual sinks, attention maps, attention against phi.

Evidence 1, 3 and 7 of Kang et al. 2025 (paper-notes section 3):
  - per (layer, head), over text queries after the image: image attention, attention to visual
    sinks, to all sinks (BOS included), the visual non-sink ratio and the image-centric share;
    heads ranked by visual-sink attention, with a bootstrap CI over samples;
  - text-to-image attention maps of the first samples' text tokens (each head and the head
    mean), drawn on the image grid with sinks marked, and how much the top-attended image tokens
    of different words overlap;
  - attention each image token receives against its phi, with Spearman's rank correlation and a
    bootstrap CI over samples.

Writes: run.json, sink_dims.json, head_scores_per_sample.csv, head_scores.csv,
token_attention.csv, phi_attention_correlation.csv, attention_maps.csv, map_overlap.csv,
figures, index.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.common import (BLOCK_BYTES, KEEP_BYTES, AnalysisConfig, InTraceReducer, KeptLayers, SinkScores,
                                      cluster_bootstrap, layer_blocks, query_row_span, report_step_for, setup,
                                      traced_chunks)
from sinkscope.analyses.step_findings import run_meta
from sinkscope.errors import SinkscopeError
from sinkscope.findings import MEASURED, NOTHING_TO_TEST, Estimate, Finding, effect_clause, top_clause
from sinkscope.measures import heads as head_measures
from sinkscope.runfolder import RunFolder


@dataclass
class HeadsConfig(AnalysisConfig):
    rho: float = 0.5
    summ: float = 0.2
    n_maps: int = 2  # samples whose attention maps are kept
    map_words: int = 4  # text queries per map sample (the first ones after the image)
    top_overlap: int = 5  # top-attended image tokens compared across words

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.rho <= 1 or not 0 <= self.summ <= 1:
            raise SinkscopeError(f"--rho and --summ must be in [0, 1]; got {self.rho}, {self.summ}")


class HeadsReducer(InTraceReducer):
    """The head analysis' tables of one batch: `head_rows` (per layer, sample, head), `token_rows` (per layer,
    sample, image token) and `map_rows` (per layer, map sample, head, query word, image token), each a list of
    frames. `take` keeps each layer's payload as arrays; `end` makes one frame per table (and one per layer and
    map sample for the maps), with no Python loop over heads, queries or tokens."""

    def __init__(self, dims, tau, eps, score, cfg: HeadsConfig, map_ids: set, token_strings):
        super().__init__(dims, tau, eps, score)
        self.cfg, self.map_ids, self.token_strings = cfg, map_ids, token_strings
        self.head_rows, self.token_rows, self.map_rows = [], [], []

    def begin(self, info):
        super().begin(info)
        self.real_pos = self.real.long().cumsum(dim=1) - 1
        self.visual_rank = self.visual.long().cumsum(dim=1) - 1
        self.strings = self.token_strings(info.input_ids) if self.token_strings else None
        self._heads: list[dict] = []  # per (layer, sample): columns of its head rows
        self._tokens: list[dict] = []  # per (layer, sample): columns of its image-token rows

    def in_trace(self, host: bool = True) -> "HeadsLayerReduction":
        """The in-trace part: per layer for a remote trace (host), deferred to the end of the forward here."""
        rows = [b for b, sid in enumerate(self.info.sample_ids) if sid in self.map_ids]
        return HeadsLayerReduction(self.dims, self.tau, self.eps, self.score, self.real, self.visual, self.queries,
                                   self.cfg.rho, self.cfg.summ, rows, self.cfg.map_words, host=host, defer=not host)

    def take(self, kind: str, layer: int, payload) -> None:
        """Keep one layer's reductions (HeadsLayerReduction), here or after a remote trace; frames in `end`."""
        if kind == "residual":
            self._take_phi(layer, payload)
            return
        p, q = payload, self.queries
        for b, sid in enumerate(self.info.sample_ids):
            n_queries = int(q[b].sum())
            if n_queries == 0:
                continue
            n_heads = p["image_attention"].shape[1]
            self._heads.append({
                "sample": [sid] * n_heads, "layer": np.full(n_heads, layer, dtype=np.int64),
                "head": np.arange(n_heads, dtype=np.int64),
                **{name: p[name][b].numpy() for name in HeadsLayerReduction.PER_HEAD},
                "n_queries": np.full(n_heads, n_queries, dtype=np.int64),
            })
            vis = torch.nonzero(self.visual[b]).flatten()
            if len(vis):
                self._tokens.append({
                    "sample": [sid] * len(vis), "layer": np.full(len(vis), layer, dtype=np.int64),
                    "position": self.real_pos[b, vis].numpy(), "visual_rank": self.visual_rank[b, vis].numpy(),
                    "token_kind": ["visual"] * len(vis), "phi": self.phi[layer][b, vis].numpy(),
                    "is_sink": self.sink[layer][b, vis].numpy(), "attention_received": p["received"][b, vis].numpy(),
                })
            if b in p["maps"] and len(vis):
                self.map_rows.append(self._map_frame(sid, layer, b, p["maps"][b], vis))

    def _map_frame(self, sid, layer: int, b: int, a: torch.Tensor, vis: torch.Tensor) -> pd.DataFrame:
        """One layer's map of sample b as rows (head, then query word, then image token): a [head + 1, query,
        visual], the last head the mean over heads."""
        queries = torch.nonzero(self.queries[b]).flatten()[: self.cfg.map_words].tolist()
        n_heads, n_queries, n_visual = a.shape[0], len(queries), len(vis)
        heads = pd.Series([str(h) for h in range(n_heads - 1)] + ["mean"]).array
        words = pd.Series([self.strings[b][t] if self.strings else str(t) for t in queries]).array
        head_of_row = np.repeat(np.arange(n_heads), n_queries * n_visual)
        query_of_row = np.tile(np.repeat(np.arange(n_queries), n_visual), n_heads)
        return pd.DataFrame({
            "sample": sid, "layer": layer, "head": heads.take(head_of_row),
            "query_position": self.real_pos[b, queries].numpy()[query_of_row], "query_token": words.take(query_of_row),
            "visual_rank": np.tile(np.arange(n_visual), n_heads * n_queries), "attention": a.reshape(-1).numpy(),
            "is_sink": np.tile(self.sink[layer][b, vis].numpy(), n_heads * n_queries),
        })

    def build(self) -> None:
        for parts, rows in ((self._heads, self.head_rows), (self._tokens, self.token_rows)):
            if parts:  # text columns as flat lists (pandas infers them as a scalar per frame was), the rest as arrays
                rows.append(pd.DataFrame({
                    name: ([x for part in parts for x in part[name]] if name in ("sample", "token_kind")
                           else np.concatenate([part[name] for part in parts]))
                    for name in parts[0]}))
        self._heads, self._tokens = [], []


class HeadsLayerReduction(SinkScores):
    """The head analysis' per-layer reductions, torch only (inside the trace, also remotely).

    attention -> per head, query-averaged image attention, visual-sink attention, attention to any sink,
    visual non-sink ratio and image-centric share [batch, head]; attention each token receives [batch, token];
    and, for the map samples only, the map the attention_maps table shows: [head + 1 (mean), map_words
    queries, image tokens]. No full [head, query, key] map leaves it, and nothing is read back from the device:
    the query rows, the map's query and image-token positions are chosen from the CPU masks when the part is made.

    Two ways to run, as the scan's: per layer (`defer=False`, what a remote trace runs: each call reduces its layer
    and returns its payload), or deferred (`defer=True`, a local run): a call keeps the layer's residual state and
    the query rows of its attention (one copy each) and returns None, and `finish()` reduces the kept layers in
    blocks of layers (`layer_blocks`, at most `block_bytes`) after the forward (or during it, when the kept layers
    would pass `keep_bytes`: `KeptLayers`), one payload per layer, each a contiguous slice of its block's result.
    Both give the same payloads (`measures.heads.query_averaged_head_measures` over one layer or a block).
    """

    PER_HEAD = ("image_attention", "visual_sink_attention", "sink_attention", "visual_nonsink_ratio", "image_centric")

    def __init__(self, dims, tau, eps, score, real, visual, queries, rho, summ, map_rows, map_words,
                 host: bool = True, defer: bool = False, block_bytes: int = BLOCK_BYTES, keep_bytes: int = KEEP_BYTES):
        super().__init__(dims, eps, score, real, host)
        self.tau, self.visual, self.queries, self.rho, self.summ = tau, visual, queries, rho, summ
        self.map_rows, self.map_words = list(map_rows), map_words
        self.defer, self.block_bytes = defer, block_bytes
        self._store = KeptLayers(self._reduce_kept, keep_bytes)
        self.query_rows = query_row_span(queries)

    def masks(self) -> dict[str, torch.Tensor]:
        first, stop = self.query_rows
        out = {"real": self.real, "visual": self.visual, "queries": self.queries[:, first:stop]}
        for b in self.map_rows:  # the map's query words (as rows of the kept block) and image tokens
            out[f"map_queries_{b}"] = torch.nonzero(self.queries[b].cpu()).flatten()[: self.map_words] - first
            out[f"map_visual_{b}"] = torch.nonzero(self.visual[b].cpu()).flatten()
        return out

    def residual(self, layer, states):
        if self.defer:
            self._store.keep("residual", layer, states.detach())
            return None
        return super().residual(layer, states)

    def attention(self, layer, probs):
        first, stop = self.query_rows
        rows = probs.detach()[:, :, first:stop]  # [batch, head, query row, key]
        if self.defer:
            self._store.keep("attention", layer, rows)
            return None
        block = self._attention_block(rows[:, None], self.phi[layer].to(probs.device)[:, None])
        return {k: (self.out(v[0]) if k != "maps" else {b: self.out(m[0]) for b, m in v.items()})
                for k, v in block.items()}

    def finish(self) -> list[tuple[str, int, object]]:
        """The kept layers' payloads, (kind, layer, payload), every layer's residual before its attention; empties
        the store."""
        return self._store.drain()

    def _reduce_kept(self, kept_by_kind: dict) -> list[tuple[str, int, object]]:
        """What the store holds, reduced in blocks where it is (popped from it): the residual payloads, then the
        attention ones."""
        out, phi = [], {}
        kept = kept_by_kind["residual"]
        for layers in layer_blocks(sorted(kept), kept, self.block_bytes):
            states = torch.stack([kept.pop(layer) for layer in layers], dim=1)  # [batch, layer, token, dim]
            block_phi = self.phi_of(states).transpose(0, 1).contiguous()  # [layer, batch, token]
            for i, layer in enumerate(layers):
                phi[layer] = block_phi[i]
                out.append(("residual", layer, block_phi[i]))
        kept = kept_by_kind["attention"]
        for layers in layer_blocks(sorted(kept), kept, self.block_bytes):
            probs = torch.stack([kept.pop(layer) for layer in layers], dim=1)  # [batch, layer, head, row, key]
            block = self._attention_block(probs, torch.stack([phi[layer].to(probs.device) for layer in layers], 1))
            for i, layer in enumerate(layers):
                out.append(("attention", layer, {k: (v[i] if k != "maps" else {b: m[i] for b, m in v.items()})
                                                 for k, v in block.items()}))
        return out

    def _attention_block(self, probs: torch.Tensor, phi: torch.Tensor) -> dict:
        """probs [batch, layer, head, query row, key], phi [batch, layer, key] -> the payload of each layer, stacked
        first: per-head measures [layer, batch, head], received [layer, batch, key], maps {b: [layer, head + 1,
        word, image token]}, each contiguous so that a layer's slice is."""
        probs = probs.float()
        there = self.on(probs.device)
        sink = (phi >= self.tau) & there["real"][:, None, :]  # [batch, layer, key]
        measures = head_measures.query_averaged_head_measures(probs, there["visual"], sink, there["queries"],
                                                              self.rho, self.summ, all_sinks=True)
        out = {name: measures[name].transpose(0, 1).contiguous() for name in (*self.PER_HEAD, "received")}
        maps = {}
        for b in self.map_rows:
            a = probs[b][:, :, there[f"map_queries_{b}"]][..., there[f"map_visual_{b}"]]  # [layer, head, word, visual]
            maps[b] = torch.cat([a, a.mean(dim=1, keepdim=True)], dim=1).contiguous()
        out["maps"] = maps
        return out


def spearman_with_ci(tokens: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """Spearman rank correlation of phi and attention received over image tokens; CI over samples."""
    from scipy import stats

    if len(tokens) < 3 or tokens["phi"].nunique() < 2 or tokens["attention_received"].nunique() < 2:
        return {"spearman": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan,
                "n_tokens": len(tokens), "n_samples": tokens["sample"].nunique() if len(tokens) else 0}
    rho, p = stats.spearmanr(tokens["phi"], tokens["attention_received"])
    groups = [g for _, g in tokens.groupby("sample")]
    phi = [g["phi"].to_numpy() for g in groups]
    att = [g["attention_received"].to_numpy() for g in groups]

    def stat(idx):
        x, y = np.concatenate([phi[i] for i in idx]), np.concatenate([att[i] for i in idx])
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            return np.nan
        return stats.spearmanr(x, y)[0]

    lo, hi = cluster_bootstrap(len(groups), stat, n_boot, seed)
    return {"spearman": float(rho), "ci_low": lo, "ci_high": hi, "p_value": float(p), "n_tokens": len(tokens),
            "n_samples": len(groups)}


def head_table(per_sample: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Mean over samples per (layer, head), the CI of visual-sink attention, and the rank by it (1 = most)."""
    cols = ["image_attention", "visual_sink_attention", "sink_attention", "visual_nonsink_ratio", "image_centric"]
    out = per_sample.groupby(["layer", "head"])[cols].mean().reset_index()
    lows, highs = [], []
    for _, g in per_sample.groupby(["layer", "head"]):
        v = g["visual_sink_attention"].to_numpy()
        lo, hi = cluster_bootstrap(len(v), lambda idx: float(v[idx].mean()), n_boot, seed)
        lows.append(lo)
        highs.append(hi)
    out["visual_sink_attention_ci_low"], out["visual_sink_attention_ci_high"] = lows, highs
    out["rank_visual_sink_attention"] = out["visual_sink_attention"].rank(ascending=False, method="min").astype(int)
    out["rank_sink_attention"] = out["sink_attention"].rank(ascending=False, method="min").astype(int)
    return out.sort_values("rank_visual_sink_attention").reset_index(drop=True)


def map_overlap(maps: pd.DataFrame, top: int) -> pd.DataFrame:
    """Per (sample, layer, head): mean pairwise Jaccard overlap of the top-`top` attended image tokens of
    different words (1 = every word looks at the same image tokens), and the share of them that are sinks."""
    rows = []
    for (sid, layer, head), g in maps.groupby(["sample", "layer", "head"]):
        tops = [set(w.nlargest(top, "attention")["visual_rank"]) for _, w in g.groupby("query_position")]
        sinks = set(g.loc[g["is_sink"].astype(bool), "visual_rank"])
        pairs = [len(a & b) / len(a | b) for i, a in enumerate(tops) for b in tops[i + 1:] if a | b]
        rows.append({"sample": sid, "layer": layer, "head": head, "n_words": len(tops),
                     "top_jaccard": float(np.mean(pairs)) if pairs else math.nan,
                     "top_sink_share": float(np.mean([len(t & sinks) / len(t) for t in tops if t])) if tops else math.nan})
    return pd.DataFrame(rows, columns=["sample", "layer", "head", "n_words", "top_jaccard", "top_sink_share"])


def run_heads(out: str, cfg: HeadsConfig, adapter=None, resume: bool = True, log=print, calibration=None,
              figures: bool = True) -> RunFolder:
    """Run the head analysis and write its run folder (resumes an interrupted run in `out`)."""
    s = setup(out, "heads", cfg, adapter, resume, log, calibration=calibration)
    folder, adapter = s.folder, s.adapter
    map_ids = {x.sample_id for x in s.samples[: cfg.n_maps]}
    for _, red in traced_chunks(s, cfg.batch_size, "heads", lambda: HeadsReducer(
            s.dims.dims, s.tau.value, adapter.rms_norm_eps, cfg.sink_score, cfg, map_ids, adapter.token_strings),
            remote=cfg.remote, per_request=cfg.batches_per_request):
        for table, rows in (("head_scores_per_sample", red.head_rows), ("token_attention", red.token_rows),
                            ("attention_maps", red.map_rows)):
            if rows:
                folder.append_rows(table, pd.concat(rows, ignore_index=True))
    return summarize_heads(folder, cfg, s.tau.value, s.dims.dims, figures)


def summarize_heads(folder: RunFolder, cfg: HeadsConfig, tau: float, dims: list[int], figures: bool = True) -> RunFolder:
    from sinkscope import plots
    from sinkscope.analyses import pages

    per_sample = folder.read("head_scores_per_sample")
    heads = head_table(per_sample, cfg.n_boot, cfg.seed) if len(per_sample) else pd.DataFrame()
    folder.write_table("head_scores", heads)
    tokens = folder.read("token_attention")
    late = tokens[tokens["layer"] >= cfg.start_layer] if len(tokens) else tokens
    corr_rows = [{"layers": f">= {cfg.start_layer}", **spearman_with_ci(late, cfg.n_boot, cfg.seed)}] if len(tokens) else []
    if len(tokens):
        for layer, g in tokens.groupby("layer"):
            corr_rows.append({"layers": str(layer), **spearman_with_ci(g, cfg.n_boot, cfg.seed)})
    corr = pd.DataFrame(corr_rows)
    folder.write_table("phi_attention_correlation", corr)
    maps = folder.read("attention_maps")
    overlap = map_overlap(maps, cfg.top_overlap) if len(maps) else pd.DataFrame()
    folder.write_table("map_overlap", overlap)
    figs = {}
    if figures and len(heads):
        figs["heads"] = plots.head_heatmap(heads, "visual_sink_attention", folder.path / "head_visual_sink_attention.png",
                                           "attention to visual sinks (text queries after the image)")
        figs["ratio"] = plots.head_heatmap(heads, "visual_nonsink_ratio", folder.path / "head_nonsink_ratio.png",
                                           "visual non-sink ratio")
    if figures and len(late) and dims:
        figs["phi"] = plots.phi_vs_attention(late, tau, folder.path / "phi_vs_attention.png", min_layer=cfg.start_layer,
                                             score=cfg.sink_score)
    if figures and len(maps):
        figs["maps"] = plots.attention_maps(maps, folder.path / "attention_maps.png", layer=_map_layer(maps, cfg))
    write_heads_index(folder, cfg, heads, corr, overlap, figs, tau, dims)
    folder.finish()
    return folder


def _map_layer(maps: pd.DataFrame, cfg: HeadsConfig) -> int:
    """The layer drawn: the first from start_layer with visual sinks in the mapped samples, else the middle one."""
    layers = sorted(maps["layer"].unique())
    with_sinks = sorted(maps.loc[maps["is_sink"].astype(bool), "layer"].unique())
    late = [l for l in with_sinks if l >= cfg.start_layer]
    return int(late[0]) if late else int(layers[len(layers) // 2])


def write_heads_index(folder, cfg, heads, corr, overlap, figs, tau, dims) -> None:
    from sinkscope.analyses.pages import step_findings_section
    from sinkscope.analyses.pages import index_head
    from sinkscope.markdown import markdown_table

    meta, lines = index_head(folder, cfg, "Heads")
    lines.append(f"{meta.get('n_samples')} samples; sink dims {dims}, tau = {tau:.3g}; queries: text tokens after the "
                 "image. CIs: 95% percentile bootstrap over samples.\n")
    lines += step_findings_section(findings, folder.path)
    lines.append("## Attention to visual sinks, per head\n")
    if heads.empty:
        lines.append("No text query follows an image in these samples: no head measure (none found).\n")
    else:
        lines += per_head_lines(heads)
    if "heads" in figs:
        lines.append(f"![visual sink attention]({figs['heads']})\n")
    lines.append("## Attention received against the sink score (image tokens)\n")
    if corr.empty or corr["spearman"].isna().all():
        lines.append("Spearman correlation undefined: no image tokens, or phi is constant (no sink dims found).\n")
    else:
        lines.append("The Spearman rank correlation over image tokens, read in the findings above:\n")
        lines.append(markdown_table(corr))
    if "phi" in figs:
        lines.append(f"![sink score against attention received]({figs['phi']})\n")
    lines.append("## Attention maps\n")
    if overlap.empty:
        lines.append("No maps (no image tokens or no text queries after the image).\n")
    else:
        mean_overlap = overlap[overlap["head"] == "mean"]
        lines.append(f"Mean pairwise overlap (Jaccard) of the top-{cfg.top_overlap} attended image tokens between "
                     f"different words, head mean, per layer: "
                     + ", ".join(f"L{int(l)} {v:.2f}" for l, v in mean_overlap.groupby("layer")["top_jaccard"].mean().items())
                     + " (1 = the same image tokens whatever the word).\n")
        if "maps" in figs:
            lines.append(f"![attention maps]({figs['maps']})\n")
    lines.append("Tables: `head_scores.csv`, `head_scores_per_sample.csv`, `token_attention.csv`, "
                 "`phi_attention_correlation.csv`, `attention_maps.csv`, `map_overlap.csv`.\n")
    folder.write_text("index.md", "\n".join(lines))


def per_head_lines(heads: pd.DataFrame) -> list[str]:
    """Markdown lines on head_scores.csv: which head (if any) gives visual sinks and image tokens the largest
    share of its attention, named only when it is the unique largest (findings.top_clause), with the heads whose CI
    overlaps its own, and the table, ranked only when there is a unique top (among ties or zeros the heads are listed
    by layer and head)."""
    from sinkscope.findings import top_clause
    from sinkscope.markdown import markdown_table

    labels = [f"L{int(l)}.H{int(h)}" for l, h in zip(heads["layer"], heads["head"])]
    lines = []
    has_ci = {"visual_sink_attention_ci_low", "visual_sink_attention_ci_high"} <= set(heads.columns)
    top, clause = top_clause(heads["visual_sink_attention"].to_numpy(float), labels, "attention to visual sinks",
                             heads["visual_sink_attention_ci_low"].to_numpy(float) if has_ci else None,
                             heads["visual_sink_attention_ci_high"].to_numpy(float) if has_ci else None)
    if heads["visual_sink_attention"].fillna(0).le(0).all():
        lines.append(f"**No visual sinks found**: every one of the {len(heads)} heads gives visual sinks 0 attention, "
                     "so no head is named.\n")
    else:
        lines.append(f"Of {len(heads)} heads: {clause}.\n")
    _, image_clause = top_clause(heads["image_attention"].to_numpy(float), labels, "attention to image tokens")
    lines.append(f"Of {len(heads)} heads: {image_clause}.\n")
    if top is None:
        shown = heads.sort_values(["layer", "head"]).drop(
            columns=["rank_visual_sink_attention", "rank_sink_attention"], errors="ignore")
        lines.append("Heads by layer and head (not ranked: no unique largest attention to visual sinks):\n")
    else:
        shown = heads
        lines.append("Heads ranked by attention to visual sinks (1 = most):\n")
    lines.append(markdown_table(shown, max_rows=12))
    return lines


# ----------------------------------------------------------------------------- the report step

FIGURES: tuple[str, ...] = ()  # the report shows the step's figures in name order


report_step = report_step_for(HeadsConfig, run_heads)


def findings(folder: Path) -> list[Finding]:
    """The top head by attention to visual sinks, the image-centric share, and Spearman(sink score, attention)."""
    heads = pd.read_csv(folder / "head_scores.csv")
    n = run_meta(folder).get("n_samples")
    out = []
    if len(heads):
        labels = [f"L{int(r.layer)}.H{int(r.head)}" for r in heads.itertuples()]
        top, clause = top_clause(heads["visual_sink_attention"].to_numpy(dtype=float), labels,
                                 "attention to visual sinks", heads["visual_sink_attention_ci_low"].to_numpy(dtype=float),
                                 heads["visual_sink_attention_ci_high"].to_numpy(dtype=float))
        if top is not None:
            r = heads.iloc[top]
            unresolved = "" if clause.endswith("has the largest attention to visual sinks") else f"; {clause}"
            out.append(Finding("heads", f"attention to visual sinks, top head {labels[top]}",
                               float(r["visual_sink_attention"]), float(r["visual_sink_attention_ci_low"]),
                               float(r["visual_sink_attention_ci_high"]), n=n, sentence=(
                                   f"The head that gives visual sinks the largest share of its text-query attention "
                                   f"(of {len(heads)} heads){unresolved}.")))
        else:
            nothing = bool((heads["visual_sink_attention"].fillna(0) == 0).all())
            out.append(Finding("heads", "attention to visual sinks, per head",
                               math.nan if nothing else float(heads["visual_sink_attention"].max()),
                               n=n, status=NOTHING_TO_TEST if nothing else MEASURED,
                               sentence=f"All {len(heads)} heads give visual sinks 0 attention (there are none): no "
                                        "head is named." if nothing else f"Heads: {clause}."))
        out.append(Finding("heads", "image-centric heads (share of queries, mean over heads)",
                           float(heads["image_centric"].mean()), n=n, sentence="Mean share of text queries for which a "
                           "head is image-centric (visual non-sink ratio >= rho, image attention >= summ)."))
    corr = pd.read_csv(folder / "phi_attention_correlation.csv")
    if len(corr):
        r = corr.iloc[0]
        status, clause = effect_clause(Estimate(float(r["spearman"]), float(r["ci_low"]), float(r["ci_high"])),
                                       above="image tokens with a higher sink score receive more attention",
                                       below="image tokens with a higher sink score receive less attention")
        out.append(Finding("heads", f"Spearman(sink score, attention received), image tokens, layers {r['layers']}",
                           float(r["spearman"]), float(r["ci_low"]), float(r["ci_high"]), n=int(r["n_samples"]),
                           status=status, sentence=f"Evidence 3: {clause}; {int(r['n_tokens'])} image tokens."))
    return out


__all__ = ["HeadsConfig", "per_head_lines", "run_heads", "spearman_with_ci", "head_table", "map_overlap", "FIGURES",
           "report_step", "findings"]
