"""Cost of streaming every layer through nnsight, against the model's own eager forward.

    python benchmarks/trace_overhead.py [--model demo] [--batch 8] [--repeats 10]

Prints the median wall time of (a) a plain eager forward, (b) the same forward with
output_hidden_states/output_attentions, (c) Tracer.run with a reducer that touches every
layer's residual and attention, and the ratios (c)/(a) and (c)/(b), measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


class _Touch:
    def begin(self, info):
        self.total = 0.0

    def residual(self, layer, states):
        self.total += float(states[..., 0].sum())

    def attention(self, layer, probs):
        self.total += float(probs[..., 0].sum())

    def end(self):
        pass


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    from sinkscope.eval.tasks import load_samples
    from sinkscope.analyses.scan import prepare_batch
    from sinkscope.models import load
    from sinkscope.trace import Tracer

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    adapter = load(args.model)
    batch = prepare_batch(adapter, load_samples("demo", args.batch))
    inputs = adapter.forward_inputs(batch)
    tracer = Tracer(adapter)
    with torch.no_grad():
        lean = adapter.without_logits()  # the forward a trace runs: the last position's logits only
        plain = _median_time(lambda: adapter.model(**inputs, **lean), args.repeats)
        full = _median_time(lambda: adapter.model(**inputs, output_hidden_states=True, output_attentions=True),
                            args.repeats)
    traced = _median_time(lambda: tracer.run(batch, [_Touch()]), args.repeats)
    print(f"model {args.model}, batch {args.batch}, {batch['input_ids'].shape[1]} tokens, "
          f"{adapter.num_layers} layers, torch threads {torch.get_num_threads()}")
    print(f"plain forward             {plain * 1e3:8.1f} ms")
    print(f"forward + outputs         {full * 1e3:8.1f} ms")
    print(f"Tracer.run, all layers    {traced * 1e3:8.1f} ms")
    print(f"ratio traced / plain      {traced / plain:8.2f}")
    print(f"ratio traced / outputs    {traced / full:8.2f}")


if __name__ == "__main__":
    main()
