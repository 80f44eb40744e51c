"""The paper's questions, answered yes / no / not testable here from a report's numbers.

One function per question of Kang et al. (2025), each taking the estimates a report measured
(`findings.Estimate`: value, 95% CI, n) and returning an `Answer` with the number behind it. The
answers follow the findings rule (`sinkscope.findings`): a comparison says yes or no only through
its CI; a question whose premise is missing (no visual sinks to knock out, no answers to score,
a step not run) is "not testable here", with the reason. Pure functions; no model, no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sinkscope.findings import (EFFECT, NO_CI, Estimate, ci_excludes, ci_text, effect_status, n_clause,
                                nothing_to_act_on, num, share_clause, unparseable_clause)

__all__ = ["YES", "NO", "NOT_TESTABLE", "QUESTIONS", "Answer", "not_run", "sink_dims_answer", "visual_sinks_answer",
           "attention_answer", "knockout_answer", "var_answer", "patching_answer", "summary_markdown"]

YES, NO, NOT_TESTABLE = "yes", "no", "not testable here"

QUESTIONS = {
    "sink_dims": "Are there sink dimensions (massive activations of the first token)?",
    "visual_sinks": "Are there visual sinks (image tokens with a sink score >= tau)?",
    "attention": "Do visual sinks draw attention (more than other image tokens)?",
    "knockout": "Does knocking them out matter more than knocking out as many random image tokens?",
    "var": "Does VAR help (POPE accuracy against the unmodified model)?",
    "patching": "Do visual sinks carry the answer (patched in from an image with the other answer)?",
}


@dataclass(frozen=True)
class Answer:
    """One row of the findings summary. key: a QUESTIONS key; answer: YES | NO | NOT_TESTABLE."""

    key: str
    answer: str
    evidence: str
    step: str
    n: int | None = None

    @property
    def question(self) -> str:
        return QUESTIONS[self.key]


def not_run(key: str, step: str) -> Answer:
    """The answer when the step that measures `key` is not part of this report."""
    return Answer(key, NOT_TESTABLE, f"the `{step}` step was not run in this report", step)


def _with_n(text: str, n, unit: str = "samples") -> str:
    return f"{text}; {n_clause(n, unit)}"


def sink_dims_answer(dims: Sequence[int] | None, method: str, n_samples) -> Answer:
    """dims: the sink dims the scan found ([] none, None: the scan could not tell)."""
    if dims is None:
        return Answer("sink_dims", NOT_TESTABLE, "the scan wrote no sink dims", "scan", n_samples)
    if not dims:
        return Answer("sink_dims", NO, _with_n(f"no dimension found ({method})", n_samples), "scan", n_samples)
    return Answer("sink_dims", YES, _with_n(f"{len(dims)} dim(s) {list(dims)} ({method})", n_samples), "scan", n_samples)


def visual_sinks_answer(per_image: Estimate | None, tau: str) -> Answer:
    """per_image: visual sinks per image in the busiest layer (mean over images); None: no image tokens."""
    if per_image is None:
        return Answer("visual_sinks", NOT_TESTABLE, "the data hold no image tokens", "scan")
    text = _with_n(f"{num(per_image.value)} per image in the busiest layer ({ci_text(per_image.ci_low, per_image.ci_high)}), "
                   f"tau {tau}", per_image.n, "images")
    return Answer("visual_sinks", YES if per_image.value > 0 else NO, text, "scan", per_image.n)


def attention_answer(has_visual_sinks: bool, ratio: Estimate | None) -> Answer:
    """ratio: attention received by visual sinks over non-sink image tokens (null 1); None: not measured."""
    if not has_visual_sinks:
        return Answer("attention", NOT_TESTABLE, "no visual sinks, so none to draw attention", "contributions")
    if ratio is None or effect_status(ratio, 1.0) == NO_CI:
        return Answer("attention", NOT_TESTABLE, "no sink / non-sink attention ratio with a CI was measured",
                      "contributions", None if ratio is None else ratio.n)
    text = _with_n(f"sinks receive {num(ratio.value)}x the attention of other image tokens "
                   f"({ci_text(ratio.ci_low, ratio.ci_high)})", ratio.n)
    answer = YES if ci_excludes(ratio.ci_low, ratio.ci_high, 1.0) and ratio.ci_low > 1.0 else NO
    if effect_status(ratio, 1.0) != EFFECT:
        text += "; no detectable difference from 1x"
    return Answer("attention", answer, text, "contributions", ratio.n)


def knockout_answer(n_sink_tokens, contrast: Estimate | None, control: str, tau: str, p_value=None) -> Answer:
    """contrast: mean |logit change| knocking out visual sinks minus knocking out as many `control` tokens.

    n_sink_tokens: visual sinks knocked out per sample at that tau (0: nothing to knock out); p_value: the
    paired test of the same contrast, shown beside the CI (the answer follows the CI).
    """
    if nothing_to_act_on(n_sink_tokens):
        return Answer("knockout", NOT_TESTABLE, f"0 visual sinks to knock out at tau {tau}", "ablate")
    if contrast is None or effect_status(contrast) == NO_CI:
        return Answer("knockout", NOT_TESTABLE, f"no sinks-vs-{control} contrast with a CI", "ablate",
                      None if contrast is None else contrast.n)
    status = effect_status(contrast)
    direction = ("more" if contrast.ci_low > 0 else "less") if status == EFFECT else "no detectable difference"
    text = _with_n(f"|logit change| sinks minus {control}: {num(contrast.value)} "
                   f"({ci_text(contrast.ci_low, contrast.ci_high)}; {direction}), "
                   f"{num(n_sink_tokens)} sinks per sample at tau {tau}"
                   + (f", Wilcoxon p = {num(p_value, 2)}" if p_value is not None else ""), contrast.n)
    return Answer("knockout", YES if status == EFFECT and contrast.ci_low > 0 else NO, text, "ablate", contrast.n)


def var_answer(change: Estimate | None, n_unparseable, n_questions, sink_dims: Sequence[int] | None,
               baseline_note: str = "", baseline_accuracy: float | None = None,
               baseline_yes_ratio: float | None = None) -> Answer:
    """change: accuracy of VAR minus the baseline on the question pairs where both answers parsed.

    n_unparseable: VAR's unparseable answers of n_questions; sink_dims: VAR's calibrated dims ([]: none,
    so VAR changes nothing). baseline_note: e.g. "baseline yes-ratio 0, F1 0", added to the evidence;
    baseline_accuracy 1: every question already right, so there is nothing VAR could improve.
    baseline_yes_ratio 0 or 1: the baseline gives one answer to every question (it does not discriminate); a
    change that is not detectable then says nothing about VAR, so the question is not testable (a detectable
    change is still reported).
    """
    tail = f"; {baseline_note}" if baseline_note else ""
    if sink_dims is not None and not sink_dims:
        return Answer("var", NOT_TESTABLE, "calibration found no sink dims: VAR has nothing to redistribute" + tail,
                      "var_eval")
    if baseline_accuracy is not None and baseline_accuracy >= 1.0:
        return Answer("var", NOT_TESTABLE, f"the baseline answers all {int(n_questions)} questions right: no room to "
                      "help" + tail, "var_eval", n_questions)
    if change is None or not change.n:
        return Answer("var", NOT_TESTABLE, f"{unparseable_clause(n_unparseable, n_questions)}: no parsed pairs to "
                      "compare" + tail, "var_eval", 0)
    status = effect_status(change)
    if status == NO_CI:
        return Answer("var", NOT_TESTABLE, _with_n("fewer than two parsed pairs: no CI", change.n, "parsed pairs"),
                      "var_eval", change.n)
    if status != EFFECT and baseline_yes_ratio is not None and baseline_yes_ratio in (0.0, 1.0):
        one = "no" if baseline_yes_ratio == 0.0 else "yes"
        return Answer("var", NOT_TESTABLE, f"the baseline answers {one} to every question, so its accuracy is the "
                      f"share of '{one}' questions whatever it sees; VAR's accuracy change {num(change.value)} "
                      f"({ci_text(change.ci_low, change.ci_high)}, {n_clause(change.n, 'parsed pairs')}) cannot "
                      "show whether VAR helps" + tail, "var_eval", change.n)
    direction = ("better" if change.ci_low > 0 else "worse") if status == EFFECT else "no detectable change"
    text = (f"accuracy change {num(change.value)} ({ci_text(change.ci_low, change.ci_high)}; {direction}); "
            f"{n_clause(change.n, 'parsed pairs')}, {unparseable_clause(n_unparseable, n_questions, 'VAR answers')}"
            + tail)
    return Answer("var", YES if status == EFFECT and change.ci_low > 0 else NO, text, "var_eval", change.n)


def patching_answer(n_sink_tokens, effect: Estimate | None, whole_swap: Estimate | None) -> Answer:
    """effect: change of the correct answer's logit difference when the visual sinks' states come from an image
    with the other answer (negative: they carry it); whole_swap: the same change for the whole other image.

    n_sink_tokens: visual sinks patched per sample (0: nothing to patch).
    """
    if nothing_to_act_on(n_sink_tokens):
        return Answer("patching", NOT_TESTABLE, "0 visual sinks to patch", "patching")
    if whole_swap is None or not ci_excludes(whole_swap.ci_low, whole_swap.ci_high):
        ci = "no CI" if whole_swap is None else ci_text(whole_swap.ci_low, whole_swap.ci_high)
        return Answer("patching", NOT_TESTABLE, "swapping the whole image moves the answer by no detectable amount "
                      f"({ci}): there is no answer to carry", "patching", None if whole_swap is None else whole_swap.n)
    if effect is None or effect_status(effect) == NO_CI:
        return Answer("patching", NOT_TESTABLE, "no patching effect with a CI", "patching")
    status = effect_status(effect)
    share = share_clause(effect.value, whole_swap, "the whole-image swap")
    text = (f"logit-difference change {num(effect.value)} ({ci_text(effect.ci_low, effect.ci_high)}"
            + (f"; {share}" if status == EFFECT and share else "") + f"), whole-image swap {num(whole_swap.value)} "
            f"({ci_text(whole_swap.ci_low, whole_swap.ci_high)})")
    if status != EFFECT:
        text += "; no detectable effect of the sinks"
    carries = status == EFFECT and effect.ci_high < 0
    return Answer("patching", YES if carries else NO, _with_n(text, effect.n, "questions"), "patching", effect.n)


def summary_markdown(answers: Sequence[Answer]) -> str:
    """The findings summary: one markdown table row per question (question, answer, the number behind it)."""
    lines = ["| question | answer | the number behind it (95% CI, n) | step |", "|---|---|---|---|"]
    for a in answers:
        evidence = a.evidence.replace("|", "\\|")
        lines.append(f"| {a.question} | **{a.answer}** | {evidence} | {a.step} |")
    return "\n".join(lines) + "\n"
