"""The findings rule (sinkscope.findings), the paper's questions (sinkscope.questions), and the report's findings
writer on planted step tables: every misleading line of issue 14 is planted and must not come back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sinkscope import findings as fr
from sinkscope import questions as q
from sinkscope.analyses.report import STEPS, ReportConfig, write_index
from sinkscope.analyses.var_eval import eval_table
from sinkscope.findings import Estimate

# ----------------------------------------------------------------------------- the rule, number by number


def test_effect_is_stated_only_when_its_ci_excludes_the_null():
    status, text = fr.effect_clause(Estimate(0.0223, -0.251, 0.282, 32), "raises", "lowers")
    assert status == fr.NO_EFFECT and text == "no detectable effect (95% CI -0.251 to 0.282)"
    status, text = fr.effect_clause(Estimate(0.139, 0.0511, 0.254), "matters more", "matters less")
    assert status == fr.EFFECT and text.startswith("matters more (0.139")
    assert fr.effect_clause(Estimate(-0.5, -1.05, -0.08), "more", "less")[1].startswith("less")
    assert fr.effect_clause(Estimate(0.0, 0.0, 0.0), "more", "less")[0] == fr.NO_EFFECT  # [0, 0] includes 0
    assert fr.effect_clause(Estimate(3.2, 3.0, 3.4), "more", "less", null=1.0)[0] == fr.EFFECT
    assert fr.effect_clause(Estimate(1.1, 0.9, 1.3), "more", "less", null=1.0)[0] == fr.NO_EFFECT
    assert fr.effect_clause(Estimate(0.7, math.nan, math.nan, 1), "more", "less")[0] == fr.NO_CI


def test_share_only_of_a_reference_whose_ci_excludes_zero():
    noisy_swap = Estimate(-0.016, -0.2, 0.17)
    assert fr.share_clause(-0.0928, noisy_swap, "swapping the whole image") == ""  # the issue's "579%"
    assert fr.share_clause(-0.0386, Estimate(-0.0386, -0.223, 0.148), "VAR's whole effect") == ""
    assert fr.share_clause(-5.14, Estimate(-5.83, -7.6, -3.9), "swapping the whole image") == \
        "88.2% of swapping the whole image"
    assert fr.share_clause(-0.0, Estimate(-5.0, -6.0, -4.0), "x") == "0% of x"  # never "-0%"
    assert fr.num(-0.0) == "0" and fr.num(-1e-9, 1) == "-1e-09" and fr.num(math.nan) == "n/a"


@pytest.mark.parametrize("values, top", [([0, 0, 0, 0], None), ([0.2, 0.5, 0.5], None), ([0.1, 0.6, 0.5], 1),
                                         ([math.nan, 0.3], 1), ([math.nan], None), ([], None)])
def test_nothing_is_named_top_when_all_zero_or_tied(values, top):
    assert fr.unique_top(values) == top


def test_top_clause_says_why_no_head_is_named():
    labels = [f"L0.H{i}" for i in range(4)]
    assert fr.top_clause([0, 0, 0, 0], labels, "attention")[1] == "all 4 score 0 in attention: none is singled out"
    assert fr.top_clause([0.1, 0.3, 0.3, 0], labels, "attention")[1].startswith("2 of 4 tie")
    assert fr.top_clause([0.1, 0.4, 0.3, 0], labels, "attention") == (1, "L0.H1 has the largest attention")


def test_tied_validation_grid_is_said():
    tied, text = fr.grid_choice_clause([0.0, 0.0, 0.0, 0.0], "p = 0.6, rho = 0.5", "f1", "nearest the paper")
    assert tied and "every one of the 4 grid points ties at validation f1 0" in text and "nearest the paper" in text
    tied, text = fr.grid_choice_clause([0.5, 0.9, 0.9], "p = 0.6", "f1", "rule")
    assert tied and "2 of 3 grid points tie" in text
    tied, text = fr.grid_choice_clause([0.5, 0.9, 0.7], "p = 0.6", "f1", "rule")
    assert not tied and "chosen on validation" in text and "next 0.7" in text


def test_unparseable_and_nothing_to_act_on():
    assert fr.unparseable_clause(32, 32) == "32 of 32 answers unparseable"
    assert fr.unparseable_clause(0, 32) == "all 32 answers parsed"
    assert fr.nothing_to_act_on(0) and fr.nothing_to_act_on(math.nan) and not fr.nothing_to_act_on(0.25)
    assert fr.nothing_clause("knock out") == "0 tokens to knock out: nothing to act on, so no effect is reported"


# ----------------------------------------------------------------------------- the paper's questions


def test_questions_without_visual_sinks_are_not_testable():
    assert q.visual_sinks_answer(Estimate(0.0, 0.0, 0.0, 32), "100").answer == q.NO
    assert q.visual_sinks_answer(None, "100").answer == q.NOT_TESTABLE  # text-only data: no image tokens
    assert q.attention_answer(False, None).answer == q.NOT_TESTABLE
    assert q.knockout_answer(0.0, Estimate(0.0, 0.0, 0.0, 32), "random_visual", "100").answer == q.NOT_TESTABLE
    assert q.patching_answer(0.0, Estimate(0.0, 0.0, 0.0, 16), Estimate(-6.0, -7.0, -5.0, 16)).answer == q.NOT_TESTABLE
    assert "0 visual sinks" in q.patching_answer(0.0, None, None).evidence


def test_questions_answered_through_their_ci():
    assert q.sink_dims_answer([507], "auto-gap", 32).answer == q.YES
    assert q.sink_dims_answer([], "auto-gap", 32).answer == q.NO
    assert q.visual_sinks_answer(Estimate(4.0, 4.0, 4.0, 16), "100").answer == q.YES
    assert q.attention_answer(True, Estimate(3.2, 3.0, 3.4, 16)).answer == q.YES
    assert q.attention_answer(True, Estimate(1.1, 0.9, 1.3, 16)).answer == q.NO
    assert q.attention_answer(True, Estimate(0.5, 0.4, 0.6, 16)).answer == q.NO
    more = q.knockout_answer(4.0, Estimate(0.139, 0.05, 0.25, 32), "random_visual", "100")
    less = q.knockout_answer(4.0, Estimate(-0.5, -1.0, -0.1, 32), "random_visual", "100")
    noise = q.knockout_answer(4.0, Estimate(0.1, -0.1, 0.3, 32), "random_visual", "100")
    assert (more.answer, less.answer, noise.answer) == (q.YES, q.NO, q.NO)
    assert "less" in less.evidence and "no detectable difference" in noise.evidence and "n = 32" in more.evidence
    # VAR: helps only when the paired change's CI lies above 0; every answer unparseable: not testable
    assert q.var_answer(Estimate(0.2, 0.05, 0.35, 30), 2, 32, [507]).answer == q.YES
    assert q.var_answer(Estimate(0.0, 0.0, 0.0, 32), 0, 32, [507]).answer == q.NO
    unparsed = q.var_answer(None, 32, 32, [507])
    assert unparsed.answer == q.NOT_TESTABLE and "32 of 32 answers unparseable" in unparsed.evidence
    assert q.var_answer(Estimate(0.0, 0.0, 0.0, 32), 0, 32, []).answer == q.NOT_TESTABLE  # no sink dims
    # a baseline that answers "no" to everything cannot show whether VAR helps unless VAR changes something
    flat = q.var_answer(Estimate(0.0, 0.0, 0.0, 32), 0, 32, [507], baseline_yes_ratio=0.0)
    assert flat.answer == q.NOT_TESTABLE and "answers no to every question" in flat.evidence
    moved = q.var_answer(Estimate(0.2, 0.05, 0.35, 32), 0, 32, [507], baseline_yes_ratio=0.0)
    assert moved.answer == q.YES  # a detectable change is still reported
    assert q.var_answer(Estimate(0.0, -0.1, 0.1, 32), 0, 32, [507], baseline_yes_ratio=0.4).answer == q.NO
    # patching: the whole swap must move the answer before the sinks can be asked to carry it
    swap = Estimate(-6.0, -7.0, -5.0, 16)
    assert q.patching_answer(4.0, Estimate(-3.0, -4.0, -2.0, 16), swap).answer == q.YES
    assert "50% of the whole-image swap" in q.patching_answer(4.0, Estimate(-3.0, -4.0, -2.0, 16), swap).evidence
    assert q.patching_answer(4.0, Estimate(1e-7, -3e-6, 3e-6, 16), swap).answer == q.NO
    flat = q.patching_answer(4.0, Estimate(-0.09, -0.3, 0.1, 16), Estimate(-0.016, -0.2, 0.17, 16))
    assert flat.answer == q.NOT_TESTABLE and "whole image" in flat.evidence


def test_summary_table_has_one_row_per_question_and_escapes_pipes():
    answers = [q.not_run(key, "scan") for key in q.QUESTIONS]
    answers[3] = q.knockout_answer(4.0, Estimate(0.1, 0.05, 0.2, 8), "random_visual", "100")  # "|logit change|"
    table = q.summary_markdown(answers)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(q.QUESTIONS)
    assert all(line.count(" | ") == 3 for line in rows)  # 4 cells: the escaped "\|" of |logit change| splits none


# ----------------------------------------------------------------------------- the findings writer, planted tables


class _Adapter:
    def describe(self) -> dict:
        return {"architecture": "Planted", "layers": 4, "hidden_size": 64, "heads": 2, "kv_heads": 2}


def _write(folder: Path, tables: dict, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        if name.endswith(".json"):
            (folder / name).write_text(json.dumps(frame))
        else:
            pd.DataFrame(frame).to_csv(folder / name, index=False)
    (folder / "run.json").write_text(json.dumps({"finished": "2026-01-01T00:00:00", **meta}))


def _per_sample_mean(rng, n, mean, spread):
    return mean + spread * rng.standard_normal(n)


def plant_report(out: Path, sinks: bool, n: int = 8, n_patch: int = 4) -> Path:
    """A report folder whose every step's tables are planted: `sinks` False is the demo of issue 14 (no visual
    sinks, noisy whole-image swap, a baseline that answers no to everything, VAR on all heads unparseable, a tied
    grid); True plants clear effects (4 sinks per image, attention ratio 3.2, knockout above random, VAR fixing
    answers, sinks carrying the answer)."""
    rng = np.random.default_rng(0)
    samples = [f"s{i}" for i in range(n)]
    tau = {"value": 100.0, "method": "planted"}
    n_vis = 4 if sinks else 0
    # scan
    rows = []
    for s in samples:
        for layer in range(4):
            rows.append({"sample": s, "layer": layer, "token_kind": "bos", "n_sinks": 1, "sum_attention": 0.5,
                         "sum_sink_attention": 0.5})
            rows.append({"sample": s, "layer": layer, "token_kind": "visual", "n_sinks": n_vis if layer >= 2 else 0,
                         "sum_attention": 0.4, "sum_sink_attention": 0.2 if sinks else 0.0})
    _write(out / "scan", {"sink_dims.json": {"dims": [5], "method": "planted"}, "token_summary_per_sample.csv": rows},
           {"n_samples": n, "tau": tau, "params": {"sink_score": "layer"}})
    # heads: every head scores 0 without sinks; a Spearman whose CI crosses 0
    heads = [{"layer": layer, "head": h, "visual_sink_attention": (0.1 * (layer * 2 + h) if sinks else 0.0),
              "visual_sink_attention_ci_low": 0.0, "visual_sink_attention_ci_high": 0.0, "image_centric": 0.25}
             for layer in range(4) for h in range(2)]
    corr = [{"layers": ">= 2", "spearman": 0.02, "ci_low": -0.05, "ci_high": 0.09, "n_tokens": 512, "n_samples": n}]
    _write(out / "heads", {"head_scores.csv": heads, "phi_attention_correlation.csv": corr}, {"n_samples": n})
    # ablate: 0 tokens to knock out without sinks
    base = _per_sample_mean(rng, n, 0.02, 0.3)
    abl, per = [], []
    for cond, t, k in (("none", math.nan, 0), ("visual_sinks", 100.0, n_vis), ("random_visual", 100.0, n_vis),
                       ("top_nonsink", 100.0, n_vis), ("bos", math.nan, 1)):
        shift = -1.0 if (sinks and cond == "visual_sinks") else 0.0
        ld = base + shift
        abl.append({"condition": cond, "tau": t, "n_tokens": float(k), "metric": "logit_diff", "value": ld.mean(),
                    "ci_low": ld.mean() - 0.25, "ci_high": ld.mean() + 0.25, "p_value": 1.0 if cond != "none" else math.nan,
                    "n_samples": n})
        per += [{"sample": s, "condition": cond, "tau": t, "seed": -1, "n_tokens": k, "logit_diff": v}
                for s, v in zip(samples, ld)]
    contrast = ([{"tau": 100.0, "control": "random_visual", "sinks_abs_change": 1.0, "control_abs_change": 0.1,
                  "difference": 0.9, "ci_low": 0.7, "ci_high": 1.1, "p_value": 0.01, "n_samples": n}] if sinks else
                [{"tau": 100.0, "control": c, "sinks_abs_change": 0.0, "control_abs_change": 0.0, "difference": 0.0,
                  "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0, "n_samples": n} for c in ("random_visual", "top_nonsink")])
    _write(out / "ablate", {"ablation.csv": abl, "ablation_per_sample.csv": per, "ablation_contrasts.csv": contrast},
           {"n_samples": n, "tau": tau, "taus": [100.0]})
    # contributions: nothing to compare without sinks
    contrib = [{"layers": ">= 2", "measure": m, "ratio_sink_over_nonsink": (r if sinks else math.nan),
                "ci_low": (lo if sinks else math.nan), "ci_high": (hi if sinks else math.nan), "n_samples": n if sinks else 0}
               for m, r, lo, hi in (("contribution", 0.01, 0.005, 0.02), ("attention", 3.2, 3.0, 3.4))]
    _write(out / "contributions", {"contributions.csv": contrib}, {"n_samples": n})
    # var_eval: answers planted per question; the tables are computed by var_eval's own eval_table
    labels = ["yes", "no"] * (n // 2)
    answers = []
    for cond in ("baseline", "var", "var_all_heads"):
        for i, y in enumerate(labels):
            if cond == "var_all_heads":
                text, pred = "red circle red", ""
            elif sinks and cond == "var":
                text = pred = y  # VAR fixes every question
            else:
                text = pred = "no"  # the baseline (and VAR without sinks) answers no to everything
            answers.append({"sample": f"test:q{i}", "question_id": f"q{i}", "phase": "test", "condition": cond,
                            "p": math.nan if cond == "baseline" else 0.6, "rho": math.nan if cond == "baseline" else 0.5,
                            "task": "pope-random", "label": y, "answer": text, "prediction": pred,
                            "correct": pred == y})
    answers = pd.DataFrame(answers)
    sweep = [{"condition": "var", "p": p, "rho": r, "task": "all", "f1": 0.0 if not sinks else 0.5 + 0.1 * p,
              "accuracy": 0.5} for p in (0.3, 0.6) for r in (0.5, 0.8)]
    _write(out / "var_eval", {"var_eval.csv": eval_table(answers, n_boot=200), "var_answers.csv": answers,
                              "var_sweep.csv": sweep},
           {"n_validation": n // 2, "n_test": n, "var_calibrated": {"sink_dims": [5], "tau": 100.0},
            "chosen": {"p": 0.6, "rho": 0.5, "how": "best pooled validation f1 over the grid"},
            "params": {"select_metric": "f1"}})
    # patching: the whole-image swap is noise without sinks (the issue's -0.016, CI across 0)
    full = _per_sample_mean(rng, n_patch, -6.0, 0.5) if sinks else np.array([0.3, -0.35, 0.2, -0.214])
    patch_rows, patch_per = [], []
    sites = [("self", "all_image", 64.0, 0.0, 0.0, 0.0), ("other_image", "visual_sinks", float(n_vis),
                                                          -3.0 if sinks else 0.0, -4.0 if sinks else 0.0,
                                                          -2.0 if sinks else 0.0),
             ("other_image", "other_heads", 30.0, -0.0928, -0.318, 0.113),
             ("var", "var_full", 20.0, -0.0386, -0.223, 0.148), ("var", "var_other_heads", 20.0, 0.0153, -0.0565, 0.0788)]
    for source, site, k, eff, lo, hi in sites:
        ref = full.mean() if source == "other_image" else -0.0386
        patch_rows.append({"source": source, "target": "clean", "site": site, "layer": -1, "n_tokens": k,
                           "effect": eff, "ci_low": lo, "ci_high": hi, "p_value": 0.5, "n_samples": n_patch,
                           "full_effect": ref, "fraction_of_full": eff / ref})
        patch_per += [{"sample": s, "source": source, "site": site, "layer": -1, "n_tokens": k, "effect": eff,
                       "full_effect": f if source == "other_image" else ref} for s, f in zip(samples, full)]
    _write(out / "patching", {"patching.csv": patch_rows, "patching_per_sample.csv": patch_per},
           {"n_samples": n_patch})
    return out


DONE = ["scan", "heads", "ablate", "contributions", "var_eval", "patching"]


def _render(out: Path) -> tuple[str, pd.DataFrame]:
    write_index(out, ReportConfig(model="planted", limit=32), _Adapter(), "layer", DONE, {})
    return (out / "index.md").read_text(), pd.read_csv(out / "findings.csv")


def _lines(index: str, *words: str) -> list[str]:
    return [line for line in index.splitlines() if line.startswith("- ") and all(w in line for w in words)]


@pytest.fixture(scope="module")
def nothing_report(tmp_path_factory):
    return _render(plant_report(tmp_path_factory.mktemp("planted") / "nothing", sinks=False))


@pytest.fixture(scope="module")
def sinks_report(tmp_path_factory):
    return _render(plant_report(tmp_path_factory.mktemp("planted") / "sinks", sinks=True))


def test_no_line_of_issue_14_comes_back(nothing_report):
    index, table = nothing_report
    for misleading in ("579%", "-148%", "-0%", "181%", "100% of VAR", "top head", "L0.H0",
                       "negative: the sinks matter less", "32 samples per step", "8 samples per step"):
        assert misleading not in index, misleading
    # a share of a noisy swap is never printed, whatever the part
    assert not _lines(index, "% of swapping") and not _lines(index, "% of VAR")


def test_effect_across_zero_says_no_detectable_effect(nothing_report):
    index, table = nothing_report
    [spearman] = _lines(index, "Spearman")
    assert "no detectable effect (95% CI -0.05 to 0.09)" in spearman
    assert table.set_index("name").filter(like="Spearman", axis=0)["status"].item() == fr.NO_EFFECT
    [heads] = _lines(index, "other_heads from the other_image")
    assert "no detectable effect (95% CI -0.318 to 0.113)" in heads and "-0.0928" not in heads


def test_all_zero_heads_name_no_top(nothing_report):
    index, _ = nothing_report
    [line] = _lines(index, "attention to visual sinks, per head")
    assert "All 8 heads give visual sinks 0 attention" in line and "no head is named" in line


def test_zero_token_conditions_say_so(nothing_report):
    index, table = nothing_report
    for condition in ("visual_sinks", "random_visual", "top_nonsink"):
        [line] = _lines(index, f"knockout {condition}")
        assert "0 tokens to knock out: nothing to act on" in line
    for line in _lines(index, "|logit change| sinks minus"):
        assert "0 visual sinks to knock out" in line and "more" not in line and "less" not in line
    [none] = _lines(index, "logit difference, no knockout")
    assert "the unmodified model" in none and "blocked" not in none
    [sinks] = _lines(index, "visual_sinks from the other_image run")
    assert "0 visual sinks to patch" in sinks
    assert all("nothing to compare" in line for line in _lines(index, "*contributions*"))
    nothing = table[table["status"] == fr.NOTHING_TO_TEST]
    assert nothing["value"].isna().all() and len(nothing) >= 7


def test_unparseable_answers_counted_apart_and_out_of_mcnemar(nothing_report, tmp_path):
    index, table = nothing_report
    [line] = _lines(index, "var_all_heads")
    assert "8 of 8 answers unparseable" in line and "McNemar" not in line
    row = table[table["name"].str.contains("var_all_heads")].iloc[0]
    assert math.isnan(row["value"]) and row["status"] == fr.NOTHING_TO_TEST
    # POPE accuracy never stands alone: yes-ratio and F1 beside it (the baseline answers no to everything)
    [baseline] = _lines(index, "POPE accuracy, baseline")
    assert "yes-ratio 0," in baseline and "F1 0 " in baseline and "accuracy 0.5" in baseline
    for line in _lines(index, "POPE accuracy"):
        assert "unparseable" in line or "parsed" in line


def test_tied_grid_is_reported(nothing_report, sinks_report):
    [tied] = _lines(nothing_report[0], "VAR's p and rho")
    assert "every one of the 4 grid points ties at validation f1 0" in tied and "tie rule" in tied
    [chosen] = _lines(sinks_report[0], "VAR's p and rho")
    assert "2 of 4 grid points tie" in chosen  # two rho values at the best p: still a tie, said so


def test_every_finding_has_n_and_the_header_counts_each_step(nothing_report):
    index, table = nothing_report
    assert table["n"].notna().all(), table[table["n"].isna()]
    assert all(line.rstrip().endswith(")") and "(n = " in line for line in _lines(index, "*"))
    header = next(line for line in index.splitlines() if "Samples per step" in line)
    assert "scan 8" in header and "patching 4" in header and "var_eval 4 validation + 8 test questions" in header


def test_summary_leads_and_answers_the_nothing_report(nothing_report):
    index, _ = nothing_report
    assert index.index("## Summary") < index.index("## Findings")
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1].strip("*") for line in index.splitlines()
            if line.startswith("| ") and line.count(" | ") == 3 and "---" not in line and "question |" not in line}
    assert rows == {q.QUESTIONS["sink_dims"]: q.YES, q.QUESTIONS["visual_sinks"]: q.NO,
                    q.QUESTIONS["attention"]: q.NOT_TESTABLE, q.QUESTIONS["knockout"]: q.NOT_TESTABLE,
                    q.QUESTIONS["var"]: q.NOT_TESTABLE, q.QUESTIONS["patching"]: q.NOT_TESTABLE}  # baseline all "no"


def test_summary_answers_the_planted_sinks(sinks_report):
    index, table = sinks_report
    rows = {line.split(" | ")[0][2:]: line for line in index.splitlines() if line.startswith("| ")}
    answers = {key: rows[text].split(" | ")[1].strip("*") for key, text in q.QUESTIONS.items()}
    assert answers == {"sink_dims": q.YES, "visual_sinks": q.YES, "attention": q.YES, "knockout": q.YES,
                       "var": q.YES, "patching": q.YES}
    assert "3.2x the attention" in rows[q.QUESTIONS["attention"]]
    # with a detectable swap, the share of a detectable part is printed; never of an undetectable one
    [sinks] = _lines(index, "visual_sinks from the other_image run")
    assert "the patch carries the other image's answer" in sinks and "% of swapping the whole image" in sinks
    [heads] = _lines(index, "other_heads from the other_image run")
    assert "no detectable effect" in heads and "% of" not in heads
    [top] = _lines(index, "top head")
    assert "L3.H1" in top  # the unique largest planted head


def test_var_at_the_ceiling_is_not_testable():
    perfect = q.var_answer(Estimate(0.0, 0.0, 0.0, 16), 0, 16, [1, 90], baseline_accuracy=1.0)
    assert perfect.answer == q.NOT_TESTABLE and "all 16 questions right" in perfect.evidence


# ----------------------------------------------------------------------------- the step pages, planted tables


def test_finding_line_carries_n_and_hides_an_undetectable_point_value():
    measured = fr.Finding("heads", "image-centric heads", 0.25, n=8, sentence="Mean share.")
    assert fr.finding_line(measured) == "- *heads*, image-centric heads: **0.25**. Mean share. (n = 8)"
    assert fr.finding_line(measured, with_step=False) == "- image-centric heads: **0.25**. Mean share. (n = 8)"
    noise = fr.Finding("patching", "other_heads", -0.0928, -0.318, 0.113, n=4, status=fr.NO_EFFECT,
                       sentence="no detectable effect (95% CI -0.318 to 0.113).")
    assert "-0.0928" not in fr.finding_line(noise) and fr.finding_line(noise).endswith("(n = 4)")
    section = fr.findings_section([measured, noise])
    assert section[0] == "## Findings\n" and section[1] == fr.RULE_NOTE + "\n" and section[-1] == ""
    assert section[2:4] == [fr.finding_line(measured, False), fr.finding_line(noise, False)]
    assert "nothing to read" in fr.findings_section([])[2]


class _PageFolder:
    """What a step's index writer uses of a RunFolder: the path, run.json's fields, write_text."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = json.loads((path / "run.json").read_text())

    def write_text(self, name: str, text: str) -> None:
        (self.path / name).write_text(text)


