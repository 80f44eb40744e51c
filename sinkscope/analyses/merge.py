"""`sinkscope merge`: one run folder from the shards of a sharded run (`--shard i/n`).

Shard i of n holds the samples whose index in the data is i modulo n, each calibrated on the same
first samples of the whole data, so the shards share sink dims and tau. Merging concatenates the
per-sample tables in the data's order (sample k is the (k // n)-th sample shard k % n finished) and
recomputes every summary, figure and index.md from them, as the unsharded run does at its end.

    merge_runs(["runs/scan-0", "runs/scan-1"], "runs/scan")

Scan, ablate, var-eval, heads, contributions, location, vit-sinks, patch, remove and inject runs merge. var-eval
shards each ran the whole validation sweep (so each chose p and rho from the same answers); the merge keeps one copy
of it, after checking every shard's copy is the same. heads, contributions, location, vit-sinks, patch, remove and
inject merge by `BY_SAMPLE`: their per-sample tables concatenated, then the analysis' own summarize function on them.
Random controls (ablate's, patch's) and inject's token draws are drawn per sample, seeded by its index in the data;
remove's chosen means and onset layer and inject's injection layer come from the calibration samples, and inject's
control dims from the seed and the sink dims alone, the same in every shard (the merge checks they are).

A merged run equals the unsharded run table by table when both ran with --batch-size 1; with larger batches the
per-sample rows are the same samples' rows (sorted by sample where the unsharded run interleaves a batch's samples),
and padding in a batch can change a forward's last bits.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.launcher import parse_shard
from sinkscope.runfolder import PLACEMENT, RunFolder

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


def _summarize_heads(folder: RunFolder, params: dict, meta: dict, figures: bool) -> None:
    from sinkscope.analyses.heads import HeadsConfig, summarize_heads

    summarize_heads(folder, HeadsConfig(**params), float(meta["tau"]["value"]), list(meta.get("sink_dims") or []),
                    figures)


def _summarize_with(module: str, config: str, function: str):
    """summarize(folder, params, meta, figures) calling `module.function(folder, module.config(**params), figures)`."""
    def summarize(folder: RunFolder, params: dict, meta: dict, figures: bool) -> None:
        import importlib

        mod = importlib.import_module(f"sinkscope.analyses.{module}")
        getattr(mod, function)(folder, getattr(mod, config)(**params), figures)
    return summarize


def _summarize_remove(folder: RunFolder, params: dict, meta: dict, figures: bool) -> None:
    from sinkscope.analyses.remove import RemoveConfig, summarize_remove
    from sinkscope.interventions.sink_signature import SinkSignature

    sig = meta["signature"]
    summarize_remove(folder, RemoveConfig(**params), SinkSignature(tuple(sig["dims"]), int(sig["layer"]), sig["tau"],
                                                                   sig["score"]))


def _summarize_inject(folder: RunFolder, params: dict, meta: dict, figures: bool) -> None:
    from sinkscope.analyses.inject import InjectConfig, summarize_inject
    from sinkscope.interventions.sink_signature import SinkSignature

    sig = meta["signature"]
    summarize_inject(folder, InjectConfig(**params), SinkSignature(tuple(sig["dims"]), int(sig["layer"]), sig["tau"],
                                                                   sig["score"]), int(meta["model"]["layers"]), figures)


# analyses merged sample by sample: run.json's analysis -> (its per-sample tables, the summarize that recomputes the
# rest from them, the run.json fields besides the calibration's that every shard must share, those kept from shard 0)
BY_SAMPLE = {
    "heads": (("head_scores_per_sample", "token_attention", "attention_maps"), _summarize_heads, (), ()),
    "contributions": (("contributions_per_sample",),
                      _summarize_with("contributions", "ContributionsConfig", "summarize_contributions"), (), ()),
    "location": (("location_per_sample",), _summarize_with("location", "LocationConfig", "summarize_location"), (),
                 ()),
    "vit_sinks": (("vit_tokens",), _summarize_with("vit_sinks", "VitSinksConfig", "summarize_vit"), (), ()),
    "patching": (("patching_per_sample",), _summarize_with("patching", "PatchConfig", "summarize_patching"), (),
                 ("var_note",)),
    "remove": (("remove_per_sample", "remove_attention_per_sample"), _summarize_remove,
               ("signature", "edited_layers", "chosen_means"), ("plain_text_source",)),
    "inject": (("inject_per_sample", "inject_heads_per_sample", "inject_answers_per_sample", "inject_var_per_sample"),
               _summarize_inject, ("signature", "control_dims"), ("groups_note",)),
}

MERGEABLE = ("scan", "ablate", "var_eval", *BY_SAMPLE)


def _read_text_table(path: Path) -> pd.DataFrame:
    """A per-sample table with every cell kept as its text, so merged rows are the shards' rows byte for byte."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _concat_in_order(paths: list[Path], table: str, order: dict[str, int]) -> pd.DataFrame | None:
    frames = [_read_text_table(p / f"{table}.csv") for p in paths if (p / f"{table}.csv").exists()]
    if not frames:
        return None
    merged = pd.concat(frames, ignore_index=True)
    rank = merged["sample"].map(order)
    if rank.isna().any():
        raise SinkscopeError(f"{table}.csv of a shard has rows of samples its samples_done.txt does not list; "
                             "resume that shard (run its command again) before merging")
    return merged.iloc[rank.argsort(kind="stable")].reset_index(drop=True)


