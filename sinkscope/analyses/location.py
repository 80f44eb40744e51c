"""`sinkscope location`: do visual sinks sit on background? (Kang et al. 2025, evidence 6)

For every image and layer: how many image tokens lie on background (the base rate), how many
are visual sinks, how many of those lie on background. Pooled over layers >= start_layer and
per layer: the sink share on background, the base rate, the enrichment (share / base rate) with
a bootstrap CI over samples, and a binomial test of the share against the base rate.

Background masks: the demo world's ground truth (`--data demo`), or `--masks DIR` with one PNG
per image named like the image (same stem), the image's size, 0 = background and anything else
= object (VOC / COCO semantic masks work as they are). The mask is reduced to the model's token
grid by area: a token is background when objects cover < 10% of it. Needs one square token grid
per image (LLaVA, Qwen2-VL on square images, Gemma 3); images whose tokens do not form one
(LLaVA-NeXT tiles + newlines) are skipped and counted.

Writes: run.json, sink_dims.json, location_per_sample.csv, location.csv, location.png, index.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sinkscope.analyses.common import (AnalysisConfig, InTraceReducer, SinkScores, cluster_bootstrap, report_step_for,
                                      setup, traced_chunks)
from sinkscope.analyses.step_findings import run_meta
from sinkscope.errors import SinkscopeError
from sinkscope.eval.tasks import Sample
from sinkscope.findings import NOTHING_TO_TEST, Estimate, Finding, effect_clause, num
from sinkscope.measures import location as loc
from sinkscope.runfolder import RunFolder

MASK_SUFFIXES = (".png",)


@dataclass
class LocationConfig(AnalysisConfig):
    masks: str | None = None  # folder of PNG masks (same stem as the image); default: demo world ground truth
    min_object_coverage: float = 0.1


def load_masks(folder: str | Path) -> dict[str, Path]:
    """stem -> PNG path of a mask folder; a clear error when the folder is missing or empty."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise SinkscopeError(f"--masks {folder!r} is not a folder; give a folder with one PNG mask per image "
                             "(same stem as the image, 0 = background)")
    masks = {p.stem: p for p in sorted(path.iterdir()) if p.suffix.lower() in MASK_SUFFIXES}
    if not masks:
        raise SinkscopeError(f"mask folder {path} holds no PNG files; put one PNG per image there, named like the "
                             "image (photo.jpg -> photo.png), pixel value 0 = background, anything else = object")
    return masks


def background_mask(sample: Sample, masks: dict[str, Path] | None) -> np.ndarray | None:
    """[height, width] bool, True = background, for a sample's image (demo ground truth or a PNG mask);
    None for a text-only sample (it has no image to locate sinks in)."""
    from PIL import Image

    if sample.image_path is None and sample._image is None:
        return None
    if masks is None:
        patches = sample.meta.get("background_patches")
        if patches is None:
            raise SinkscopeError(f"sample {sample.sample_id} has no ground-truth background mask; pass --masks DIR "
                                 "(one PNG per image, same stem, 0 = background) or use --data demo")
        arr = np.asarray(patches, dtype=bool)
        side = int(round(math.sqrt(arr.size)))
        return arr.reshape(side, side)
    stem = Path(sample.image_path).stem if sample.image_path else sample.sample_id
    if stem not in masks:
        raise SinkscopeError(f"no mask for image {stem!r} in the mask folder; add {stem}.png (0 = background) or "
                             "leave that image out of --data")
    with Image.open(masks[stem]) as im:
        mask = np.asarray(im.convert("L"))
    image = sample.image()
    if image is not None and (mask.shape[1], mask.shape[0]) != image.size:
        raise SinkscopeError(f"mask {masks[stem].name} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                             f"{image.size[0]}x{image.size[1]}; resize the mask to the image's size (nearest "
                             "neighbour) or export it again from the annotation")
    return mask == 0


