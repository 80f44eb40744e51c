"""The findings rule: how a measured number becomes a sentence a reviewer would sign.

Every line of a report's findings goes through these functions, so the rules live in one place:

- an effect is stated as an effect only when its 95% CI excludes the null (0 for a difference,
  1 for a ratio); otherwise the line says "no detectable effect (95% CI a to b)";
- a share of another (reference) effect is printed only when the reference's CI excludes 0;
- nothing is named "top" when every value is 0 or the largest value is tied;
- answers that cannot be parsed are counted apart ("32 of 32 answers unparseable");
- a parameter chosen on a validation grid says when the grid tied, and what was taken then;
- a condition with nothing to act on (0 tokens) says so instead of reporting an effect;
- every finding carries its n (the samples or questions behind the number).

Pure functions on numbers; no model, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Estimate", "Finding", "EFFECT", "NO_EFFECT", "NOTHING_TO_TEST", "MEASURED", "NO_CI", "num", "ci_text",
           "has_ci", "ci_excludes", "effect_status", "effect_clause", "share_clause", "unique_top", "overlapping_top",
           "top_clause",
           "unparseable_clause", "grid_choice_clause", "nothing_to_act_on", "nothing_clause", "n_clause",
           "finding_line", "findings_section", "RULE_NOTE",
           "EXACT_TEST_LEVEL", "exact_test_clause", "EXACT_TEST_NOTE"]

# status of a finding (findings.csv column `status`)
EFFECT = "effect"  # the CI excludes the null: stated as an effect
NO_EFFECT = "no detectable effect"  # the CI includes the null
NOTHING_TO_TEST = "nothing to test"  # nothing to act on (0 tokens, no sinks, every answer unparseable)
MEASURED = "measured"  # a descriptive quantity (a count, a share), not a comparison
NO_CI = "no CI"  # an effect without a confidence interval (fewer than two samples): not stated


@dataclass(frozen=True)
class Estimate:
    """A number, its 95% CI (NaN when there is none) and n, the samples behind it (None: unknown)."""

    value: float
    ci_low: float = math.nan
    ci_high: float = math.nan
    n: int | None = None


@dataclass
class Finding:
    """One line of a report's findings: a number, its 95% CI, its n, what it means, and its status."""

    step: str
    name: str
    value: float
    ci_low: float = math.nan
    ci_high: float = math.nan
    sentence: str = ""
    n: int | None = None
    status: str = MEASURED


# ----------------------------------------------------------------------------- formatting


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def num(x, digits: int = 3) -> str:
    """x with `digits` significant digits; 'n/a' for None or NaN; never '-0'."""
    if not _finite(x):
        return "n/a"
    text = f"{float(x):.{digits}g}"
    return "0" if float(text) == 0 else text


def ci_text(low, high) -> str:
    """'95% CI a to b', or 'no CI' when either bound is missing."""
    return f"95% CI {num(low)} to {num(high)}" if has_ci(low, high) else "no CI"


def n_clause(n, unit: str = "samples") -> str:
    """'n = 32 samples' ('n unknown' for None)."""
    return f"n = {int(n)} {unit}" if _finite(n) else "n unknown"


# ----------------------------------------------------------------------------- the rule


def has_ci(low, high) -> bool:
    """Both bounds of the CI are finite numbers."""
    return _finite(low) and _finite(high)


def ci_excludes(low, high, null: float = 0.0) -> bool:
    """The CI lies entirely above or entirely below `null` (a CI of exactly [null, null] does not)."""
    return has_ci(low, high) and (float(low) > null or float(high) < null)


def effect_status(est: Estimate, null: float = 0.0) -> str:
    """EFFECT when the CI excludes `null`, NO_EFFECT when it includes it, NO_CI when there is none."""
    if not has_ci(est.ci_low, est.ci_high):
        return NO_CI
    return EFFECT if ci_excludes(est.ci_low, est.ci_high, null) else NO_EFFECT


