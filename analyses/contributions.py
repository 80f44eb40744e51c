"""contributions analysis: same as `sinkscope contributions`, kept so every experiment has a runnable script.

    python analyses/contributions.py --model organism --out runs/contributions
"""

import sys

from sinkscope.cli import app

if __name__ == "__main__":
    app(["contributions", *sys.argv[1:]])
