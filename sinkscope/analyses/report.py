"""`sinkscope report`: every analysis on one model, one page that leads with the findings.

Each step writes its own run folder under the report folder (`scan/`, `heads/`, ...). A step
whose run.json says "finished" is not run again; an interrupted step resumes where it stopped
(its run folder appends per sample). Then `index.md` lists the findings (each a number with
its confidence interval and one sentence), and every step's figures, and `viewer.html` lets a
reader look at attention and sinks image by image.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.report import PLANTED_BANNER

STEPS = ("scan", "heads", "ablate", "contributions", "location", "vit_sinks", "var_eval", "patching")


@dataclass
class ReportConfig:
    model: str = "demo"
    data: str = "demo"
    limit: int = 32
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    steps: tuple[str, ...] = STEPS
    sink_score: str = "auto"  # auto: the paper's phi, or the layer-relative score when phi saturates (hidden < 1600)
    tau: float | None = None
    viewer_samples: int = 4

    def validate(self) -> None:
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise SinkscopeError(f"unknown report steps {unknown}; choose from {', '.join(STEPS)}")
        if self.sink_score not in ("auto", "rms", "layer"):
            raise SinkscopeError(f"--sink-score must be auto, rms or layer; got {self.sink_score!r}")
        if self.limit is not None and self.limit < 1:
            raise SinkscopeError(f"--limit must be >= 1; got {self.limit}")


@dataclass
class Finding:
    """One line of the report's lead: a number, its 95% CI, and what it means."""

    step: str
    name: str
    value: float
    ci_low: float = math.nan
    ci_high: float = math.nan
    sentence: str = ""


@dataclass
class Step:
    run: Callable  # (folder: Path, cfg: ReportConfig, adapter, sink_score: str, log) -> None
    findings: Callable  # (folder: Path) -> list[Finding]
    figures: tuple[str, ...] = field(default_factory=tuple)  # PNG names to show, in order (others are listed)


def is_finished(folder: Path) -> bool:
    run = folder / "run.json"
    if not run.exists():
        return False
    try:
        return bool(json.loads(run.read_text()).get("finished"))
    except (OSError, json.JSONDecodeError):
        return False