def effect_clause(est: Estimate, above: str, below: str, null: float = 0.0) -> tuple[str, str]:
    """(status, clause) for an effect measured against `null` (0 for a difference, 1 for a ratio).

    above / below: what the effect means when the CI lies above / below the null, e.g.
    "the sinks matter more". Returns e.g. (EFFECT, "the sinks matter more (0.139, 95% CI 0.05 to 0.25)"),
    (NO_EFFECT, "no detectable effect (95% CI -0.25 to 0.28)") or (NO_CI, "no CI (n = 1): no effect can be stated").
    """
    status = effect_status(est, null)
    if status == NO_CI:
        return status, f"no CI ({n_clause(est.n)}): no effect can be stated"
    if status == NO_EFFECT:
        return status, f"no detectable effect ({ci_text(est.ci_low, est.ci_high)})"
    meaning = above if float(est.ci_low) > null else below
    return status, f"{meaning} ({num(est.value)}, {ci_text(est.ci_low, est.ci_high)})"


EXACT_TEST_LEVEL = 0.05  # the exact test's p below which a paired yes/no change whose CI excludes 0 is stated


def exact_test_clause(est: Estimate, p_value: float, tested: str, above: str, below: str) -> tuple[str, str]:
    """`effect_clause` for a paired change of a yes/no outcome (accuracy against a baseline), stated only where an
    exact test on the same pairs (McNemar's: `p_value`, on `tested`, e.g. "the 4 changed answers") also rejects no
    change. With a handful of changed answers a percentile bootstrap can exclude 0 where the exact test does not
    (4 of 12 pairs broken, none fixed: CI below 0, McNemar p = 0.125); such a change is not stated."""
    status, clause = effect_clause(est, above, below)
    if status == EFFECT and not p_value < EXACT_TEST_LEVEL:
        return NO_EFFECT, (f"no detectable effect (the bootstrap {ci_text(est.ci_low, est.ci_high)} excludes 0, "
                           f"but McNemar's exact test on {tested} does not reject no change)")
    return status, clause


def share_clause(part: float, reference: Estimate, reference_name: str) -> str:
    """'87% of <reference_name>' when the reference effect's CI excludes 0, else '' (no share of noise)."""
    if not _finite(part) or not ci_excludes(reference.ci_low, reference.ci_high) or not reference.value:
        return ""
    return f"{num(100 * float(part) / float(reference.value))}% of {reference_name}"


def unique_top(values: Sequence[float]) -> int | None:
    """Position of the single largest finite value; None when there is none, all are equal, or the largest is tied."""
    x = np.asarray(values, dtype=float)
    finite = np.isfinite(x)
    if not finite.any():
        return None
    best = x[finite].max()
    at_best = np.flatnonzero(finite & (x == best))
    return int(at_best[0]) if len(at_best) == 1 else None


def overlapping_top(values: Sequence[float], ci_low: Sequence[float], ci_high: Sequence[float]) -> list[int]:
    """Positions of the others whose 95% CI overlaps the unique top's (its lower bound at or below their upper
    bound): the top is not resolved from them. [] when there is no unique top or no CI overlaps it."""
    top = unique_top(values)
    if top is None:
        return []
    low, high = np.asarray(ci_low, dtype=float), np.asarray(ci_high, dtype=float)
    if not np.isfinite(low[top]):
        return []
    order = np.argsort(-np.nan_to_num(np.asarray(values, dtype=float), nan=-np.inf), kind="stable")
    return [int(i) for i in order if i != top and np.isfinite(high[i]) and high[i] >= low[top]]


