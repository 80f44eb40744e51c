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
# token's residual state, score every token (phi, or the layer-relative score on narrow models), and
# draw the image with its sink tokens outlined. `MODEL` is `"demo"` by default (the LLaVA on SmolLM2-135M); the tests run this
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
from sinkscope import plots
from sinkscope import world
from sinkscope.measures import massive, sinks

torch.set_num_threads(int(os.environ.get("SINKSCOPE_THREADS", "1")))
adapter = sinkscope.load_model(MODEL)
image = world.scene("test", SCENE).pil()
batch = adapter.prepare([QUESTION], [image])  # chat template + image tokens
cache = sinkscope.Tracer(adapter).run_with_cache(batch)
kinds = adapter.token_kinds(batch["input_ids"], batch["attention_mask"])
print(adapter.describe())

# %% [markdown]
# ## Sink dimensions and the sink score
#
# The sink dimensions are where the first token's RMS-normalised state is massive across layers.
# phi(x) = max over those dims of |x_d / RMS(x)| can never exceed sqrt(hidden size); for narrow
# models (sqrt(hidden) < 40) sinkscope uses the layer-relative score instead (max over those dims of
# |x_d| / the median token RMS of the layer, no ceiling), as `sinkscope report` does. The printout
# and the figure name the score used.

# %%
residual = cache.stacked_residual()[:, 0]  # [layer, token, dim]
bos = residual[:, kinds.bos_mask[0]][:, 0]  # [layer, dim]
found = massive.discover_sink_dims(bos[None], start_layer=2)
print("sink dims:", found.dims, "-", found.reason)
score = "rms" if math.sqrt(adapter.hidden_size) >= 40 else "layer"
if score == "layer":
    tau = sinks.choose_tau_layer_relative()
    scores = sinks.sink_score(residual, found.dims, "layer", kinds.real_mask[0].expand(residual.shape[:2])) \
        if found.dims else torch.zeros(residual.shape[:2])
else:
    scores = sinks.phi(residual, found.dims) if found.dims else torch.zeros(residual.shape[:2])  # [layer, token]
    tau = sinks.choose_tau(scores[None, 2:], adapter.hidden_size, token_kinds=kinds.kind)
name = plots.score_name(score)  # "phi" or "layer-relative score"
print(f"score: {name} = {plots.SCORE_FORMULAS[score]}; tau = {tau.value:.3g} ({tau.method})")
visual = kinds.visual_mask[0]
visual_sinks = (scores >= tau.value) & visual  # [layer, token]
for layer in range(scores.shape[0]):
    print(f"layer {layer:2d}: visual sinks {int(visual_sinks[layer].sum()):3d} of {int(visual.sum())} image tokens, "
          f"largest image-token {name} {float(scores[layer][visual].max()):.3g}")

# %% [markdown]
# ## The image with its sink tokens outlined
#
# The layer with the most visual sinks; when no image token reaches tau in any layer, the layer
# where an image token comes closest, and the figure says there are none. Each image token is one
# patch of the (square) grid.

# %%
per_layer = visual_sinks.sum(dim=1)  # [layer]
if per_layer.any():
    layer = int(per_layer.argmax())
    title = f"{MODEL}: {int(per_layer[layer])} visual sinks at layer {layer} (the most of any layer)"
else:
    layer = int(scores.masked_fill(~visual, float("-inf")).amax(dim=1).argmax())
    title = (f"{MODEL}: no visual sinks in any layer (no image token reaches tau {tau.value:.3g});\n"
             f"layer {layer}, where an image token comes closest")
n = int(visual.sum())
side = int(round(n ** 0.5))
score_grid = scores[layer][visual][: side * side].reshape(side, side)
sink_grid = visual_sinks[layer][visual][: side * side].reshape(side, side)
fig = plots.image_sinks(image, score_grid.numpy(), sink_grid.numpy(), tau.value, score, title)
plt.show()
print(title.replace("\n", " "))
print(f"layer {layer}: {int(sink_grid.sum())} visual sink tokens")

# %% [markdown]
# Next: `sinkscope scan --model demo` measures this over a data set into a run folder, and
# `sinkscope view RUN_DIR` opens it image by image in the browser.
