"""At real size: the scan, VAR and knockout on a 7B-wide language model, as ratios measured in one run.

Builds LLaVA-1.5-7B's language model (Llama: hidden 4096, 32 heads, 32 kv heads, intermediate
11008, vocab 32064, 576 image tokens per image) or Qwen2-VL-7B's (Qwen2 with M-RoPE: hidden 3584,
28 heads, 4 kv heads, intermediate 18944, vocab 152064, 576 image tokens from a 48x48 patch grid)
at full width and head counts, with `--layers` decoder layers (default 2), random weights
(normal, std 0.02; transformers' own initialisation skipped to save time). The vision tower is
tiny (1 layer, width 64) with the real patch geometry, so the language model sees the real
number of image tokens: what is measured is the language model's attention and tracing path.

Per sample (batch 1, prompt = BOS + 4 text + 576 image + 59 text tokens = 640), median of
`--repeats` after one warm-up, the variants taking turns:
  - plain forward, eager and SDPA (the language model's attention; the vision tower's is untouched), as a trace
    runs it: every layer, the logits of the last position only (`logits_to_keep=1`); and the eager forward
    that unembeds every position, what `model(**inputs)` costs;
  - scan: `Tracer.run` with the scan's own `ScanReducer` on every layer (residual stream and
    attention probabilities, phi, sink tokens, per-head visual attention, its per-sample tables);
    sink dims and tau are pinned (calibration is a one-off residual-only pass over the first
    `--calibration` samples of a run, not a per-sample cost); and a stream of `--stream` samples in
    `run_scan`'s order (a sample's tables written while the next sample's forward runs on the device),
    per sample;
  - the head and contribution analyses' per-sample work (a traced forward and the tables; contributions read
    value states through nnsight): informative ratios, no goal;
  - `generate` of `--new-tokens` tokens with KV cache: eager, SDPA, VAR (every layer edited, sinks
    at tau chosen so ~20 image tokens are sinks; random weights have no massive activations), and
    knockout of those sinks (every layer); with `--compile`, VAR with compile=True too;
  - peak memory of the scan over 1 and `--samples` samples: on CUDA the allocator's peak, on the CPU
    peak RSS (VmHWM reset through /proc/self/clear_refs
    before each; per-sample tables written to a run folder as `run_scan` does).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_size.py --family llava --layers 2 --dtype bfloat16
    .venv/bin/python benchmarks/real_size.py --family qwen2_vl --device cuda --dtype float16 --layers 28

Goals (issue 17): scan <= 1.2x a plain eager forward; VAR generate <= 1.10x eager and <= 1.3x
SDPA; scan peak memory flat in the number of samples. Each line says met / not met.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

N_IMAGE, N_BEFORE, N_AFTER = 576, 4, 59  # tokens: BOS + N_BEFORE text, N_IMAGE image, N_AFTER text


@dataclass(frozen=True)
class Shape:
    """A 7B language model's shape."""

    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


SHAPES = {
    "llava": Shape(hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32064),
    "qwen2_vl": Shape(hidden=3584, heads=28, kv_heads=4, intermediate=18944, vocab=152064),
}


# ----------------------------------------------------------------------------- building

