"""VAR evaluation: same as `sinkscope var-eval`, kept so every experiment has a runnable script.

    python analyses/var_eval.py --model organism --out runs/var_eval --captions 50
"""

import sys

from sinkscope.cli import app

if __name__ == "__main__":
    app(["var-eval", *sys.argv[1:]])
