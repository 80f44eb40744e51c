"""heads analysis: same as `sinkscope heads`, kept so every experiment has a runnable script.

    python analyses/heads.py --model organism --out runs/heads
"""

import sys

from sinkscope.cli import app

if __name__ == "__main__":
    app(["heads", *sys.argv[1:]])
