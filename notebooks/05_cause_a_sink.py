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
# # Cause a sink: write the sink signature into a token, then take it away
#
# Kang et al. show that tokens with massive values in the sink dimensions receive much attention.
# That is a correlation. Here we intervene: `inject_sink` sets the sink-dim coordinates of one
# ordinary background image token to a fraction (`scale`) of the first token's, at the residual
# stream entering the layer where the first token's massive values appear, and we watch whether the
# heads start treating it as a sink. A control adds the same magnitude along a random non-sink
# dimension. Then `remove_sink` takes the signature away from the first token (to zero, or to the
# mean over ordinary tokens) and we look at where its attention goes.
# `sinkscope inject` and `sinkscope remove` do this over a data set with controls and CIs.
# `MODEL` defaults to `"demo"`; the tests use `"organism"` (its sink mechanism is planted by hand:
# what it shows there is ground truth, not a finding).

# %% tags=["parameters"]
import os

MODEL = os.environ.get("SINKSCOPE_NOTEBOOK_MODEL", "demo")
N_SAMPLES = 4
SCALES = [0.0, 0.01, 0.1, 1.0]

# %%
import math

import matplotlib.pyplot as plt
import torch

import sinkscope
from sinkscope.analyses.inject import background_mask
from sinkscope.eval.tasks import load_samples
from sinkscope.interventions.sink_signature import SinkSignature, inject_sink, remove_sink, sink_mask_of
from sinkscope.measures.attention_share import attention_share
from sinkscope.measures.contributions import class_means

torch.set_num_threads(int(os.environ.get("SINKSCOPE_THREADS", "1")))
adapter = sinkscope.load_model(MODEL)
samples = load_samples("demo:pope-adversarial", N_SAMPLES)
batch = adapter.prepare([s.question for s in samples], [s.image() for s in samples])
inputs = adapter.forward_inputs(batch)
kinds = adapter.token_kinds(inputs["input_ids"], inputs["attention_mask"])
queries = kinds.queries_after_image()
score = "rms" if math.sqrt(adapter.hidden_size) >= 40 else "layer"  # the scan's choice for narrow models

# %% [markdown]
# ## The signature: sink dims, the layer where the first token is a sink, the sink rule
#
# Sink dims and tau are discovered on this batch the way `sinkscope scan` does it (the first token's
# RMS-normalised state). We inject where the first token is a sink by that rule (as `sinkscope inject`
# does by default): in a narrow model the first token's massive values appear a layer or two before
# they cross tau.

# %%
from dataclasses import replace

from sinkscope.analyses.inject import first_sink_layer

sig = SinkSignature.discover(adapter, batch, score=score)
layer, why = first_sink_layer(adapter, samples, sig, N_SAMPLES, N_SAMPLES)
sig = replace(sig, layer=layer)
print(f"sink dims {list(sig.dims)}, injection layer {sig.layer} ({why}), sink rule: {score} score >= tau {sig.tau:.3g}")

# %% [markdown]
# ## One ordinary background token per sample
#
# A background image token (the demo world's ground truth) that is not a sink entering the onset layer.

# %%
with torch.no_grad():
    base = adapter.model(**inputs, output_attentions=True, output_hidden_states=True)
state = base.hidden_states[sig.layer]
ordinary = background_mask(samples, kinds) & ~sink_mask_of(state, kinds, sig)
target = torch.zeros_like(ordinary)
for b in range(len(samples)):
    target[b, ordinary[b].nonzero()[len(ordinary[b].nonzero()) // 2]] = True
print("injected token per sample (position):", target.float().argmax(1).tolist())


def received(output, layer):
    """[batch, head]: attention the target token receives from the text queries after the image."""
    return class_means(output.attentions[layer].float(), target, queries)


# %% [markdown]
# ## Inject: attention the token receives, its most attentive head, per layer and scale

# %%
layers = list(range(sig.layer, adapter.num_layers))
curves = {}
with torch.no_grad():
    curves["no injection"] = [float(received(base, l).max(dim=1).values.mean()) for l in layers]
    for scale in SCALES:
        with inject_sink(adapter, target, scale=scale, signature=sig):
            out = adapter.model(**inputs, output_attentions=True)
        curves[f"injected, scale {scale:g}"] = [float(received(out, l).max(dim=1).values.mean()) for l in layers]
    generator = torch.Generator().manual_seed(0)
    control_dim = next(d for d in torch.randperm(adapter.hidden_size, generator=generator).tolist() if d not in sig.dims)
    with inject_sink(adapter, target, scale=1.0, signature=sig, control="random_dim", control_dim=control_dim):
        out = adapter.model(**inputs, output_attentions=True)
    curves[f"random dim {control_dim}, same magnitude"] = [float(received(out, l).max(dim=1).values.mean()) for l in layers]

for name, values in curves.items():
    print(f"{name:32s} max over layers: {max(values):.3f}")
fig, ax = plt.subplots(figsize=(6, 3.2))
for name, values in curves.items():
    ax.plot(layers, values, marker="o", ms=3, label=name, ls="--" if "random" in name else "-")
ax.set_xlabel("layer")
ax.set_ylabel("attention received\n(most attentive head, mean over queries)")
ax.set_yscale("log")
ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
ax.set_title("Writing the sink signature into one background token")
plt.show()

# %% [markdown]
# On the organism the planted heads key on the planted dims, so the injected token draws their
# attention and the random-dimension control does not: the notebook checks that (ground truth).
# On the demo, read the curves: does a pretrained SmolLM2 head start attending to an image token
# because of its sink-dim values alone?

# %%
if MODEL == "organism":
    assert max(curves["injected, scale 1"]) > 5 * max(curves["no injection"])
    assert max(curves[f"random dim {control_dim}, same magnitude"]) < 2 * max(curves["no injection"])
    print("organism: the planted heads attend to the injected token, not to the random-dim control (planted)")

# %% [markdown]
# ## Remove: where does the first token's attention go?
#
# The first token's sink dims set to zero, or to the mean over ordinary tokens, entering the onset layer.

# %%
first = kinds.bos_mask
classes = {"first token": first, "other text": kinds.text_mask & ~first, "image": kinds.visual_mask}


def shares(output):
    return {name: float(torch.stack([attention_share(output.attentions[l].float(), m, queries).mean()
                                     for l in layers]).mean()) for name, m in classes.items()}


yes_id, no_id = (adapter.processor.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("yes", "no"))
sign = torch.tensor([1.0 if s.answer == "yes" else -1.0 for s in samples])
rows = {"unmodified": (shares(base), base.logits)}
with torch.no_grad():
    for to in ("zero", "mean"):
        with remove_sink(adapter, "first", to=to, signature=sig):
            out = adapter.model(**inputs, output_attentions=True)
        rows[f"first token to {to}"] = (shares(out), out.logits)
for name, (share, logits) in rows.items():
    diff = ((logits[:, -1, yes_id] - logits[:, -1, no_id]) * sign).mean()
    print(f"removal {name:20s} " + ", ".join(f"{k} {v:.3f}" for k, v in share.items())
          + f"; answer logit difference {float(diff):+.2f}")

# %% [markdown]
# Over a data set, with the other token groups, controls, CIs and VAR beside it:
#
# ```bash
# sinkscope inject --model demo --out runs/inject
# sinkscope remove --model demo --data demo:mixed --out runs/remove
# sinkscope remove --model smollm2 --data plain-text --out runs/remove-text   # perplexity, text only
# ```
