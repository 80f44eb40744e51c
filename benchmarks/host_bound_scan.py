"""Host time of the scan where the host bounds the forward (a GPU at batch 1), measured on a CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/host_bound_scan.py [--layers 2 32] [--repeats 25]

A GPU runs a 7B layer in about a millisecond, about what Python and the dispatcher take to launch its
kernels, so at batch 1 everything sinkscope adds on the host shows in the wall time. This benchmark
makes the same regime on a CPU: a LLaVA (Llama text model) of width 64 and a 30-token prompt (16 image
tokens), one thread, so a forward costs what its Python and dispatch cost. It times, variants taking
turns, the minimum over `--repeats` (the least disturbed run):
  - a plain eager forward;
  - `Tracer.run` with a reducer that does nothing (what tracing itself costs: hooks, capture function);
  - the scan's reducer without its `end()` (the per-layer copies during the forward);
  - the scan's reducer with its tables (`ScanReducer.end`: block reductions, copies to the host, pandas);
  - `real_size.scan_pass`: the scan's whole per-sample work (its summaries and CSV rows included since
    the commit that added `scan_tables.py`; earlier results stopped at the reducer's tables);
and prints each at every layer count, per layer (the slope between the first and last count), and the
scan over the plain forward. The goal (issue 17) is scan <= 1.2x a plain eager forward.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_size  # noqa: E402  (scan_pass: the scan's per-sample work)

IMAGE_TOKEN = 999


def build(n_layers: int, n_heads: int = 4, image_size: int = 56, text_tokens: int = 14, name: str = "host-bound"):
    """(adapter, batch): a random tiny LLaVA with `n_layers` Llama layers of `n_heads` heads (width 64, or 2 per
    head past 32 heads) on eager attention, and one prompt: BOS, 3 text tokens, the image's (image_size / 14)^2
    image tokens, the rest of `text_tokens` after it. Default: a 30-token prompt with 16 image tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from sinkscope.models import adapter_for_model

    width = max(64, 2 * n_heads)
    text = LlamaConfig(hidden_size=width, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                       intermediate_size=128, vocab_size=1000, num_hidden_layers=n_layers, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=14, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", pad_token_id=0)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    n_image = (image_size // 14) ** 2
    ids = [1, 5, 6, 7] + [IMAGE_TOKEN] * n_image + [8 + i % 900 for i in range(text_tokens - 4)]
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "pixel_values": torch.randn(1, 3, image_size, image_size)}
    adapter = adapter_for_model(model, None, f"{name}-{n_layers}")
    adapter.set_text_attention("eager")
    return adapter, batch


class _Nothing:
    def begin(self, info):
        pass

    def residual(self, layer, states):
        pass

    def attention(self, layer, probs):
        pass

    def end(self):
        pass


def variants(adapter, batch, dims, tau) -> dict:
    from sinkscope.analyses.scan import ScanReducer
    from sinkscope.trace import Tracer

    class WithoutTables(ScanReducer):
        def end(self):
            pass

    def reducer(cls):
        return cls(dims, tau, 5, 0.5, 0.2, adapter.rms_norm_eps, [], want_profile=False, score="rms")

    from sinkscope.runfolder import RunFolder

    tracer = Tracer(adapter)
    inputs = adapter.forward_inputs(batch)
    folder = RunFolder(tempfile.mkdtemp(prefix="host_bound_scan_"), "scan", {"benchmark": "host_bound"}, resume=False)
    lean = adapter.without_logits()  # the forward a trace runs: the last position's logits only
    return {"plain forward": lambda: adapter.model(**inputs, **lean),
            "trace, empty reducer": lambda: tracer.run(batch, [_Nothing()]),
            "scan reducer, no tables": lambda: tracer.run(batch, [reducer(WithoutTables)], sample_ids=[0]),
            "scan reducer": lambda: tracer.run(batch, [reducer(ScanReducer)], sample_ids=[0]),
            "scan (scan_pass)": lambda: real_size.scan_pass(tracer, adapter, batch, dims, tau, folder)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    counts = sorted(args.layers)
    results: dict[int, dict[str, float]] = {}
    for n_layers in counts:
        adapter, batch = build(n_layers)
        runs = variants(adapter, batch, dims=[0, 1], tau=3.0)
        times = {name: [] for name in runs}
        with torch.no_grad():
            for fn in runs.values():
                fn()  # warm-up
            for _ in range(args.repeats):
                for name, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        results[n_layers] = {name: min(t) * 1e3 for name, t in times.items()}
    print(f"host-bound probe: LLaVA (Llama, width 64), 30-token prompt, 1 thread, torch {torch.__version__}; "
          f"minimum of {args.repeats} runs, variants taking turns")
    print(f"{'':26}" + "".join(f"{n:>9} layers" for n in counts) + "   per layer")
    first, last = counts[0], counts[-1]
    for name in results[first]:
        per_layer = (results[last][name] - results[first][name]) / max(1, last - first)
        print(f"{name:<26}" + "".join(f"{results[n][name]:13.2f} ms" for n in counts) + f"   {per_layer:.3f} ms")
    for n in counts:
        ratio = results[n]["scan (scan_pass)"] / results[n]["plain forward"]
        print(f"scan / plain forward at {n} layers = {real_size.verdict(ratio, 1.2)}")


if __name__ == "__main__":
    main()