def plant_location_and_vit(out: Path, sinks: bool, n: int = 8) -> None:
    """location.csv: no sinks, or 12 sinks whose background enrichment CI crosses 1; vit_sinks.csv: high-norm tokens
    but no language-model visual sinks (the demo of issue 14), or both."""
    location = [{"layers": ">= 2", "n_sinks": 12 if sinks else 0, "sink_background_share": 0.85 if sinks else math.nan,
                 "background_base_rate": 0.81, "enrichment": 1.05 if sinks else math.nan,
                 "ci_low": 0.9 if sinks else math.nan, "ci_high": 1.2 if sinks else math.nan,
                 "p_value_binomial": 0.4 if sinks else math.nan, "n_samples": n}]
    _write(out / "location", {"location.csv": location}, {"n_samples": n, "tau": {"value": 100.0}})
    vit = [{"site": site, "n_tokens": 512, "n_high_norm": k, "n_lm_visual_sinks": 16 if sinks else 0,
            "n_both": 4 if sinks else 0, "share_found_by_dsink": 4 / k if sinks else 0.0,
            "ci_low": 0.1 if sinks else 0.0, "ci_high": 0.4 if sinks else 0.0,
            "share_missed_by_dsink": 1 - 4 / k if sinks else 1.0, "jaccard": 0.1 if sinks else 0.0}
           for site, k in (("lm_input", 87), ("vit", 53))]
    dims = [{"site": "lm_input", "dim": 66, "n_high_norm_tokens": 50}, {"site": "lm_input", "dim": 467,
                                                                       "n_high_norm_tokens": 37},
            {"site": "vit", "dim": 40, "n_high_norm_tokens": 53}]
    _write(out / "vit_sinks", {"vit_sinks.csv": vit, "vit_dims.csv": dims}, {"n_samples": n, "tau": {"value": 100.0}})


