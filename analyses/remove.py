"""Sink-signature removal (zero vs mean: attention redistribution, accuracy, perplexity): same as `sinkscope remove`,
kept so every experiment has a runnable script.

    python analyses/remove.py --model organism --out runs/remove
"""

import sys

from sinkscope.cli import app

if __name__ == "__main__":
    app(["remove", *sys.argv[1:]])
