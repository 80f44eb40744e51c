"""Sink-signature injection (dose-response with controls, VAR on injected sinks): same as `sinkscope inject`,
kept so every experiment has a runnable script.

    python analyses/inject.py --model organism --out runs/inject
"""

import sys

from sinkscope.cli import app

if __name__ == "__main__":
    app(["inject", *sys.argv[1:]])
