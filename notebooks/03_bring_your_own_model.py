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
# # Bring your own model
#
# sinkscope takes a hub id (`llava-hf/llava-1.5-7b-hf`), a local checkpoint directory (a saved
# Hugging Face model with safetensors weights and its processor), or a model you already built.
# Cells that need a GPU or the hub are guarded, so this notebook also runs on a CPU-only,
# offline machine, where it uses the embedded `FALLBACK` model (the tests: `organism`).

# %% tags=["parameters"]
import os

HUB_ID = os.environ.get("SINKSCOPE_BYOM_HUB_ID", "llava-hf/llava-1.5-7b-hf")
FALLBACK = os.environ.get("SINKSCOPE_NOTEBOOK_MODEL", "demo")
OUT = os.environ.get("SINKSCOPE_NOTEBOOK_OUT", "")  # run folder of the scan below (default: a new temporary one)

# %%
import tempfile

import torch

import sinkscope
from sinkscope import SinkscopeError

torch.set_num_threads(int(os.environ.get("SINKSCOPE_THREADS", "1")))
HAVE_GPU = torch.cuda.is_available()
print("GPU:", torch.cuda.get_device_name(0) if HAVE_GPU else "none")

# %% [markdown]
# ## A hub checkpoint on GPUs (`device_map="auto"`)
#
# With accelerate, `device_map="auto"` spreads a large checkpoint over every GPU of the node.
# Only on a machine with a GPU and access to the hub (or the checkpoint already in its cache).

# %%
adapter = None
if HAVE_GPU:
    try:
        adapter = sinkscope.load_model(HUB_ID, dtype="bfloat16", device_map="auto")
        print("loaded", HUB_ID, adapter.describe())
    except SinkscopeError as err:
        print(f"could not load {HUB_ID}: {err}")
else:
    print("no GPU here: skipping the hub checkpoint")

# %% [markdown]
# Asking for a device this machine does not have is one clear error, not a traceback:

# %%
if not HAVE_GPU:
    try:
        sinkscope.load_model(FALLBACK, device="cuda")
    except SinkscopeError as err:
        print("error:", err)

# %% [markdown]
# ## A model NDIF runs (`remote="ndif"`)
#
# Without a GPU at all: NDIF runs the model, sinkscope builds it here on the meta device (no weights) and sends each
# batch's trace there (`batches_per_request=N` sends N batches as one job); only the reductions come back. Needs an
# NDIF API key (`nnsight login` or `NDIF_API_KEY`) and a model NDIF is running (`nnsight.status()` lists them).
# Analyses that edit attention (VAR, ablations) cannot run there: their edits must sit in the process that runs the
# model.

# %%
if os.environ.get("NDIF_API_KEY"):
    try:
        ndif_run = sinkscope.scan(tempfile.mkdtemp(prefix="ndif_scan_"), model=HUB_ID, remote="ndif", limit=8,
                                  batch_size=4, batches_per_request=2, calibration=8)
        print("scanned on NDIF:", ndif_run.path / "index.md")
    except SinkscopeError as err:
        print(f"could not scan {HUB_ID} on NDIF: {err}")
else:
    print("no NDIF_API_KEY: skipping the NDIF scan")

# %% [markdown]
# ## A local checkpoint directory
#
# Any directory that `save_pretrained` wrote (config.json, safetensors weights, processor files).
# Here the fallback model is saved to a temporary directory and loaded back from it.

# %%
if adapter is None:
    embedded = sinkscope.load_model(FALLBACK)
    local_dir = tempfile.mkdtemp(prefix="sinkscope_byom_")
    embedded.model.save_pretrained(local_dir)
    embedded.processor.save_pretrained(local_dir)
    adapter = sinkscope.load_model(local_dir)
    print("loaded from", local_dir, ":", sorted(os.listdir(local_dir))[:6], "...")
    MODEL_SPEC = local_dir
else:
    MODEL_SPEC = HUB_ID

# %% [markdown]
# ## A model you built yourself
#
# `adapter_for_model` wraps an already-loaded transformers model (quantised, patched, ...).

# %%
wrapped = sinkscope.adapter_for_model(adapter.model, adapter.processor, name="mine")
print(wrapped.family, wrapped.num_layers, "layers,", wrapped.num_heads, "heads, hidden", wrapped.hidden_size)

# %% [markdown]
# ## The same scan as `sinkscope scan`
#
# On a few demo-world samples (pass `data=` a POPE-style .jsonl or an image folder for your own).

# %%
folder = sinkscope.scan(OUT or tempfile.mkdtemp(prefix="sinkscope_byom_scan_"), model=MODEL_SPEC, adapter=wrapped, limit=4, batch_size=2, calibration=4)
meta = folder.meta
print(f"sink dims {meta['sink_dims']}, tau {meta['tau']['value']:.3g}; wrote {folder.path}/index.md")
