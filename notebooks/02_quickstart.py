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
# # Quickstart: find the visual sinks on one image
#
# Load a model, run it once on one image and question, find the sink dimensions from the first
# token's residual state, score every token with phi, and draw the image with its sink tokens
# outlined. `MODEL` is `"demo"` by default (the LLaVA on SmolLM2-135M); the tests run this
# notebook on `"organism"` (the tiny model with planted sinks) through `SINKSCOPE_NOTEBOOK_MODEL`.

# %% tags=["parameters"]
import os

MODEL = os.environ.get("SINKSCOPE_NOTEBOOK_MODEL", "demo")
SCENE = 7  # which test scene of the demo world
QUESTION = "is there a red circle in the image ?"

# %%
import math

import matplotlib.pyplot as plt
import torch

import sinkscope
from sinkscope.demo import world
from sinkscope.measures import massive, sinks

torch.set_num_threads(int(os.environ.get("SINKSCOPE_THREADS", "1")))
adapter = sinkscope.load_model(MODEL)
image = world.scene("test", SCENE).pil()
batch = adapter.prepare([QUESTION], [image])  # chat template + image tokens
cache = sinkscope.Tracer(adapter).run_with_cache(batch)
kinds = adapter.token_kinds(batch["input_ids"], batch["attention_mask"])
print(adapter.describe())

# %% [markdown]
# ## Sink dimensions and phi
#
# The sink dimensions are where the first token's RMS-normalised state is massive across layers.
# phi(x) = max over those dims of |x_d / RMS(x)| can never exceed sqrt(hidden size); for narrow
# models (sqrt(hidden) < 40) sinkscope uses the layer-relative score instead, as `sinkscope report` does.

# %%
residual = cache.stacked_residual()[:, 0]  # [layer, token, dim]
bos = residual[:, kinds.bos_mask[0]][:, 0]  # [layer, dim]
found = massive.discover_sink_dims(bos[None], start_layer=2)
print("sink dims:", found.dims, "-", found.reason)
score = "rms" if math.sqrt(adapter.hidden_size) >= 40 else "layer"
if score == "layer":
    tau = sinks.choose_tau_layer_relative()
    phi = sinks.sink_score(residual, found.dims, "layer", kinds.real_mask[0].expand(residual.shape[:2])) \
        if found.dims else torch.zeros(residual.shape[:2])
else:
    phi = sinks.phi(residual, found.dims) if found.dims else torch.zeros(residual.shape[:2])  # [layer, token]
    tau = sinks.choose_tau(phi[None, 2:], adapter.hidden_size, token_kinds=kinds.kind)
print(f"score {score}, tau = {tau.value:.3g} ({tau.method})")
visual = kinds.visual_mask[0]
visual_sinks = (phi >= tau.value) & visual  # [layer, token]
for layer in range(phi.shape[0]):
    print(f"layer {layer:2d}: visual sinks {int(visual_sinks[layer].sum()):3d} of {int(visual.sum())} image tokens, "
          f"max image phi {float(phi[layer][visual].max()):.2f}")

# %% [markdown]
# ## The image with its sink tokens outlined
#
# The layer with the most visual sinks; each image token is one patch of the (square) grid.

# %%
layer = int(visual_sinks.sum(dim=1).argmax())
n = int(visual.sum())
side = int(round(n ** 0.5))
phi_grid = phi[layer][visual][: side * side].reshape(side, side)
sink_grid = visual_sinks[layer][visual][: side * side].reshape(side, side)
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
axes[0].imshow(image.resize((side * 32, side * 32)))
axes[1].imshow(phi_grid, cmap="magma")
for ax in axes:
    for r, c in torch.nonzero(sink_grid).tolist():
        scale = 32 if ax is axes[0] else 1
        ax.add_patch(plt.Rectangle((c * scale - 0.5 * (scale == 1), r * scale - 0.5 * (scale == 1)), scale, scale,
                                   fill=False, edgecolor="cyan", linewidth=2))
    ax.set_xticks([]); ax.set_yticks([])
axes[0].set_title(f"{MODEL}: visual sinks at layer {layer}")
axes[1].set_title(f"{score} score per image token (tau {tau.value:.3g})")
plt.show()
print(f"layer {layer}: {int(sink_grid.sum())} visual sink tokens")

# %% [markdown]
# Next: `sinkscope scan --model demo` measures this over a data set into a run folder, and
# `sinkscope view RUN_DIR` opens it image by image in the browser.
