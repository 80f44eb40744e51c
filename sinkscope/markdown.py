"""Markdown building blocks of the run folders' pages: tables, the planted-model banner, the skipped samples.

(The pages themselves are written by each analysis; `sinkscope.analyses.pages` holds the shared ones.)
"""

from __future__ import annotations

import math

import pandas as pd

from sinkscope.findings import num

PLANTED_BANNER = (
    "> **PLANTED MECHANISM.** `organism` is the demo model with a sink mechanism installed by "
    "hand-made weight edits (see its model card and `ground_truth.json`). What it shows was put "
    "there on purpose, to validate sinkscope against a known answer; it is not a finding about "
    "any trained model.\n"
)


def fmt_cell(x, digits: int = 3) -> str:
    """A table cell: floats to `digits` significant digits (never '-0'), NaN as 'n/a', '|' escaped."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return num(x, digits)
    return str(x).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame, digits: int = 3, max_rows: int = 40) -> str:
    if frame is None or frame.empty:
        return "_(empty)_\n"
    f = frame.head(max_rows)
    cols = list(f.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in f.iterrows():
        lines.append("| " + " | ".join(fmt_cell(row[c], digits) for c in cols) + " |")
    if len(frame) > max_rows:
        lines.append(f"\n_{len(frame) - max_rows} more rows in the CSV._")
    return "\n".join(lines) + "\n"


def skipped_section(skipped) -> list[str]:
    """index.md lines listing the samples left out of a run (unreadable or missing images), or none."""
    if not skipped:
        return []
    frame = pd.DataFrame(skipped, columns=["sample", "source", "reason"])
    return [f"## Skipped samples\n",
            f"{len(frame)} sample(s) of the data were left out; every other sample ran. Fix or remove them and "
            "run the same command again to add them (finished samples are kept).\n",
            markdown_table(frame, max_rows=50)]
