"""sinkscope: mechanistic interpretability of visual attention sinks in large multimodal models.

    import sinkscope
    adapter = sinkscope.load_model("demo")            # or a local directory / hub id
    tracer = sinkscope.Tracer(adapter)
    cache = tracer.run_with_cache(adapter.prepare(["is there a red circle in the image ?"], [image]))
    cache["resid_pre.3"], cache["pattern.3"]           # [batch, token, dim], [batch, head, query, key]
    sinkscope.scan("runs/demo", model="demo")          # the whole scan -> a run folder
    with sinkscope.var(adapter, sinkscope.VARConfig(sink_dims=[1, 90], tau=5.4)):  # VAR around generate
        adapter.model.generate(**batch)
"""

from __future__ import annotations

__version__ = "0.1.0"

from sinkscope.models import SinkscopeError, adapter_for_model, load as load_model, supported  # noqa: E402,F401
from sinkscope.trace import ActivationCache, Tracer  # noqa: E402,F401
from sinkscope.interventions.var import VARConfig, var  # noqa: E402,F401


def scan(out: str, **config):
    """Run `sinkscope scan` from Python; keyword arguments are ScanConfig fields."""
    from sinkscope.analyses.scan import ScanConfig, run_scan

    adapter = config.pop("adapter", None)
    return run_scan(out, ScanConfig(**config), adapter=adapter)
