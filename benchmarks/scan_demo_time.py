"""Time per sample of `sinkscope scan` on the embedded demo (SmolLM2-135M LLaVA), CPU.

    python benchmarks/scan_demo_time.py                  # 64 samples, batch 8
    python benchmarks/scan_demo_time.py --samples 16 --threads 2

Prints the load time (assembly from the cache), the calibration + scan time, the time per
sample, and the ratio of the scan to a plain forward pass over the same batches (measured in
the same run), so the cost of tracing every layer is visible next to the model's own cost.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from sinkscope.analyses.scan import ScanConfig, prepare_batch, run_scan
    from sinkscope.eval.tasks import batches, load_samples
    from sinkscope.models import load

    t0 = time.time()
    adapter = load(args.model)
    load_seconds = time.time() - t0
    samples = load_samples("demo", args.samples)
    cfg = ScanConfig(model=args.model, data="demo", limit=args.samples, batch_size=args.batch_size,
                     calibration=args.calibration)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        run_scan(out, cfg, adapter=adapter, resume=False, log=lambda m: None, figures=True)
    scan_seconds = time.time() - t0
    t0 = time.time()
    with torch.no_grad():
        for chunk in batches(samples, args.batch_size):
            adapter.model(**adapter.forward_inputs(prepare_batch(adapter, chunk)))
    forward_seconds = time.time() - t0
    print(f"model {args.model}: load {load_seconds:.1f} s; {args.samples} samples, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"scan (calibration on {args.calibration} + every sample, tables, figures): {scan_seconds:.1f} s = "
          f"{scan_seconds / args.samples:.2f} s per sample")
    print(f"plain forward over the same batches: {forward_seconds:.1f} s = {forward_seconds / args.samples:.3f} s per "
          f"sample; scan / forward = {scan_seconds / forward_seconds:.1f}x")


if __name__ == "__main__":
    main()
