import sys, time, torch
sys.path.insert(0, 'benchmarks')
import host_bound_scan as hb, real_size as r
from sinkscope.trace import Tracer
torch.set_num_threads(1)
adapter, batch = hb.build(32)
dims, tau = [0, 1], 3.0
inputs = adapter.forward_inputs(batch)
from sinkscope.analyses.contributions import output_grams
ow = output_grams(adapter)  # W_O as the contribution analysis takes it (per-head grams; W_O itself before 96cc194)
tr = Tracer(adapter)
variants = {"forward": lambda: adapter.model(**inputs),
            "contributions": lambda: r.contributions_pass(tr, adapter, batch, dims, tau, ow),
            "heads": lambda: r.heads_pass(tr, adapter, batch, dims, tau)}
times = {k: [] for k in variants}
with torch.no_grad():
    for i in range(26):
        for k, f in variants.items():
            t = time.perf_counter(); f(); dt = time.perf_counter() - t
            if i: times[k].append(dt)
fw = min(times["forward"])
print("host-bound (Llama-LLaVA width 64, 30-token prompt, 32 layers, 1 thread, min of 25, variants taking turns): "
      + "; ".join(f"{k} {min(v) * 1e3:.1f} ms ({min(v) / fw:.2f}x)" for k, v in times.items()))
