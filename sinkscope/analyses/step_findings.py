"""What the analyses' `findings(folder)` readers share: a step's run.json and the mean with its bootstrap CI.

Each analysis module reads its own findings from the tables its run folder holds (`findings(folder) ->
list[Finding]`); the report lists them, and the step's own index.md shows the same ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from sinkscope.eval import stats


def run_meta(folder: Path) -> dict:
    """A step's run.json ({} when missing or unreadable)."""
    try:
        return json.loads((Path(folder) / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def bootstrap_mean_ci(values, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap CI (`eval.stats.bootstrap_ci`, 2000 resamples) of the finite values;
    a single value (or a constant sample) gives the value as both bounds, none gives NaN."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if len(x) < 2 or np.all(x == x[0]):
        return float(x.mean()), float(x.mean()), float(x.mean())
    low, high = stats.bootstrap_ci(x, np.mean, n_boot=2000, level=0.95, seed=seed)
    return float(x.mean()), low, high