def render_step_pages(out: Path) -> dict[str, str]:
    """Every step page written by its own module from the planted tables; step -> index.md text."""
    from sinkscope.analyses import ablate, contributions, heads, location, patching, var_eval, vit_sinks

    def folder(step):
        return _PageFolder(out / step)

    def table(step, name):
        return pd.read_csv(out / step / name)

    patching._write_index(folder("patching"), patching.PatchConfig(model="planted"), table("patching", "patching.csv"),
                          {})
    ablate._write_index(folder("ablate"), ablate.AblateConfig(model="planted"), table("ablate", "ablation.csv"), {},
                        table("ablate", "ablation_contrasts.csv"))
    head_scores = table("heads", "head_scores.csv").assign(image_attention=0.3)  # every head ties in image attention
    heads.write_heads_index(folder("heads"), heads.HeadsConfig(model="planted"), head_scores,
                            table("heads", "phi_attention_correlation.csv"), pd.DataFrame(), {}, 100.0, [5])
    contributions._write_index(folder("contributions"), contributions.ContributionsConfig(model="planted"),
                               table("contributions", "contributions.csv"), None, {})
    location._write_index(folder("location"), location.LocationConfig(model="planted"),
                          table("location", "location.csv"), {})
    vit_sinks._write_index(folder("vit_sinks"), vit_sinks.VitSinksConfig(model="planted"),
                           table("vit_sinks", "vit_sinks.csv"), table("vit_sinks", "vit_dims.csv"), {})
    var_eval._write_index(folder("var_eval"), var_eval.VarEvalConfig(model="planted"), table("var_eval", "var_eval.csv"),
                          table("var_eval", "var_sweep.csv"), pd.DataFrame(), (0.6, 0.5), {})
    return {step: (out / step / "index.md").read_text() for step in STEP_PAGES}


