# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Image-centric heads and VAR in `generate`
#
# Visual Attention Redistribution (Kang et al.) moves a share p of the attention that
# image-centric heads pay to sink tokens onto the image's non-sink tokens. It is an attention
# edit, so `model.generate` (KV cache, batching) just works inside `with var(...)`. This notebook
# calibrates VAR (sink dims and tau from data), shows which heads it selects, and compares the
# answers with and without it. `MODEL` defaults to `"demo"`; the tests use `"organism"`.

# %% tags=["parameters"]
import os

MODEL = os.environ.get("SINKSCOPE_NOTEBOOK_MODEL", "demo")
N_SAMPLES = 4

# %%
import math

import torch

import sinkscope
from sinkscope.eval.tasks import load_samples
from sinkscope.interventions.var import VARConfig, calibrate, var

torch.set_num_threads(int(os.environ.get("SINKSCOPE_THREADS", "1")))
adapter = sinkscope.load_model(MODEL)
samples = load_samples("demo:mixed", N_SAMPLES)
score = "rms" if math.sqrt(adapter.hidden_size) >= 40 else "layer"  # as `sinkscope report` chooses
config = calibrate(adapter, samples, VARConfig(sink_score=score))  # paper defaults: rho 0.5, p 0.6, summ 0.2
print(f"VAR: sink dims {config.sink_dims}, tau {config.tau:.3g} ({score}), rho {config.rho}, p {config.p}")

# %% [markdown]
# ## Answers with and without VAR, and the heads VAR edited

# %%
def generate(batch) -> str:
    with torch.no_grad():
        out = adapter.model.generate(**adapter.forward_inputs(batch), max_new_tokens=4, do_sample=False)
    return adapter.processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


changed = 0
for s in samples:
    batch = adapter.prepare([s.question], [s.image()])
    base = generate(batch)
    with var(adapter, config) as run:
        with_var = generate(batch)
        heads = {layer: torch.nonzero(run.selected(layer)[0].any(dim=-1)).flatten().tolist()
                 for layer in run.resolved.layers}
    changed += base != with_var
    print(f"{s.question!r} (reference {s.answer!r}): answer {base!r}, with VAR {with_var!r}")
    print("  heads VAR edited (last step), by layer:", {k: v for k, v in heads.items() if v} or "none")
print(f"VAR changed {changed} of {len(samples)} answers")
