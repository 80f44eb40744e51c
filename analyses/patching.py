"""Causal patching: same as `sinkscope patch`, kept so every experiment has a runnable script.

    python analyses/patching.py --model organism --out runs/patching
"""

import sys

from sinkscope.cli import app

if __name__ == "__main__":
    app(["patch", *sys.argv[1:]])