def merge_runs(folders: list[str | Path], out: str | Path, figures: bool = True, log=print) -> RunFolder:
    """Merge finished shards of one scan, ablate, var-eval, heads, contributions, location, vit-sinks, patch, remove or
    inject run into `out`; the shards must be one run's i/n shards covering 0..n-1."""
    paths = [Path(f) for f in folders]
    if not paths:
        raise SinkscopeError("give the shard folders to merge")
    metas = [_read_run(p) for p in paths]
    kinds = {m.get("analysis") for m in metas}
    if len(kinds) != 1 or not kinds <= set(MERGEABLE):
        raise SinkscopeError(f"merge takes the shards of one {', '.join(MERGEABLE).replace('_', '-')} run; got "
                             f"{sorted(map(str, kinds))}")
    kind = kinds.pop()
    shards = [parse_shard(m["params"].get("shard"), {}) or (0, 1) for m in metas]
    n = shards[0][1]
    if sorted(shards) != [(i, n) for i in range(n)]:
        raise SinkscopeError(f"the folders hold shards {sorted(f'{i}/{k}' for i, k in shards)}: give each of "
                             f"0/{n}..{n - 1}/{n} once")
    same = [{k: v for k, v in m["params"].items() if k != "shard"} for m in metas]
    settings = [{k: v for k, v in p.items() if k not in PLACEMENT} for p in same]  # the shards may spread the model
    if any(p != settings[0] for p in settings[1:]):  # over devices differently (the first folder's map is kept)
        raise SinkscopeError("the shards were run with different settings (other than --shard); they are not one run")
    fingerprints = sorted({m["model_fingerprint"] for m in metas if m.get("model_fingerprint")})
    if len(fingerprints) > 1:
        raise SinkscopeError(f"the shards were run with different weights of the model (weights fingerprints "
                             f"{', '.join(fingerprints)}); they are not one run: re-run the odd shards on the same checkpoint")
    if kind == "ablate":
        return _merge_ablate(paths, metas, shards, same[0], out, figures, log)
    if kind == "var_eval":
        return _merge_var_eval(paths, metas, shards, same[0], out, figures, log)
    if kind in BY_SAMPLE:
        return _merge_by_sample(kind, paths, metas, shards, same[0], out, figures, log)
    return _merge_scan(paths, metas, shards, same[0], out, figures, log)


