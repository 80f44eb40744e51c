"""Run a benchmark of this folder's later commits against the package as it was at abbb0dd (the session's start).

    git worktree add /tmp/at_abbb0dd abbb0dd
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/cpu-2026-12-07/run_at_abbb0dd.py /tmp/at_abbb0dd \
        benchmarks/scan_tables.py        # or benchmarks/host_bound_scan.py

At abbb0dd, `run_scan` computed each batch's image-token ranks, background marks and summaries in its loop body
after `ScanReducer.end()`; that loop body stands in here for `batch_tables`, and the run folder writes with
pandas only (the commit had no `arrow_csv`).
"""

import runpy
import sys
from pathlib import Path

old_tree, script = sys.argv[1], sys.argv[2]
sys.path.insert(0, old_tree)
sys.path.insert(1, str(Path(script).resolve().parent))

import pandas as pd  # noqa: E402

import sinkscope.runfolder as runfolder  # noqa: E402
from sinkscope.analyses import scan  # noqa: E402

assert scan.__file__.startswith(str(Path(old_tree).resolve())), scan.__file__


def batch_tables(reducer, detail):
    tokens = pd.concat(reducer.token_rows, ignore_index=True)
    tokens["visual_rank"] = tokens.groupby(["sample", "layer", "image_index"]).cumcount()
    tokens.loc[tokens["token_kind"] != "visual", "visual_rank"] = -1
    tokens = scan._background_column(tokens, reducer.samples)
    return {"massive_activations": pd.concat(reducer.massive_rows, ignore_index=True),
            "layer_magnitudes_per_sample": pd.concat(reducer.magnitude_rows, ignore_index=True),
            "token_summary_per_sample": scan.token_counts(tokens),
            "token_stats": tokens if detail == "all" else scan._sinks_and_top_visual(tokens),
            "sink_tokens": tokens[tokens["is_sink"]][["sample", "layer", "position", "token_kind", "role", "token",
                                                      "phi"]],
            "role_phi_per_sample": scan.role_phi(tokens),
            "head_scores_per_sample": pd.concat(reducer.head_rows, ignore_index=True)}


scan.batch_tables = batch_tables
runfolder.arrow_csv = lambda frame, header: None
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
