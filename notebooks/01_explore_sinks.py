# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       format_name: percent
# ---
# %% [markdown]
# # Exploring sinks in the embedded models
#
# A notebook in jupytext's percent format (open it in Jupyter with jupytext, or run it as a
# script: `python notebooks/01_explore_sinks.py`). The tests execute it, so it stays working.
#
# It compares the grown `demo` model with the planted `organism`: the residual stream of the
# BOS token and of the most sink-like image token, phi per layer, and the attention that the
# text queries pay to sink tokens.

# %%
import os

import torch

import sinkscope
from sinkscope import world
from sinkscope.measures import massive, sinks

torch.set_num_threads(int(os.environ.get("SINKSCOPE_THREADS", "1")))
scene = world.scene("test", 7)
question = "is there a red circle in the image ?"
print(world.caption(scene))

# %%
results = {}
for name in ("tiny", "organism"):
    adapter = sinkscope.load_model(name)
    batch = adapter.prepare([question], [scene.pil()])
    cache = sinkscope.Tracer(adapter).run_with_cache(batch)
    kinds = adapter.token_kinds(batch["input_ids"], batch["attention_mask"])
    residual = cache.stacked_residual()[:, 0]  # [layer, token, dim]
    bos = residual[:, kinds.bos_mask[0]][:, 0]  # [layer, dim]
    found = massive.discover_sink_dims(bos[None], start_layer=2)
    dims = found.dims
    phi = sinks.phi(residual, dims) if dims else torch.zeros(residual.shape[:2])  # [layer, token]
    results[name] = {"dims": dims, "reason": found.reason, "phi": phi, "kinds": kinds, "cache": cache}
    print(f"{name}: sink dims {dims or 'none'}")

# %% [markdown]
# ## phi per layer: BOS, the most sink-like image token, the median text token

# %%
for name, r in results.items():
    phi, kinds = r["phi"], r["kinds"]
    visual = kinds.visual_mask[0]
    text = kinds.text_mask[0]
    for layer in range(phi.shape[0]):
        row = phi[layer]
        print(f"{name:9s} layer {layer}: BOS {float(row[kinds.bos_mask[0]][0]):5.2f}  "
              f"max image {float(row[visual].max()):5.2f}  median text {float(row[text].median()):5.2f}")

# %% [markdown]
# ## Attention from the question's tokens to sink tokens (organism, where sinks exist)

# %%
r = results["organism"]
kinds = r["kinds"]
for layer, pattern in sorted(r["cache"].attention.items()):
    sink_mask = r["phi"][layer] >= 5.0  # the organism's sinks sit near sqrt(128) = 11.3
    queries = kinds.text_mask[0].clone()
    queries[: int(torch.nonzero(kinds.visual_mask[0]).max()) + 1] = False
    share = pattern[0][:, queries][:, :, sink_mask].sum(-1).mean(-1)  # [head]
    print(f"layer {layer}: attention to sinks per head {[round(float(s), 2) for s in share]}")

# %% [markdown]
# The organism's sink dims were planted; the discovery above must have found exactly them.

# %%
from sinkscope.models.embedded.organism import GroundTruth
from sinkscope.models.registry import embedded_path

truth = GroundTruth.load(embedded_path("organism") / "ground_truth.json")
assert results["organism"]["dims"] == truth.sink_dims, (results["organism"]["dims"], truth.sink_dims)
print(f"organism: discovered {results['organism']['dims']} == planted {truth.sink_dims}")