def _merge_scan(paths, metas, shards, params, out, figures, log) -> RunFolder:
    from sinkscope.analyses.scan import summarize
    from sinkscope.measures import massive, sinks

    n = shards[0][1]
    same = [params]
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
    skipped = _merged_skipped(metas)
    folder.update_meta(**{k: base[k] for k in ("model", "model_fingerprint", "planted", "tau", "sink_dims", "token_stats") if k in base},
                       n_samples=len(order), skipped=skipped, merged_from=[str(p) for p in paths])
    dims = massive.SinkDims.from_json(dims_json)
    tau = sinks.SinkThreshold(**base["tau"])
    model = SimpleNamespace(**{**base.get("model", {}), "hidden_size": base.get("model", {}).get("hidden_size")})
    summarize(folder, dims, tau, model, figures=figures)
    folder.finish()
    log(f"merged {len(paths)} shards ({len(order)} samples) into {folder.path}")
    return folder


def _check_same_calibration(paths: list[Path], metas: list[dict], keys: tuple[str, ...]) -> None:
    texts = {(p / "sink_dims.json").read_text() for p in paths if (p / "sink_dims.json").exists()}
    values = {json.dumps([m.get(k) for k in keys], sort_keys=True) for m in metas}
    if len(texts) > 1 or len(values) != 1:
        raise SinkscopeError(f"the shards found different {' / '.join(keys)}: they did not calibrate on the same "
                             "samples (same data, --limit and --calibration?); run them again with the same settings")


def _merged_skipped(metas: list[dict]) -> list | dict:
    """The shards' skipped samples once each: every shard loads the whole data, so the samples skipped when it
    loaded are in each shard's list; those skipped in its own samples are in one. Lists (records) or dicts (location's
    sample -> reason)."""
    if any(isinstance(m.get("skipped"), dict) for m in metas):
        return {k: v for m in metas if isinstance(m.get("skipped"), dict) for k, v in m["skipped"].items()}
    seen: dict[str, object] = {}
    for m in metas:
        for record in m.get("skipped") or []:
            seen.setdefault(json.dumps(record, sort_keys=True), record)
    return list(seen.values())


def _merge_by_sample(kind, paths, metas, shards, params, out, figures, log) -> RunFolder:
    """heads, contributions, location, vit-sinks, patch, remove, inject: the per-sample tables of BY_SAMPLE[kind]
    concatenated in the data's order, then the analysis' own summarize (summaries, CIs, figures, index.md) on them."""
    n = shards[0][1]
    tables, summarize, shared, kept = BY_SAMPLE[kind]
    _check_same_calibration(paths, metas, ("tau", "sink_dims", *shared))
    order = _sample_order(paths, metas)
    folder = RunFolder(out, kind, {**params, "shard": None}, resume=False)
    first = paths[shards.index((0, n))]
    if (first / "sink_dims.json").exists():
        folder.write_text("sink_dims.json", (first / "sink_dims.json").read_text())
    for table in tables:
        merged = _concat_in_order(paths, table, order)
        if merged is not None:
            folder.append_rows(table, merged)
    folder.mark_done(sorted(order, key=order.get))
    base = metas[shards.index((0, n))]
    folder.update_meta(**{k: base[k] for k in ("model", "model_fingerprint", "planted", "tau", "sink_dims", "calibration", "n_samples",
                                               *shared, *kept) if k in base},
                       skipped=_merged_skipped(metas), merged_from=[str(p) for p in paths])
    summarize(folder, {**params, "shard": None}, folder.meta, figures)
    log(f"merged {len(paths)} {kind.replace('_', '-')} shards ({len(order)} samples) into {folder.path}")
    return folder


