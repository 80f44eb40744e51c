"""Operations dispatched per layer and per step, and host reads: what sinkscope adds where a GPU waits on the host.

At batch 1 a 7B decode step on a GPU is launch-bound: each operation costs a kernel launch and Python
dispatch (~10-20 us) whatever its size, so the number of operations per layer predicts the time ratios
there (the H200 of 2026-12-04 gave VAR generate / eager 1.86x when the operation counts below gave 1.72x).
A host read (`.item()`, a boolean-mask index, `nonzero`) makes the host wait for the device, so the
next layer's kernels cannot be queued in advance. Both are counted here on the CPU, exactly, with a
TorchDispatchMode: no GPU needed, and the counts do not depend on the width, so a narrow model of
LLaVA-1.5's structure (Llama layers, 576 image tokens, 640-token prompt) stands in for the 7B one.

Per layer: the difference between models of `--layers` and 2 layers, divided by the difference in layers;
per decode step: the difference between generating 3 and 2 tokens. View and metadata operations
(`view`, `transpose`, `slice`, ...) are left out: they launch nothing.

    .venv/bin/python benchmarks/dispatch_count.py
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_size  # noqa: E402  (the same LLaVA-1.5 builder, at a narrow width)

VIEWS = {"view", "_unsafe_view", "expand", "transpose", "t", "unsqueeze", "squeeze", "slice", "select", "permute",
         "as_strided", "alias", "detach", "unbind", "split", "lift_fresh", "_reshape_alias", "reshape"}
READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "equal"}
ALLOCATIONS = {"empty", "empty_strided", "empty_like"}  # the allocator, no kernel
TABLES = ("_sample_columns", "_residual_tables", "_token_table", "_head_table", "_profile_entry")  # on the CPU
MAYBE_NOTHING = {"aten::to", "aten::dropout", "aten::contiguous"}  # launch nothing when they have no children


class Count(TorchDispatchMode):
    """Counts launching operations, and host reads made from sinkscope's own code."""

    def __init__(self, within: tuple[str, ...] = (), host_side: tuple[str, ...] = ()):
        super().__init__()
        self.within = within  # count reads only under these functions (empty: anywhere in sinkscope)
        self.host_side = host_side  # functions whose operations run on CPU tensors whatever the model's device
        self.ops: collections.Counter = collections.Counter()
        self.host_ops: collections.Counter = collections.Counter()
        self.reads: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[1]
        if name not in VIEWS:
            if self.host_side and any(f.name in self.host_side for f in traceback.extract_stack()):
                self.host_ops[name] += 1
            else:
                self.ops[name] += 1
        bool_index = name in ("index", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
        if name in READS or bool_index:
            stack = [f for f in traceback.extract_stack() if "/torch/" not in f.filename]
            frames = [f for f in stack if "/sinkscope/" in f.filename]
            mine = bool(frames) and stack[-2] is frames[-1]  # the read is made by sinkscope's code, not the model's
            if mine and (not self.within or any(f.name in self.within for f in frames)):
                self.reads[f"{name} at {frames[-1].filename.split('/sinkscope/')[-1]}:{frames[-1].lineno}"] += 1
        return func(*args, **(kwargs or {}))


def profiled(fn) -> int:
    """Operations that launch work, by torch.profiler: top-level aten operations (views, allocations and no-ops left
    out) plus the kernels of compiled regions (inductor's kernel profile). The way to count a torch.compile'd edit, which runs no
    aten operations a dispatch mode could see (and refuses to run under one)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for event in prof.events():
        name = event.name
        if name.startswith("graph_") and "_fused_" in name:
            count += 1
        elif name.startswith("aten::") and name.split("::")[1] not in VIEWS | ALLOCATIONS:
            if name in MAYBE_NOTHING and not event.cpu_children:
                continue  # a no-op: same dtype and device, dropout at p = 0
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            count += parent is None
    return count


def counted(fn, within: tuple[str, ...] = (), host_side: tuple[str, ...] = ()) -> Count:
    with Count(within, host_side) as c:
        fn()
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    narrow = real_size.Shape(hidden=128, heads=4, kv_heads=4, intermediate=256, vocab=32064)
    from sinkscope.interventions.knockout import knockout
    from sinkscope.interventions.var import VARConfig, var
    from sinkscope.trace import Tracer

    built = {n: real_size.build("llava", n, torch.float32, "cpu", shape=narrow) for n in (2, args.layers)}
    per_layer = args.layers - 2

    def variants(adapter, dims, tau, sink_mask, n_layers):
        layers = list(range(n_layers))
        return {"eager": lambda: real_size.attention_as(adapter, "eager"),
                "sdpa": lambda: real_size.attention_as(adapter, "sdpa"),
                "VAR": lambda: var(adapter, VARConfig(sink_dims=dims, tau=tau, layers=layers)),
                "knockout": lambda: knockout(adapter, sink_mask, layers=layers)}

    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # compiled kernels appear in the profiler by name
    profiled_step: dict[int, dict[str, int]] = {}
    step: dict[int, dict[str, Count]] = {}
    scan: dict[int, dict[str, Count]] = {}
    with torch.no_grad():
        for n, (adapter, batch) in built.items():
            inputs = adapter.forward_inputs(batch)
            dims, tau, sink_mask = real_size.sinks_at(adapter, batch)

            def generate(k):
                return lambda: adapter.model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                                      pad_token_id=0)
            step[n], profiled_step[n] = {}, {}
            contexts = variants(adapter, dims, tau, sink_mask, n)
            for name, context in contexts.items():
                with context():
                    two, three = counted(generate(2)), counted(generate(3))
                diff = Count()
                diff.ops, diff.reads = three.ops - two.ops, three.reads - two.reads
                step[n][name] = diff
            contexts["VAR compiled"] = lambda: var(adapter, VARConfig(sink_dims=dims, tau=tau, layers=list(range(n))),
                                                   compile=True)
            for name in ("eager", "sdpa", "VAR", "VAR compiled"):
                with contexts[name]():
                    generate(3)()  # compiles, for the compiled variant
                    profiled_step[n][name] = profiled(generate(3)) - profiled(generate(2))
            tracer = Tracer(adapter)
            real_size.scan_pass(tracer, adapter, batch, dims, tau)  # locate the ops once
            scan[n] = {"forward": counted(lambda: adapter.model(**inputs)),
                       # reads during the trace only: the tables are built on the CPU after the forward
                       "scan": counted(lambda: real_size.scan_pass(tracer, adapter, batch, dims, tau),
                                       within=("residual", "attention", "values", "run"), host_side=TABLES)}

    def total(c: Count) -> int:
        return sum(c.ops.values())

    big, small = args.layers, 2
    print(f"LLaVA-1.5 structure (Llama layers, {real_size.N_IMAGE} image tokens, prompt "
          f"{real_size.N_BEFORE + 1 + real_size.N_IMAGE + real_size.N_AFTER} tokens), hidden 128; per layer = "
          f"({big} layers - {small} layers) / {per_layer}; torch {torch.__version__}")
    print("one decode step of generate (batch 1):")
    eager = total(step[big]["eager"])
    for name in ("eager", "sdpa", "VAR", "knockout"):
        t_big, t_small = total(step[big][name]), total(step[small][name])
        layer = (t_big - t_small) / per_layer
        reads = sum(step[big][name].reads.values())
        print(f"  {name:<9} {t_big:5d} ops ({layer:5.1f} per layer), host reads in sinkscope code: {reads}")
    e_layer = (total(step[big]["eager"]) - total(step[small]["eager"])) / per_layer
    s_layer = (total(step[big]["sdpa"]) - total(step[small]["sdpa"])) / per_layer
    v_layer = (total(step[big]["VAR"]) - total(step[small]["VAR"])) / per_layer
    k_layer = (total(step[big]["knockout"]) - total(step[small]["knockout"])) / per_layer
    print(f"  VAR adds {v_layer - e_layer:.1f} ops per layer to eager, {v_layer - s_layer:.1f} to SDPA; knockout adds "
          f"{k_layer - e_layer:.1f} to eager")
    fixed_e = total(step[big]["eager"]) - big * e_layer
    fixed_s = total(step[big]["sdpa"]) - big * s_layer
    fixed_v = total(step[big]["VAR"]) - big * v_layer
    var_step = fixed_v + 32 * v_layer
    print(f"  operation ratios of a decode step at 32 layers (the launch-bound proxy): VAR / eager = "
          f"{var_step / (fixed_e + 32 * e_layer):.3f} (goal 1.10), VAR / SDPA = {var_step / (fixed_s + 32 * s_layer):.3f} "
          f"(goal 1.3)")
    print("the same by torch.profiler (top-level operations and compiled kernels), to include VAR compiled:")
    p_layer = {name: (profiled_step[big][name] - profiled_step[small][name]) / per_layer for name in profiled_step[big]}
    fixed = {name: profiled_step[big][name] - big * p_layer[name] for name in p_layer}
    at32 = {name: fixed[name] + 32 * p_layer[name] for name in p_layer}
    for name in ("VAR", "VAR compiled"):
        print(f"  {name:<13} {p_layer[name]:5.1f} per layer (eager {p_layer['eager']:.1f}, SDPA {p_layer['sdpa']:.1f}); "
              f"at 32 layers VAR / eager = {at32[name] / at32['eager']:.3f} (goal 1.10), VAR / SDPA = "
              f"{at32[name] / at32['sdpa']:.3f} (goal 1.3)")
    f_layer = (total(scan[big]["forward"]) - total(scan[small]["forward"])) / per_layer
    c_layer = (total(scan[big]["scan"]) - total(scan[small]["scan"])) / per_layer
    reads_big = scan[big]["scan"].reads
    reads_layer = (sum(reads_big.values()) - sum(scan[small]["scan"].reads.values())) / per_layer
    h_layer = (sum(scan[big]["scan"].host_ops.values()) - sum(scan[small]["scan"].host_ops.values())) / per_layer
    print("scan of one sample (prefill, every layer traced):")
    print(f"  plain eager forward {f_layer:.1f} ops per layer; scan {c_layer:.1f} per layer on the model's device "
          f"(ratio {c_layer / f_layer:.2f}), and {h_layer:.1f} per layer on CPU tensors when its tables are built after "
          f"the forward; host reads during the trace: {reads_layer:.1f} per layer, "
          f"{sum(reads_big.values())} per sample (those not per layer read the token kinds, which live on the host)")
    for where, k in sorted(reads_big.items(), key=lambda kv: -kv[1])[:6]:
        print(f"    {k:4d}  {where}")


class HostCopies(TorchDispatchMode):
    """Copies between the host and the meta device, by direction; a copy to the host is answered with zeros (meta
    holds no values). On a GPU each copy to the host, and each from it without `non_blocking`, waits for the device."""

    def __init__(self):
        super().__init__()
        self.to_host = self.from_host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            source, target = args[0].device.type, str(kwargs.get("device", args[0].device))
            if source == "meta" and target == "cpu":
                self.to_host += 1
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            self.from_host += source == "cpu" and target == "meta"
        return func(*args, **kwargs)


def head_and_contribution_copies(n_layers: int) -> dict[str, tuple[int, int, int]]:
    """The head and contribution analyses run here on one LLaVA-1.5-shaped sample (640 tokens, 32 heads, width
    4096, its attention map kept), on the meta device: (copies during the forward's first layer, during each later
    layer; at the batch's end, to the host and from it; operations in a layer, views and allocations left out)."""
    from sinkscope.analyses.contributions import ContributionReducer
    from sinkscope.analyses.heads import HeadsConfig, HeadsReducer
    from sinkscope.kinds import BOS, TEXT, VISUAL, TokenKinds
    from sinkscope.trace import BatchInfo

    kind = torch.tensor([[BOS] + [TEXT] * real_size.N_BEFORE + [VISUAL] * real_size.N_IMAGE
                         + [TEXT] * real_size.N_AFTER])
    info = BatchInfo(torch.zeros(kind.shape, dtype=torch.long), TokenKinds(kind, torch.where(kind == VISUAL, 0, -1)),
                     ["s0"])
    t, heads, width = kind.shape[1], 32, 4096
    reducers = {"heads": HeadsReducer([1415, 2533], 20.0, 1e-6, "rms", HeadsConfig(model="meta"), {"s0"}, None),
                "contributions": ContributionReducer([1415, 2533], 20.0, 1e-6, "rms",  # W_O's grams per layer
                                                     {i: torch.empty(heads, width // heads, width // heads,
                                                                     dtype=torch.float64, device="meta")
                                                      for i in range(n_layers)})}
    out = {}
    for name, reducer in reducers.items():
        reducer.begin(info)
        per_layer, ops = [], 0
        for layer in range(n_layers):
            with Count() as counted_ops, HostCopies() as copies:
                reducer.residual(layer, torch.empty(1, t, width, device="meta"))
                if name == "contributions":
                    reducer.values(layer, torch.empty(1, heads, t, width // heads, device="meta"))
                reducer.attention(layer, torch.empty(1, heads, t, t, device="meta"))
            per_layer.append(copies.to_host + copies.from_host)
            ops = sum(n for op, n in counted_ops.ops.items() if op not in ALLOCATIONS)  # the last layer's
        with HostCopies() as copies:
            reducer.end()
        out[name] = (per_layer[0], max(per_layer[1:]), copies.to_host, copies.from_host, ops)
    return out


def print_head_and_contribution_copies() -> None:
    print("head and contribution analyses, one LLaVA-1.5-shaped sample run here (meta device, 32 layers): copies "
          "between host and device")
    for name, (first, later, to_host, from_host, ops) in head_and_contribution_copies(32).items():
        print(f"  {name:<13} first layer {first}, each later layer {later}; end of batch {to_host} to the host, "
              f"{from_host} from it (the batch's token masks); {ops} operations per layer during the forward")


if __name__ == "__main__":
    main()
    print_head_and_contribution_copies()
