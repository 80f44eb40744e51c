"""Streaming: tracing many batches does not keep their attention maps alive.

Tracer.run hands each layer's [batch, head, T, T] probabilities to the reducers and should
drop them afterwards (nnsight, the Tracer and ScanReducer keep nothing), so a scan's memory
does not grow with the number of samples. Checked three ways on a tiny LLaVA with long
prompts (T ~ 430, so one layer's attention is a few MB):
  - weak references to every tensor the reducers received are dead after the runs;
  - no live Python tensor of shape [..., T, T] is left (gc), with a leaky reducer as the
    positive control that shows the check can see one;
  - the process's peak RSS grows far less over 8 more batches than retaining them would cost.
(tracemalloc does not see torch's CPU allocations, hence RSS.)
"""

from __future__ import annotations

import gc
import resource
import sys
import warnings
import weakref

import pytest
import torch
from tiny_models import HEADS, LAYERS

from sinkscope.analyses.scan import ScanReducer
from sinkscope.eval.tasks import Sample
from sinkscope.models.registry import adapter_for_model
from sinkscope.trace import Tracer


class _Counter:
    """Counts calls and keeps only weak references to what it receives."""

    def __init__(self, refs: list):
        self.refs = refs
        self.calls = 0

    def begin(self, info):
        pass

    def residual(self, layer, states):
        self.refs.append(weakref.ref(states))

    def attention(self, layer, probs):
        self.calls += 1
        self.refs.append(weakref.ref(probs))

    def end(self):
        pass


class _Leaky(_Counter):
    def __init__(self, refs):
        super().__init__(refs)
        self.kept = []

    def attention(self, layer, probs):
        super().attention(layer, probs)
        self.kept.append(probs)


@pytest.fixture(scope="module")
def long_batch(tiny_llava):
    adapter = adapter_for_model(tiny_llava.model, tiny_llava.processor)
    question = " ".join(["describe the image"] * 140)  # tiny LLaVA has 512 positions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = adapter.prepare([question, question + " ?"], [tiny_llava.image(0), tiny_llava.image(1)])
    T = batch["input_ids"].shape[1]
    assert 300 < T <= 512
    return adapter, batch, T


def _attention_maps_alive(T: int) -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some deprecated torch aliases warns
        return sum(1 for o in gc.get_objects()
                   if isinstance(o, torch.Tensor) and o.dim() == 4 and o.shape[-2:] == (T, T))


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def test_counting_reducer_keeps_nothing(long_batch):
    adapter, batch, T = long_batch
    tracer = Tracer(adapter)
    assert _attention_maps_alive(T) == 0

    # positive control: a reducer that keeps the maps is seen by the gc check
    refs: list = []
    leaky = _Leaky(refs)
    tracer.run(batch, [leaky])
    assert _attention_maps_alive(T) == LAYERS
    del leaky
    assert _attention_maps_alive(T) == 0

    refs = []
    for _ in range(3):  # warm up: allocator pools, nnsight's first-trace setup
        tracer.run(batch, [_Counter(refs)])
    before = _peak_rss_mb()
    counter = _Counter(refs)
    n_batches = 8
    for _ in range(n_batches):
        tracer.run(batch, [counter])
    grown = _peak_rss_mb() - before
    assert counter.calls == n_batches * LAYERS
    assert _attention_maps_alive(T) == 0
    assert all(r() is None for r in refs), "a tensor handed to a reducer is still alive"

    # keeping every map of those batches would have cost this much (float32)
    retained_mb = n_batches * LAYERS * 2 * HEADS * T * T * 4 / 2**20
    assert grown < 0.4 * retained_mb, f"peak RSS grew {grown:.0f} MB over {n_batches} batches"


def test_scan_reducer_keeps_no_attention(long_batch):
    """The scan's reducer (one per batch, its tables kept, as run_scan does) holds no maps."""
    adapter, batch, T = long_batch
    tracer = Tracer(adapter)
    samples = [Sample("a", "q"), Sample("b", "q")]
    kept_tables = []
    for n in range(3):
        reducer = ScanReducer(dims=[0, 1], tau=2.0, top_k=3, rho=0.5, summ=0.2, eps=adapter.rms_norm_eps,
                              samples=samples, want_profile=(n == 0))
        tracer.run(batch, [reducer], sample_ids=["a", "b"])
        for value in vars(reducer).values():  # nothing [.., T, T] among its attributes
            assert not (isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-2:] == (T, T))
        kept_tables.append((reducer.token_rows, reducer.head_rows, reducer.massive_rows))
        del reducer
        assert _attention_maps_alive(T) == 0
    head_rows = sum(len(frame) for frame in kept_tables[0][1])
    assert head_rows == 2 * LAYERS * HEADS  # head rows: per sample, layer and head