def _merge_ablate(paths, metas, shards, params, out, figures, log) -> RunFolder:
    from sinkscope.analyses.ablate import AblateConfig, summarize_ablation

    n = shards[0][1]
    _check_same_calibration(paths, metas, ("tau", "sink_dims", "taus"))
    order = _sample_order(paths, metas)
    folder = RunFolder(out, "ablate", {**params, "shard": None}, resume=False)
    first = paths[shards.index((0, n))]
    folder.write_text("sink_dims.json", (first / "sink_dims.json").read_text())
    per = _concat_in_order(paths, "ablation_per_sample", order)
    if per is not None:
        folder.append_rows("ablation_per_sample", per)
    folder.mark_done(sorted(order, key=order.get))
    base = metas[shards.index((0, n))]
    skipped = _merged_skipped(metas)
    folder.update_meta(**{k: base[k] for k in ("model", "model_fingerprint", "planted", "tau", "sink_dims", "taus", "n_samples") if k in base},
                       skipped=skipped, merged_from=[str(p) for p in paths])
    summarize_ablation(folder, AblateConfig(**{**params, "shard": None}), figures)
    log(f"merged {len(paths)} ablate shards ({len(order)} samples) into {folder.path}")
    return folder


def _var_eval_order(paths: list[Path], shards: list[tuple[int, int]]) -> dict[str, int]:
    """done key -> position as the unsharded run writes it: the validation questions (every shard ran them all, in
    the same order), then the test questions, then the captions, each in the data's order (index modulo n)."""
    n = shards[0][1]
    done = {s: [x for x in (p / "samples_done.txt").read_text().split("\n") if x]
            if (p / "samples_done.txt").exists() else [] for p, s in zip(paths, shards)}
    order: dict[str, int] = {}
    for offset, phase in enumerate(("validation:", "test:", "caption:")):
        if phase == "validation:":
            for rank, key in enumerate(k for k in done[(0, n)] if k.startswith(phase)):
                order[key] = offset * 10 ** 9 + rank
            continue
        for (i, _), keys in done.items():
            for rank, key in enumerate(k for k in keys if k.startswith(phase)):
                order[key] = offset * 10 ** 9 + i + rank * n
    return order


def _merge_var_eval(paths, metas, shards, params, out, figures, log) -> RunFolder:
    from sinkscope.analyses.var_eval import VarEvalConfig, summarize_var_eval

    n = shards[0][1]
    _check_same_calibration(paths, metas, ("var_calibrated",))
    chosen = {json.dumps(m.get("chosen"), sort_keys=True) for m in metas}
    if len(chosen) != 1:
        raise SinkscopeError("the shards chose different p and rho on validation (their validation answers differ: "
                             "different machines or dtypes?); run every shard on the same hardware and settings")
    answers = [_read_text_table(p / "var_answers.csv") if (p / "var_answers.csv").exists() else None for p in paths]
    first = shards.index((0, n))
    val = [None if a is None else a[a["phase"] == "validation"].reset_index(drop=True) for a in answers]
    if any((v is None) != (val[first] is None) or (v is not None and not v.equals(val[first])) for v in val):
        raise SinkscopeError("the shards' validation answers differ (each shard runs the whole validation sweep, so "
                             "they should be the same); run every shard on the same hardware, dtype and settings")
    order = _var_eval_order(paths, shards)
    folder = RunFolder(out, "var_eval", {**params, "shard": None}, resume=False)
    tables = []
    if answers[first] is not None:
        tests = [a[a["phase"] != "validation"] for a in answers if a is not None]
        test = pd.concat(tests, ignore_index=True)
        test = test.iloc[test["sample"].map(order).argsort(kind="stable")]
        tables.append(("var_answers", pd.concat([val[first], test], ignore_index=True)))
    caps = _concat_in_order(paths, "var_captions", order)
    if caps is not None:
        tables.append(("var_captions", caps))
    for table, frame in tables:
        folder.append_rows(table, frame)
    folder.mark_done(sorted(order, key=order.get))
    base = metas[first]
    folder.update_meta(**{k: base[k] for k in ("model", "model_fingerprint", "n_validation", "n_test", "planted", "var_calibrated",
                                               "calibration_source", "calibration_note", "chosen") if k in base},
                       merged_from=[str(p) for p in paths])
    c = base["chosen"]
    summarize_var_eval(folder, VarEvalConfig(**{**params, "shard": None}), (c["p"], c["rho"]), figures)
    log(f"merged {len(paths)} var-eval shards ({len(order)} questions and captions) into {folder.path}")
    return folder
