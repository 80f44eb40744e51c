"""Knockout analysis: same as `sinkscope ablate`, kept so every experiment has a runnable script.

    python analyses/ablate.py --model organism --out runs/ablate
"""

import sys

from sinkscope.cli import app

if __name__ == "__main__":
    app(["ablate", *sys.argv[1:]])
