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


# ----------------------------------------------------------------------------- analysis steps


def _analysis_runner(module: str, function: str, config_class: str, **overrides):
    """A step runner calling sinkscope.analyses.<module>.<function>(folder, Config(...), adapter=...)."""

    def run(folder: Path, cfg: ReportConfig, adapter, sink_score: str, log) -> None:
        import importlib

        mod = importlib.import_module(f"sinkscope.analyses.{module}")
        config = getattr(mod, config_class)(model=cfg.model, limit=cfg.limit, device=cfg.device, seed=cfg.seed,
                                            tau=cfg.tau, sink_score=sink_score, **overrides)
        if cfg.data != "demo" and "data" not in overrides:
            config.data = cfg.data
        getattr(mod, function)(str(folder), config, adapter=adapter, log=log)

    return run


def _row(table: pd.DataFrame, **where) -> pd.Series | None:
    for key, value in where.items():
        table = table[table[key].astype(str) == str(value)]
    return table.iloc[0] if len(table) else None


def _heads_findings(folder: Path) -> list[Finding]:
    heads = pd.read_csv(folder / "head_scores.csv")
    out = []
    if len(heads):
        top = heads.iloc[0]
        out.append(Finding("heads", f"attention to visual sinks, top head L{int(top['layer'])}.H{int(top['head'])}",
                           float(top["visual_sink_attention"]), float(top["visual_sink_attention_ci_low"]),
                           float(top["visual_sink_attention_ci_high"]),
                           "The head that gives visual sinks the largest share of its text-query attention."))
        out.append(Finding("heads", "image-centric heads (share of queries, mean over heads)",
                           float(heads["image_centric"].mean()), sentence="Mean share of text queries for which a "
                           "head is image-centric (visual non-sink ratio >= rho, image attention >= summ)."))
    corr = pd.read_csv(folder / "phi_attention_correlation.csv")
    if len(corr):
        r = corr.iloc[0]
        out.append(Finding("heads", f"Spearman(sink score, attention received), image tokens, layers {r['layers']}",
                           float(r["spearman"]), float(r["ci_low"]), float(r["ci_high"]),
                           "Do image tokens with a higher sink score receive more attention (evidence 3)?"))
    return out


def _contributions_findings(folder: Path) -> list[Finding]:
    table = pd.read_csv(folder / "contributions.csv")
    out = []
    for measure, sentence in (("contribution", "|| a_ij x_j W_OV || of visual sinks over non-sinks (evidence 5): below 1 "
                               "means sinks write less into the residual stream than ordinary image tokens."),
                              ("attention", "Attention received by visual sinks over non-sinks.")):
        r = table[table["measure"] == measure].head(1)
        if len(r):
            r = r.iloc[0]
            out.append(Finding("contributions", f"sink / non-sink {measure} ratio, layers {r['layers']}",
                               float(r["ratio_sink_over_nonsink"]), float(r["ci_low"]), float(r["ci_high"]), sentence))
    if not out:
        out.append(Finding("contributions", "sink / non-sink contribution ratio", math.nan,
                           sentence="No visual sinks were found, so there is no ratio to report."))
    return out


def _location_findings(folder: Path) -> list[Finding]:
    table = pd.read_csv(folder / "location.csv")
    if not len(table):
        return [Finding("location", "background enrichment", math.nan, sentence="No masks or no visual sinks.")]
    r = table.iloc[0]
    return [Finding("location", f"background enrichment of visual sinks, layers {r['layers']}", float(r["enrichment"]),
                    float(r["ci_low"]), float(r["ci_high"]),
                    f"{100 * float(r['sink_background_share']):.3g}% of visual sinks lie on background against a base "
                    f"rate of {100 * float(r['background_base_rate']):.3g}% of image tokens (paper: 1.04-1.09x)."
                    if r["n_sinks"] else "No visual sinks: nothing to locate.")]


def _vit_findings(folder: Path) -> list[Finding]:
    table = pd.read_csv(folder / "vit_sinks.csv")
    out = []
    for _, r in table.iterrows():
        out.append(Finding("vit_sinks", f"high-norm image tokens at {r['site']} also found by D_sink",
                           float(r["share_found_by_dsink"]), float(r["ci_low"]), float(r["ci_high"]),
                           f"{int(r['n_high_norm'])} high-norm tokens, {int(r['n_lm_visual_sinks'])} language-model "
                           f"visual sinks, {int(r['n_both'])} both."))
    return out or [Finding("vit_sinks", "high-norm image tokens", math.nan, sentence="None found.")]


