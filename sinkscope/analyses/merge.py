"""`sinkscope merge`: one run folder from the shards of a sharded run (`--shard i/n`).

Shard i of n holds the samples whose index in the data is i modulo n, each calibrated on the same
first samples of the whole data, so the shards share sink dims and tau. Merging concatenates the
per-sample tables in the data's order (sample k is the (k // n)-th sample shard k % n finished) and
recomputes every summary, figure and index.md from them, as the unsharded run does at its end.

    merge_runs(["runs/scan-0", "runs/scan-1"], "runs/scan")

Only scan runs merge for now.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.runconfig import parse_shard
from sinkscope.runfolder import RunFolder

SCAN_TABLES = ("massive_activations", "layer_magnitudes_per_sample", "token_summary_per_sample", "token_stats",
               "sink_tokens", "role_phi_per_sample", "head_scores_per_sample")


def _read_run(path: Path) -> dict:
    run = path / "run.json"
    if not run.exists():
        raise SinkscopeError(f"{path} is not a run folder (no run.json)")
    meta = json.loads(run.read_text())
    if not meta.get("finished"):
        raise SinkscopeError(f"{path}: this shard has not finished; resume it (run its command again) before merging")
    return meta


def _sample_order(folders: list[Path], metas: list[dict]) -> dict[str, int]:
    """sample id -> index in the data, from each shard's (i, n) and the order it finished its samples."""
    order: dict[str, int] = {}
    for folder, meta in zip(folders, metas):
        i, n = parse_shard(meta["params"].get("shard"), {}) or (0, 1)
        done = [s for s in (folder / "samples_done.txt").read_text().split("\n") if s] \
            if (folder / "samples_done.txt").exists() else []
        for rank, sid in enumerate(done):
            order[sid] = i + rank * n
    return order


def merge_runs(folders: list[str | Path], out: str | Path, figures: bool = True, log=print) -> RunFolder:
    """Merge finished scan shards into `out`; the shards must be one run's i/n shards covering 0..n-1."""
    from sinkscope.analyses.scan import summarize
    from sinkscope.measures import massive, sinks

    paths = [Path(f) for f in folders]
    if not paths:
        raise SinkscopeError("give the shard folders to merge")
    metas = [_read_run(p) for p in paths]
    kinds = {m.get("analysis") for m in metas}
    if kinds != {"scan"}:
        raise SinkscopeError(f"only scan runs merge for now; got {sorted(map(str, kinds))}")
    shards = [parse_shard(m["params"].get("shard"), {}) or (0, 1) for m in metas]
    n = shards[0][1]
    if sorted(shards) != [(i, n) for i in range(n)]:
        raise SinkscopeError(f"the folders hold shards {sorted(f'{i}/{k}' for i, k in shards)}: give each of "
                             f"0/{n}..{n - 1}/{n} once")
    same = [{k: v for k, v in m["params"].items() if k != "shard"} for m in metas]
    if any(p != same[0] for p in same[1:]):
        raise SinkscopeError("the shards were run with different settings (other than --shard); they are not one run")
    dims_text = {(p / "sink_dims.json").read_text() for p in paths}
    if len(dims_text) != 1 or len({json.dumps(m.get("tau"), sort_keys=True) for m in metas}) != 1:
        raise SinkscopeError("the shards found different sink dims or tau: they did not calibrate on the same samples")
    order = _sample_order(paths, metas)
    folder = RunFolder(out, "scan", {**same[0], "shard": None}, resume=False)
    dims_json = dims_text.pop()
    folder.write_text("sink_dims.json", dims_json)
    for table in SCAN_TABLES:
        frames = [pd.read_csv(p / f"{table}.csv", dtype={"sample": str}) for p in paths if (p / f"{table}.csv").exists()]
        if not frames:
            continue
        merged = pd.concat(frames, ignore_index=True)
        rank = merged["sample"].map(order)
        merged = merged.iloc[rank.argsort(kind="stable")].reset_index(drop=True)
        folder.append_rows(table, merged)
    first = paths[shards.index((0, n))]
    if (first / "dim_profile.csv").exists():  # the profile of the data's first sample, as the unsharded run keeps
        folder.write_table("dim_profile", pd.read_csv(first / "dim_profile.csv"))
    folder.mark_done(sorted(order, key=order.get))
    base = metas[shards.index((0, n))]
    skipped = [s for m in metas for s in m.get("skipped", [])]
    folder.update_meta(**{k: base[k] for k in ("model", "planted", "tau", "sink_dims", "token_stats") if k in base},
                       n_samples=len(order), skipped=skipped, merged_from=[str(p) for p in paths])
    dims = massive.SinkDims.from_json(dims_json)
    tau = sinks.SinkThreshold(**base["tau"])
    model = SimpleNamespace(**{**base.get("model", {}), "hidden_size": base.get("model", {}).get("hidden_size")})
    summarize(folder, dims, tau, model, figures=figures)
    folder.finish()
    log(f"merged {len(paths)} shards ({len(order)} samples) into {folder.path}")
    return folder
