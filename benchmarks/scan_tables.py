"""Host time of the scan's per-sample tables at LLaVA-1.5-7B shape: the work after a forward that no GPU does.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scan_tables.py [--layers 32] [--heads 32] [--repeats 15] [--head-tables]
        [--image-size 336] [--text-tokens 64]

A 7B forward takes ~30 ms on an H200 at batch 1 (benchmarks/results/h200-2026-12-04); the scan then turns its
reductions into rows: one per (layer, sample, real token), 20,480 per LLaVA sample, and appends them to its
CSVs. That work is pandas and text on the host, the same on any accelerator, so it is timed here on the CPU. The
model is a random LLaVA with the real prompt shape (576 image tokens + 64 text, 32 layers of 32 heads) at width
64, traced once; the reductions it left are then turned into tables again and again, the steps taking turns,
minimum over `--repeats`:
  - tables: a fresh `ScanReducer` given the kept reductions, its `end()` (the tables of the reductions, each image
    token's rank in its image and background mark, the summaries from the tensors) and `analyses.scan.batch_tables`
    (the token rows), with every token row kept (--token-stats all) or only BOS, sinks and the top image tokens
    (sinks: what `auto` picks past 2M token rows, ~100 LLaVA samples); what `run_scan` does per batch before
    writing;
  - append: the rows appended to a run folder's CSVs and the sample marked done, by Arrow's CSV writer (what
    `RunFolder.append_rows` uses) and, for the ratio, by pandas' `to_csv`.
Token strings are made by a cheap stand-in, not a tokenizer's decode. `--head-tables` also times the head analysis'
tables (`HeadsReducer.take` of every layer's kept payload, then `end`) for a sample without and with its
attention maps (the first `--n-maps` samples of a run keep them: 33 x 4 x 576 rows per layer). A small prompt
(`--image-size 56 --text-tokens 14`: 16 image tokens, 30 in all) leaves what a batch costs whatever its prompt.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build(n_layers: int, n_heads: int, text_tokens: int, image_size: int = 336):
    """(adapter, batch): a random LLaVA-1.5-shaped model (336 px, patch 14: 576 image tokens) at width 64."""
    from host_bound_scan import build as tiny_llava

    return tiny_llava(n_layers, n_heads, image_size=image_size, text_tokens=text_tokens, name="scan-tables")


def token_strings(input_ids: torch.Tensor) -> list[list[str]]:
    return [[f"t{t}" for t in row] for row in input_ids.tolist()]


class _Sample:
    sample_id = "s0"

    def __init__(self, n_image: int = 576):
        self.meta = {"background_patches": [i % 3 == 0 for i in range(n_image)]}  # as the demo world marks them


def main(argv=None) -> None:
    from sinkscope.analyses.scan import ScanReducer, batch_tables
    from sinkscope.runfolder import RunFolder
    from sinkscope.trace import Tracer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=336, help="pixels (patch 14): 336 = LLaVA-1.5's 576 tokens")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--head-tables", action="store_true", help="also time the head analysis' tables")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    adapter, batch = build(args.layers, args.heads, args.text_tokens, args.image_size)
    n_image = (args.image_size // 14) ** 2
    samples = [_Sample(n_image)]

    class Keep(ScanReducer):
        def end(self):  # keep the reductions the trace left, make the tables later
            self.kept = list(self._local.finish())

    def reducer(kept=None) -> ScanReducer:
        r = ScanReducer([0, 1], 3.0, 5, 0.5, 0.2, 1e-6, samples, want_profile=False, token_strings=token_strings)
        if kept is not None:
            r.begin(info)
            for kind, layers, block in kept:
                r._payloads[kind].append((layers, block))
        return r

    with torch.no_grad():
        keep = Keep([0, 1], 3.0, 5, 0.5, 0.2, 1e-6, samples, want_profile=False, token_strings=token_strings)
        Tracer(adapter).run(batch, [keep], sample_ids=["s0"])
    info = keep.info

    done = reducer(keep.kept)
    done.end()
    written = {detail: batch_tables(done, detail) for detail in ("all", "sinks")}
    folder = RunFolder(tempfile.mkdtemp(prefix="scan_tables_"), "scan", {"benchmark": "scan_tables"}, resume=False)

    def append(detail: str, writer: str):
        def run():
            if writer == "pandas":
                with mock.patch("sinkscope.runfolder.arrow_csv", return_value=None):
                    run_with()
            else:
                run_with()

        def run_with():
            for table, frame in written[detail].items():
                folder.append_rows(f"{table}_{detail}_{writer}", frame)
            folder.mark_done(["s0"])
        return run

    def tables(detail: str):
        def run():
            fresh = reducer(keep.kept)
            fresh.end()
            batch_tables(fresh, detail)
        return run

    steps = {
        "tables all": tables("all"),
        "tables sinks": tables("sinks"),
        "append all (Arrow)": append("all", "arrow"),
        "append all (pandas)": append("all", "pandas"),
        "append sinks (Arrow)": append("sinks", "arrow"),
        "append sinks (pandas)": append("sinks", "pandas"),
    }
    times = {name: [] for name in steps}
    for i in range(args.repeats + 1):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    best = {name: min(t) * 1e3 for name, t in times.items()}
    n_rows = len(written["all"]["token_stats"])
    shape = "LLaVA-1.5 shape" if n_image == 576 else "small prompt"
    print(f"scan tables per sample (a batch of 1): {shape} ({batch['input_ids'].shape[1]} tokens, {n_image} image; "
          f"{args.layers} layers of {args.heads} heads; {n_rows} token rows), 1 thread, torch {torch.__version__}; "
          f"minimum of {args.repeats} runs, steps taking turns")
    for name, ms in best.items():
        print(f"  {name:<24} {ms:8.1f} ms")
    for detail in ("all", "sinks"):
        arrow = best[f"tables {detail}"] + best[f"append {detail} (Arrow)"]
        pandas = best[f"tables {detail}"] + best[f"append {detail} (pandas)"]
        print(f"per-sample host work after the forward, token stats {detail}: {arrow:.1f} ms "
              f"(with pandas' writer {pandas:.1f} ms; append Arrow / pandas = "
              f"{best[f'append {detail} (Arrow)'] / best[f'append {detail} (pandas)']:.3f})")
    if args.head_tables:
        heads_tables(adapter, batch, args.repeats)


def heads_tables(adapter, batch, repeats: int) -> None:
    """The head analysis' per-sample tables from one trace's payloads, replayed: without and with maps."""
    from sinkscope.analyses.heads import HeadsConfig, HeadsReducer
    from sinkscope.trace import Tracer

    cfg = HeadsConfig(model="scan-tables")
    kept: list = []

    class Keep(HeadsReducer):
        def take(self, kind, layer, payload):
            kept.append((kind, layer, payload))
            super().take(kind, layer, payload)

    def reducer(cls, maps: bool):
        return cls([0, 1], 3.0, 1e-6, "rms", cfg, {"s0"} if maps else set(), token_strings)

    with torch.no_grad():
        keep = reducer(Keep, maps=True)
        Tracer(adapter).run(batch, [keep], sample_ids=["s0"])

    def replay(maps: bool):
        r = reducer(HeadsReducer, maps)
        r.begin(keep.info)
        for kind, layer, payload in kept:
            r.take(kind, layer, payload if maps or kind == "residual" else {**payload, "maps": {}})
        r.end()

    times = {"heads tables, no maps": [], "heads tables, with maps": []}
    for i in range(repeats + 1):
        for name, maps in (("heads tables, no maps", False), ("heads tables, with maps", True)):
            start = time.perf_counter()
            replay(maps)
            if i:
                times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        print(f"  {name:<24} {min(t) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
