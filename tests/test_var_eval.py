"""VAR evaluation: selection on validation only, tables against hand computations, the run folder on the
organism (all conditions, resumable), a POPE-format file on the tiny demo model, and bad configs."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sinkscope.analyses.var_eval import CONDITIONS, VarEvalConfig, choose, eval_table, run_var_eval
from sinkscope.errors import SinkscopeError

ORGANISM = Path(__file__).resolve().parent.parent / "sinkscope" / "models" / "embedded" / "assets" / "organism"


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def test_choose_best_and_ties_nearest_the_paper():
    rows = [{"condition": "var", "p": p, "rho": r, "task": "all", "f1": f, "accuracy": 0.5}
            for p, r, f in [(0.3, 0.3, 0.7), (0.6, 0.8, 0.9), (0.9, 0.5, 0.9), (0.6, 0.5, 0.8)]]
    rows.append({"condition": "var", "p": 0.3, "rho": 0.3, "task": "pope-random", "f1": 1.0, "accuracy": 1.0})
    sweep = pd.DataFrame(rows)
    assert choose(sweep, "f1") == (0.6, 0.8)  # tie at 0.9: distance 0.3 beats 0.3 + 0 ... then smaller p
    assert choose(sweep[sweep["f1"] < 0.85], "f1") == (0.6, 0.5)
    assert choose(sweep.iloc[:0], "f1") == (0.6, 0.5)  # nothing swept: the paper's values


def test_eval_table_hand_computed():
    labels = ["yes", "no"] * 5
    base_pred = ["yes", "no", "yes", "yes", "no", "no", "yes", "no", "yes", "no"]  # 8/10 correct (2, 4 wrong)
    var_pred = ["yes", "no", "no", "no", "yes", "no", "yes", "yes", "yes", "no"]  # fixes 2, 4 ... breaks 3? see below
    rows = []
    for cond, preds in (("baseline", base_pred), ("var", var_pred)):
        for i, (p, y) in enumerate(zip(preds, labels)):
            rows.append({"sample": f"test:{i}", "question_id": f"q{i}", "phase": "test", "condition": cond,
                         "p": math.nan if cond == "baseline" else 0.6, "rho": math.nan if cond == "baseline" else 0.5,
                         "task": "pope-random", "label": y, "answer": p, "prediction": p, "correct": p == y})
    table = eval_table(pd.DataFrame(rows), n_boot=200)
    v = table[(table["condition"] == "var") & (table["task"] == "all")].iloc[0]
    b = table[(table["condition"] == "baseline") & (table["task"] == "all")].iloc[0]
    assert b["accuracy"] == pytest.approx(0.8)
    var_correct = [p == y for p, y in zip(var_pred, labels)]
    base_correct = [p == y for p, y in zip(base_pred, labels)]
    fixed = sum(a and not c for a, c in zip(var_correct, base_correct))
    broken = sum(c and not a for a, c in zip(var_correct, base_correct))
    n = fixed + broken
    literal = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2 ** n)
    assert (v["discordant_better"], v["discordant_worse"]) == (fixed, broken)
    assert v["p_value"] == pytest.approx(literal)
    assert v["accuracy"] == pytest.approx(np.mean(var_correct))
    tp = sum(p == "yes" and y == "yes" for p, y in zip(var_pred, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(var_pred, labels))
    assert v["precision"] == pytest.approx(tp / (tp + fp))
    assert v["ci_low"] <= v["accuracy"] <= v["ci_high"] and v["f1_ci_low"] <= v["f1"] <= v["f1_ci_high"]
    assert math.isnan(b["p_value"])


@pytest.fixture(scope="module")
def organism():
    from sinkscope.models import load

    if not (ORGANISM / "config.json").exists():
        pytest.skip("the organism asset is not built")
    return _quiet(load, "organism")


def test_organism_run_folder_all_conditions_tuned_on_validation(organism, tmp_path):
    cfg = VarEvalConfig(model="organism", limit=12, val_limit=8, captions=4, p_grid=[0.3, 0.9], rho_grid=[0.5],
                        batch_size=32, n_boot=200, calibration=8)
    folder = _quiet(run_var_eval, str(tmp_path / "ve"), cfg, adapter=organism)
    table = pd.read_csv(folder.path / "var_eval.csv")
    sweep = pd.read_csv(folder.path / "var_sweep.csv")
    answers = pd.read_csv(folder.path / "var_answers.csv")
    assert list(table.columns[:11]) == ["condition", "task", "accuracy", "precision", "recall", "f1", "yes_ratio", "n",
                                        "ci_low", "ci_high", "p_value"]
    assert set(table["condition"]) == set(CONDITIONS)
    assert set(table["task"]) == {"all", "pope-random", "pope-popular", "pope-adversarial"}
    assert (table[table["task"] == "all"]["n"] == 36).all()
    # chosen on validation only: the sweep holds validation questions, the test rows use the chosen pair
    meta = json.loads((folder.path / "run.json").read_text())
    chosen = (meta["chosen"]["p"], meta["chosen"]["rho"])
    assert chosen == choose(sweep, "f1")
    assert sweep[sweep["chosen"]][["p", "rho"]].drop_duplicates().values.tolist() == [list(chosen)]
    assert set(answers[answers["phase"] == "validation"]["question_id"]).isdisjoint(
        answers[answers["phase"] == "test"]["question_id"])
    assert (answers[(answers["phase"] == "test") & (answers["condition"] == "var")]["p"] == chosen[0]).all()
    assert meta["var_calibrated"]["sink_dims"] == [1, 90]
    assert (folder.path / "chair.csv").exists() and (folder.path / "var_sweep.png").exists()
    text = (folder.path / "index.md").read_text()
    assert "## Findings" in text and "McNemar" in text and "test split was not used" in text
    # a tie on the validation grid is said, in run.json and on the page, never passed off as a choice
    from sinkscope.analyses.var_eval import choice_clause

    tied, sentence = choice_clause(sweep, chosen, "f1")
    assert meta["chosen"]["tied"] == tied and sentence in text
    assert ("tie" in meta["chosen"]["how"]) == tied
    # resume: nothing recomputed, identical tables
    n_rows = len(answers)
    again = _quiet(run_var_eval, str(tmp_path / "ve"), cfg, adapter=organism)
    assert len(pd.read_csv(again.path / "var_answers.csv")) == n_rows
    assert pd.read_csv(again.path / "var_eval.csv").equals(table)


def test_pope_files_on_tiny(tmp_path):
    from sinkscope import world
    from sinkscope.models import load

    if not (ORGANISM.parent / "tiny" / "config.json").exists():
        pytest.skip("the tiny asset is not built")
    adapter = _quiet(load, "tiny")
    images = tmp_path / "images"
    images.mkdir()
    for split, name in (("validation", "val"), ("test", "test")):
        lines = []
        for i in range(4):
            s = world.scene(split, i)
            s.pil().save(images / f"{name}{i}.png")
            present = sorted(s.categories)[0]
            absent = next(c for c in world.all_categories() if c not in s.categories)
            lines += [{"question_id": f"{name}{i}y", "image": f"{name}{i}.png", "text": f"is there a {present} in the image ?", "label": "yes"},
                      {"question_id": f"{name}{i}n", "image": f"{name}{i}.png", "text": f"is there a {absent} in the image ?", "label": "no"}]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    cfg = VarEvalConfig(model="tiny", data=str(tmp_path / "test.jsonl"), validation=str(tmp_path / "val.jsonl"),
                        image_root=str(images), conditions=["baseline", "var"], p_grid=[0.6], rho_grid=[0.3, 0.5],
                        batch_size=8, n_boot=100, calibration=4)
    folder = _quiet(run_var_eval, str(tmp_path / "ve"), cfg, adapter=adapter)
    table = pd.read_csv(folder.path / "var_eval.csv")
    assert set(table["task"]) == {"all", "test"} and (table["n"] == 8).all()
    with pytest.raises(SinkscopeError, match="also appear in the test file"):
        _quiet(run_var_eval, str(tmp_path / "ve2"), VarEvalConfig(
            model="tiny", data=str(tmp_path / "test.jsonl"), validation=str(tmp_path / "test.jsonl"),
            image_root=str(images)), adapter=adapter)


@pytest.mark.parametrize("kwargs,match", [
    ({"conditions": ["var"]}, "include 'baseline'"), ({"conditions": ["baseline", "magic"]}, "come from"),
    ({"p": 1.5}, r"--p must be in \[0, 1\]"), ({"rho_grid": []}, "rho-grid"), ({"select_metric": "auc"}, "f1 or accuracy"),
    ({"tasks": ["color"]}, "pope-random"), ({"limit": 1}, ">= 2"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(SinkscopeError, match=match):
        VarEvalConfig(**kwargs).validate()


def _answers(rows):
    out = []
    for cond, preds, labels in rows:
        for i, (p, y) in enumerate(zip(preds, labels)):
            parsed = p if p in ("yes", "no") else ""
            out.append({"sample": f"test:{i}", "question_id": f"q{i}", "phase": "test", "condition": cond,
                        "p": math.nan if cond == "baseline" else 0.6, "rho": math.nan if cond == "baseline" else 0.5,
                        "task": "pope-random", "label": y, "answer": p, "prediction": parsed, "correct": parsed == y})
    return pd.DataFrame(out)


def test_unparseable_answers_are_counted_apart_and_left_out_of_mcnemar():
    """The issue's var_all_heads: every answer unparseable was 'accuracy 0, McNemar p = 3e-5, worsens accuracy'."""
    labels = ["yes", "no"] * 8
    baseline = ["no"] * 16  # answers no to everything: accuracy 0.5, yes-ratio 0, F1 0
    table = eval_table(_answers([("baseline", baseline, labels), ("var_all_heads", ["red circle"] * 16, labels)]),
                       n_boot=200)
    r = table[(table["condition"] == "var_all_heads") & (table["task"] == "all")].iloc[0]
    assert (r["n"], r["n_parsed"], r["n_unparseable"], r["n_pairs"]) == (16, 0, 16, 0)
    assert math.isnan(r["p_value"]) and math.isnan(r["accuracy_change"]) and math.isnan(r["change_ci_low"])
    b = table[(table["condition"] == "baseline") & (table["task"] == "all")].iloc[0]
    assert (b["accuracy"], b["yes_ratio"], b["f1"], b["n_unparseable"]) == (0.5, 0.0, 0.0, 0)
    from sinkscope.analyses.var_eval import condition_sentence
    from sinkscope.findings import NOTHING_TO_TEST

    status, text = condition_sentence(r)
    assert status == NOTHING_TO_TEST and text.startswith("16 of 16 answers unparseable") and "McNemar" not in text


