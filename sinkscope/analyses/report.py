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
from sinkscope.findings import (EFFECT, MEASURED, NOTHING_TO_TEST, RULE_NOTE, Estimate, Finding, effect_clause,
                                finding_line, num, nothing_clause, nothing_to_act_on, share_clause, top_clause)
from sinkscope.questions import Answer, summary_markdown
from sinkscope.markdown import PLANTED_BANNER

STEPS = ("scan", "heads", "ablate", "contributions", "location", "vit_sinks", "var_eval", "patching", "inject",
         "remove")


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
    var_questions: int | None = None  # test questions per POPE split in the VAR evaluation (default: limit // 2, >= 8)

    def validate(self) -> None:
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise SinkscopeError(f"unknown report steps {unknown}; choose from {', '.join(STEPS)}")
        if self.sink_score not in ("auto", "rms", "layer"):
            raise SinkscopeError(f"--sink-score must be auto, rms or layer; got {self.sink_score!r}")
        if self.limit is not None and self.limit < 1:
            raise SinkscopeError(f"--limit must be >= 1; got {self.limit}")
        if self.var_questions is not None and (isinstance(self.var_questions, bool) or self.var_questions < 1):
            raise SinkscopeError(f"--var-questions must be a whole number >= 1 (test questions per POPE split), or "
                                 f"left out for limit // 2; got {self.var_questions!r}")


@dataclass
class Step:
    run: Callable  # (folder: Path, cfg: ReportConfig, adapter, sink_score: str, log, calibration=) -> None
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
    from sinkscope.runconfig import resolve_sink_score as rule

    return rule(cfg.sink_score, adapter.hidden_size)


# ----------------------------------------------------------------------------- scan step


def _scan_config(cfg: ReportConfig, sink_score: str):
    from sinkscope.analyses.scan import ScanConfig

    return ScanConfig(model=cfg.model, data=cfg.data, limit=cfg.limit, device=cfg.device, seed=cfg.seed, tau=cfg.tau,
                      sink_score=sink_score)


def report_calibration(cfg: ReportConfig, adapter, sink_score: str, log=print):
    """The report's one calibration (the scan's: the report data's first samples), handed to every step."""
    from sinkscope.analyses.common import calibrate_samples
    from sinkscope.eval.data import load_data

    scan = _scan_config(cfg, sink_score)
    samples = load_data(scan.data, scan.limit, scan.question, scan.image_root)
    return calibrate_samples(adapter, samples, scan, log=log)


def _run_scan(folder: Path, cfg: ReportConfig, adapter, sink_score: str, log, calibration=None) -> None:
    from sinkscope.analyses.scan import run_scan

    run_scan(str(folder), _scan_config(cfg, sink_score), adapter=adapter, log=log, calibration=calibration)


def _scan_findings(folder: Path) -> list[Finding]:
    run = _run_meta(folder)
    dims = json.loads((folder / "sink_dims.json").read_text())
    n = run.get("n_samples")
    tau = run.get("tau", {})
    score = run.get("params", {}).get("sink_score", "rms")
    how = (f"tau = {num(tau.get('value', math.nan))} ({tau.get('method')}, score: "
           f"{'phi' if score == 'rms' else 'layer-relative'})")
    out = [Finding("scan", "sink dims", float(len(dims["dims"])), n=n, sentence=(
        f"Sink dims {dims['dims']} found by {dims['method']} on the first token; {how}." if dims["dims"] else
        f"No sink dimension found ({dims['method']}): no activation of the first token stands out; {how}."))]
    counts = _token_counts(folder)
    per_image = _per_image(counts)
    if per_image is not None:
        out.append(Finding("scan", "visual sinks per image (busiest layer)", per_image.value, per_image.ci_low,
                           per_image.ci_high, n=per_image.n, sentence=(
                               "Image tokens at or above tau in the layer where they are most numerous, mean over "
                               "images." if per_image.value > 0 else
                               "No image token reaches tau in any layer >= 2: no visual sinks at this threshold.")))
        vis = counts[(counts["layer"] >= 2) & (counts["token_kind"] == "visual")]
        if per_image.value > 0:
            m, lo, hi = bootstrap_mean_ci(vis.groupby("sample")["sum_sink_attention"].max().values)
            out.append(Finding("scan", "text-query attention to visual sinks (busiest layer)", m, lo, hi, n=per_image.n,
                               sentence="Share of the attention of text queries after the image that visual sinks "
                                        "receive."))
        else:
            out.append(Finding("scan", "text-query attention to visual sinks", math.nan, n=per_image.n,
                               status=NOTHING_TO_TEST, sentence="No visual sinks: no attention to them to measure."))
    first = counts[(counts["layer"] >= 2) & (counts["token_kind"] == "bos")]
    if len(first):
        per_sample = first.groupby("sample")["sum_attention"].mean()
        m, lo, hi = bootstrap_mean_ci(per_sample.values)
        out.append(Finding("scan", "attention to the first token (mean over layers >= 2)", m, lo, hi,
                           n=len(per_sample), sentence="Share of text-query attention that the first token receives."))
    return out


