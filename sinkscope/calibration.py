"""One calibration: sink dims and tau from the first calibration samples, for every analysis, VAR and the report.

    cal = calibrate(adapter, batches, sink_score="auto")   # processor batches of the calibration samples
    cal.dims.dims, cal.tau.value, cal.sink_score            # discovered (or pinned) dims, tau, the score used
    cal.record()                                            # the block every run.json stores under "calibration"

Two streaming passes at most, both through `sinkscope.trace.Tracer` (also remotely): the BOS token's state
entering each layer -> `measures.massive.discover_sink_dims` (unless dims are pinned); then, only where the
tau rule reads the data (phi on a narrow model, tau unset), phi of every token -> the tau rule
`measures.sinks.sink_threshold`. A report calibrates once and hands the result to every step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sinkscope.measures import massive, sinks
from sinkscope.runconfig import resolve_sink_score
from sinkscope.trace import Tracer


@dataclass
class Calibration:
    """Sink dims, tau and the (resolved) sink score one run uses; `n_samples` samples calibrated them."""

    dims: massive.SinkDims
    tau: sinks.SinkThreshold
    sink_score: str
    n_samples: int

    def record(self) -> dict:
        """What run.json stores under "calibration" (the same block in every step of a report)."""
        return {"sink_dims": [int(d) for d in self.dims.dims], "sink_dims_method": self.dims.method,
                "tau": asdict(self.tau), "sink_score": self.sink_score, "n_samples": int(self.n_samples)}


def calibrate(adapter, batches, *, sink_score: str = "auto", tau: float | None = None,
              sink_dims: list[int] | None = None, start_layer: int = 2, eps: float | None = None,
              tracer: Tracer | None = None, remote: str | None = None, per_request: int = 1,
              log=print) -> Calibration:
    """Sink dims (discovered unless pinned) and tau (the one rule, unless given) from `batches`.

    batches: a list of processor batches (the calibration samples, already prepared).
    sink_score: auto (`runconfig.resolve_sink_score`), rms or layer. eps: RMS epsilon of phi (default: the
    model's). Layers before `start_layer` take part in neither the discovery nor the tau rule. per_request: batches
    traced as one request of a remote run (`Tracer.run_many`).
    """
    tracer = tracer or Tracer(adapter)
    score = resolve_sink_score(sink_score, adapter.hidden_size)
    eps = adapter.rms_norm_eps if eps is None else eps
    batches = list(batches)
    n_samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    if sink_dims:
        dims = massive.pinned_sink_dims(sink_dims, hidden_size=adapter.hidden_size)
    else:
        bos = _traced(tracer, batches, _BosReducer, per_request, remote)
        dims = massive.discover_sink_dims(torch.cat([r.states() for r in bos]), start_layer=start_layer, eps=eps)
    log(f"sink dims: {dims.dims} ({dims.method}): {dims.reason}")
    phis = kinds = None
    if dims.dims and sinks.needs_phi_for_tau(score, adapter.hidden_size, tau):
        phi_reds = _traced(tracer, batches, lambda: _PhiReducer(dims.dims, eps, score), per_request, remote)
        values = [v for r in phi_reds for v in r.values]
        width = max(v.shape[-1] for v in values)
        phis = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[-1]), value=0.0) for v in values])
        kinds = torch.cat([torch.nn.functional.pad(k, (0, width - k.shape[-1]), value=-1)
                           for r in phi_reds for k in r.kinds])
        phis = phis[:, start_layer:] if phis.shape[1] > start_layer else phis
    threshold = sinks.sink_threshold(score, adapter.hidden_size, phis, tau, token_kinds=kinds,
                                     has_dims=bool(dims.dims))
    log(f"tau = {threshold.value:.3g} ({threshold.method}): {threshold.reason}")
    return Calibration(dims, threshold, score, n_samples)


def _traced(tracer: Tracer, batches: list, make_reducer, per_request: int, remote) -> list:
    """One `make_reducer()` per batch, traced over the residual stream (`per_request` batches per remote request)."""
    reducers = [make_reducer() for _ in batches]
    for k in range(0, len(batches), per_request):
        tracer.run_many([(batch, [r], None) for batch, r in zip(batches[k:k + per_request], reducers[k:k + per_request])],
                        attention=False, remote=remote)
    return reducers


class _BosInTrace:
    """Inside the trace: the BOS row of the residual stream, [batch, dim] float32."""

    def __init__(self, bos_pos: torch.Tensor):
        self.bos_pos = bos_pos

    def residual(self, layer, states):
        rows = torch.arange(states.shape[0], device=states.device)
        return states[rows, self.bos_pos.to(states.device)].float().cpu()

    def attention(self, layer, probs):
        return None


class _PhiInTrace:
    """Inside the trace: the sink score of every token, [batch, token] float32."""

    def __init__(self, dims, eps, score, real):
        self.dims, self.eps, self.score, self.real = dims, eps, score, real

    def residual(self, layer, states):
        return sinks.sink_score(states, self.dims, self.score, self.real.to(states.device), self.eps).float().cpu()

    def attention(self, layer, probs):
        return None


class _BosReducer:
    """Keeps the BOS token's residual state per layer: [sample, layer, dim]."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []
        self._current: list[torch.Tensor] = []
        self._bos_pos = None

    def begin(self, info):
        self._bos_pos = info.token_kinds.bos_mask.float().argmax(dim=1)
        self._current = []

    def residual(self, layer, states):
        self.take("residual", layer, self.in_trace().residual(layer, states))

    def attention(self, layer, probs):
        pass

    def in_trace(self) -> "_BosInTrace":
        return _BosInTrace(self._bos_pos)

    def take(self, kind, layer, payload):
        self._current.append(payload)

    def end(self):
        self.rows.append(torch.stack(self._current, dim=1))

    def states(self) -> torch.Tensor:
        return torch.cat(self.rows, dim=0)


class _PhiReducer:
    """phi of every token per layer, for choosing tau: list of ([batch, layer, token], kinds)."""

    def __init__(self, dims, eps, score: str = "rms"):
        self.dims, self.eps, self.score = dims, eps, score
        self.values, self.kinds, self._cur = [], [], []

    def begin(self, info):
        self._cur = []
        self._kinds = info.token_kinds.kind
        self._real = info.token_kinds.real_mask

    def residual(self, layer, states):
        self.take("residual", layer, self.in_trace().residual(layer, states))

    def attention(self, layer, probs):
        pass

    def in_trace(self) -> "_PhiInTrace":
        return _PhiInTrace(self.dims, self.eps, self.score, self._real)

    def take(self, kind, layer, payload):
        self._cur.append(payload)

    def end(self):
        self.values.append(torch.stack(self._cur, dim=1))
        self.kinds.append(self._kinds)