def top_clause(values: Sequence[float], labels: Sequence[str], what: str, ci_low: Sequence[float] | None = None,
               ci_high: Sequence[float] | None = None, shown: int = 3) -> tuple[int | None, str]:
    """(position of the top, sentence): names the top only when it is unique (see `unique_top`); with CIs, says
    when the top's 95% CI overlaps others' (see `overlapping_top`), naming up to `shown` of them.

    values, ci_low, ci_high: [k] scores and their CIs; labels: [k] names of what is scored; what: the noun of the score.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    top = unique_top(values)
    if top is not None:
        close = overlapping_top(values, ci_low, ci_high) if ci_low is not None and ci_high is not None else []
        if not close:
            return top, f"{labels[top]} has the largest {what}"
        names = ", ".join(labels[i] for i in close[:shown]) + (f" and {len(close) - shown} more" if len(close) > shown
                                                                 else "")
        return top, (f"{labels[top]} has the largest {what} ({num(values[top])}), but its {ci_text(ci_low[top], ci_high[top])} "
                     f"overlaps the CIs of {len(close)} other(s) ({names}): which of them is largest is not resolved")
    if len(x) == 0:
        return None, f"no {what} to rank"
    if np.all(x == x[0]):
        return None, f"all {len(x)} score {num(x[0])} in {what}: none is singled out"
    n_tied = int(np.sum(x == x.max()))
    return None, f"{n_tied} of {len(x)} tie at the largest {what} ({num(x.max())}): none is singled out"


def unparseable_clause(n_unparseable, n, noun: str = "answers") -> str:
    """'32 of 32 answers unparseable' or 'all 32 answers parsed'."""
    if not _finite(n_unparseable) or int(n_unparseable) == 0:
        return f"all {int(n)} {noun} parsed" if _finite(n) else f"{noun}: parse count unknown"
    return f"{int(n_unparseable)} of {int(n)} {noun} unparseable"


def grid_choice_clause(scores: Sequence[float], chosen: str, metric: str, tie_rule: str) -> tuple[bool, str]:
    """(tied, sentence) for a parameter chosen as the best validation score over a grid.

    scores: [k] validation `metric` of every grid point; chosen: e.g. "p = 0.6, rho = 0.5"; tie_rule: how a
    tie is broken, e.g. "nearest the paper's p = 0.6, rho = 0.5". tied: the best score is shared.
    """
    x = np.asarray(scores, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return False, f"{chosen}: no validation scores, nothing was chosen on validation"
    if len(x) == 1:
        return False, f"{chosen}: a single grid point, nothing to choose"
    best = x.max()
    n_best = int(np.sum(np.isclose(x, best, rtol=0, atol=1e-12)))
    if n_best == len(x):
        return True, (f"{chosen}: every one of the {len(x)} grid points ties at validation {metric} {num(best)}, so "
                      f"validation chose nothing; {chosen} was taken by the tie rule ({tie_rule})")
    if n_best > 1:
        return True, (f"{chosen}: {n_best} of {len(x)} grid points tie for the best validation {metric} {num(best)}; "
                      f"{chosen} was taken among them by the tie rule ({tie_rule})")
    runner_up = np.sort(x)[-2]
    return False, (f"{chosen}, chosen on validation: best {metric} {num(best)} of {len(x)} grid points "
                   f"(next {num(runner_up)})")


def nothing_to_act_on(n_tokens) -> bool:
    """True when a condition had nothing to act on: 0 tokens (or no count at all)."""
    return not _finite(n_tokens) or float(n_tokens) <= 0


def nothing_clause(action: str, what: str = "tokens") -> str:
    """'0 tokens to knock out: nothing to act on, so no effect is reported'."""
    return f"0 {what} to {action}: nothing to act on, so no effect is reported"


# ----------------------------------------------------------------------------- markdown


RULE_NOTE = ("An effect is stated only where its 95% CI excludes no effect; shares of another effect only where that "
             "effect's CI excludes 0; nothing is named top among ties or zeros; n is the number of samples (images or "
             "questions) behind each line.")


EXACT_TEST_NOTE = (f"A change in accuracy against a baseline is stated only where McNemar's exact test on the same "
                   f"pairs agrees (p < {EXACT_TEST_LEVEL:g}).")


def finding_line(f: Finding, with_step: bool = True) -> str:
    """One markdown bullet: the value and CI in bold where the finding is a measurement; for an effect or its
    absence the sentence itself carries the numbers (an undetectable effect's point value is not shown).

    with_step: lead with the step's name (the report's index.md); a step's own page leaves it out.
    """
    lead = ""
    if f.status not in (EFFECT, NO_EFFECT) and _finite(f.value):
        ci = f" ({ci_text(f.ci_low, f.ci_high)})" if has_ci(f.ci_low, f.ci_high) else ""
        lead = f" **{num(f.value)}**{ci}."
    n = f" (n = {int(f.n)})" if _finite(f.n) else ""
    where = f"*{f.step}*, " if with_step else ""
    return f"- {where}{f.name}:{lead} {f.sentence}{n}"


def findings_section(findings: Sequence[Finding], with_step: bool = False, heading: str = "## Findings") -> list[str]:
    """Markdown lines: the heading, the rule in one sentence, one bullet per finding (or a line saying there is none)."""
    lines = [f"{heading}\n", RULE_NOTE + "\n"]
    lines += [finding_line(f, with_step) for f in findings] or ["No findings: the step's tables hold nothing to read."]
    return lines + [""]
