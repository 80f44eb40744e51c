import time, torch, warnings
warnings.simplefilter("ignore")
from sinkscope.analyses.ablate import _measure, parse_yes_no
from sinkscope.analyses.common import answer_token_ids
from sinkscope.analyses.scan import prepare_batch
from sinkscope.eval.tasks import load_samples
from sinkscope.models import load
torch.set_num_threads(2)
adapter = load("demo")
samples = load_samples("demo", 8)
batch = prepare_batch(adapter, samples)
yes_id, no_id = answer_token_ids(adapter)
labels = ["yes"] * 8
@torch.no_grad()
def old():
    inputs = adapter.device_inputs(batch)
    logits = adapter.model(**inputs).logits[:, -1].float().cpu()
    tok = getattr(adapter.processor, "tokenizer", adapter.processor)
    out = adapter.model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    return out
new = lambda: _measure(adapter, batch, yes_id, no_id, labels, 4)
t = {"old": [], "new": []}
for i in range(7):
    for k, f in (("old", old), ("new", new)):
        s = time.perf_counter(); f(); e = time.perf_counter() - s
        if i: t[k].append(e)
import statistics
o, n = statistics.median(t["old"]), statistics.median(t["new"])
print(f"demo, batch 8 of {batch['input_ids'].shape[1]} tokens, 4 new tokens: forward+generate {o*1e3:.0f} ms, generate with its logits {n*1e3:.0f} ms, ratio {n/o:.3f}")
