"""Sink scan of one model (massive activations, sink dims, sink tokens, head ratios).

    python analyses/scan.py --model demo --out runs/demo
Same as `sinkscope scan`; kept here so every experiment has a runnable script.
"""

from sinkscope.cli import app

if __name__ == "__main__":
    app(["scan", *__import__("sys").argv[1:]])