def _run_meta(folder: Path) -> dict:
    """A step's run.json ({} when missing or unreadable)."""
    try:
        return json.loads((folder / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _token_counts(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "token_summary_per_sample.csv")


def _visual_sinks_per_image(folder: Path) -> Estimate | None:
    """Visual sinks per image in its busiest layer >= 2, mean over images with 95% CI; None without image tokens."""
    return _per_image(_token_counts(folder))


def _per_image(counts: pd.DataFrame) -> Estimate | None:
    """counts: the scan's token_summary_per_sample.csv (sample, layer, token_kind, n_sinks, ...)."""
    vis = counts[(counts["layer"] >= 2) & (counts["token_kind"] == "visual")]
    if not len(vis):
        return None
    per_sample = vis.groupby("sample")["n_sinks"].max()
    m, lo, hi = bootstrap_mean_ci(per_sample.values)
    return Estimate(m, lo, hi, len(per_sample))


REGISTRY: dict[str, Step] = {
    "scan": Step(_run_scan, _scan_findings, ("massive_activations.png", "phi_by_role.png", "phi_vs_attention.png",
                                             "dim_profile.png", "head_nonsink_ratio.png")),
}


# ----------------------------------------------------------------------------- analysis steps


def _analysis_runner(module: str, function: str, config_class: str, **overrides):
    """A step runner calling sinkscope.analyses.<module>.<function>(folder, Config(...), adapter=...)."""

    def run(folder: Path, cfg: ReportConfig, adapter, sink_score: str, log, calibration=None) -> None:
        import importlib

        mod = importlib.import_module(f"sinkscope.analyses.{module}")
        config = getattr(mod, config_class)(model=cfg.model, limit=cfg.limit, device=cfg.device, seed=cfg.seed,
                                            tau=cfg.tau, sink_score=sink_score, **overrides)
        if cfg.data != "demo" and "data" not in overrides:
            config.data = cfg.data
        getattr(mod, function)(str(folder), config, adapter=adapter, log=log, calibration=calibration)

    return run


def _row(table: pd.DataFrame, **where) -> pd.Series | None:
    for key, value in where.items():
        table = table[table[key].astype(str) == str(value)]
    return table.iloc[0] if len(table) else None


def _heads_findings(folder: Path) -> list[Finding]:
    heads = pd.read_csv(folder / "head_scores.csv")
    n = _run_meta(folder).get("n_samples")
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


RATIO_MEANINGS = {
    "contribution": ("visual sinks write more into the residual stream (|| a_ij x_j W_OV ||) than other image tokens",
                     "visual sinks write less into the residual stream (|| a_ij x_j W_OV ||) than other image tokens "
                     "(evidence 5)"),
    "attention": ("visual sinks receive more attention than other image tokens",
                  "visual sinks receive less attention than other image tokens"),
}


def _contributions_findings(folder: Path) -> list[Finding]:
    table = pd.read_csv(folder / "contributions.csv")
    out = []
    for measure, (above, below) in RATIO_MEANINGS.items():
        rows = table[table["measure"] == measure].head(1)
        r = rows.iloc[0] if len(rows) else None
        name = f"sink / non-sink {measure} ratio" + (f", layers {r['layers']}" if r is not None else "")
        if r is None or not np.isfinite(float(r["ratio_sink_over_nonsink"])):
            n = _run_meta(folder).get("n_samples")
            out.append(Finding("contributions", name, math.nan, status=NOTHING_TO_TEST, n=n, sentence=(
                f"No sample of {n} holds both visual sinks and other image tokens: nothing to compare.")))
            continue
        est = Estimate(float(r["ratio_sink_over_nonsink"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
        status, clause = effect_clause(est, above, below, null=1.0)
        out.append(Finding("contributions", name, est.value, est.ci_low, est.ci_high, n=est.n, status=status,
                           sentence=f"Ratio against 1: {clause}."))
    return out


def _location_findings(folder: Path) -> list[Finding]:
    table = pd.read_csv(folder / "location.csv")
    n = _run_meta(folder).get("n_samples")
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


def _vit_findings(folder: Path) -> list[Finding]:
    table = pd.read_csv(folder / "vit_sinks.csv")
    n = _run_meta(folder).get("n_samples")
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


def _ablate_tau(folder: Path, taus) -> float:
    """The tau the findings read: the run's own tau when it was swept, else the middle of the sweep."""
    taus = sorted(t for t in taus if np.isfinite(t))
    if not taus:
        return math.nan
    own = (_run_meta(folder).get("tau") or {}).get("value")
    return float(own) if own is not None and any(np.isclose(own, t) for t in taus) else float(taus[len(taus) // 2])


def _ablate_tokens(table: pd.DataFrame, condition: str, tau: float) -> float:
    """Mean tokens knocked out per sample for `condition` at `tau` (tau-free conditions: their only rows)."""
    rows = table[(table["condition"] == condition) & (np.isclose(table["tau"], tau) | table["tau"].isna())]
    return float(rows["n_tokens"].iloc[0]) if len(rows) else math.nan


def _ablate_change(per_sample: pd.DataFrame, condition: str, tau: float) -> Estimate:
    """Change of the logit difference against no knockout, paired per sample (seeds averaged), mean with 95% CI."""
    base = per_sample[per_sample["condition"] == "none"].groupby("sample")["logit_diff"].mean()
    rows = per_sample[(per_sample["condition"] == condition)
                      & (np.isclose(per_sample["tau"], tau) | per_sample["tau"].isna())]
    diff = (rows.groupby("sample")["logit_diff"].mean() - base).dropna()
    m, lo, hi = bootstrap_mean_ci(diff.values)
    return Estimate(m, lo, hi, len(diff))


def _ablate_findings(folder: Path) -> list[Finding]:
    table = pd.read_csv(folder / "ablation.csv")
    diff = table[table["metric"] == "logit_diff"]
    tau = _ablate_tau(folder, diff["tau"].dropna().unique())
    n_sinks = _ablate_tokens(diff, "visual_sinks", tau)
    out = []
    contrasts = folder / "ablation_contrasts.csv"
    if contrasts.exists():
        c = pd.read_csv(contrasts)
        for _, r in c[np.isclose(c["tau"], tau)].iterrows():
            name = f"|logit change| sinks minus {r['control']} (tau {num(tau)})"
            if nothing_to_act_on(n_sinks):
                out.append(Finding("ablate", name, math.nan, n=int(r["n_samples"]), status=NOTHING_TO_TEST,
                                   sentence=f"{nothing_clause('knock out', 'visual sinks')}; nothing to compare with "
                                            f"{r['control']} tokens."))
                continue
            est = Estimate(float(r["difference"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
            status, clause = effect_clause(
                est, f"knocking out visual sinks moves answers more than knocking out as many {r['control']} tokens",
                f"knocking out visual sinks moves answers less than knocking out as many {r['control']} tokens")
            out.append(Finding("ablate", name, est.value, est.ci_low, est.ci_high, n=est.n, status=status, sentence=(
                f"{clause}; mean |logit change| {num(r['sinks_abs_change'])} for {num(n_sinks)} sinks per sample, "
                f"{num(r['control_abs_change'])} for {r['control']} (Wilcoxon p = {num(r['p_value'], 2)}).")))
    if not len(diff):
        return out
    per_sample_path = folder / "ablation_per_sample.csv"
    per_sample = pd.read_csv(per_sample_path) if per_sample_path.exists() else None
    for condition in ("none", "visual_sinks", "random_visual", "top_nonsink", "bos"):
        rows = diff[(diff["condition"] == condition) & (np.isclose(diff["tau"], tau) | diff["tau"].isna())]
        if not len(rows):
            continue
        r = rows.iloc[0]
        n = int(r["n_samples"]) if "n_samples" in r and pd.notna(r["n_samples"]) else None
        if condition == "none":
            out.append(Finding("ablate", "logit difference, no knockout (the unmodified model)", float(r["value"]),
                               float(r["ci_low"]), float(r["ci_high"]), n=n, sentence=(
                                   "Correct-answer logit minus the other (yes/no) with nothing knocked out: the "
                                   "reference every knockout is compared with.")))
            continue
        tokens = float(r["n_tokens"])
        at = "" if pd.isna(r["tau"]) else f"tau {num(tau)}, "
        name = f"change of the logit difference, knockout {condition} ({at}{num(tokens)} token(s) per sample)"
        if nothing_to_act_on(tokens):
            out.append(Finding("ablate", name, math.nan, n=n, status=NOTHING_TO_TEST,
                               sentence=f"{nothing_clause('knock out')} (the model ran unmodified)."))
            continue
        p = "" if pd.isna(r["p_value"]) else f"; Wilcoxon p = {num(r['p_value'], 2)} against no knockout"
        if per_sample is None:
            out.append(Finding("ablate", f"logit difference, knockout {condition} ({at}{num(tokens)} token(s) per sample)",
                               float(r["value"]), float(r["ci_low"]), float(r["ci_high"]), n=n,
                               sentence=f"Correct-answer logit minus the other with these keys blocked{p}."))
            continue
        est = _ablate_change(per_sample, condition, tau)
        status, clause = effect_clause(est, "knocking them out raises the correct answer's logit difference",
                                       "knocking them out lowers the correct answer's logit difference")
        out.append(Finding("ablate", name, est.value, est.ci_low, est.ci_high, n=est.n, status=status, sentence=(
            f"Text queries after the image (and generated tokens) blocked from these keys: {clause}; logit difference "
            f"{num(r['value'])} against {num(_ablate_none(diff))} unmodified{p}.")))
    return out


def _ablate_none(diff: pd.DataFrame) -> float:
    rows = diff[diff["condition"] == "none"]
    return float(rows["value"].iloc[0]) if len(rows) else math.nan


def _run_var_eval(folder: Path, cfg: ReportConfig, adapter, sink_score: str, log, calibration=None) -> None:
    from sinkscope.analyses.var_eval import VarEvalConfig, run_var_eval

    limit = cfg.var_questions or max(8, cfg.limit // 2)
    config = VarEvalConfig(model=cfg.model, limit=limit, val_limit=max(8, cfg.limit // 4),
                           device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, tau=cfg.tau, sink_score=sink_score,
                           tasks=["pope-random", "pope-popular", "pope-adversarial"], p_grid=[0.3, 0.6],
                           rho_grid=[0.5, 0.8])
    if cfg.data != "demo":
        config.data = cfg.data
    run_var_eval(str(folder), config, adapter=adapter, log=log, calibration=calibration)


def _var_eval_tables(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(var_eval.csv, var_sweep.csv); a var_eval.csv written before unparseable answers were counted apart is
    recomputed from var_answers.csv, so its McNemar test is on parsed pairs too."""
    from sinkscope.analyses.var_eval import SWEEP_COLUMNS, eval_table

    table = pd.read_csv(folder / "var_eval.csv")
    if "n_pairs" not in table.columns and (folder / "var_answers.csv").exists():
        n_boot = int(_run_meta(folder).get("params", {}).get("n_boot", 1000))
        table = eval_table(pd.read_csv(folder / "var_answers.csv"), n_boot=n_boot)
    sweep_path = folder / "var_sweep.csv"
    sweep = pd.read_csv(sweep_path) if sweep_path.exists() else pd.DataFrame(columns=SWEEP_COLUMNS)
    return table, sweep


def _var_eval_findings(folder: Path) -> list[Finding]:
    from sinkscope.analyses.var_eval import choice_clause, condition_sentence

    table, sweep = _var_eval_tables(folder)
    meta = _run_meta(folder)
    chosen = (meta.get("chosen") or {})
    metric = meta.get("params", {}).get("select_metric", "f1")
    out = []
    if "p" in chosen:
        tied, clause = choice_clause(sweep, (chosen["p"], chosen["rho"]), metric, chosen.get("how"))
        out.append(Finding("var_eval", "VAR's p and rho", math.nan, n=meta.get("n_validation"), sentence=(
            f"{clause}. Validation questions only; the test split was not used for any choice.")))
    pooled = table[table["task"] == "all"] if (table["task"] == "all").any() else table
    for _, r in pooled.iterrows():
        status, sentence = condition_sentence(r)
        all_unparsed = int(r["n_unparseable"]) == int(r["n"])
        out.append(Finding("var_eval", f"POPE accuracy, {r['condition']}" + (f" (p {num(r['p'])}, rho {num(r['rho'])})"
                                                                           if pd.notna(r.get("p")) else ""),
                           math.nan if all_unparsed else float(r["accuracy"]),
                           math.nan if all_unparsed else float(r["ci_low"]),
                           math.nan if all_unparsed else float(r["ci_high"]), n=int(r["n"]), status=status,
                           sentence=f"Test split, yes/no answers: {sentence}."))
    return out


def _patching_reference(folder: Path, table: pd.DataFrame, source: str) -> Estimate | None:
    """The effect a share is taken of: the whole-image swap (source other_image, from the per-sample table) or
    VAR's whole effect (var_full); None when it was not measured."""
    if source == "var":
        rows = table[(table["site"] == "var_full") & (table["layer"] == -1)]
        if not len(rows):
            return None
        r = rows.iloc[0]
        return Estimate(float(r["effect"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
    path = folder / "patching_per_sample.csv"
    if not path.exists():
        return None
    per_sample = pd.read_csv(path)
    rows = per_sample[(per_sample["source"] == source) & (per_sample["layer"] == -1)]
    if not len(rows):
        return None
    full = rows.groupby("sample")["full_effect"].first()
    m, lo, hi = bootstrap_mean_ci(full.values)
    return Estimate(m, lo, hi, len(full))


PATCH_MEANINGS = {  # source: (above 0, below 0)
    "other_image": ("the patch moves the answer away from the other image's", "the patch carries the other image's "
                    "answer"),
    "var": ("raises the correct answer's logit difference", "lowers the correct answer's logit difference"),
}


def _count(x) -> str:
    """A mean count per sample: whole numbers from 100 on ('1007', not '1.01e+03')."""
    return f"{float(x):.0f}" if np.isfinite(float(x)) and float(x) >= 100 else num(x)


def _patching_findings(folder: Path) -> list[Finding]:
    table = pd.read_csv(folder / "patching.csv")
    out = []
    swap = _patching_reference(folder, table, "other_image")
    if swap is not None:
        status, clause = effect_clause(swap, *PATCH_MEANINGS["other_image"])
        out.append(Finding("patching", "whole image from the other_image run (the most a patch can do)", swap.value,
                           swap.ci_low, swap.ci_high, n=swap.n, status=status, sentence=(
                               f"Running the other image instead: {clause}.")))
    references = {"other_image": (swap, "swapping the whole image"),
                  "var": (_patching_reference(folder, table, "var"), "VAR's whole effect")}
    for _, r in table[table["layer"] == -1].iterrows():
        name = f"{r['site']} from the {r['source']} run, all layers"
        est = Estimate(float(r["effect"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
        if r["source"] == "self":
            out.append(Finding("patching", name, est.value, est.ci_low, est.ci_high, n=est.n, sentence=(
                "Check: every image token patched from the target's own run must change nothing (0).")))
            continue
        if nothing_to_act_on(r["n_tokens"]):
            what = "visual sinks" if r["site"] == "visual_sinks" else f"{r['site']} tokens"
            out.append(Finding("patching", name, math.nan, n=est.n, status=NOTHING_TO_TEST,
                               sentence=f"{nothing_clause('patch', what)}."))
            continue
        above, below = PATCH_MEANINGS.get(r["source"], ("raises the correct answer's logit difference",
                                                        "lowers the correct answer's logit difference"))
        status, clause = effect_clause(est, above, below)
        reference, ref_name = references.get(r["source"], (None, ""))
        # a share only of a detectable reference (share_clause) and only for a detectable part: no share of noise
        share = ("" if reference is None or r["site"] == "var_full" or status != EFFECT
                 else share_clause(est.value, reference, ref_name))
        out.append(Finding("patching", name, est.value, est.ci_low, est.ci_high, n=est.n, status=status, sentence=(
            f"Change of the correct answer's logit difference: {clause}" + (f"; {share}" if share else "")
            + f" ({_count(r['n_tokens'])} positions or heads per question).")))
    return out


def _run_patching(folder: Path, cfg: ReportConfig, adapter, sink_score: str, log, calibration=None) -> None:
    from sinkscope.analyses.patching import PatchConfig, run_patching

    config = PatchConfig(model=cfg.model, limit=max(8, cfg.limit // 2), device=cfg.device, seed=cfg.seed, tau=cfg.tau,
                         sink_score=sink_score, layers=[])
    run_patching(str(folder), config, adapter=adapter, log=log, calibration=calibration)


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


def _causal_step(module: str, figures: tuple[str, ...] = ()) -> Step:
    """Causal tests of the sink mechanism (sinkscope.analyses.inject / .remove): their own runner and findings."""
    import importlib

    def run(*args, **kwargs):
        return importlib.import_module(f"sinkscope.analyses.{module}").report_run(*args, **kwargs)

    def findings(folder):
        return importlib.import_module(f"sinkscope.analyses.{module}").report_findings(folder)

    return Step(run, findings, figures)


REGISTRY.update({"inject": _causal_step("inject", ("dose_response.png",)), "remove": _causal_step("remove")})


# ----------------------------------------------------------------------------- report


REPORT_FILES = ("report.json", "index.md", "findings.csv", "viewer.html")
SETTINGS_FREE_TO_CHANGE = ("device", "steps", "viewer_samples")  # they change no number of a finished step


def report_folder_conflict(out: Path, cfg: ReportConfig) -> str | None:
    """Why `out` may not take this report: it holds another report (other settings) or files that are not a
    report; None when it may (missing, empty, or a report with the same settings, steps added allowed)."""
    from sinkscope.runconfig import differing_settings

    if not out.is_dir() or not any(out.iterdir()):
        return None
    recorded = out / "report.json"
    if not recorded.exists():
        return "files but no report.json (it is not a sinkscope report)"
    try:
        old = json.loads(recorded.read_text()).get("config", {})
    except (OSError, json.JSONDecodeError):
        old = {"report.json": "unreadable"}
    new = json.loads(json.dumps(asdict(cfg), default=str))
    problems = differing_settings(old, new, ignore=SETTINGS_FREE_TO_CHANGE)
    dropped = [s for s in old.get("steps", []) if s not in cfg.steps]
    if dropped:
        problems.append(f"steps {dropped} would be dropped from its index.md")
    return f"a report made with other settings ({'; '.join(problems)})" if problems else None


def check_report_folder(out: Path, cfg: ReportConfig) -> None:
    """Raise, naming the differences and the fix, when `out` holds another report (see report_folder_conflict)."""
    conflict = report_folder_conflict(out, cfg)
    if conflict:
        raise SinkscopeError(f"--out {out} holds {conflict}; give another --out (the default is runs/report-MODEL), "
                             "or add --force to replace it")


def clear_report(out: Path) -> None:
    """Delete a report's own files in `out` (step folders, report.json, index.md, findings.csv, viewer.html)."""
    import shutil

    for name in (*STEPS, *REPORT_FILES):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_report(out: str | Path, cfg: ReportConfig, adapter=None, log=print, force: bool = False) -> Path:
    """Run every step not yet finished and write index.md; returns the report folder.

    A folder of another report (other settings) is refused before the model loads; `force` replaces it
    (its files are deleted once the model has loaded).
    """
    from sinkscope.models import load
    from sinkscope.runfolder import atomic_write_text

    cfg.validate()
    out = Path(out)
    replace = force and report_folder_conflict(out, cfg) is not None
    if not replace:
        check_report_folder(out, cfg)  # before the model loads
    adapter = adapter or load(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if replace:  # only once the model has loaded: a failed load leaves the old report in place
        clear_report(out)
    out.mkdir(parents=True, exist_ok=True)
    sink_score = resolve_sink_score(cfg, adapter)
    atomic_write_text(out / "report.json", json.dumps({"config": asdict(cfg), "sink_score": sink_score,
                                                       "model": adapter.describe()}, indent=1, default=str))
    done, skipped = [], {}
    calibration = None  # calibrated once, on the first step that runs, and handed to every step
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
            if calibration is None:
                calibration = report_calibration(cfg, adapter, sink_score, log=log)
            step.run(folder, cfg, adapter, sink_score, log, calibration=calibration)
        done.append(name)
    if is_finished(out / "scan"):  # the viewer shows the scan's samples; a report without a scan has none
        try:
            from sinkscope import viewer

            viewer.write_viewer(out / "scan", out / "viewer.html", adapter=adapter, n_samples=cfg.viewer_samples)
        except (ImportError, AttributeError) as err:
            log(f"viewer not written: {err}")
    else:
        log("viewer not written: the report has no finished scan step")
    write_index(out, cfg, adapter, sink_score, done, skipped)
    return out


def _step_samples(out: Path, done: list[str]) -> str:
    """'scan 32, heads 32, ..., var_eval 16 validation + 32 test questions, patching 16': each step's own count,
    read from its run.json (a step may use fewer samples than the report's --limit)."""
    parts = []
    for name in done:
        meta = _run_meta(out / name)
        if "n_test" in meta:
            parts.append(f"{name} {meta.get('n_validation', 0)} validation + {meta['n_test']} test questions")
        elif "n_samples" in meta:
            parts.append(f"{name} {meta['n_samples']}")
        else:
            parts.append(f"{name} unknown")
    return ", ".join(parts)


def _summary_answers(out: Path, done: list[str]) -> list[Answer]:
    """The paper's questions answered from the steps' tables (`sinkscope.questions`); a missing step or table
    makes its question 'not testable here' with the reason."""
    from sinkscope import questions as q

    answers: dict[str, Answer] = {}
    per_image = None
    if "scan" in done:
        folder = out / "scan"
        dims = json.loads((folder / "sink_dims.json").read_text())
        tau = (_run_meta(folder).get("tau") or {}).get("value")
        per_image = _visual_sinks_per_image(folder)
        answers["sink_dims"] = q.sink_dims_answer(dims.get("dims"), dims.get("method", ""),
                                                  _run_meta(folder).get("n_samples"))
        answers["visual_sinks"] = q.visual_sinks_answer(per_image, num(tau))
    has_sinks = per_image is not None and per_image.value > 0
    if "contributions" in done:
        table = pd.read_csv(out / "contributions" / "contributions.csv")
        rows = table[table["measure"] == "attention"]
        ratio = None
        if len(rows) and np.isfinite(float(rows.iloc[0]["ratio_sink_over_nonsink"])):
            r = rows.iloc[0]
            ratio = Estimate(float(r["ratio_sink_over_nonsink"]), float(r["ci_low"]), float(r["ci_high"]),
                             int(r["n_samples"]))
        answers["attention"] = q.attention_answer(has_sinks if "scan" in done else ratio is not None, ratio)
    if "ablate" in done:
        folder = out / "ablate"
        diff = pd.read_csv(folder / "ablation.csv")
        diff = diff[diff["metric"] == "logit_diff"]
        tau = _ablate_tau(folder, diff["tau"].dropna().unique())
        contrast, p_value = None, None
        if (folder / "ablation_contrasts.csv").exists():
            c = pd.read_csv(folder / "ablation_contrasts.csv")
            c = c[np.isclose(c["tau"], tau) & (c["control"] == "random_visual")]
            if len(c):
                r = c.iloc[0]
                contrast = Estimate(float(r["difference"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
                p_value = float(r["p_value"])
        answers["knockout"] = q.knockout_answer(_ablate_tokens(diff, "visual_sinks", tau), contrast, "random_visual",
                                                num(tau), p_value)
    if "var_eval" in done:
        folder = out / "var_eval"
        table, _ = _var_eval_tables(folder)
        pooled = table[table["task"] == "all"].set_index("condition")
        dims = (_run_meta(folder).get("var_calibrated") or {}).get("sink_dims")
        if "var" in pooled.index:
            r = pooled.loc["var"]
            change = None if not r["n_pairs"] or pd.isna(r["n_pairs"]) else Estimate(
                float(r["accuracy_change"]), float(r["change_ci_low"]), float(r["change_ci_high"]), int(r["n_pairs"]))
            note, base_accuracy, base_yes = "", None, None
            if "baseline" in pooled.index:
                b = pooled.loc["baseline"]
                base_accuracy = float(b["accuracy"])
                base_yes = float(b["yes_ratio"]) if not b["n_unparseable"] and pd.notna(b["yes_ratio"]) else None
                same = {0.0: " (it answers no to every question)", 1.0: " (it answers yes to every question)"}
                note = (f"baseline accuracy {num(b['accuracy'])}, yes-ratio {num(b['yes_ratio'])}, F1 {num(b['f1'])}"
                        f"{same.get(float(b['yes_ratio']), '') if not b['n_unparseable'] else ''}; VAR accuracy {num(r['accuracy'])}, yes-ratio "
                        f"{num(r['yes_ratio'])}, F1 {num(r['f1'])}")
            answers["var"] = q.var_answer(change, int(r["n_unparseable"]), int(r["n"]), dims, note, base_accuracy,
                                          base_yes)
    if "patching" in done:
        folder = out / "patching"
        table = pd.read_csv(folder / "patching.csv")
        rows = table[(table["site"] == "visual_sinks") & (table["layer"] == -1)]
        if len(rows):
            r = rows.iloc[0]
            effect = Estimate(float(r["effect"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
            answers["patching"] = q.patching_answer(r["n_tokens"], effect,
                                                    _patching_reference(folder, table, "other_image"))
    steps = {"sink_dims": "scan", "visual_sinks": "scan", "attention": "contributions", "knockout": "ablate",
             "var": "var_eval", "patching": "patching"}
    return [answers.get(key) or q.not_run(key, steps[key]) for key in q.QUESTIONS]


def report_command(cfg: ReportConfig, out: Path) -> str:
    """The `sinkscope report` command line that makes this report (options that differ from the defaults)."""
    parts = ["sinkscope report", f"--model {cfg.model}", f"--out {out}"]
    defaults = ReportConfig()
    for name, option in (("data", "--data"), ("limit", "--limit"), ("dtype", "--dtype"), ("seed", "--seed"),
                         ("sink_score", "--sink-score"), ("tau", "--tau"), ("var_questions", "--var-questions")):
        value = getattr(cfg, name)
        if value != getattr(defaults, name):
            parts.append(f"{option} {value}")
    if tuple(cfg.steps) != tuple(defaults.steps):
        parts.append(f"--steps {','.join(cfg.steps)}")
    return " ".join(parts)


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
    if getattr(adapter, "planted", False):
        lines.append(PLANTED_BANNER)
    lines.append(f"{arch['architecture']}, {arch['layers']} layers, hidden {arch['hidden_size']}, {arch['heads']} heads "
                 f"({arch['kv_heads']} key-value), seed {cfg.seed}. Samples per step (each step's run.json): "
                 f"{_step_samples(out, done)}.\n")
    lines.append(f"Made by: `{report_command(cfg, out)}`\n")
    if sink_score == "layer":
        lines.append("**Sink score.** With hidden size {h}, phi = |x_d / RMS(x)| cannot exceed sqrt({h}) = {c:.3g}, "
                     "and the paper's tau = 20 sits near that ceiling; this report uses the layer-relative score "
                     "|x_d| / (median token RMS of the layer), tau 100 by default (see the scan's phi-by-role figure "
                     "for where phi itself puts first, delimiter, text and image tokens).\n".format(
                         h=arch["hidden_size"], c=math.sqrt(arch["hidden_size"])))
    lines.append("## Summary: the paper's questions\n")
    lines.append("Each answer rests on the number beside it: a comparison counts as yes or no only through its 95% CI; "
                 "a question whose premise is missing here (no visual sinks, no parsed answers) is not testable. "
                 "The findings below give every number.\n")
    try:
        lines.append(summary_markdown(_summary_answers(out, done)))
    except (OSError, KeyError, ValueError) as err:
        lines.append(f"_The summary could not be read from the steps' tables: {err}._\n")
    lines.append("## Findings\n")
    lines.append(RULE_NOTE + "\n")
    lines += [finding_line(f) for f in findings]
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
