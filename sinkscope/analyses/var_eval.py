"""`sinkscope var-eval`: does VAR help? POPE (and CHAIR) with controls, tuned on validation only.

Protocol (Kang et al. 2025, sections 5-6 of the shared paper notes, with the reviewers' concerns met):
  1. Calibrate VAR (sink dims, tau) on validation questions (`interventions.var.calibrate`).
  2. Sweep p x rho (a small grid) on the *validation* split; pick the pair with the best pooled
     `select_metric` (F1 by default; ties: nearest the paper's p = 0.6, rho = 0.5). `var_sweep.csv`.
  3. On the *test* split, never used for choosing, run every condition with the chosen p, rho:
       baseline           the unmodified model;
       var                VAR on image-centric heads (the paper);
       var_random_heads   as many heads per (layer, query), drawn at random (matched in count);
       var_all_heads      every head (the paper reports collapse);
       var_text_budget    the budget goes to text tokens instead of image non-sinks (worse in the paper).
     Greedy answers, yes/no parsed (`eval.pope.parse_yes_no`), POPE metrics per task and pooled;
     95% percentile bootstrap CIs over questions (accuracy: ci_low/ci_high; F1: f1_ci_low/f1_ci_high);
     answers that parse to neither yes nor no count as wrong in accuracy (POPE) and are counted apart
     (n_parsed, n_unparseable); against baseline, only the n_pairs questions where both answers parsed
     enter McNemar's exact test (p_value) and the paired accuracy change (accuracy_change with
     change_ci_low/change_ci_high). `var_eval.csv`.
  4. Optionally captions of test scenes (demo world): CHAIR_s, CHAIR_i per condition (`chair.csv`).
Data: `demo` (the demo world's POPE splits: validation and test scenes are disjoint), or a POPE
question file with --validation another POPE file (without one, nothing is tuned: p and rho are the
given or paper values, and index.md says so).

Sharded (--shard i/n): the test questions (and captions) whose index modulo n is i; every shard runs the
whole validation sweep, so each chooses p and rho from the same validation answers, as the unsharded run
does (the choice must be made before any test question runs, so validation cannot wait for the other
shards); `sinkscope merge` joins the shards and recomputes every table. var_random_heads draws its heads
per question, from a generator seeded from (--seed, the question's index), one question per generate call,
so the draw does not depend on the batch or shard.

Resumable: per-question rows are appended to var_answers.csv as each batch of questions finishes all its
conditions (key `sample` = "<phase>:<question id>"); a rerun skips finished questions.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.common import AnalysisConfig, report_step_config
from sinkscope.analyses.step_findings import run_meta
from sinkscope.errors import SinkscopeError
from sinkscope.eval import stats
from sinkscope.eval.pope import STRATEGIES, demo_pope, load_pope, parse_yes_no, pope_metrics
from sinkscope.eval.tasks import Sample, progress
from sinkscope.findings import Finding, num
from sinkscope.launcher import parse_shard
from sinkscope.runconfig import analysis_default, sample_seed
from sinkscope.runfolder import RunFolder, check_resumable

CONDITIONS = ("baseline", "var", "var_random_heads", "var_all_heads", "var_text_budget")
PAPER_P, PAPER_RHO = 0.6, 0.5
EVAL_COLUMNS = ["condition", "task", "accuracy", "precision", "recall", "f1", "yes_ratio", "n", "ci_low", "ci_high",
                "p_value", "f1_ci_low", "f1_ci_high", "n_parsed", "n_unparseable", "n_pairs", "accuracy_change",
                "change_ci_low", "change_ci_high", "p", "rho", "discordant_better", "discordant_worse"]
SWEEP_COLUMNS = ["condition", "p", "rho", "task", "accuracy", "precision", "recall", "f1", "yes_ratio", "n", "chosen"]


@dataclass
class VarEvalConfig(AnalysisConfig):
    """The run's settings (`RunConfig`, via AnalysisConfig: data is demo or a POPE .jsonl of test questions, limit
    counts test questions per task, batch size questions per generate call) and VAR's evaluation's own."""

    limit: int = analysis_default("var_eval", "limit")  # test questions per task
    batch_size: int = analysis_default("var_eval", "batch_size")
    validation: str | None = None  # a POPE .jsonl of validation questions (demo: the world's validation split)
    tasks: list[str] = field(default_factory=lambda: [f"pope-{s}" for s in STRATEGIES])  # demo tasks
    val_limit: int = 60  # validation questions per task
    captions: int = 0  # test captions per condition for CHAIR (demo only; 0 = none)
    caption_tokens: int = 40
    max_new_tokens: int = 4
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    p_grid: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])
    rho_grid: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.8])
    p: float | None = None  # given: no tuning of p
    rho: float | None = None  # given: no tuning of rho
    summ: float = 0.2
    select_metric: str = "f1"
    compile: bool = False  # fuse VAR's edit of each layer with torch.compile (a GPU's decode steps; not random heads)
    # shard (AnalysisConfig): test questions and captions whose index modulo n is i (validation: all)

    def validate(self) -> None:
        super().validate()
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad or "baseline" not in self.conditions:
            raise SinkscopeError(f"--conditions must include 'baseline' and come from {', '.join(CONDITIONS)}; got "
                                 f"{self.conditions}")
        for name in ("p", "rho", "summ"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise SinkscopeError(f"--{name} must be in [0, 1]; got {v}")
        for name in ("p_grid", "rho_grid"):
            v = getattr(self, name)
            if not v or any(not 0.0 <= x <= 1.0 for x in v):
                raise SinkscopeError(f"--{name.replace('_', '-')} must be non-empty values in [0, 1]; got {v}")
        if self.select_metric not in ("f1", "accuracy"):
            raise SinkscopeError(f"--select-metric must be f1 or accuracy; got {self.select_metric!r}")
        if self.limit < 2 or self.val_limit < 2:
            raise SinkscopeError("--limit and --val-limit must be >= 2 questions per task")
        if self.captions < 0:
            raise SinkscopeError(f"--captions must be >= 0; got {self.captions}")
        bad_tasks = [t for t in self.tasks if t not in [f"pope-{s}" for s in STRATEGIES]]
        if self.is_demo and bad_tasks:
            raise SinkscopeError(f"--tasks for the demo world are pope-random, pope-popular, pope-adversarial; got {bad_tasks}")

    @property
    def is_demo(self) -> bool:
        return self.data == "demo"


# ----------------------------------------------------------------------------- data


def eval_splits(cfg: VarEvalConfig) -> tuple[list[Sample], list[Sample]]:
    """(validation questions, test questions), disjoint; validation empty when nothing can be tuned."""
    if cfg.is_demo:
        val = [s for t in cfg.tasks for s in demo_pope("validation", t[5:], cfg.val_limit)]
        test = [s for t in cfg.tasks for s in demo_pope("test", t[5:], cfg.limit)]
        return val, test
    test = list(load_pope(cfg.data, cfg.image_root, cfg.limit))
    val = list(load_pope(cfg.validation, cfg.image_root, cfg.val_limit)) if cfg.validation else []
    overlap = {(s.image_path, s.question) for s in val} & {(s.image_path, s.question) for s in test}
    if overlap:
        raise SinkscopeError(f"{len(overlap)} validation questions also appear in the test file; tuning on them would "
                             "tune on test. Give disjoint files")
    return val, test


# ----------------------------------------------------------------------------- conditions


def condition_config(base, condition: str, p: float, rho: float):
    """The VARConfig of a condition (None for baseline). base: the calibrated VARConfig."""
    if condition == "baseline":
        return None
    cfg = replace(base, p=float(p), rho=float(rho))
    return {"var": cfg, "var_random_heads": replace(cfg, head_selection="random"),
            "var_all_heads": replace(cfg, head_selection="all"),
            "var_text_budget": replace(cfg, budget_target="text")}[condition]


def _answers(adapter, samples, var_cfg, max_new_tokens, batch_size, compile: bool = False) -> list[str]:
    """compile: VAR's edit fused by torch.compile (random heads, which torch.compile cannot draw, run unfused)."""
    from sinkscope.eval.accuracy import generate_answers
    from sinkscope.interventions.var import var

    if var_cfg is None:
        return generate_answers(adapter, samples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    fused = compile and var_cfg.head_selection != "random"
    with var(adapter, var_cfg, fallback="eager", compile=fused):  # unedited layers as the eager baseline
        return generate_answers(adapter, samples, max_new_tokens=max_new_tokens, batch_size=batch_size)


def _condition_answers(adapter, samples, indices, condition, var_cfg, max_new_tokens, batch_size, seed, phase,
                       compile: bool = False):
    """Answers of one condition; var_random_heads one question at a time, its heads drawn with a seed from
    (seed, phase, the question's index), so a question's draw does not depend on its batch or shard."""
    if condition != "var_random_heads" or var_cfg is None:
        return _answers(adapter, samples, var_cfg, max_new_tokens, batch_size, compile=compile)
    return [_answers(adapter, [s], replace(var_cfg, seed=sample_seed(seed, phase, k)), max_new_tokens, 1)[0]
            for s, k in zip(samples, indices)]


def _answer_rows(phase, condition, p, rho, samples, answers) -> list[dict]:
    rows = []
    for s, a in zip(samples, answers):
        pred = parse_yes_no(a)
        label = (s.answer or "").strip().lower()
        rows.append({"sample": f"{phase}:{s.sample_id}", "question_id": s.sample_id, "phase": phase,
                     "condition": condition, "p": p, "rho": rho, "task": s.task, "label": label,
                     "answer": a.strip(), "prediction": pred if pred else "", "correct": pred == label})
    return rows


# ----------------------------------------------------------------------------- the run


def run_var_eval(out: str, cfg: VarEvalConfig, adapter=None, resume: bool = True, log=print,
                 figures: bool = True, calibration=None) -> RunFolder:
    """calibration: a `sinkscope.calibration.Calibration` found already (a report calibrates once for every step);
    default: VAR is calibrated here on the first validation questions."""
    from sinkscope.interventions.var import VARConfig, calibration_of, with_calibration
    from sinkscope.models import load_placed

    cfg.validate()
    torch.manual_seed(cfg.seed)
    check_resumable(out, "var_eval", asdict(cfg), resume)  # another run in --out fails before the model loads
    adapter = adapter or load_placed(cfg)
    val, test = eval_splits(cfg)
    folder = RunFolder(out, "var_eval", asdict(cfg), resume=resume, fingerprint=adapter.weights_fingerprint())
    folder.update_meta(model=adapter.describe(), n_validation=len(val), n_test=len(test),
                       planted=bool(getattr(adapter, "planted", False)))
    base = VARConfig(tau=cfg.tau, sink_dims=cfg.sink_dims, sink_score=cfg.sink_score, summ=cfg.summ, seed=cfg.seed)
    if folder.meta.get("var_calibrated"):
        base = replace(base, **folder.meta["var_calibrated"])
    else:
        note, source = "", "validation" if val else "test (no validation data given)"
        if calibration is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                calibration = calibration_of(adapter, (val or test)[: cfg.calibration], base, cfg.start_layer)
            note = "; ".join(str(w.message) for w in caught if issubclass(w.category, UserWarning))
        else:
            source = "the report's calibration (its data's first samples, shared by every step)"
        base = with_calibration(base, calibration)
        folder.update_meta(var_calibrated={"sink_dims": base.sink_dims, "tau": base.tau},
                           calibration=calibration.record(), calibration_source=source, calibration_note=note)
        log(f"VAR calibration: sink dims {base.sink_dims}, tau {base.tau:.3g}" + (f" ({note})" if note else ""))
    if cfg.compile and adapter.device.type == "cpu":
        log("--compile on the CPU: the fused edit is meant for GPUs, where a decode step waits on kernel launches; on "
            "a CPU it measured slower than the unfused edit (a compiled call's own overhead, benchmarks/"
            "host_bound_decode.py)")
    done = folder.done_samples()
    # 1. validation sweep
    grid = [(p, r) for p in ([cfg.p] if cfg.p is not None else cfg.p_grid)
            for r in ([cfg.rho] if cfg.rho is not None else cfg.rho_grid)]
    tune = bool(val) and len(grid) > 1
    if tune:
        for chunk in progress([s for s in val if f"validation:{s.sample_id}" not in done], cfg.batch_size,
                              "var-eval validation"):
            rows = _answer_rows("validation", "baseline", math.nan, math.nan, chunk,
                                _answers(adapter, chunk, None, cfg.max_new_tokens, cfg.batch_size))
            for p, r in grid:
                rows += _answer_rows("validation", "var", p, r, chunk, _answers(
                    adapter, chunk, condition_config(base, "var", p, r), cfg.max_new_tokens, cfg.batch_size,
                    compile=cfg.compile))
            folder.append_rows("var_answers", pd.DataFrame(rows))
            folder.mark_done([f"validation:{s.sample_id}" for s in chunk])
        sweep = sweep_table(folder.read("var_answers"), cfg)
        chosen = choose(sweep, cfg.select_metric)
    else:
        sweep = pd.DataFrame(columns=SWEEP_COLUMNS)
        chosen = (cfg.p if cfg.p is not None else PAPER_P, cfg.rho if cfg.rho is not None else PAPER_RHO)
    tied = tune and choice_clause(sweep, chosen, cfg.select_metric)[0]
    how = ("given or paper defaults (no validation data, or nothing to tune)" if not tune else
           f"validation {cfg.select_metric} tied at the best grid points, so the tie rule ({TIE_RULE}) chose" if tied else
           f"best pooled validation {cfg.select_metric} over the grid")
    folder.update_meta(chosen={"p": chosen[0], "rho": chosen[1], "how": how, "tied": bool(tied)})
    log(f"p = {chosen[0]}, rho = {chosen[1]}: {how}")
    # 2. test: every condition with the chosen p, rho
    shard_i, shard_n = parse_shard(cfg.shard, {}) or (0, 1)
    index = {s.sample_id: k for k, s in enumerate(test)}
    mine = list(test)[shard_i::shard_n]
    if shard_n > 1:
        log(f"shard {shard_i}/{shard_n}: {len(mine)} of {len(test)} test questions (validation: all, in every shard)")
    for chunk in progress([s for s in mine if f"test:{s.sample_id}" not in done], cfg.batch_size, "var-eval test"):
        rows = []
        for condition in cfg.conditions:
            vc = condition_config(base, condition, *chosen)
            p, r = (math.nan, math.nan) if vc is None else chosen
            rows += _answer_rows("test", condition, p, r, chunk, _condition_answers(
                adapter, chunk, [index[s.sample_id] for s in chunk], condition, vc, cfg.max_new_tokens,
                cfg.batch_size, cfg.seed, "test", compile=cfg.compile))
        folder.append_rows("var_answers", pd.DataFrame(rows))
        folder.mark_done([f"test:{s.sample_id}" for s in chunk])
    # 3. captions (CHAIR)
    if cfg.captions and cfg.is_demo:
        from sinkscope.eval.chair import caption_counts, demo_captions

        caps = demo_captions("test", cfg.captions)
        cap_index = {s.sample_id: k for k, s in enumerate(caps)}
        mine = [s for s in list(caps)[shard_i::shard_n] if f"caption:{s.sample_id}" not in done]
        for chunk in progress(mine, cfg.batch_size, "var-eval captions"):
            rows = []
            for condition in cfg.conditions:
                vc = condition_config(base, condition, *chosen)
                for s, a in zip(chunk, _condition_answers(adapter, chunk, [cap_index[s.sample_id] for s in chunk],
                                                          condition, vc, cfg.caption_tokens, cfg.batch_size, cfg.seed,
                                                          "caption", compile=cfg.compile)):
                    c = caption_counts(a, set(s.meta["objects"]))
                    rows.append({"sample": f"caption:{s.sample_id}", "condition": condition, "caption": a.strip(),
                                 **asdict(c)})
            folder.append_rows("var_captions", pd.DataFrame(rows))
            folder.mark_done([f"caption:{s.sample_id}" for s in chunk])
    return summarize_var_eval(folder, cfg, chosen, figures)


# ----------------------------------------------------------------------------- tables


def _parsed(predictions: pd.Series) -> np.ndarray:
    """[n] bool: the answer parsed to yes or no (var_answers.csv keeps '' / NaN for an unparseable one)."""
    return predictions.fillna("").astype(str).isin(["yes", "no"]).to_numpy()


def _metrics_row(g: pd.DataFrame) -> dict:
    m = pope_metrics([x or None for x in g["prediction"].fillna("")], g["label"].tolist())
    return {"accuracy": m.accuracy, "precision": m.precision, "recall": m.recall, "f1": m.f1,
            "yes_ratio": m.yes_ratio, "n": m.n, "n_parsed": m.n - m.unknown, "n_unparseable": m.unknown}


def sweep_table(answers: pd.DataFrame, cfg: VarEvalConfig) -> pd.DataFrame:
    """var_sweep.csv: validation metrics per (condition, p, rho) and task, plus the pooled task 'all'."""
    val = answers[answers["phase"] == "validation"]
    rows = []
    for (condition, p, rho), g in val.groupby(["condition", "p", "rho"], dropna=False, sort=False):
        for task, t in [("all", g)] + list(g.groupby("task")):
            row = _metrics_row(t)
            row.pop("n_parsed"), row.pop("n_unparseable")
            rows.append({"condition": condition, "p": p, "rho": rho, "task": task, **row, "chosen": False})
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


def choose(sweep: pd.DataFrame, metric: str = "f1") -> tuple[float, float]:
    """(p, rho) with the best pooled validation `metric`; ties: nearest the paper's (0.6, 0.5), then smaller p."""
    pooled = sweep[(sweep["condition"] == "var") & (sweep["task"] == "all")]
    if pooled.empty:
        return PAPER_P, PAPER_RHO
    best = pooled[metric].max()
    top = pooled[np.isclose(pooled[metric], best, rtol=0, atol=1e-12)]
    key = top.assign(dist=(top["p"] - PAPER_P).abs() + (top["rho"] - PAPER_RHO).abs()).sort_values(["dist", "p", "rho"])
    return float(key.iloc[0]["p"]), float(key.iloc[0]["rho"])


def eval_table(answers: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """var_eval.csv from the test answers: per condition and task (and 'all'), metrics with CIs; against
    baseline, on the question pairs where both answers parsed (n_pairs): McNemar's exact p-value of
    per-question correctness and the paired accuracy change with its bootstrap CI."""
    test = answers[answers["phase"] == "test"]
    if test.empty:
        return pd.DataFrame(columns=EVAL_COLUMNS)
    base = test[test["condition"] == "baseline"].set_index("question_id")
    rows = []
    for condition, g in test.groupby("condition", sort=False):
        for task, t in [("all", g)] + list(g.groupby("task")):
            row = _metrics_row(t)
            correct = t["correct"].astype(bool).to_numpy()
            lo, hi = stats.bootstrap_ci(correct.astype(float), n_boot=n_boot, seed=seed)
            preds = [x or None for x in t["prediction"].fillna("")]
            labels = t["label"].tolist()
            flo, fhi = stats.bootstrap_metric_ci(len(t), lambda i: pope_metrics([preds[k] for k in i],
                                                                                [labels[k] for k in i]).f1,
                                                 n_boot=n_boot, seed=seed)
            pval, better, worse, n_pairs, change, clo, chi = math.nan, 0, 0, math.nan, math.nan, math.nan, math.nan
            if condition != "baseline":
                ref = base.loc[t["question_id"]]
                ref_correct = ref["correct"].astype(bool).to_numpy()
                both = _parsed(t["prediction"]) & _parsed(ref["prediction"])
                mc = stats.mcnemar_exact(correct, ref_correct, keep=both)
                pval, better, worse, n_pairs = mc.p_value, mc.only_a, mc.only_b, mc.n_pairs
                if n_pairs:
                    x, y = correct[both].astype(float), ref_correct[both].astype(float)
                    change = float(np.mean(x - y))
                    clo, chi = stats.paired_diff_ci(x, y, n_boot=n_boot, seed=seed)
            rows.append({"condition": condition, "task": task, **row, "ci_low": lo, "ci_high": hi, "p_value": pval,
                         "f1_ci_low": flo, "f1_ci_high": fhi, "n_pairs": n_pairs, "accuracy_change": change,
                         "change_ci_low": clo, "change_ci_high": chi, "p": float(t["p"].iloc[0]),
                         "rho": float(t["rho"].iloc[0]), "discordant_better": better, "discordant_worse": worse})
    return pd.DataFrame(rows, columns=EVAL_COLUMNS)


def chair_table(captions: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """chair.csv: CHAIR_s, CHAIR_i, recall per condition with bootstrap CIs over captions."""
    from sinkscope.eval.chair import CaptionCounts, chair_from_counts

    rows = []
    for condition, g in captions.groupby("condition", sort=False):
        counts = [CaptionCounts(int(r.mentioned), int(r.hallucinated), int(r.truth), int(r.covered)) for r in g.itertuples()]
        score = chair_from_counts(counts)
        row = {"condition": condition, "n": score.n}
        for metric in ("chair_s", "chair_i", "recall"):
            lo, hi = stats.bootstrap_metric_ci(len(counts), lambda i: getattr(chair_from_counts([counts[k] for k in i]), metric),
                                               n_boot=n_boot, seed=seed)
            row.update({metric: getattr(score, metric), f"{metric}_ci_low": lo, f"{metric}_ci_high": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def summarize_var_eval(folder: RunFolder, cfg: VarEvalConfig, chosen: tuple[float, float], figures: bool = True) -> RunFolder:
    from sinkscope import plots

    answers = folder.read("var_answers")
    sweep = sweep_table(answers, cfg) if len(answers) else pd.DataFrame(columns=SWEEP_COLUMNS)
    if len(sweep):
        sweep["chosen"] = (sweep["condition"] == "var") & np.isclose(sweep["p"], chosen[0]) & np.isclose(sweep["rho"], chosen[1])
    folder.write_table("var_sweep", sweep)
    table = eval_table(answers, cfg.n_boot, cfg.seed) if len(answers) else pd.DataFrame(columns=EVAL_COLUMNS)
    folder.write_table("var_eval", table)
    caps = folder.read("var_captions")
    chair = chair_table(caps, cfg.n_boot, cfg.seed) if len(caps) else pd.DataFrame()
    if len(chair):
        folder.write_table("chair", chair)
    figs = {}
    if figures and len(table):
        figs["accuracy"] = plots.var_eval_bars(table, folder.path / "var_eval_accuracy.png", "accuracy")
        figs["f1"] = plots.var_eval_bars(table, folder.path / "var_eval_f1.png", "f1")
    if figures and len(sweep):
        figs["sweep"] = plots.var_sweep_heatmap(sweep[sweep["task"] == "all"], folder.path / "var_sweep.png",
                                                cfg.select_metric, chosen)
    _write_index(folder, cfg, table, sweep, chair, chosen, figs)
    folder.finish()
    return folder


TIE_RULE = f"nearest the paper's p = {PAPER_P}, rho = {PAPER_RHO}, then the smaller p"


def choice_clause(sweep: pd.DataFrame, chosen: tuple[float, float], metric: str, how: str | None = None) -> tuple[bool, str]:
    """(tied, sentence): how p and rho were chosen, saying when every (or the best) validation grid point tied.

    sweep: var_sweep.csv (empty when nothing was tuned); how: run.json's chosen.how, used when nothing was tuned.
    """
    from sinkscope.findings import grid_choice_clause

    label = f"p = {chosen[0]:.3g}, rho = {chosen[1]:.3g}"
    pooled = sweep[(sweep["condition"] == "var") & (sweep["task"] == "all")] if len(sweep) else sweep
    if not len(pooled):
        return False, f"{label}: {how or 'given or paper defaults'} (no validation grid was run)"
    return grid_choice_clause(pooled[metric].to_numpy(dtype=float), label, metric, TIE_RULE)


def condition_sentence(r) -> tuple[str, str]:
    """(status, sentence) of one var_eval.csv row, by the findings rule (sinkscope.findings).

    POPE accuracy always stands with yes-ratio and F1; unparseable answers are counted apart; the change
    against baseline is stated only when its CI (over the parsed pairs) excludes 0 and McNemar's exact test on the
    same pairs agrees (p < 0.05): with a handful of changed answers a percentile bootstrap of the paired change can
    exclude 0 where the exact test finds nothing (3 of 10 pairs broken, none fixed: CI -0.6 to -0.1, p = 0.25).
    """
    from sinkscope.findings import (MEASURED, NOTHING_TO_TEST, Estimate, ci_text, exact_test_clause, num,
                                    unparseable_clause)

    n, n_unparseable = int(r["n"]), int(r["n_unparseable"])
    parsed = unparseable_clause(n_unparseable, n)
    if n and n_unparseable == n:
        return NOTHING_TO_TEST, (f"{parsed}: nothing to score (accuracy, yes-ratio and F1 would only count unparsed "
                                 "answers as wrong) and no parsed pair to compare against baseline")
    wrong = f"; the {n_unparseable} unparseable count as wrong" if n_unparseable else ""
    pope = (f"accuracy {num(r['accuracy'])} ({ci_text(r['ci_low'], r['ci_high'])}{wrong}), yes-ratio "
            f"{num(r['yes_ratio'])}, F1 {num(r['f1'])} ({ci_text(r['f1_ci_low'], r['f1_ci_high'])}); {parsed}")
    if r["condition"] == "baseline":
        return MEASURED, pope
    n_pairs = 0 if pd.isna(r["n_pairs"]) else int(r["n_pairs"])
    if not n_pairs:
        return NOTHING_TO_TEST, f"{pope}; no question where both this and the baseline answer parsed: nothing to compare"
    changed = int(r["discordant_better"]) + int(r["discordant_worse"])
    status, clause = exact_test_clause(Estimate(r["accuracy_change"], r["change_ci_low"], r["change_ci_high"], n_pairs),
                                       r["p_value"], f"the {changed} changed answers", above="improves accuracy",
                                       below="worsens accuracy")
    if not r["discordant_better"] and not r["discordant_worse"]:
        clause += " (no answer changed from right to wrong or back)"
    return status, (f"{pope}; against baseline on the {n_pairs} pairs where both answers parsed: {clause}, "
                    f"change {num(r['accuracy_change'])}, {int(r['discordant_better'])} fixed and "
                    f"{int(r['discordant_worse'])} broken (McNemar exact p = {num(r['p_value'], 2)})")


def finding_sentences(table: pd.DataFrame, chosen, meta: dict, sweep: pd.DataFrame | None = None,
                      metric: str = "f1") -> list[str]:
    """The step page's findings: sentences read from var_eval.csv (pooled over tasks), each with its numbers, CI
    and n (the report's are `findings`)."""
    out = []
    if not (meta.get("var_calibrated") or {}).get("sink_dims"):
        out.append("Calibration found **no sink dimensions**: VAR has no sinks to take attention from and leaves this "
                   "model unchanged, so every VAR condition equals the baseline.")
    from sinkscope.findings import n_clause

    sweep = pd.DataFrame(columns=SWEEP_COLUMNS) if sweep is None else sweep
    out.append("Chosen: " + choice_clause(sweep, chosen, metric, (meta.get("chosen") or {}).get("how"))[1]
               + f" ({n_clause(meta.get('n_validation'), 'validation questions')}).")
    pooled = table[table["task"] == "all"]
    baseline = pooled[pooled["condition"] == "baseline"]
    if len(baseline) and float(baseline["accuracy"].iloc[0]) >= 1.0:
        out.append(f"The baseline answers all {int(baseline['n'].iloc[0])} test questions right: there is no room for "
                   "VAR to help here, so whether it helps is not testable on these questions (a change could only be "
                   "harm).")
    for condition in CONDITIONS:
        for _, r in pooled[pooled["condition"] == condition].iterrows():
            name = f"Baseline (test, all tasks, n = {int(r['n'])})" if condition == "baseline" else f"`{condition}`"
            out.append(f"{name}: {condition_sentence(r)[1]}.")
    return out


def _write_index(folder, cfg, table, sweep, chair, chosen, figs) -> None:
    from sinkscope.findings import EXACT_TEST_NOTE, RULE_NOTE
    from sinkscope.analyses.pages import index_head
    from sinkscope.markdown import markdown_table

    meta, lines = index_head(folder, cfg, "VAR evaluation")
    cal = meta.get("var_calibrated") or {}
    lines.append(f"{meta.get('n_validation')} validation and {meta.get('n_test')} test questions "
                 f"({', '.join(cfg.tasks) if cfg.is_demo else cfg.data}); greedy answers of at most {cfg.max_new_tokens} "
                 f"tokens, parsed as yes/no. VAR calibrated on {meta.get('calibration_source', 'validation')}: sink dims "
                 f"{cal.get('sink_dims')}, tau {cal.get('tau')}"
                 + (f" ({meta['calibration_note']})" if meta.get("calibration_note") else "") + ". "
                 f"**p = {chosen[0]}, rho = {chosen[1]}** (how they were chosen: the first finding below); the test split "
                 "was not used for any choice. CIs: 95% percentile bootstrap over questions (accuracy: ci_low/ci_high; "
                 "F1: f1_ci_low/f1_ci_high). Answers that parse to neither yes nor no are counted apart (n_unparseable) "
                 "and count as wrong in accuracy; against baseline only the n_pairs questions where both answers "
                 "parsed are compared: p_value is McNemar's exact test of per-question correctness on them, "
                 "accuracy_change the paired change with change_ci_low/change_ci_high.\n")
    lines.append("## Findings\n")
    lines.append(f"{RULE_NOTE} {EXACT_TEST_NOTE}\n")
    lines += [f"- {f}" for f in finding_sentences(table, chosen, meta, sweep, cfg.select_metric)] + [""]
    if len(chair):
        lines.append("Captions (CHAIR, test scenes): " + "; ".join(
            f"`{r['condition']}` CHAIR_s {r['chair_s']:.3g} ({r['chair_s_ci_low']:.3g} to {r['chair_s_ci_high']:.3g}), "
            f"CHAIR_i {r['chair_i']:.3g} ({r['chair_i_ci_low']:.3g} to {r['chair_i_ci_high']:.3g})"
            for _, r in chair.iterrows()) + ".\n")
    for key in ("accuracy", "f1", "sweep"):
        if key in figs:
            lines.append(f"![{key}]({figs[key]})\n")
    lines.append("## var_eval.csv (test)\n")
    lines.append(markdown_table(table, max_rows=80))
    if len(sweep):
        lines.append("\n## var_sweep.csv (validation, all tasks pooled)\n")
        lines.append(markdown_table(sweep[sweep["task"] == "all"], max_rows=40))
    if len(chair):
        lines.append("\n## chair.csv (test captions)\n")
        lines.append(markdown_table(chair))
    folder.write_text("index.md", "\n".join(lines))


# ----------------------------------------------------------------------------- the report step

FIGURES: tuple[str, ...] = ()  # the report shows the step's figures in name order


def report_step(folder: Path, report_cfg, adapter, sink_score: str, log, calibration=None) -> None:
    """`sinkscope report` step: the three POPE splits, `--var-questions` test questions per split (default
    limit // 2, at least 8), limit // 4 (at least 8) validation questions, a 2 x 2 grid of p and rho."""
    limit = report_cfg.var_questions or max(8, report_cfg.limit // 2)
    config = report_step_config(VarEvalConfig, report_cfg, sink_score, limit=limit,
                                val_limit=max(8, report_cfg.limit // 4),
                                tasks=["pope-random", "pope-popular", "pope-adversarial"], p_grid=[0.3, 0.6],
                                rho_grid=[0.5, 0.8])
    run_var_eval(str(folder), config, adapter=adapter, log=log, calibration=calibration)


def read_tables(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(var_eval.csv, var_sweep.csv); a var_eval.csv written before unparseable answers were counted apart is
    recomputed from var_answers.csv, so its McNemar test is on parsed pairs too."""
    table = pd.read_csv(folder / "var_eval.csv")
    if "n_pairs" not in table.columns and (folder / "var_answers.csv").exists():
        n_boot = int(run_meta(folder).get("params", {}).get("n_boot", 1000))
        table = eval_table(pd.read_csv(folder / "var_answers.csv"), n_boot=n_boot)
    sweep_path = folder / "var_sweep.csv"
    sweep = pd.read_csv(sweep_path) if sweep_path.exists() else pd.DataFrame(columns=SWEEP_COLUMNS)
    return table, sweep


def findings(folder: Path) -> list[Finding]:
    """How p and rho were chosen, and POPE accuracy of every condition on the test split (pooled over tasks)."""
    table, sweep = read_tables(folder)
    meta = run_meta(folder)
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