STEP_PAGES = ("patching", "ablate", "heads", "contributions", "location", "vit_sinks", "var_eval")


def _planted_pages(root: Path, sinks: bool) -> tuple[dict[str, str], str]:
    out = plant_report(root, sinks=sinks)
    plant_location_and_vit(out, sinks)
    pages = render_step_pages(out)
    write_index(out, ReportConfig(model="planted", limit=32), _Adapter(), "layer", DONE + ["location", "vit_sinks"], {})
    return pages, (out / "index.md").read_text()


@pytest.fixture(scope="module")
def nothing_pages(tmp_path_factory):
    return _planted_pages(tmp_path_factory.mktemp("pages") / "nothing", sinks=False)


@pytest.fixture(scope="module")
def sinks_pages(tmp_path_factory):
    return _planted_pages(tmp_path_factory.mktemp("pages") / "sinks", sinks=True)


def _bullets(page: str, *words: str) -> list[str]:
    return [line for line in page.splitlines() if line.startswith("- ") and all(w in line for w in words)]


def test_no_step_page_prints_a_misleading_line(nothing_pages):
    pages, _ = nothing_pages
    misleading = {"patching": ("negligible", "% of the full swap", "% of VAR", "% of swapping", "-1287%",
                               "VAR changes the logit difference by", "fraction_of_full |"),
                  "ablate": ("sinks matter less", "a negative difference means", "moves answers less",
                             "moves answers more", "logit difference 0.126 (95% CI", "p = 1 vs none"),
                  "heads": ("Top head", "top head", "L0.H0", "ranked by attention", "The head with most"),
                  "contributions": ("times a visual non-sink's", "times the attention"),
                  "location": ("enrichment n/a",),
                  "vit_sinks": ("share that D_sink detection finds as visual sinks: 0 (95% CI 0 to 0)", "top dims"),
                  "var_eval": ("best pooled validation f1", "accuracy 0 (")}
    for step, phrases in misleading.items():
        for phrase in phrases:
            assert phrase not in pages[step], (step, phrase)
        assert "-0 " not in pages[step] and "-0%" not in pages[step] and "-0)" not in pages[step], step