def _fill_random(model: torch.nn.Module, seed: int) -> None:
    """Normal(0, 0.02) weights, unit norm scales, zero biases (in place, without autograd, on each weight's device)."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_()
                elif is_norm:
                    p.fill_(1.0)
                else:
                    if p.device not in generators:
                        generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                    p.normal_(0.0, 0.02, generator=generators[p.device])


def build_llava(layers: int, device: str = "cpu", shape: Shape | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    s = shape or SHAPES["llava"]
    text = LlamaConfig(hidden_size=s.hidden, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       intermediate_size=s.intermediate, vocab_size=s.vocab, num_hidden_layers=layers,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", pad_token_id=0)
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():  # weights allocated where they run (7B in float32: 28 GB)
        model = LlavaForConditionalGeneration(cfg)
    ids = [1] + [100 + i for i in range(N_BEFORE)] + [32000] * N_IMAGE + [200 + i for i in range(N_AFTER)]
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "pixel_values": torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))}
    return model, batch


def build_qwen2_vl(layers: int, device: str = "cpu", shape: Shape | None = None):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    s = shape or SHAPES["qwen2_vl"]
    text = dict(hidden_size=s.hidden, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                intermediate_size=s.intermediate, vocab_size=s.vocab, num_hidden_layers=layers,
                max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=1, embed_dim=64, hidden_size=s.hidden, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                        vision_start_token_id=151652, vision_end_token_id=151653)
    with torch.device(device), no_init_weights():
        model = Qwen2VLForConditionalGeneration(cfg)
    grid = (1, 48, 48)  # 2304 patches, merged 2x2 -> 576 image tokens
    ids = ([151644] + [100 + i for i in range(N_BEFORE - 1)] + [151652] + [151655] * N_IMAGE + [151653]
           + [200 + i for i in range(N_AFTER - 1)])
    types = [1 if t == 151655 else 0 for t in ids]
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "pixel_values": torch.randn(grid[1] * grid[2], 3 * 2 * 14 * 14, generator=g),
             "image_grid_thw": torch.tensor([grid]), "mm_token_type_ids": torch.tensor([types])}
    return model, batch


def build(family: str, layers: int, dtype: torch.dtype, device: str, seed: int = 0, shape: Shape | None = None):
    """(adapter, batch) of a random 7B-wide model of `family` with `layers` decoder layers (`shape`: another width)."""
    from sinkscope.models import adapter_for_model

    model, batch = {"llava": build_llava, "qwen2_vl": build_qwen2_vl}[family](layers, device, shape)
    _fill_random(model, seed)
    model = model.to(dtype=dtype).eval()
    adapter = adapter_for_model(model, None, f"{family}-7b-width-{layers}-layers")
    adapter.set_text_attention("eager")
    batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
    return adapter, batch


# ----------------------------------------------------------------------------- measuring

def interleaved(variants: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each variant's run, the variants taking turns (A B C A B C ...).

    variants: name -> (context manager factory, fn). Taking turns keeps a change in the load of a
    shared machine from landing on one variant only; each variant runs once first as a warm-up.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(repeats + 1):
        for name, (context, fn) in variants.items():
            with context():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                if i:
                    times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def reset_peak(device: str = "cpu") -> None:
    """Reset the peak memory reading so the next one covers what follows: the GPU allocator's peak on CUDA,
    this process's peak RSS (Linux: VmHWM) on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb(device: str = "cpu") -> float:
    """Peak memory in MB since the last reset_peak: GPU memory allocated on CUDA, resident set on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sinks_at(adapter, batch, n_sinks: int = 20) -> tuple[list[int], float, torch.Tensor]:
    """(sink dims, tau, [batch, token] sink mask at layer 0): tau picked so about n_sinks image tokens are sinks."""
    from sinkscope.measures.sinks import sink_score
    from sinkscope.trace import Tracer

    dims = [0, 1]
    seen = {}

    class Grab:
        def begin(self, info):
            self.kinds = info.token_kinds

        def residual(self, layer, states):
            seen[layer] = sink_score(states, dims, "rms", self.kinds.real_mask.to(states.device), 1e-6).float().cpu()

        def attention(self, layer, probs):
            pass

        def end(self):
            pass

    grab = Grab()
    Tracer(adapter).run(batch, [grab], layers=[adapter.num_layers - 1], attention=False)
    phi = seen[adapter.num_layers - 1][0]
    visual = grab.kinds.visual_mask[0].cpu()  # phi was brought to the CPU
    tau = float(phi[visual].sort(descending=True).values[n_sinks - 1])
    return dims, tau, ((phi >= tau) & visual)[None]


def _scan_reducer(adapter, dims, tau, tables_later: bool = False):
    from sinkscope.analyses.scan import ScanReducer

    return ScanReducer(dims, tau, 5, 0.5, 0.2, adapter.rms_norm_eps, [], want_profile=False, score="rms",
                       token_strings=adapter.token_strings, tables_later=tables_later)


def _write(reducer, folder, sample_id) -> None:
    """A traced sample's tables (`batch_tables`, every token row kept) and, given a run folder, their rows appended
    to its CSVs and the sample marked done."""
    from sinkscope.analyses.scan import batch_tables

    tables = batch_tables(reducer, "all")
    if folder is not None:
        for table, frame in tables.items():
            folder.append_rows(table, frame)
        folder.mark_done([str(sample_id)])


def scan_pass(tracer, adapter, batch, dims, tau, folder=None, sample_id=0) -> None:
    """The scan's per-sample work, one sample on its own: one traced forward with its reducer, then its tables."""
    reducer = _scan_reducer(adapter, dims, tau)
    tracer.run(batch, [reducer], sample_ids=[str(sample_id)])
    _write(reducer, folder, sample_id)


def scan_stream(tracer, adapter, batch, dims, tau, folder, n: int) -> None:
    """n samples in `run_scan`'s order: each sample's forward is queued, then the previous sample's tables are
    written while the device runs it (on a CPU nothing is queued: the same as n scan_pass calls)."""
    pending = None
    for i in range(n):
        reducer = _scan_reducer(adapter, dims, tau, tables_later=True)
        tracer.run(batch, [reducer], sample_ids=[str(i)])
        if pending is not None:
            _write(*pending)
        pending = (reducer, folder, i)
    _write(*pending)