def _ablate_findings(folder: Path) -> list[Finding]:
    table = pd.read_csv(folder / "ablation.csv")
    out = []
    contrasts = folder / "ablation_contrasts.csv"
    if contrasts.exists():
        c = pd.read_csv(contrasts)
        if len(c):
            tau = sorted(c["tau"].unique())[len(c["tau"].unique()) // 2]
            for _, r in c[c["tau"] == tau].iterrows():
                out.append(Finding("ablate", f"|logit change| sinks minus {r['control']} (tau {tau:.3g})",
                                   float(r["difference"]), float(r["ci_low"]), float(r["ci_high"]),
                                   f"Knocking out visual sinks moves answers by {r['sinks_abs_change']:.3g} on average, "
                                   f"as many {r['control']} tokens by {r['control_abs_change']:.3g} (Wilcoxon p = "
                                   f"{r['p_value']:.2g}); negative: the sinks matter less."))
    diff = table[table["metric"] == "logit_diff"]
    if not len(diff):
        return out
    taus = sorted(diff["tau"].dropna().unique())
    tau = taus[len(taus) // 2] if taus else math.nan
    for condition in ("none", "visual_sinks", "random_visual", "top_nonsink", "bos"):
        rows = diff[(diff["condition"] == condition) & ((diff["tau"] == tau) | diff["tau"].isna())]
        if not len(rows):
            continue
        r = rows.iloc[0]
        p = "" if pd.isna(r["p_value"]) else f" Paired test against no knockout: p = {float(r['p_value']):.2g}."
        out.append(Finding("ablate", f"logit difference, knockout {condition} (tau {tau:.3g}, {r['n_tokens']:.3g} tokens)",
                           float(r["value"]), float(r["ci_low"]), float(r["ci_high"]),
                           "Correct-answer logit minus the other (yes/no), text queries after the image blocked from "
                           "the keys." + p))
    return out


def _run_var_eval(folder: Path, cfg: ReportConfig, adapter, sink_score: str, log) -> None:
    from sinkscope.analyses.var_eval import VarEvalConfig, run_var_eval

    config = VarEvalConfig(model=cfg.model, limit=max(8, cfg.limit // 2), val_limit=max(8, cfg.limit // 4),
                           device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, tau=cfg.tau, sink_score=sink_score,
                           tasks=["pope-random", "pope-adversarial"], p_grid=[0.3, 0.6], rho_grid=[0.5, 0.8])
    if cfg.data != "demo":
        config.data = cfg.data
    run_var_eval(str(folder), config, adapter=adapter, log=log)


def _var_eval_findings(folder: Path) -> list[Finding]:
    table = pd.read_csv(folder / "var_eval.csv")
    out = []
    pooled = table[table["task"] == "all"] if (table["task"] == "all").any() else table
    for _, r in pooled.iterrows():
        p = "" if pd.isna(r["p_value"]) else f" McNemar exact p = {float(r['p_value']):.2g} against baseline"
        out.append(Finding("var_eval", f"accuracy, {r['condition']}" + (f" (p {r['p']:.2g}, rho {r['rho']:.2g})"
                                                                        if pd.notna(r.get("p")) else ""),
                           float(r["accuracy"]), float(r["ci_low"]), float(r["ci_high"]),
                           f"POPE-style yes/no on the test split, n = {int(r['n'])}, F1 {float(r['f1']):.3g}." + p
                           + ("; p and rho were chosen on the validation split." if r["condition"] == "var" else "")))
    return out


def _run_patching(folder: Path, cfg: ReportConfig, adapter, sink_score: str, log) -> None:
    from sinkscope.analyses.patching import PatchConfig, run_patching

    config = PatchConfig(model=cfg.model, limit=max(8, cfg.limit // 2), device=cfg.device, seed=cfg.seed, tau=cfg.tau,
                         sink_score=sink_score, layers=[])
    run_patching(str(folder), config, adapter=adapter, log=log)


def _patching_findings(folder: Path) -> list[Finding]:
    table = pd.read_csv(folder / "patching.csv")
    out = []
    for _, r in table[table["layer"] == -1].iterrows():
        whole = "of VAR's whole effect" if r["source"] == "var" else "of swapping the whole image"
        share = "" if pd.isna(r.get("fraction_of_full")) else f" ({100 * float(r['fraction_of_full']):.3g}% {whole})"
        out.append(Finding("patching", f"{r['site']} from the {r['source']} run, all layers", float(r["effect"]),
                           float(r["ci_low"]), float(r["ci_high"]),
                           f"Change of the correct answer's logit difference{share}, {int(r['n_samples'])} questions; "
                           "negative: the patch carries the other image's answer."))
    return out


REGISTRY.update({
    "var_eval": Step(_run_var_eval, _var_eval_findings),
    "patching": Step(_run_patching, _patching_findings),
    "heads": Step(_analysis_runner("heads", "run_heads", "HeadsConfig"), _heads_findings),
    "ablate": Step(_analysis_runner("ablate", "run_ablate", "AblateConfig", n_random=3), _ablate_findings),
    "contributions": Step(_analysis_runner("contributions", "run_contributions", "ContributionsConfig"),
                          _contributions_findings),
    "location": Step(_analysis_runner("location", "run_location", "LocationConfig"), _location_findings),
    "vit_sinks": Step(_analysis_runner("vit_sinks", "run_vit_sinks", "VitSinksConfig"), _vit_findings),
})


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