def test_step_pages_say_the_rule_and_carry_n(nothing_pages, sinks_pages):
    for pages in (nothing_pages[0], sinks_pages[0]):
        for step, page in pages.items():
            assert "## Findings" in page and fr.RULE_NOTE in page, step
            if step == "var_eval":
                continue  # its findings name n inside each sentence (questions, parsed pairs)
            section = page.split("## Findings", 1)[1].split("\n## ", 1)[0]
            bullets = [line for line in section.splitlines() if line.startswith("- ")]
            assert bullets, step
            assert all("(n = " in line for line in bullets), (step, [b for b in bullets if "(n = " not in b])


def test_step_pages_list_the_same_findings_as_the_report(nothing_pages, sinks_pages):
    for pages, index in (nothing_pages, sinks_pages):
        for step in ("patching", "ablate", "heads", "contributions", "location", "vit_sinks"):
            on_index = [line.replace(f"- *{step}*, ", "- ", 1) for line in _bullets(index, f"*{step}*, ")]
            section = pages[step].split("## Findings", 1)[1]
            on_page = [line for line in section.splitlines() if line.startswith("- ")][:len(on_index)]
            assert on_index and on_page == on_index, step


def test_patching_page_gives_no_share_of_a_noisy_reference(nothing_pages):
    page = nothing_pages[0]["patching"]
    [swap] = _bullets(page, "whole image from the other_image run")
    assert "no detectable effect (95% CI" in swap
    [var_full] = _bullets(page, "var_full from the var run")
    assert "no detectable effect (95% CI -0.223 to 0.148)" in var_full
    [other] = _bullets(page, "var_other_heads from the var run")
    assert "no detectable effect (95% CI -0.0565 to 0.0788)" in other and "% of" not in other
    [sinks] = _bullets(page, "visual_sinks from the other_image run")
    assert "0 visual sinks to patch: nothing to act on" in sinks
    assert "fraction_of_full" not in page.split("is left out here", 1)[1]  # the table's header has no such column


