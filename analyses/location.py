"""location analysis: same as `sinkscope location`, kept so every experiment has a runnable script.

    python analyses/location.py --model organism --out runs/location
"""

import sys

from sinkscope.cli import app

if __name__ == "__main__":
    app(["location", *sys.argv[1:]])