class LocationReducer(InTraceReducer):
    """Per (sample, layer): the first image's tokens, its background ones, its visual sinks and those on background.
    Its in-trace part is phi of every token (`SinkScores`), so it runs here (the batch's phi brought to the host once)
    or inside a remote trace alike; the counts are made on the host from the masks."""

    def __init__(self, dims, tau, eps, score, backgrounds: dict, min_object_coverage: float):
        super().__init__(dims, tau, eps, score)
        self.backgrounds, self.cov = backgrounds, min_object_coverage
        self.rows, self.skipped = [], {}
        self._token_bg: dict = {}

    def in_trace(self, host: bool = True) -> SinkScores:
        return SinkScores(self.dims, self.eps, self.score, self.real, host)

    def take(self, kind: str, layer: int, payload) -> None:
        if kind != "residual":
            return
        self._take_phi(layer, payload)
        for b, sid in enumerate(self.info.sample_ids):
            first = (self.kinds.image_index[b] == 0)
            if not first.any():
                self.skipped[sid] = "no image tokens"
                continue
            n = int(first.sum())
            if self.backgrounds.get(sid) is None:
                self.skipped[sid] = "no background mask"
                continue
            if sid not in self._token_bg:
                grid = loc.square_grid(n)
                if grid is None:
                    self.skipped[sid] = f"{n} image tokens do not form one square grid"
                    continue
                self._token_bg[sid] = loc.token_background(self.backgrounds[sid], grid, self.cov)
            c = loc.location_counts(self.visual_sink[layer][b][first].numpy(), self._token_bg[sid])
            self.rows.append({"sample": sid, "layer": layer, "n_visual": c.n_visual, "n_background": c.n_background,
                              "n_sinks": c.n_sinks, "n_sinks_background": c.n_sinks_background})


