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
# # Ablations: knock out attention to the visual sinks
#
# Kang et al. (evidence 4): blocking the text queries' attention to visual sink tokens barely
# changes the answers, while blocking as many random image tokens can. This notebook does it on
# a few yes/no questions with `sinkscope.interventions.knockout` and compares the answers.
# `sinkscope ablate` does the same over a data set with CIs. `MODEL` defaults to `"demo"`; the
# tests use `"organism"`.

# %% tags=["parameters"]
import os

MODEL = os.environ.get("SINKSCOPE_NOTEBOOK_MODEL", "demo")
N_SAMPLES = 4

# %%
import math

import torch

import sinkscope
from sinkscope.eval.tasks import load_samples
from sinkscope.interventions.knockout import knockout, random_image_keys
from sinkscope.measures import massive, sinks

torch.set_num_threads(int(os.environ.get("SINKSCOPE_THREADS", "1")))
adapter = sinkscope.load_model(MODEL)
tracer = sinkscope.Tracer(adapter)
samples = load_samples("demo:pope-adversarial", N_SAMPLES)
score = "rms" if math.sqrt(adapter.hidden_size) >= 40 else "layer"

# %% [markdown]
# ## Which image tokens are sinks (any layer from 2 on)

# %%
masks = []
for s in samples:
    batch = adapter.prepare([s.question], [s.image()])
    cache = tracer.run_with_cache(batch)
    kinds = adapter.token_kinds(batch["input_ids"], batch["attention_mask"])
    residual = cache.stacked_residual()[:, 0]  # [layer, token, dim]
    dims = massive.discover_sink_dims(residual[:, kinds.bos_mask[0]][:, 0][None], start_layer=2).dims
    if not dims:
        masks.append((batch, kinds, torch.zeros_like(kinds.visual_mask)))
        continue
    real = kinds.real_mask[0].expand(residual.shape[:2])
    phi = sinks.sink_score(residual, dims, score, real)
    tau = sinks.choose_tau_layer_relative() if score == "layer" else sinks.choose_tau(phi[None, 2:], adapter.hidden_size)
    sink_any = ((phi[2:] >= tau.value).any(dim=0) & kinds.visual_mask[0])[None]  # [1, token]
    masks.append((batch, kinds, sink_any))
    print(f"{s.sample_id}: {int(sink_any.sum())} visual sink tokens of {int(kinds.visual_mask.sum())}")

# %% [markdown]
# ## Answers: no knockout, visual sinks knocked out, as many random image tokens knocked out

# %%
def answer(batch) -> tuple[str, float]:
    """Greedy answer (3 tokens) and the first token's top probability."""
    with torch.no_grad():
        out = adapter.model.generate(**adapter.forward_inputs(batch), max_new_tokens=3, do_sample=False,
                                     output_scores=True, return_dict_in_generate=True)
    text = adapter.processor.batch_decode(out.sequences[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    return text.strip(), float(out.scores[0].softmax(-1).max())


generator = torch.Generator().manual_seed(0)
for s, (batch, kinds, sink_mask) in zip(samples, masks):
    base = answer(batch)
    with knockout(adapter, sink_mask):
        no_sinks = answer(batch)
    with knockout(adapter, random_image_keys(kinds, sink_mask.sum(dim=1), generator=generator)):
        no_random = answer(batch)
    print(f"{s.question!r} (reference {s.answer!r})\n  answer {base[0]!r} p={base[1]:.3f} | knockout sinks "
          f"{no_sinks[0]!r} p={no_sinks[1]:.3f} | knockout random {no_random[0]!r} p={no_random[1]:.3f}")
