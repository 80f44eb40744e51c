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
from typing import Callable, ClassVar

import numpy as np
import pandas as pd

from sinkscope.analyses import (ablate, contributions, heads, inject, location, patching, remove, scan, var_eval,
                                vit_sinks)
from sinkscope.analyses.step_findings import run_meta
from sinkscope.errors import SinkscopeError
from sinkscope.runfolder import PLACEMENT
from sinkscope.findings import RULE_NOTE, Estimate, Finding, finding_line, num
from sinkscope.questions import Answer, summary_markdown
from sinkscope.runconfig import RunConfig
from sinkscope.markdown import PLANTED_BANNER


@dataclass
class Step:
    name: str  # the step's run folder under the report folder, and its name in --steps
    run: Callable  # (folder: Path, cfg: ReportConfig, adapter, sink_score: str, log, calibration=) -> None
    findings: Callable  # (folder: Path) -> list[Finding]
    figures: tuple[str, ...] = field(default_factory=tuple)  # PNG names to show, in order (others are listed)


# Every step is an analysis module of one shape: `report_step(folder, cfg, adapter, sink_score, log, calibration=)`
# runs it with the report's settings, `findings(folder)` reads its findings from the tables it wrote (its own
# index.md shows the same), `FIGURES` names the figures the report shows first. The report runs them in this order.
STEPS_IN_ORDER: tuple[Step, ...] = tuple(
    Step(module.__name__.rsplit(".", 1)[-1], module.report_step, module.findings, module.FIGURES)
    for module in (scan, heads, ablate, contributions, location, vit_sinks, var_eval, patching, inject, remove))
REGISTRY: dict[str, Step] = {step.name: step for step in STEPS_IN_ORDER}
STEPS = tuple(REGISTRY)


@dataclass
class ReportConfig(RunConfig):
    """The report's run settings (a RunConfig, checked by its one validate(); every step gets them through
    `common.report_step_config`, each with its own sample count) and the report's own.

    batch_size None: each step's own default (patching 8, the VAR evaluation 16, the others 4); layers: refused
    (each step chooses its layers); device, device_map and max_memory place the model and may change on resume.
    """

    BATCH_SIZE_OPTIONAL: ClassVar[bool] = True
    limit: int = 32  # samples per step (each step's own rule: patching limit // 2, inject at most 8, ...)
    batch_size: int | None = None
    steps: tuple[str, ...] = STEPS
    viewer_samples: int = 4
    var_questions: int | None = None  # test questions per POPE split in the VAR evaluation (default: limit // 2, >= 8)

    def validate(self) -> None:
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise SinkscopeError(f"unknown report steps {unknown}; choose from {', '.join(STEPS)}")
        if self.limit is None:
            raise SinkscopeError("--limit: a report needs a number of samples per step (default 32)")
        super().validate()
        if self.layers is not None:
            raise SinkscopeError("--layers: a report runs each step on the layers it studies; give --layers to a "
                                 "single analysis command (sinkscope heads --layers 2,3) instead")
        if self.var_questions is not None and (isinstance(self.var_questions, bool) or self.var_questions < 1):
            raise SinkscopeError(f"--var-questions must be a whole number >= 1 (test questions per POPE split), or "
                                 f"left out for limit // 2; got {self.var_questions!r}")


def is_finished(folder: Path) -> bool:
    run = folder / "run.json"
    if not run.exists():
        return False
    try:
        return bool(json.loads(run.read_text()).get("finished"))
    except (OSError, json.JSONDecodeError):
        return False


def resolve_sink_score(cfg: ReportConfig, adapter) -> str:
    """auto -> the paper's phi when sqrt(hidden) >= 40 (its tau = 20 is reachable), else the layer-relative score."""
    from sinkscope.runconfig import resolve_sink_score as rule

    return rule(cfg.sink_score, adapter.hidden_size)


# ----------------------------------------------------------------------------- calibration


def report_calibration(cfg: ReportConfig, adapter, sink_score: str, log=print):
    """The report's one calibration (the scan's: the report data's first samples), handed to every step."""
    from sinkscope.analyses.common import calibrate_samples
    from sinkscope.eval.data import load_data

    config = scan.report_config(cfg, sink_score)
    samples = load_data(config.data, config.limit, config.question, config.image_root)
    return calibrate_samples(adapter, samples, config, log=log)


