"""Model card of an embedded model (tiny or organism): scan it, then write the card.

    python -m scripts.model_card --model sinkscope/models/embedded/assets/organism --kind organism

Runs `sinkscope scan` on the held-out test split (32 questions), then
`scripts.card.build_card` with that run folder (accuracy per task, emergence per layer,
visual sinks). Lives above both the demo package and the analyses: the demo package runs no analysis.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from sinkscope.analyses.scan import ScanConfig, run_scan
from scripts.card import build_card
from sinkscope.models import load


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--kind", choices=["demo", "organism"], required=True)
    parser.add_argument("--train-dir", default=None)
    parser.add_argument("--recipes", default=None)
    parser.add_argument("--n-per-task", type=int, default=200)
    parser.add_argument("--scan-samples", type=int, default=32)
    parser.add_argument("--scan-dir", default=None, help="keep the scan here (default: a temporary folder)")
    args = parser.parse_args(argv)
    adapter = load(args.model)
    scan_dir = Path(args.scan_dir or tempfile.mkdtemp(prefix="card-scan-"))
    run_scan(str(scan_dir), ScanConfig(model=args.model, data="demo", limit=args.scan_samples), adapter=adapter,
             figures=False, log=lambda m: None)
    build_card(args.model, args.kind, scan_dir, args.train_dir, args.recipes, args.n_per_task, adapter=adapter)
    if not args.scan_dir:
        shutil.rmtree(scan_dir, ignore_errors=True)
    print(f"card written to {args.model}/README.md")


if __name__ == "__main__":
    main()
