"""Statistics shared by the analyses: bootstrap CIs and paired tests against a baseline.

Small API, every function pure (numpy in, numbers out):

    lo, hi = bootstrap_ci(values)                             # CI of a mean, [n] floats
    lo, hi = bootstrap_ci(x, statistic=np.median)             # any statistic of one sample
    lo, hi = bootstrap_metric_ci(n, lambda idx: f1(idx))      # any statistic of resampled indices
    lo, hi = paired_diff_ci(x, y)                             # CI of mean(x - y), paired
    res = mcnemar_exact(correct_a, correct_b)                 # paired binary outcomes
    res = mcnemar_exact(a, b, keep=parsed_a & parsed_b)       # only the pairs where both answers parsed
    p = paired_test(x, y, method="wilcoxon")                  # paired continuous outcomes

CIs are 95% percentile bootstrap intervals (scipy.stats.bootstrap) over samples unless `level`
says otherwise; they are (nan, nan) when fewer than two samples exist or the statistic is
undefined. p-values are two-sided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "bootstrap_metric_ci", "paired_diff_ci", "McNemar", "mcnemar_exact", "paired_test"]


def _bootstrap(data: tuple, statistic, n_boot: int, level: float, seed: int, paired: bool = False) -> tuple[float, float]:
    from scipy import stats

    if len(data[0]) < 2:
        return math.nan, math.nan
    try:
        res = stats.bootstrap(data, statistic, n_resamples=n_boot, vectorized=False, paired=paired,
                              confidence_level=level, method="percentile",
                              random_state=np.random.default_rng(seed))
    except (ValueError, FloatingPointError, ZeroDivisionError):
        return math.nan, math.nan
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return lo, hi


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` of one sample.

    values: [n] numbers (NaN entries are dropped). A constant sample gives (value, value).
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) >= 2 and np.all(x == x[0]):
        v = float(statistic(x))
        return v, v
    return _bootstrap((x,), lambda a: float(statistic(a)), n_boot, level, seed)


def bootstrap_metric_ci(n: int, statistic: Callable[[np.ndarray], float], n_boot: int = 1000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of a metric computed on resampled sample indices.

    statistic(idx) gets an int array [n] of sample indices drawn with replacement and returns a
    float: use it for metrics that are not means of per-sample values (F1, precision, CHAIR_i).
    """
    if n < 2:
        return math.nan, math.nan
    return _bootstrap((np.arange(n),), lambda idx: float(statistic(np.asarray(idx, dtype=int))), n_boot, level, seed)


def paired_diff_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 1000, level: float = 0.95,
                   seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(x - y) for paired samples x, y: [n] each."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal shapes, got {x.shape} and {y.shape}")
    return bootstrap_ci(x - y, np.mean, n_boot, level, seed)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test. only_a: pairs where only A is correct; only_b: only B; p_value two-sided (NaN when
    no pair was tested); n_pairs: pairs tested; n_excluded: pairs left out (e.g. an answer unparseable)."""

    only_a: int
    only_b: int
    p_value: float
    n_pairs: int = 0
    n_excluded: int = 0


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool], keep: Sequence[bool] | None = None) -> McNemar:
    """McNemar's exact test on paired binary outcomes (e.g. correctness of VAR vs baseline per sample).

    correct_a, correct_b: [n] bool; keep: [n] bool, the pairs to test (None: all). Pairs not kept, such as
    questions where either answer could not be parsed, are left out of the test and counted in n_excluded:
    an unparseable answer is neither right nor wrong about the image, so it must not count as a discordant pair.
    Under H0 each discordant pair is equally likely either way: p = binomtest(only_a, only_a + only_b, 0.5),
    two-sided. No discordant pair: p = 1; no pair kept: p = NaN (nothing was tested).
    """
    from scipy import stats

    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need equal shapes, got {a.shape} and {b.shape}")
    mask = np.ones(a.shape, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    if mask.shape != a.shape:
        raise ValueError(f"keep needs the outcomes' shape {a.shape}, got {mask.shape}")
    a, b = a[mask], b[mask]
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    if not len(a):
        p = math.nan
    else:
        p = float(stats.binomtest(only_a, n, 0.5).pvalue) if n else 1.0
    return McNemar(only_a, only_b, p, int(len(a)), int(np.sum(~mask)))


PAIRED_METHODS = ("wilcoxon", "t", "sign")


def paired_test(x: Sequence[float], y: Sequence[float], method: str = "wilcoxon") -> float:
    """Two-sided p-value that paired continuous samples x, y ([n] each) have the same location.

    method: "wilcoxon" (signed-rank on x - y, zero differences dropped), "t" (paired t-test) or
    "sign" (binomial test on the signs of nonzero differences). All differences zero: p = 1;
    fewer than two pairs: nan.
    """
    from scipy import stats

    if method not in PAIRED_METHODS:
        raise ValueError(f"method must be one of {PAIRED_METHODS}, got {method!r}")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal shapes, got {x.shape} and {y.shape}")
    d = x - y
    d = d[~np.isnan(d)]
    if len(d) < 2:
        return math.nan
    if np.all(d == 0):
        return 1.0
    if method == "wilcoxon":
        return float(stats.wilcoxon(d).pvalue)
    if method == "t":
        return float(stats.ttest_1samp(d, 0.0).pvalue)
    nz = d[d != 0]
    return float(stats.binomtest(int(np.sum(nz > 0)), len(nz), 0.5).pvalue)