def test_a_change_is_stated_only_where_the_exact_test_agrees_with_the_interval():
    """Like the demo report's var_all_heads on 48 questions (10 parsed pairs, 3 broken, none fixed: bootstrap CI -0.6
    to -0.1, McNemar p = 0.25): 12 pairs, 4 broken, none fixed. The percentile bootstrap of the paired change excludes
    0 (a resample without a broken pair has probability (8/12)^12 < 1%) while McNemar's exact test gives
    p = 2 / 2^4 = 0.125: no effect is stated. With 30 of 100 pairs broken both agree and the effect is stated."""
    from sinkscope.analyses.var_eval import condition_sentence
    from sinkscope.findings import EFFECT, NO_EFFECT

    labels = ["yes", "no"] * 6
    few = eval_table(_answers([("baseline", labels, labels),
                               ("var_all_heads", ["no", "yes", "no", "yes"] + labels[4:], labels)]), n_boot=1000)
    r = few[(few["condition"] == "var_all_heads") & (few["task"] == "all")].iloc[0]
    assert (r["n_pairs"], r["discordant_better"], r["discordant_worse"]) == (12, 0, 4)
    assert r["change_ci_high"] < 0 and r["p_value"] == pytest.approx(0.125)  # the disagreement itself
    status, text = condition_sentence(r)
    assert status == NO_EFFECT and "no detectable effect" in text and "worsens" not in text
    assert "McNemar's exact test on the 4 changed answers does not reject" in text

    labels = ["yes", "no"] * 50
    many = eval_table(_answers([("baseline", labels, labels),
                                ("var", [{"yes": "no", "no": "yes"}[x] for x in labels[:30]] + labels[30:], labels)]),
                      n_boot=1000)
    r = many[(many["condition"] == "var") & (many["task"] == "all")].iloc[0]
    assert r["p_value"] < 1e-6 and r["change_ci_high"] < 0
    status, text = condition_sentence(r)
    assert status == EFFECT and "worsens accuracy (-0.3," in text