def test_patching_page_gives_the_share_of_a_detectable_swap(sinks_pages):
    page = sinks_pages[0]["patching"]
    [sinks] = _bullets(page, "visual_sinks from the other_image run")
    assert "the patch carries the other image's answer" in sinks and "% of swapping the whole image" in sinks
    [heads] = _bullets(page, "other_heads from the other_image run")
    assert "no detectable effect" in heads and "% of" not in heads


def test_ablate_page_zero_token_knockouts_are_not_effects(nothing_pages):
    page = nothing_pages[0]["ablate"]
    assert "**No visual sinks found** at any tau swept" in page
    for condition in ("visual_sinks", "random_visual", "top_nonsink"):
        [line] = _bullets(page, f"knockout {condition}")
        assert "0 tokens to knock out: nothing to act on, so no effect is reported" in line
    contrasts = _bullets(page, "tau 100, sinks vs")
    assert len(contrasts) == 2
    assert all("0 visual sinks to knock out" in line and "nothing to compare" in line for line in contrasts)
    [none] = _bullets(page, "no knockout (the unmodified model)")
    assert "blocked" not in none


def test_ablate_contrast_lines_follow_the_rule_at_every_tau():
    from sinkscope.analyses.ablate import contrast_lines

    table = pd.DataFrame([{"condition": "visual_sinks", "tau": t, "metric": "logit_diff", "n_tokens": k}
                          for t, k in ((50.0, 6.0), (100.0, 2.0), (150.0, 0.0))])
    contrasts = pd.DataFrame([
        {"tau": 50.0, "control": "random_visual", "sinks_abs_change": 0.2, "control_abs_change": 0.9,
         "difference": -0.7, "ci_low": -0.9, "ci_high": -0.5, "p_value": 0.004, "n_samples": 16},
        {"tau": 100.0, "control": "random_visual", "sinks_abs_change": 0.3, "control_abs_change": 0.35,
         "difference": -0.05, "ci_low": -0.2, "ci_high": 0.1, "p_value": 0.6, "n_samples": 16},
        {"tau": 150.0, "control": "random_visual", "sinks_abs_change": 0.0, "control_abs_change": 0.0,
         "difference": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0, "n_samples": 16}])
    lines = [line for line in contrast_lines(table, contrasts) if line.startswith("- ")]
    assert len(lines) == 3
    assert "moves answers less than the control (-0.7, 95% CI -0.9 to -0.5)" in lines[0]
    assert "no detectable effect (95% CI -0.2 to 0.1)" in lines[1] and "less" not in lines[1]
    assert "0 visual sinks to knock out: nothing to act on" in lines[2] and "p =" not in lines[2]
    assert all("n = 16 samples" in line for line in lines)
    assert contrast_lines(table, pd.DataFrame()) == []


