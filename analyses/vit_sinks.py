"""vit_sinks analysis: same as `sinkscope vit-sinks`, kept so every experiment has a runnable script.

    python analyses/vit_sinks.py --model organism --out runs/vit_sinks
"""

import sys

from sinkscope.cli import app

if __name__ == "__main__":
    app(["vit-sinks", *sys.argv[1:]])