# ----------------------------------------------------------------------------- report


REPORT_FILES = ("report.json", "index.md", "findings.csv", "viewer.html")
SETTINGS_FREE_TO_CHANGE = PLACEMENT + ("steps", "viewer_samples")  # they change no number of a finished step


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
    # a setting the recorded report lacks (it was made before the setting existed) had its default
    defaults = json.loads(json.dumps(asdict(ReportConfig()), default=str))
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
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


def recorded_fingerprint(out: Path) -> str | None:
    """The weights fingerprint a report in `out` was made with (report.json, else its steps' run.json); None when
    none is recorded (no report, or one made before fingerprints were)."""
    for path in (out / "report.json", *sorted(out.glob("*/run.json"))):
        try:
            value = json.loads(path.read_text()).get("model_fingerprint")
        except (OSError, ValueError):
            continue
        if value:
            return value
    return None


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
    from sinkscope.models import load_placed
    from sinkscope.runfolder import atomic_write_text

    cfg.validate()
    out = Path(out)
    replace = force and report_folder_conflict(out, cfg) is not None
    if not replace:
        check_report_folder(out, cfg)  # before the model loads
    if adapter is None:
        adapter = load_placed(cfg)
    fingerprint = adapter.weights_fingerprint()
    old_fingerprint = recorded_fingerprint(out)
    if old_fingerprint not in (None, fingerprint):  # same settings, other weights (e.g. a retrained demo)
        if not force:
            raise SinkscopeError(f"--out {out} holds a report made with other weights of {cfg.model} (weights fingerprint "
                                 f"{old_fingerprint}, now {fingerprint}); add --force to replace it, or give another --out")
        replace = True
    if replace:  # only once the model has loaded: a failed load leaves the old report in place
        clear_report(out)
    out.mkdir(parents=True, exist_ok=True)
    sink_score = resolve_sink_score(cfg, adapter)
    atomic_write_text(out / "report.json", json.dumps({"config": asdict(cfg), "sink_score": sink_score,
                                                       "model": adapter.describe(), "model_fingerprint": fingerprint},
                                                      indent=1, default=str))
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
        meta = run_meta(out / name)
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
        tau = (run_meta(folder).get("tau") or {}).get("value")
        per_image = scan.visual_sinks_per_image(folder)
        answers["sink_dims"] = q.sink_dims_answer(dims.get("dims"), dims.get("method", ""),
                                                  run_meta(folder).get("n_samples"))
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
        tau = ablate.reported_tau(folder, diff["tau"].dropna().unique())
        contrast, p_value = None, None
        if (folder / "ablation_contrasts.csv").exists():
            c = pd.read_csv(folder / "ablation_contrasts.csv")
            c = c[np.isclose(c["tau"], tau) & (c["control"] == "random_visual")]
            if len(c):
                r = c.iloc[0]
                contrast = Estimate(float(r["difference"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
                p_value = float(r["p_value"])
        answers["knockout"] = q.knockout_answer(ablate.knocked_out_tokens(diff, "visual_sinks", tau), contrast, "random_visual",
                                                num(tau), p_value)
    if "var_eval" in done:
        folder = out / "var_eval"
        table, _ = var_eval.read_tables(folder)
        pooled = table[table["task"] == "all"].set_index("condition")
        dims = (run_meta(folder).get("var_calibrated") or {}).get("sink_dims")
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
                                                    patching.reference_effect(folder, table, "other_image"))
    steps = {"sink_dims": "scan", "visual_sinks": "scan", "attention": "contributions", "knockout": "ablate",
             "var": "var_eval", "patching": "patching"}
    return [answers.get(key) or q.not_run(key, steps[key]) for key in q.QUESTIONS]


def report_command(cfg: ReportConfig, out: Path) -> str:
    """The `sinkscope report` command line that makes this report (options that differ from the defaults)."""
    parts = ["sinkscope report", f"--model {cfg.model}", f"--out {out}"]
    defaults = ReportConfig()
    for name in ("data", "limit", "batch_size", "calibration", "dtype", "device_map", "max_memory", "seed", "sink_score",
                 "tau", "sink_dims", "image_root", "var_questions"):
        value = getattr(cfg, name)
        if value != getattr(defaults, name):
            shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            parts.append(f"--{name.replace('_', '-')} {shown}")
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
