"""Peak memory of `run_scan` for few vs many samples: does it grow with the sample count?

The scan streams (reducers keep per-sample tables, never attention maps), so its peak RSS
should be about the same for 4 and 32 samples. Each setting runs in a fresh subprocess (peak
RSS only ever goes up within a process) on a tiny randomly initialised demo-architecture
LLaVA, built offline and saved to a temporary directory unless --model is given.

    python benchmarks/scan_memory.py                     # 4 vs 32 samples
    python benchmarks/scan_memory.py --samples 4 16 64 --batch-size 4

Per setting it prints the peak RSS after loading the model and data (before the scan) and
at the end, and the scan's own increment; then the ratio of the largest to the smallest.
RSS comes from resource.getrusage (ru_maxrss of the child itself); tracemalloc would miss
torch's CPU allocations.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def child(model: str, n: int, batch_size: int, calibration: int) -> dict:
    """One scan in this (fresh) process; returns what it measured."""
    warnings.simplefilter("ignore")
    from sinkscope.analyses.scan import ScanConfig, run_scan
    from sinkscope.eval.tasks import load_samples
    from sinkscope.models import load

    adapter = load(model)
    load_samples("demo", n)  # build the data once so the "before" peak includes it
    before = peak_rss_mb()
    cfg = ScanConfig(model=model, data="demo", limit=n, batch_size=batch_size, calibration=calibration)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        run_scan(out, cfg, adapter=adapter, resume=False, log=lambda m: None, figures=False)
    return {"samples": n, "peak_before_mb": before, "peak_mb": peak_rss_mb(), "seconds": time.time() - t0}


def build_demo(directory: Path) -> None:
    from sinkscope.models.embedded.modeling import build_model
    from sinkscope.models.embedded.processor import build_processor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_model(seed=0).save_pretrained(directory)
        build_processor().save_pretrained(directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--calibration", type=int, default=4, help="same for every setting, so only N differs")
    ap.add_argument("--model", default=None, help="model directory (default: a tiny random demo LLaVA)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        print(json.dumps(child(args.model, args.child, args.batch_size, args.calibration)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "demo_random")
            build_demo(Path(model))
        results = []
        for n in args.samples:
            cmd = [sys.executable, __file__, "--child", str(n), "--model", model,
                   "--batch-size", str(args.batch_size), "--calibration", str(min(args.calibration, n))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"scan of {n} samples failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{r['samples']:>5} samples: peak RSS {r['peak_mb']:8.1f} MB "
                  f"(before the scan {r['peak_before_mb']:.1f} MB, scan +{r['peak_mb'] - r['peak_before_mb']:.1f} MB) "
                  f"in {r['seconds']:.1f}s", flush=True)
    lo = min(results, key=lambda r: r["samples"])
    hi = max(results, key=lambda r: r["samples"])
    inc_lo = max(lo["peak_mb"] - lo["peak_before_mb"], 1e-9)
    inc_hi = hi["peak_mb"] - hi["peak_before_mb"]
    print(f"peak RSS ratio {hi['samples']} / {lo['samples']} samples: {hi['peak_mb'] / lo['peak_mb']:.3f} "
          f"(scan increments: {inc_hi:.1f} / {inc_lo:.1f} MB = {inc_hi / inc_lo:.2f}; "
          f"samples ratio {hi['samples'] / lo['samples']:.0f})")


if __name__ == "__main__":
    main()