def test_heads_page_names_no_top_among_zeros(nothing_pages, sinks_pages):
    page = nothing_pages[0]["heads"]
    assert "no head is named" in page and "not ranked: no unique largest attention" in page
    assert "all 8 score 0.3 in attention to image tokens: none is singled out" in page
    table = page.split("not ranked: no unique largest attention to visual sinks):", 1)[1]
    assert "rank_visual_sink_attention" not in table  # rank 1 for every head would rank zeros
    [spearman] = _bullets(page, "Spearman")
    assert "no detectable effect (95% CI -0.05 to 0.09)" in spearman
    named = sinks_pages[0]["heads"]
    assert "L3.H1 has the largest attention to visual sinks" in named and "top head L3.H1" in named


def test_per_head_lines_say_a_tie():
    from sinkscope.analyses.heads import per_head_lines

    heads = pd.DataFrame([{"layer": 1, "head": h, "visual_sink_attention": v, "image_attention": 0.2 + 0.1 * h,
                           "rank_visual_sink_attention": 1} for h, v in enumerate((0.4, 0.4, 0.1))])
    text = "\n".join(per_head_lines(heads))
    assert "2 of 3 tie at the largest attention to visual sinks (0.4): none is singled out" in text
    assert "L1.H2 has the largest attention to image tokens" in text and "not ranked" in text


def test_ratio_pages_state_effects_against_one_only_through_the_ci(nothing_pages, sinks_pages):
    contributions = nothing_pages[0]["contributions"]
    assert "**No visual sinks found**" in contributions
    assert len(_bullets(contributions, "nothing to compare")) == 2
    [attention] = _bullets(sinks_pages[0]["contributions"], "attention ratio")
    assert "visual sinks receive more attention than other image tokens (3.2, 95% CI 3 to 3.4)" in attention
    assert "nothing to locate" in nothing_pages[0]["location"]
    [enrichment] = _bullets(sinks_pages[0]["location"], "background enrichment")
    assert "no detectable effect (95% CI 0.9 to 1.2)" in enrichment and "binomial test" in sinks_pages[0]["location"].lower()