def heads_pass(tracer, adapter, batch, dims, tau) -> None:
    """The head analysis' per-sample work (a sample without attention maps, as all but a run's first
    `--n-maps`): one traced forward with its reducer, whose `end` builds the tables."""
    from sinkscope.analyses.heads import HeadsConfig, HeadsReducer

    reducer = HeadsReducer(dims, tau, adapter.rms_norm_eps, "rms", HeadsConfig(model="real-size"), set(),
                           adapter.token_strings)
    tracer.run(batch, [reducer], sample_ids=["0"])


def contributions_pass(tracer, adapter, batch, dims, tau, grams: dict) -> None:
    """The contribution analysis' per-sample work: a forward traced with value states (from the capture function)."""
    from sinkscope.analyses.contributions import ContributionReducer

    reducer = ContributionReducer(dims, tau, adapter.rms_norm_eps, "rms", grams)
    tracer.run(batch, [reducer], sample_ids=["0"], values=True)


@contextlib.contextmanager
def attention_as(adapter, name: str):
    """The language model's attention implementation set to `name` inside the block, back to eager after it."""
    adapter.set_text_attention(name)
    try:
        yield
    finally:
        adapter.set_text_attention("eager")


def verdict(value: float, goal: float) -> str:
    return f"{value:.3f} (goal <= {goal:g}: {'met' if value <= goal else 'NOT met'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(SHAPES), default="llava")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--samples", type=int, default=3, help="samples of the second peak-memory scan")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stream", type=int, default=4, help="samples of the timed scan stream (run_scan's order)")
    ap.add_argument("--compile", action="store_true",
                    help="also time VAR with compile=True (each layer's edit fused by torch.compile; compiled in the "
                         "warm-up run, which is not timed)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from sinkscope.interventions.knockout import knockout
    from sinkscope.interventions.var import VARConfig, var
    from sinkscope.runfolder import RunFolder
    from sinkscope.trace import Tracer

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    adapter, batch = build(args.family, args.layers, dtype, args.device)
    s = SHAPES[args.family]
    n_params = sum(p.numel() for p in adapter.model.parameters())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.family} at 7B width: hidden {s.hidden}, {s.heads} heads ({s.kv_heads} kv), intermediate "
          f"{s.intermediate}, vocab {s.vocab}, {args.layers} decoder layers, {n_params / 1e9:.2f}B parameters, "
          f"{args.dtype} on {args.device}; tiny vision tower (real patch grid); prompt {batch['input_ids'].shape[1]} "
          f"tokens ({N_IMAGE} image); batch 1; {torch.get_num_threads()} torch threads; 1-min load average "
          f"{load:.1f} on {os.cpu_count()} CPUs; built in {time.perf_counter() - t0:.0f}s; median of {args.repeats}")
    if load > (os.cpu_count() or 1):
        print("note: the machine is shared and loaded (load average above the CPU count): absolute times are "
              "inflated and noisy; ratios are measured back to back in this run")
    model, r = adapter.model, {}
    tok_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    inputs = adapter.forward_inputs(batch)
    dims, tau, sink_mask = sinks_at(adapter, batch)
    layers = list(range(args.layers))
    tracer = Tracer(adapter)
    run_info: dict = {}

    def attention(name):
        return attention_as(adapter, name)

    @contextlib.contextmanager
    def with_var():
        with var(adapter, VARConfig(sink_dims=dims, tau=tau, layers=layers)) as handle:
            yield
            run_info["selected"] = int(handle.selected(layers[-1]).sum())
            run_info["sinks"] = int(handle.sinks(layers[-1]).sum())

    @contextlib.contextmanager
    def with_var_compiled():
        with var(adapter, VARConfig(sink_dims=dims, tau=tau, layers=layers), compile=True):
            yield

    def with_knockout():
        return knockout(adapter, sink_mask.to(args.device), layers=layers)

    # the forward a trace runs: every layer, the last position's logits only (the scan reads no logits); the
    # forward unembedding every position is timed beside it, for what a plain `model(**inputs)` costs
    forward = lambda: model(**inputs, **adapter.without_logits())  # noqa: E731
    forward_all_logits = lambda: model(**inputs)  # noqa: E731
    generate = lambda: model.generate(**inputs, **tok_kw)  # noqa: E731
    from sinkscope.analyses.contributions import output_grams

    grams = output_grams(adapter)  # once per run, as run_contributions makes them
    scan_folder = RunFolder(tempfile.mkdtemp(prefix="real_size_scan_"), "scan", {"benchmark": "real_size"},
                            resume=False)  # the timed scan writes its rows, as run_scan does
    with torch.no_grad():
        r.update(interleaved({
            "forward eager": (lambda: attention("eager"), forward),
            "forward sdpa": (lambda: attention("sdpa"), forward),
            "forward eager, all logits": (lambda: attention("eager"), forward_all_logits),
            "scan": (contextlib.nullcontext, lambda: scan_pass(tracer, adapter, batch, dims, tau, scan_folder)),
            "scan stream": (contextlib.nullcontext, lambda: scan_stream(tracer, adapter, batch, dims, tau, scan_folder,
                                                                        args.stream)),
            "forward knockout": (with_knockout, forward),
            "heads": (contextlib.nullcontext, lambda: heads_pass(tracer, adapter, batch, dims, tau)),
            "contributions": (contextlib.nullcontext,
                              lambda: contributions_pass(tracer, adapter, batch, dims, tau, grams)),
        }, args.repeats))
        generates = {
            "generate eager": (lambda: attention("eager"), generate),
            "generate sdpa": (lambda: attention("sdpa"), generate),
            "generate var": (with_var, generate),
            "generate knockout": (with_knockout, generate),
        }
        if args.compile:
            generates["generate var compiled"] = (with_var_compiled, generate)
        r.update(interleaved(generates, args.repeats))
    shutil.rmtree(scan_folder.path, ignore_errors=True)
    n_sel, n_sinks = run_info["selected"], run_info["sinks"]
    r["scan stream, per sample"] = r.pop("scan stream") / args.stream
    for k, v in r.items():
        print(f"  {k:<24} {v * 1000:9.1f} ms")
    print(f"VAR: {n_sinks} sinks found at prefill in the last layer; {n_sel} (head, query) rows edited in its last "
          f"decode step (of {s.heads}); knockout blocks {int(sink_mask.sum())} image tokens in every layer")
    e, d = r["forward eager"], r["forward sdpa"]
    print(f"scan / plain eager forward       = {verdict(r['scan'] / e, 1.2)}   (scan / SDPA forward = {r['scan'] / d:.3f})")
    stream = r["scan stream, per sample"]
    print(f"scan stream / plain eager forward = {verdict(stream / e, 1.2)}   ({args.stream} samples in run_scan's "
          f"order: a sample's tables written while the next one's forward runs)")
    print(f"(plain eager forward / the same unembedding every position = {e / r['forward eager, all logits']:.3f}; "
          f"scan / that = {r['scan'] / r['forward eager, all logits']:.3f})")
    print(f"heads / plain eager forward      = {r['heads'] / e:.3f}   contributions / plain eager forward = "
          f"{r['contributions'] / e:.3f}   (no goals; a sample's forward traced and its tables built)")
    print(f"VAR generate / eager generate    = {verdict(r['generate var'] / r['generate eager'], 1.10)}")
    print(f"VAR generate / SDPA generate     = {verdict(r['generate var'] / r['generate sdpa'], 1.3)}")
    if args.compile:
        print(f"VAR compiled / eager generate    = {verdict(r['generate var compiled'] / r['generate eager'], 1.10)}")
        print(f"VAR compiled / SDPA generate     = {verdict(r['generate var compiled'] / r['generate sdpa'], 1.3)}")
    print(f"knockout forward / eager forward = {r['forward knockout'] / e:.3f}   knockout generate / eager generate = "
          f"{r['generate knockout'] / r['generate eager']:.3f}")
    # peak memory of the scan: 1 sample vs --samples samples, tables written as run_scan writes them
    peaks = {}
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for n in (1, args.samples):
            folder = RunFolder(os.path.join(tmp, f"scan{n}"), "scan", {"benchmark": "real_size"}, resume=False)
            reset_peak(args.device)
            base = peak_rss_mb(args.device)
            for i in range(n):
                scan_pass(tracer, adapter, batch, dims, tau, folder, sample_id=i)
            peaks[n] = (base, peak_rss_mb(args.device))
    (b1, p1), (bn, pn) = peaks[1], peaks[args.samples]
    what = "peak GPU memory allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"scan {what}: 1 sample {p1:.0f} MB (+{p1 - b1:.0f} over the model), {args.samples} samples {pn:.0f} MB "
          f"(+{pn - bn:.0f}); ratio {pn / p1:.3f} (flat: {'met' if pn / p1 <= 1.05 else 'NOT met'}, goal <= 1.05)")
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