def test_mcnemar_and_change_use_only_parsed_pairs():
    labels = ["yes", "no"] * 6
    baseline = ["no", "no", "yes", "no", "no", "no", "yes", "yes", "no", "no", "yes", "no"]
    var = ["yes", "no", "yes", "??", "yes", "no", "maybe", "no", "yes", "yes", "yes", "no"]
    table = eval_table(_answers([("baseline", baseline, labels), ("var", var, labels)]), n_boot=200)
    r = table[(table["condition"] == "var") & (table["task"] == "all")].iloc[0]
    keep = [v in ("yes", "no") for v in var]
    a = [v == y for v, y, k in zip(var, labels, keep) if k]
    b = [v == y for v, y, k in zip(baseline, labels, keep) if k]
    fixed, broken = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    n = fixed + broken
    literal = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2 ** n)
    assert (r["n_parsed"], r["n_unparseable"], r["n_pairs"]) == (10, 2, 10)
    assert (r["discordant_better"], r["discordant_worse"]) == (fixed, broken)
    assert r["p_value"] == pytest.approx(literal)
    assert r["accuracy_change"] == pytest.approx(np.mean(a) - np.mean(b))
    assert r["change_ci_low"] <= r["accuracy_change"] <= r["change_ci_high"]
    assert r["accuracy"] == pytest.approx(np.mean([v == y for v, y in zip(var, labels)]))  # unparsed count as wrong


