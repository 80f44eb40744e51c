"""Knockout prefill vs eager forward, LLaVA-1.5 structure with 32 heads at width 256 (maps as large as 7B's), 4 layers."""
import sys, time, statistics, warnings, torch
sys.path.insert(0, "benchmarks")
import real_size
from sinkscope.interventions.knockout import knockout
warnings.simplefilter("ignore")
torch.set_num_threads(2)
shape = real_size.Shape(hidden=256, heads=32, kv_heads=32, intermediate=512, vocab=32064)
adapter, batch = real_size.build("llava", 4, torch.float32, "cpu", shape=shape)
inputs = adapter.forward_inputs(batch)
dims, tau, sink_mask = real_size.sinks_at(adapter, batch)
ctx = {"eager": lambda: real_size.attention_as(adapter, "eager"), "knockout": lambda: knockout(adapter, sink_mask)}
t = {k: [] for k in ctx}
with torch.no_grad():
    for rep in range(7):
        for k, c in ctx.items():
            with c():
                a = time.perf_counter(); adapter.model(**inputs); t[k].append(time.perf_counter() - a)
m = {k: min(v) for k, v in t.items()}
print(f"eager {m['eager']*1e3:.1f} ms, knockout {m['knockout']*1e3:.1f} ms, ratio {m['knockout']/m['eager']:.3f}")