def bootstrap_mean_ci(values, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap CI (scipy), NaN CI for fewer than 2 values."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if len(x) < 2 or np.all(x == x[0]):
        return float(x.mean()), float(x.mean()), float(x.mean())
    res = stats.bootstrap((x,), np.mean, n_resamples=2000, confidence_level=0.95, method="percentile",
                          random_state=np.random.default_rng(seed))
    return float(x.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def resolve_sink_score(cfg: ReportConfig, adapter) -> str:
    """auto -> the paper's phi when sqrt(hidden) >= 40 (its tau = 20 is reachable), else the layer-relative score."""
    if cfg.sink_score != "auto":
        return cfg.sink_score
    return "rms" if math.sqrt(adapter.hidden_size) >= 40 else "layer"


# ----------------------------------------------------------------------------- scan step


def _run_scan(folder: Path, cfg: ReportConfig, adapter, sink_score: str, log) -> None:
    from sinkscope.analyses.scan import ScanConfig, run_scan

    run_scan(str(folder), ScanConfig(model=cfg.model, data=cfg.data, limit=cfg.limit, device=cfg.device,
                                     seed=cfg.seed, tau=cfg.tau, sink_score=sink_score),
             adapter=adapter, log=log)


def _scan_findings(folder: Path) -> list[Finding]:
    run = json.loads((folder / "run.json").read_text())
    dims = json.loads((folder / "sink_dims.json").read_text())
    counts = pd.read_csv(folder / "token_summary_per_sample.csv")
    tau = run.get("tau", {})
    score = run.get("params", {}).get("sink_score", "rms")
    out = [Finding("scan", "sink dims", float(len(dims["dims"])), sentence=(
        f"Sink dims {dims['dims']} found by {dims['method']} on the first token; tau = {tau.get('value', math.nan):.3g} "
        f"({tau.get('method')}, score: {'phi' if score == 'rms' else 'layer-relative'})."))]
    deep = counts[counts["layer"] >= 2]
    vis = deep[deep["token_kind"] == "visual"]
    if len(vis):
        per_sample = vis.groupby("sample")["n_sinks"].max()
        m, lo, hi = bootstrap_mean_ci(per_sample.values)
        out.append(Finding("scan", "visual sinks per image (busiest layer)", m, lo, hi,
                           "Image tokens at or above tau in the layer where they are most numerous, mean over images."
                           if m > 0 else "No image token reaches tau in any layer >= 2: no visual sinks at this threshold."))
        share = vis.groupby("sample")["sum_sink_attention"].max()
        m, lo, hi = bootstrap_mean_ci(share.values)
        out.append(Finding("scan", "text-query attention to visual sinks (busiest layer)", m, lo, hi,
                           "Share of the attention of text queries after the image that visual sinks receive."))
    first = deep[deep["token_kind"] == "bos"]
    if len(first):
        per_sample = first.groupby("sample")["sum_attention"].mean()
        m, lo, hi = bootstrap_mean_ci(per_sample.values)
        out.append(Finding("scan", "attention to the first token (mean over layers >= 2)", m, lo, hi,
                           "Share of text-query attention that the first token receives."))
    return out


REGISTRY: dict[str, Step] = {
    "scan": Step(_run_scan, _scan_findings, ("massive_activations.png", "phi_by_role.png", "phi_vs_attention.png",
                                             "dim_profile.png", "head_nonsink_ratio.png")),
}


def register_step(name: str, step: Step) -> None:
    REGISTRY[name] = step


# ----------------------------------------------------------------------------- report


def run_report(out: str | Path, cfg: ReportConfig, adapter=None, log=print) -> Path:
    """Run every step not yet finished and write index.md; returns the report folder."""
    from sinkscope.models import load
    from sinkscope.runfolder import atomic_write_text

    cfg.validate()
    out = Path(out)
    adapter = adapter or load(cfg.model, device=cfg.device, dtype=cfg.dtype)
    out.mkdir(parents=True, exist_ok=True)
    sink_score = resolve_sink_score(cfg, adapter)
    atomic_write_text(out / "report.json", json.dumps({"config": asdict(cfg), "sink_score": sink_score,
                                                       "model": adapter.describe()}, indent=1, default=str))
    done, skipped = [], {}
    for name in cfg.steps:
        step = REGISTRY.get(name)
        if step is None:
            skipped[name] = "not available in this installation"
            continue
        folder = out / name
        if is_finished(folder):
            log(f"[{name}] finished earlier: kept")
        else:
            log(f"[{name}] running")
            step.run(folder, cfg, adapter, sink_score, log)
        done.append(name)
    try:
        from sinkscope import viewer

        viewer.write_viewer(out / "scan", out / "viewer.html", adapter=adapter, n_samples=cfg.viewer_samples)
    except (ImportError, AttributeError) as err:
        log(f"viewer not written: {err}")
    write_index(out, cfg, adapter, sink_score, done, skipped)
    return out


def write_index(out: Path, cfg: ReportConfig, adapter, sink_score: str, done: list[str], skipped: dict) -> None:
    from sinkscope.runfolder import atomic_write_csv, atomic_write_text

    findings = []
    for name in done:
        try:
            findings += REGISTRY[name].findings(out / name)
        except (OSError, KeyError, ValueError) as err:
            findings.append(Finding(name, "(no findings)", math.nan, sentence=f"could not read the step's tables: {err}"))
    table = pd.DataFrame([asdict(f) for f in findings])
    atomic_write_csv(out / "findings.csv", table)
    arch = adapter.describe()
    lines = [f"# sinkscope report: `{cfg.model}` on `{cfg.data}`\n"]
    if "organism" in str(cfg.model):
        lines.append(PLANTED_BANNER)
    lines.append(f"{arch['architecture']}, {arch['layers']} layers, hidden {arch['hidden_size']}, {arch['heads']} heads "
                 f"({arch['kv_heads']} key-value). {cfg.limit} samples per step, seed {cfg.seed}.\n")
    if sink_score == "layer":
        lines.append("**Sink score.** With hidden size {h}, phi = |x_d / RMS(x)| cannot exceed sqrt({h}) = {c:.3g}, "
                     "and the paper's tau = 20 sits near that ceiling; this report uses the layer-relative score "
                     "|x_d| / (median token RMS of the layer), tau 100 by default (see the scan's phi-by-role figure "
                     "for where phi itself puts first, delimiter, text and image tokens).\n".format(
                         h=arch["hidden_size"], c=math.sqrt(arch["hidden_size"])))
    lines.append("## Findings\n")
    for f in findings:
        ci = "" if math.isnan(f.ci_low) else f" (95% CI {f.ci_low:.3g} to {f.ci_high:.3g})"
        value = "" if math.isnan(f.value) else f" **{f.value:.3g}**{ci}."
        lines.append(f"- *{f.step}*, {f.name}:{value} {f.sentence}")
    lines.append("")
    if (out / "viewer.html").exists():
        lines.append("Look at attention and sinks image by image in the [sink viewer](viewer.html).\n")
    for name in done:
        step = REGISTRY[name]
        folder = out / name
        lines.append(f"## {name}\n")
        lines.append(f"Details: [{name}/index.md]({name}/index.md).\n")
        shown = [p for p in step.figures if (folder / p).exists()]
        others = sorted(p.name for p in folder.glob("*.png") if p.name not in shown)
        for png in shown + others:
            lines.append(f"![{name}: {png}]({name}/{png})\n")
    if skipped:
        lines.append("## Not run\n")
        lines += [f"- {k}: {v}" for k, v in skipped.items()]
    lines.append("\n## Files\n")
    lines.append("`findings.csv` (the list above), `report.json` (configuration), one run folder per step "
                 "(run.json with parameters, versions, commit and times; tidy CSV tables; figures).\n")
    atomic_write_text(out / "index.md", "\n".join(lines))
