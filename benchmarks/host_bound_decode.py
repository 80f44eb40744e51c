"""Host time of a decode step with VAR and knockout where the host bounds it (a GPU at batch 1), measured on a CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/host_bound_decode.py [--layers 32] [--steps 30] [--repeats 5]
                                                                       [--compile]

A 7B decode step at batch 1 on a GPU waits on kernel launches: each operation costs Python and the
dispatcher ~10 us whatever its size. The same regime on a CPU: LLaVA-1.5's structure (Llama layers, the
640-token prompt of `real_size.py` with 576 image tokens) at width 128 with one thread, so that a decode
step costs about what its operations' dispatch costs. Each variant prefills once inside its block, then
runs `--steps` single-token forwards (of `--batch` copies of the prompt) on the KV cache, cropping the new token back off after each (every
step sees the same 640 cached keys); variants take turns `--repeats` times; the 10th percentile of all
steps is printed (the least disturbed). Variants: eager, SDPA, VAR on every layer (sinks at the tau
that makes ~20 image tokens sinks, as in `real_size.py`), with `--compile` VAR with compile=True too,
and knockout of those sinks on every layer. Goals (issue 17, for a GPU): VAR <= 1.10x eager and <= 1.3x
SDPA. `dispatch_count.py` gives the exact operation counts behind these times.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_size  # noqa: E402  (the LLaVA-1.5 builder and the sinks of random weights)


def step_times(adapter, inputs, context, steps: int) -> list[float]:
    """Seconds of `steps` single-token forwards after one prefill inside `context()` (cache cropped after each)."""
    batch, n = inputs["input_ids"].shape
    mask = torch.ones(batch, n + 1, dtype=inputs["attention_mask"].dtype)
    position = torch.tensor([n])
    out = []
    # the KV cache's name: `cache` since transformers 5.24, `past_key_values` before (a warning on 5.24+)
    name = "cache" if "cache" in inspect.signature(type(adapter.model).forward).parameters else "past_key_values"
    with context():
        prefill = adapter.model(**inputs, use_cache=True)
        cache, token = getattr(prefill, name), prefill.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            start = time.perf_counter()
            adapter.model(input_ids=token, attention_mask=mask, use_cache=True, cache_position=position,
                          **{name: cache})
            out.append(time.perf_counter() - start)
            cache.crop(-1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="the prompt repeated this many times (var-eval batches)")
    ap.add_argument("--compile", action="store_true", help="also VAR with compile=True (needs a C++ compiler)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from sinkscope.interventions.knockout import knockout
    from sinkscope.interventions.var import VARConfig, var

    narrow = real_size.Shape(hidden=128, heads=4, kv_heads=4, intermediate=256, vocab=32064)
    adapter, batch = real_size.build("llava", args.layers, torch.float32, "cpu", shape=narrow)
    dims, tau, sink_mask = real_size.sinks_at(adapter, batch)
    inputs = {k: v.repeat(args.batch, *[1] * (v.dim() - 1)) for k, v in adapter.forward_inputs(batch).items()}
    sink_mask = sink_mask.repeat(args.batch, 1)
    layers = list(range(args.layers))
    variants = {"eager": lambda: real_size.attention_as(adapter, "eager"),
                "sdpa": lambda: real_size.attention_as(adapter, "sdpa"),
                "VAR": lambda: var(adapter, VARConfig(sink_dims=dims, tau=tau, layers=layers)),
                "knockout": lambda: knockout(adapter, sink_mask, layers=layers)}
    if args.compile:
        variants["VAR compiled"] = lambda: var(adapter, VARConfig(sink_dims=dims, tau=tau, layers=layers), compile=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for name, context in variants.items():  # warm-up (and compilation)
            step_times(adapter, inputs, context, 2)
        for _ in range(args.repeats):
            for name, context in variants.items():
                times[name] += step_times(adapter, inputs, context, args.steps)
    low = {name: statistics.quantiles(t, n=10)[0] for name, t in times.items()}
    print(f"decode step, batch {args.batch}, LLaVA-1.5 structure at width 128, {args.layers} layers, 640 cached keys, 1 thread; "
          f"10th percentile of {args.repeats} x {args.steps} steps; torch {torch.__version__}")
    for name, t in low.items():
        print(f"  {name:<13} {t * 1e3:7.2f} ms  ({t / low['eager']:.3f}x eager, {t / low['sdpa']:.3f}x SDPA)")
    for name in [n for n in ("VAR", "VAR compiled") if n in low]:
        print(f"  {name}: / eager {real_size.verdict(low[name] / low['eager'], 1.10)}, / SDPA "
              f"{real_size.verdict(low[name] / low['sdpa'], 1.3)}")
    print(f"  knockout / eager {low['knockout'] / low['eager']:.3f}")


if __name__ == "__main__":
    main()