def enrichment_row(g: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """Pooled share, base rate, enrichment (CI over samples) and a binomial test of share vs base rate."""
    from scipy import stats

    per = g.groupby("sample")[["n_visual", "n_background", "n_sinks", "n_sinks_background"]].sum()
    share, base, enr = loc.pooled_enrichment(per["n_visual"], per["n_background"], per["n_sinks"],
                                             per["n_sinks_background"])
    arr = per.to_numpy()

    def stat(idx):
        return loc.pooled_enrichment(*arr[idx].T)[2]

    lo, hi = cluster_bootstrap(len(per), stat, n_boot, seed) if per["n_sinks"].sum() else (math.nan, math.nan)
    n_s, k = int(per["n_sinks"].sum()), int(per["n_sinks_background"].sum())
    p = float(stats.binomtest(k, n_s, base).pvalue) if n_s and 0 < base < 1 else math.nan
    return {"n_samples": len(per), "n_visual": int(per["n_visual"].sum()), "n_sinks": n_s, "sink_background_share": share,
            "background_base_rate": base, "enrichment": enr, "ci_low": lo, "ci_high": hi, "p_value_binomial": p}


def skip_records(skipped) -> list[dict]:
    """Skipped samples as records {sample, reason, ...}: setup writes a list of them; runs written before kept a
    {sample: reason} mapping."""
    if not skipped:
        return []
    if isinstance(skipped, dict):
        return [{"sample": k, "reason": v} for k, v in skipped.items()]
    return [dict(r) for r in skipped]


def run_location(out: str, cfg: LocationConfig, adapter=None, resume: bool = True, log=print, calibration=None,
                 figures: bool = True) -> RunFolder:
    masks = load_masks(cfg.masks) if cfg.masks else None  # bad --masks fails before the model loads
    s = setup(out, "location", cfg, adapter, resume, log, calibration=calibration)
    backgrounds = {x.sample_id: background_mask(x, masks) for x in s.samples}  # every mask checked up front
    skipped = skip_records(s.folder.meta.get("skipped"))  # the data's own skips (setup), then the location's
    for _, red in traced_chunks(s, cfg.batch_size, "location", lambda: LocationReducer(
            s.dims.dims, s.tau.value, s.adapter.rms_norm_eps, cfg.sink_score, backgrounds, cfg.min_object_coverage),
            attention=False, remote=cfg.remote, per_request=cfg.batches_per_request):
        s.folder.append_rows("location_per_sample", pd.DataFrame(
            red.rows, columns=["sample", "layer", "n_visual", "n_background", "n_sinks", "n_sinks_background"]))
        seen = {r["sample"] for r in skipped}
        skipped += [{"sample": sid, "reason": reason} for sid, reason in red.skipped.items() if sid not in seen]
        s.folder.update_meta(skipped=skipped)
    return summarize_location(s.folder, cfg, figures)


def summarize_location(folder: RunFolder, cfg: LocationConfig, figures: bool = True) -> RunFolder:
    from sinkscope import plots

    per = folder.read("location_per_sample")
    rows = []
    if len(per):
        rows.append({"layers": f">= {cfg.start_layer}", **enrichment_row(per[per["layer"] >= cfg.start_layer],
                                                                          cfg.n_boot, cfg.seed)})
        for layer, g in per.groupby("layer"):
            rows.append({"layers": str(layer), **enrichment_row(g, cfg.n_boot, cfg.seed)})
    table = pd.DataFrame(rows)
    folder.write_table("location", table)
    figs = {}
    if figures and len(table):
        figs["bars"] = plots.location_shares(table, folder.path / "location.png")
    _write_index(folder, cfg, table, figs)
    folder.finish()
    return folder


def _write_index(folder, cfg, table, figs) -> None:
    from sinkscope.analyses.pages import index_head, step_findings_section, tau_text
    from sinkscope.markdown import markdown_table

    meta, lines = index_head(folder, cfg, "Sink location")
    src = f"masks from `{cfg.masks}`" if cfg.masks else "the demo world's ground-truth masks"
    lines.append(f"{meta.get('n_samples')} samples, {src}; sink dims {meta.get('sink_dims')}, tau = "
                 f"{tau_text(meta)}. A token is background when objects cover "
                 f"< {cfg.min_object_coverage:g} of it. CI: 95% percentile bootstrap over samples.\n")
    skipped = skip_records(meta.get("skipped"))
    if skipped:
        lines.append(f"{len(skipped)} samples skipped: " + "; ".join(f"{r['sample']}: {r['reason']}" for r in skipped[:5])
                     + "\n")
    pooled = table.iloc[0] if len(table) else None
    if pooled is None or not pooled["n_sinks"]:
        lines.append(f"**No visual sinks found** in layers >= {cfg.start_layer}: nothing to locate. Base rate of "
                     f"background tokens: {pooled['background_base_rate']:.3g}.\n" if pooled is not None else
                     "**No visual sinks found** (no image could be located).\n")
    lines += step_findings_section(findings, folder.path)
    if pooled is not None and pooled["n_sinks"]:
        lines.append(f"Binomial test of the sinks' background share against the base rate: p = "
                     f"{num(pooled['p_value_binomial'], 2)} (the findings' CI is the bootstrap over samples).\n")
    if "bars" in figs:
        lines.append(f"![location]({figs['bars']})\n")
    lines.append(markdown_table(table))
    folder.write_text("index.md", "\n".join(lines))


# ----------------------------------------------------------------------------- the report step

FIGURES: tuple[str, ...] = ()  # the report shows the step's figures in name order


report_step = report_step_for(LocationConfig, run_location)


def findings(folder: Path) -> list[Finding]:
    """The background enrichment of visual sinks against the base rate of image tokens, against 1."""
    table = pd.read_csv(folder / "location.csv")
    n = run_meta(folder).get("n_samples")
    if not len(table):
        return [Finding("location", "background enrichment", math.nan, n=n, status=NOTHING_TO_TEST,
                        sentence="No object masks or no visual sinks: nothing to locate.")]
    r = table.iloc[0]
    name = f"background enrichment of visual sinks, layers {r['layers']}"
    if not r["n_sinks"] or not np.isfinite(float(r["enrichment"])):
        return [Finding("location", name, math.nan, n=int(r["n_samples"]), status=NOTHING_TO_TEST,
                        sentence="No visual sinks: nothing to locate.")]
    est = Estimate(float(r["enrichment"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
    status, clause = effect_clause(est, "visual sinks lie on background more often than image tokens do",
                                   "visual sinks lie on background less often than image tokens do", null=1.0)
    return [Finding("location", name, est.value, est.ci_low, est.ci_high, n=est.n, status=status, sentence=(
        f"{num(100 * float(r['sink_background_share']))}% of {int(r['n_sinks'])} visual sinks lie on background against "
        f"a base rate of {num(100 * float(r['background_base_rate']))}% of image tokens: {clause} (paper: 1.04-1.09x)."))]