def test_tied_grid_is_said_in_the_choice():
    from sinkscope.analyses.var_eval import choice_clause

    sweep = pd.DataFrame([{"condition": "var", "p": p, "rho": r, "task": "all", "f1": 0.0}
                          for p in (0.3, 0.6) for r in (0.5, 0.8)])
    tied, text = choice_clause(sweep, (0.6, 0.5), "f1")
    assert tied and "every one of the 4 grid points ties" in text
    sweep.loc[0, "f1"] = 0.4
    tied, text = choice_clause(sweep, (0.3, 0.5), "f1")
    assert not tied and "chosen on validation" in text
    assert "no validation grid" in choice_clause(sweep.iloc[:0], (0.6, 0.5), "f1", "given")[1]


def test_compile_reaches_every_var_condition_but_random_heads_and_a_run_resumes_across_it(organism, tmp_path,
                                                                                        monkeypatch):
    """--compile asks `var` for the fused edit in every VAR condition except var_random_heads (torch.compile cannot
    draw random heads); like the device, it is not part of what a run computes, so a run resumes across it. The
    fused edit itself is tested against the unfused one in tests/test_var.py; here it runs unfused."""
    from sinkscope.interventions import var as var_module

    asked: list[tuple[str, bool]] = []
    plain_var = var_module.var

    def recording(adapter, config, *args, compile=False, **kwargs):
        asked.append((config.head_selection, compile))
        return plain_var(adapter, config, *args, compile=False, **kwargs)

    monkeypatch.setattr(var_module, "var", recording)
    cfg = VarEvalConfig(model="organism", limit=2, val_limit=2, p=0.6, rho=0.5, batch_size=8, n_boot=50,
                        calibration=4, compile=True)
    said: list[str] = []
    folder = _quiet(run_var_eval, str(tmp_path / "ve"), cfg, adapter=organism, log=said.append)
    assert {selection: fused for selection, fused in asked} == {"image_centric": True, "random": False,
                                                                "all": True}
    assert any(line.startswith("--compile on the CPU") for line in said)  # the organism runs on the CPU here
    n_rows = len(pd.read_csv(folder.path / "var_answers.csv"))
    asked.clear()
    again = _quiet(run_var_eval, str(tmp_path / "ve"), VarEvalConfig(**{**cfg.__dict__, "compile": False}),
                   adapter=organism)
    assert asked == [] and len(pd.read_csv(again.path / "var_answers.csv")) == n_rows  # resumed, nothing redone
