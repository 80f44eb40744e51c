"""sinkscope: mechanistic interpretability of visual attention sinks in large multimodal models.

    import sinkscope
    adapter = sinkscope.load_model("demo")            # or a local directory / hub id
    tracer = sinkscope.Tracer(adapter)
    cache = tracer.run_with_cache(adapter.prepare(["is there a red circle in the image ?"], [image]))
    cache["resid_pre.3"], cache["pattern.3"]           # [batch, token, dim], [batch, head, query, key]
    sinkscope.scan("runs/demo", model="demo")          # the whole scan -> a run folder
    sinkscope.scan("runs/70b", model="meta-llama/Llama-3.1-70B", remote="ndif")  # traced on NDIF, reductions back
    with sinkscope.var(adapter, sinkscope.VARConfig(sink_dims=[1, 90], tau=5.4)):  # VAR around generate
        adapter.model.generate(**batch)

The names below torch (models, tracing, VAR) load on first use, so `import sinkscope` and the
`sinkscope` command stay fast until a model is needed.
"""

from __future__ import annotations

import importlib
import importlib.util

from sinkscope.errors import SinkscopeError  # noqa: F401

__version__ = "0.1.0"

_LAZY = {  # public name -> (module, attribute)
    "load_model": ("sinkscope.models", "load"),
    "load_hosted": ("sinkscope.models", "load_hosted"),
    "adapter_for_model": ("sinkscope.models", "adapter_for_model"),
    "supported": ("sinkscope.models", "supported"),
    "Tracer": ("sinkscope.trace", "Tracer"),
    "ActivationCache": ("sinkscope.trace", "ActivationCache"),
    "VARConfig": ("sinkscope.interventions.var", "VARConfig"),
    "var": ("sinkscope.interventions.var", "var"),
}
_EAGER_BEFORE = ("sinkscope.models", "sinkscope.trace", "sinkscope.interventions.var")
__all__ = ["SinkscopeError", "scan", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        for module in _EAGER_BEFORE:  # what `import sinkscope` used to load, so `sinkscope.interventions.var` resolves
            importlib.import_module(module)
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'sinkscope' has no attribute {name!r}")


def scan(out: str, **config):
    """Run `sinkscope scan` from Python; keyword arguments are ScanConfig fields."""
    from sinkscope.analyses.scan import ScanConfig, run_scan

    adapter = config.pop("adapter", None)
    return run_scan(out, ScanConfig(**config), adapter=adapter)
