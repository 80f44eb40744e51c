"""Measure the embedded demo on the held-out test split and write its model card.

    python -m scripts.demo_card --train-dir runs/smolvlm [--assets sinkscope/models/embedded/assets/demo]

Accuracy per task (generation), a scan of the test split (sink dims by discovery, tau, per-layer
sinks by role, visual sinks and their location), and the emergence curve of training, into
card.json / README.md / emergence.png beside the shipped parts. Lives above both the demo
package and the analyses: the demo package itself runs no analysis.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sinkscope.analyses.scan import ScanConfig, run_scan
from scripts import smolvlm_card
from sinkscope.models.embedded import smolvlm
from sinkscope.eval.accuracy import demo_accuracy
from sinkscope.models.registry import adapter_for_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=str(smolvlm.ASSETS))
    parser.add_argument("--train-dir", default=None)
    parser.add_argument("--n-per-task", type=int, default=200)
    parser.add_argument("--n-pope", type=int, default=300, help="questions per POPE split")
    parser.add_argument("--scan-samples", type=int, default=64)
    parser.add_argument("--scan-dir", default=None, help="keep the scan here (default: a temporary folder)")
    parser.add_argument("--recipes", default=None, help="JSON list of {name, what, result}: recipes tried, for the card")
    parser.add_argument("--extras", default=None, help="JSON object measured elsewhere (training, image_use, heldout, "
                        "variants; see smolvlm_card.write_card)")
    parser.add_argument("--accuracy-csv", default=None, help="reuse this accuracy table (written by a previous run)")
    args = parser.parse_args(argv)
    model, processor = smolvlm.load_demo(args.assets)
    adapter = adapter_for_model(model, processor, "demo")
    if args.accuracy_csv and Path(args.accuracy_csv).exists():
        import pandas as pd

        accuracy = pd.read_csv(args.accuracy_csv)
    else:
        accuracy = demo_accuracy(adapter, n_per_task=args.n_per_task, n_pope=args.n_pope)
        if args.accuracy_csv:
            accuracy.to_csv(args.accuracy_csv, index=False)
    print(accuracy.to_string())
    root = Path(args.scan_dir or tempfile.mkdtemp(prefix="demo-card-scan-"))
    for score in ("rms", "layer"):  # the paper's phi (saturates at hidden 576) and the layer-relative score
        run_scan(str(root / score), ScanConfig(model="demo", data="demo", limit=args.scan_samples, sink_score=score),
                 adapter=adapter, figures=(score == "rms"), log=print)
    trained = sum(v.numel() for v in smolvlm.trained_state(adapter.model).values())
    smolvlm_card.write_card(Path(args.assets), accuracy, root / "layer", Path(args.train_dir) if args.train_dir else None,
                            {**adapter.describe(), "lora": getattr(adapter.model.config, "sinkscope_lora", None)},
                            trained, phi_scan_dir=root / "rms",
                            recipes=json.loads(Path(args.recipes).read_text()) if args.recipes else None,
                            extras=json.loads(Path(args.extras).read_text()) if args.extras else None)
    print(f"card written to {args.assets}/README.md")


if __name__ == "__main__":
    main()