def test_ov_norm_line_follows_the_rule():
    from sinkscope.analyses.contributions import ov_norm_line

    row = pd.Series({"ratio_sink_over_nonsink": 0.4, "ci_low": 0.3, "ci_high": 0.5, "n_samples": 16})
    assert "a visual sink would write less than another image token (0.4, 95% CI 0.3 to 0.5)" in ov_norm_line(row, 2)
    noisy = row.copy()
    noisy[["ci_low", "ci_high"]] = (0.5, 1.4)
    assert "no detectable effect (95% CI 0.5 to 1.4)" in ov_norm_line(noisy, 2)
    empty = pd.Series({"ratio_sink_over_nonsink": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_samples": 0})
    assert ov_norm_line(empty, 2) == ""  # the findings say there is nothing to compare, with the step's n


def test_vit_page_without_language_model_sinks(nothing_pages, sinks_pages):
    page = nothing_pages[0]["vit_sinks"]
    assert len(_bullets(page, "D_sink marks no image token as a sink here")) == 2
    [dims] = _bullets(page, "`lm_input`: 87 high-norm tokens")
    assert "66 (50), 467 (37)" in dims and "no language-model visual sinks to overlap with" in dims
    [both] = _bullets(sinks_pages[0]["vit_sinks"], "`vit`: 53 high-norm tokens")
    assert "Jaccard overlap with the 16 language-model visual sinks 0.1" in both


def test_var_eval_page_pope_accuracy_with_yes_ratio_f1_and_parse_counts(nothing_pages):
    page = nothing_pages[0]["var_eval"]
    pope = [line for line in _bullets(page) if "accuracy" in line and not line.startswith("- Chosen")]
    assert pope and all("yes-ratio" in line and "F1" in line for line in pope if "unparseable:" not in line)
    assert all("parsed" in line or "unparseable" in line for line in pope)
    [unparsed] = _bullets(page, "`var_all_heads`")
    assert "8 of 8 answers unparseable" in unparsed and "McNemar" not in unparsed
    assert "every one of the 4 grid points ties at validation f1 0" in page


def test_var_eval_page_says_when_the_baseline_leaves_no_room():
    from sinkscope.analyses.var_eval import finding_sentences as var_findings

    labels = ["yes", "no"] * 4
    answers = pd.DataFrame([{"sample": f"test:q{i}", "question_id": f"q{i}", "phase": "test", "condition": cond,
                             "p": math.nan if cond == "baseline" else 0.6, "rho": math.nan if cond == "baseline" else 0.5,
                             "task": "pope-random", "label": y, "answer": y, "prediction": y, "correct": True}
                            for cond in ("baseline", "var") for i, y in enumerate(labels)])
    meta = {"n_validation": 4, "var_calibrated": {"sink_dims": [5]}, "chosen": {"how": "given"}}
    lines = var_findings(eval_table(answers, n_boot=100), (0.6, 0.5), meta)
    assert lines[0].endswith("(n = 4 validation questions).")
    assert any("The baseline answers all 8 test questions right" in line and "not testable" in line for line in lines)
    [var] = [line for line in lines if line.startswith("`var`")]
    assert "yes-ratio 0.5" in var and "F1 1" in var and "no detectable effect" in var


def test_a_step_page_without_readable_tables_says_so(tmp_path):
    from sinkscope.analyses import patching
    from sinkscope.analyses.pages import step_findings_section

    (tmp_path / "run.json").write_text(json.dumps({"n_samples": 4}))
    lines = step_findings_section(patching.findings, tmp_path)  # no patching.csv
    assert lines[0] == "## Findings\n" and "could not be read from the step's tables" in lines[1]


def test_a_top_whose_ci_overlaps_others_is_said_unresolved():
    labels = ["L3.H0", "L2.H3", "L4.H0", "L3.H1"]
    values, low, high = [0.597, 0.586, 0.571, 0.0645], [0.557, 0.532, 0.541, 0.056], [0.641, 0.646, 0.602, 0.074]
    assert fr.overlapping_top(values, low, high) == [1, 2]
    top, text = fr.top_clause(values, labels, "attention to visual sinks", low, high)
    assert top == 0 and text == ("L3.H0 has the largest attention to visual sinks (0.597), but its 95% CI 0.557 to "
                                 "0.641 overlaps the CIs of 2 other(s) (L2.H3, L4.H0): which of them is largest is "
                                 "not resolved")
    separated = [0.7, 0.65, 0.6, 0.1]
    assert fr.top_clause(separated, labels, "attention", [0.66, 0.5, 0.5, 0.0], [0.74, 0.64, 0.65, 0.2]) == \
        (0, "L3.H0 has the largest attention")
    assert fr.overlapping_top([0.2, 0.2], [0.1, 0.1], [0.3, 0.3]) == []  # a tie has no unique top to qualify
    assert fr.overlapping_top([0.5, 0.2], [math.nan, 0.1], [math.nan, 0.3]) == []  # no CI: nothing to say


def test_heads_page_says_when_the_top_head_is_not_resolved():
    from sinkscope.analyses.heads import per_head_lines

    heads = pd.DataFrame([{"layer": l, "head": h, "visual_sink_attention": v, "visual_sink_attention_ci_low": lo,
                           "visual_sink_attention_ci_high": hi, "image_attention": 0.1 * (i + 1)}
                          for i, (l, h, v, lo, hi) in enumerate(((3, 0, 0.597, 0.557, 0.641), (2, 3, 0.586, 0.532, 0.646),
                                                                 (3, 1, 0.0645, 0.056, 0.074)))])
    text = "\n".join(per_head_lines(heads))
    assert "overlaps the CIs of 1 other(s) (L2.H3): which of them is largest is not resolved" in text
    assert "Heads ranked by attention to visual sinks" in text


def test_the_report_qualifies_a_top_head_whose_ci_overlaps_others(tmp_path):
    from sinkscope.analyses.report import REGISTRY

    heads = [{"layer": l, "head": h, "visual_sink_attention": v, "visual_sink_attention_ci_low": lo,
              "visual_sink_attention_ci_high": hi, "image_centric": 0.5}
             for l, h, v, lo, hi in ((3, 0, 0.597, 0.557, 0.641), (2, 3, 0.586, 0.532, 0.646), (3, 1, 0.06, 0.05, 0.07))]
    corr = [{"layers": ">= 2", "spearman": 0.19, "ci_low": 0.13, "ci_high": 0.24, "n_tokens": 4096, "n_samples": 16}]
    _write(tmp_path, {"head_scores.csv": heads, "phi_attention_correlation.csv": corr}, {"n_samples": 16})
    [top] = [f for f in REGISTRY["heads"].findings(tmp_path) if "top head" in f.name]
    assert top.name.endswith("L3.H0") and "overlaps the CIs of 1 other(s) (L2.H3)" in top.sentence
    assert "not resolved" in fr.finding_line(top)


def test_an_exact_test_must_agree_before_a_paired_yes_no_change_is_stated():
    """exact_test_clause: an effect whose CI excludes 0 stays an effect only with McNemar p < 0.05; at p >= 0.05 or
    without a p it is no detectable effect and says why; a CI that includes 0 is unchanged by any p."""
    from sinkscope.findings import EFFECT, NO_EFFECT, Estimate, effect_clause, exact_test_clause

    falls = Estimate(-0.333, -0.583, -0.0833, 12)
    assert exact_test_clause(falls, 0.01, "the 4 changed answers", "up", "down") == effect_clause(falls, "up", "down")
    assert exact_test_clause(falls, 0.01, "x", "up", "down")[0] == EFFECT
    for p in (0.125, 0.05, float("nan")):
        status, clause = exact_test_clause(falls, p, "the 4 changed answers", "up", "down")
        assert status == NO_EFFECT and clause.startswith("no detectable effect (the bootstrap 95% CI -0.583 to -0.0833 excludes 0, but")
        assert clause.endswith("McNemar's exact test on the 4 changed answers does not reject no change)")
    spans = Estimate(0.1, -0.05, 0.2, 12)
    assert exact_test_clause(spans, 1e-9, "x", "up", "down") == effect_clause(spans, "up", "down")
