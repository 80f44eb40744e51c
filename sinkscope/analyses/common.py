"""What every analysis shares: its config (one `RunConfig` plus the analysis fields every analysis
takes), the run set-up (model, data, run folder, and the one calibration of `sinkscope.calibration`,
or the one a report hands in), a reducer that knows each layer's sinks, the cluster bootstrap
over samples used for every CI, and the config a report step runs an analysis with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from sinkscope.eval.data import load_data
from sinkscope.calibration import Calibration, calibrate
from sinkscope.errors import SinkscopeError
from sinkscope.eval.tasks import Sample, batches, request_groups
from sinkscope.measures import contributions, massive, sinks
from sinkscope.models.base import ModelAdapter
from sinkscope.launcher import parse_shard
from sinkscope.runconfig import RunConfig, check_remote, resolve_sink_score
from sinkscope.runfolder import RunFolder, check_resumable
from sinkscope.trace import BatchInfo, Tracer

__all__ = ["AnalysisConfig", "Setup", "setup", "SinkAwareReducer", "cluster_bootstrap", "prepare_batch",
           "prepare_readable", "text_queries_after_image", "fmt_ci", "calibrate_samples", "open_calibration",
           "report_step_config", "traced_chunks", "InTraceReducer", "payloads_to_host", "layer_blocks",
           "KeptLayers", "KEEP_BYTES", "BLOCK_BYTES", "query_row_span", "DeviceCopies", "output_grams", "yes_no_labels", "answer_token_ids"]


@dataclass
class AnalysisConfig(RunConfig):
    """One RunConfig (model, data, limit, batch size, calibration, device, dtype, seed, sink score, tau, sink dims,
    layers: declared and defaulted there, once) plus the fields every analysis takes; subclasses add their own."""

    start_layer: int = 2
    question: str = "describe the image ."
    n_boot: int = 1000
    remote: str | None = None  # traces through "local" (nnsight's serialised dry run of NDIF), "ndif" or a server URL
    batches_per_request: int = 1  # with remote: batches sent as one request (an nnsight session: one NDIF job)
    shard: str | None = None  # "i/n": only the samples whose index modulo n is i (merge with `sinkscope merge`)

    def validate(self) -> None:
        super().validate()
        if self.n_boot < 10:
            raise SinkscopeError(f"--n-boot must be >= 10 bootstrap resamples; got {self.n_boot}")
        if self.start_layer < 0:
            raise SinkscopeError(f"--start-layer must be >= 0; got {self.start_layer}")
        check_remote(self.remote)  # local, ndif or a server URL
        if self.batches_per_request < 1:
            raise SinkscopeError(f"--batches-per-request must be >= 1; got {self.batches_per_request}")
        if self.batches_per_request > 1 and not self.remote:
            raise SinkscopeError("--batches-per-request bundles remote traces into one request; it needs --remote "
                                 "(ndif, a server's URL or local), or leave it at 1")
        parse_shard(self.shard, {})  # a bad --shard names the fix before the model loads


def prepare_batch(adapter: ModelAdapter, samples: list[Sample]):
    """Processor batch for samples (chat template, images); text-only when a sample has none."""
    images = [s.image() for s in samples]
    if any(im is None for im in images):
        if not all(im is None for im in images):
            raise SinkscopeError("a batch mixes samples with and without images; use --batch-size 1")
        return adapter.prepare([s.question for s in samples], None)
    return adapter.prepare([s.question for s in samples], images)


def prepare_readable(adapter: ModelAdapter, samples: list[Sample], skipped: list[dict]):
    """(batch, kept samples): `prepare_batch` without the samples whose image fails to load.

    Images are checked when the data is loaded (eval.tasks.drop_unreadable); one that passed that
    check but fails to decode here is left out too, and recorded in `skipped`.
    """
    from sinkscope.eval.tasks import skip_record

    try:
        return prepare_batch(adapter, samples), samples
    except SinkscopeError:
        kept = []
        for s in samples:
            try:
                s.image()
                kept.append(s)
            except SinkscopeError as err:
                skipped.append(skip_record(s, str(err)))
        if len(kept) == len(samples):
            raise
        return (prepare_batch(adapter, kept) if kept else None), kept


def text_queries_after_image(info: BatchInfo) -> torch.Tensor:
    """[batch, token] bool: prompt text (and generated) tokens after the last image token.

    Rows without image tokens: all text tokens (text-only measures still run).
    """
    return info.token_kinds.queries_after_image(include_generated=True)



def calibrate_samples(adapter: ModelAdapter, samples: list[Sample], cfg: RunConfig, tracer: Tracer | None = None,
                      log=print) -> Calibration:
    """The run's calibration (`sinkscope.calibration.calibrate`) on the data's first `cfg.calibration` samples
    (an image that fails to decode is left out; the main pass records it)."""
    chunks = []
    for chunk in batches(list(samples)[: cfg.calibration], cfg.batch_size):
        batch, kept = prepare_readable(adapter, chunk, [])
        if kept:
            chunks.append(batch)
    return calibrate(adapter, chunks, sink_score=cfg.sink_score, tau=cfg.tau, sink_dims=cfg.sink_dims,
                     start_layer=getattr(cfg, "start_layer", 2), tracer=tracer, remote=getattr(cfg, "remote", None),
                     per_request=getattr(cfg, "batches_per_request", 1),
                     log=log)


def open_calibration(folder: RunFolder, adapter, samples, cfg: RunConfig, tracer: Tracer,
                     calibration: Calibration | None = None, log=print) -> Calibration:
    """The run's sink dims and tau: resumed from the folder, else the one handed in (a report calibrates once
    for all its steps), else calibrated here; written to sink_dims.json and run.json ("calibration")."""
    if (folder.path / "sink_dims.json").exists() and folder.meta.get("tau"):
        dims = massive.SinkDims.from_json((folder.path / "sink_dims.json").read_text())
        tau = sinks.SinkThreshold(**folder.meta["tau"])
        log(f"resuming with sink dims {dims.dims} and tau {tau.value:.3g}")
        recorded = folder.meta.get("calibration") or {}
        return Calibration(dims, tau, recorded.get("sink_score", cfg.sink_score), recorded.get("n_samples", 0))
    cal = calibration or calibrate_samples(adapter, samples, cfg, tracer, log=log)
    folder.write_json("sink_dims.json", cal.dims.to_dict())
    folder.update_meta(tau=asdict(cal.tau), sink_dims=cal.dims.dims, calibration=cal.record())
    return cal


@dataclass
class Setup:
    adapter: object
    samples: list[Sample]
    folder: RunFolder
    tracer: Tracer
    dims: massive.SinkDims
    tau: sinks.SinkThreshold
    todo: list[Sample] = field(default_factory=list)


def setup(out: str, name: str, cfg: AnalysisConfig, adapter=None, resume: bool = True, log=print,
          extra_meta: dict | None = None, calibration: Calibration | None = None) -> Setup:
    """Load model and data, open (or resume) the run folder, find sink dims and tau (`open_calibration`: the
    handed `calibration` when given)."""
    from sinkscope.models import load_placed

    cfg.validate()
    if cfg.remote and name not in REMOTE_ANALYSES:  # the analyses that edit attention or the residual stream
        raise SinkscopeError(f"{name} cannot run remotely: it edits attention or the residual stream inside the model's "
                             "forward, which needs sinkscope's own code in the process that runs the model; remote "
                             f"runs: scan, {', '.join(REMOTE_ANALYSES)}")
    torch.manual_seed(cfg.seed)
    samples = load_data(cfg.data, cfg.limit, cfg.question, cfg.image_root)  # bad data fails before the model loads
    # a folder holding another run fails before the model loads too (the sink score may still be 'auto')
    check_resumable(out, name, asdict(cfg), resume, unresolved=("sink_score",) if cfg.sink_score == "auto" else ())
    if adapter is None:  # placed as the config says, a device map included (the CLI hands its loaded model)
        adapter = load_placed(cfg)
    cfg.sink_score = resolve_sink_score(cfg.sink_score, adapter.hidden_size)  # the analysis and run.json: the score used
    folder = RunFolder(out, name, asdict(cfg), resume=resume, fingerprint=adapter.weights_fingerprint())
    folder.update_meta(model=adapter.describe(), n_samples=len(samples),
                       planted=bool(getattr(adapter, "planted", False)), skipped=list(getattr(samples, "skipped", [])),
                       **(extra_meta or {}))
    tracer = Tracer(adapter)
    cal = open_calibration(folder, adapter, samples, cfg, tracer, calibration, log=log)
    dims, tau = cal.dims, cal.tau
    done = folder.done_samples()
    # calibration above used the whole data's first samples, so every shard shares sink dims and tau
    shard_i, shard_n = parse_shard(getattr(cfg, "shard", None), {}) or (0, 1)
    todo = [s for s in list(samples)[shard_i::shard_n] if s.sample_id not in done]
    if shard_n > 1:
        log(f"shard {shard_i}/{shard_n}: {len(todo)} samples to go (index modulo {shard_n} = {shard_i})")
    return Setup(adapter, samples, folder, tracer, dims, tau, todo)


# The report's settings every step gets (besides its limit, its sink score resolved on the model and its data)
REPORT_SETTINGS = ("model", "calibration", "device", "dtype", "device_map", "max_memory", "seed", "tau", "sink_dims",
                   "image_root")


def report_step_config(config_class, report_cfg, sink_score: str, **overrides):
    """The config a `sinkscope report` step runs an analysis with: the report's REPORT_SETTINGS, limit and resolved sink
    score, its batch size when it gives one (else the analysis' own), its data unless it is the demo's (the analysis
    keeps its own default data then), and the step's `overrides` (its own sample count, grids, layers, data)."""
    values = {name: getattr(report_cfg, name) for name in REPORT_SETTINGS}
    values.update(limit=report_cfg.limit, sink_score=sink_score)
    if report_cfg.batch_size is not None:
        values["batch_size"] = report_cfg.batch_size
    if report_cfg.data != "demo":
        values["data"] = report_cfg.data
    values.update(overrides)
    return config_class(**values)


def report_step_for(config_class, run, **overrides):
    """A `sinkscope report` step that runs `run(folder, report_step_config(config_class, ...), ...)`: the shape of
    every analysis whose report step only maps the report's settings onto its own config."""

    import sys

    def report_step(folder, report_cfg, adapter, sink_score: str, log, calibration=None) -> None:
        current = getattr(sys.modules[run.__module__], run.__name__)  # looked up when called, like a plain call
        current(str(folder), report_step_config(config_class, report_cfg, sink_score, **overrides), adapter=adapter,
                log=log, calibration=calibration)

    report_step.__doc__ = f"`sinkscope report` step: {run.__name__} with the report's settings."
    return report_step


# besides scan, every analysis that only reads activations; the others (ablate, var_eval, patching, inject, remove)
# edit the forward
REMOTE_ANALYSES = ("heads", "contributions", "location", "vit_sinks")


def output_grams(adapter, host: bool = False) -> dict[int, torch.Tensor]:
    """layer -> (W_O^h)^T W_O^h of every head ([head, head_dim, head_dim], `measures.contributions.ov_grams`) of W_O
    as it acts (LoRA included), made once per run where the layer sits (on the CPU with `host`): all that the
    contribution measures (`ov_norms_from_grams`) need of W_O, for every batch of the run."""
    grams = {}
    with torch.no_grad():
        for i in range(adapter.num_layers):
            gram = contributions.ov_grams(adapter.output_weight(i).detach(), adapter.num_heads)
            grams[i] = gram.cpu() if host else gram
    return grams


class DeviceCopies:
    """Named tensors (or anything with `.to(device)`, such as TokenKinds) and the sink-dim index, copied to a device
    on their first use there, once per batch: a copy from the host waits for the device, so no layer's reduction
    makes one."""

    def __init__(self, tensors: dict, dims):
        self.tensors, self.dims = tensors, list(dims)
        self._on: dict = {}  # device -> {name: copy there, "dims": the sink-dim index there (or the empty list)}

    def on(self, device, states: torch.Tensor | None = None) -> dict:
        """The tensors on `device`; given the states, also "dims", the sink-dim index checked against their width."""
        if device not in self._on:
            self._on[device] = {name: t.to(device) for name, t in self.tensors.items()}
        there = self._on[device]
        if states is not None and "dims" not in there:
            index = sinks._dims_index(self.dims, states)
            there["dims"] = self.dims if index is None else index
        return there


class SinkScores:
    """In-trace part of a sink-aware reducer (torch only, also inside a remote trace): phi of every token,
    [batch, token] float32 (zeros without sink dims); keeps it per layer for `attention`.

    host: payloads move to the CPU as they are made (what a remote trace sends back); False leaves them where the
    layer ran, for the reducer to bring over once per batch (`payloads_to_host`). The batch's token masks and the
    sink-dim index are copied to a device once per batch (`on`): a copy from the host waits for the device, so
    nothing in a layer's reduction does."""

    def __init__(self, dims, eps: float, score: str, real: torch.Tensor, host: bool = True,
                 extra_masks: dict[str, torch.Tensor] | None = None):
        self.dims, self.eps, self.score, self.real, self.host = list(dims), eps, score, real, host
        self.extra_masks = dict(extra_masks or {})
        self.phi: dict[int, torch.Tensor] = {}
        self._copies: DeviceCopies | None = None  # made on first use, when a subclass' masks() are complete

    def masks(self) -> dict[str, torch.Tensor]:
        """The CPU masks the reductions use, by name (`real` and `extra_masks`); subclasses add theirs."""
        return {"real": self.real, **self.extra_masks}

    def on(self, device, states: torch.Tensor | None = None) -> dict:
        """`masks()` on `device` (and, given the states, the sink-dim index as "dims"): `DeviceCopies.on`."""
        if self._copies is None:
            self._copies = DeviceCopies(self.masks(), self.dims)
        return self._copies.on(device, states)

    def out(self, payload):
        """A payload as it leaves the part: on the CPU when `host`, else where it is."""
        return payload.cpu() if self.host else payload

    def phi_of(self, states: torch.Tensor) -> torch.Tensor:
        """states [batch, (layer,) token, dim] -> phi [batch, (layer,) token] float32, where the states are (zeros
        without sink dims)."""
        states = states.detach()
        if not self.dims:
            return torch.zeros(states.shape[:-1], device=states.device)
        there = self.on(states.device, states)
        return sinks.sink_score(states, there["dims"], self.score, there["real"], self.eps).float()

    def residual(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        phi = self.phi[layer] = self.phi_of(states)
        return self.out(phi)

    def attention(self, layer: int, probs: torch.Tensor):
        return None


BLOCK_BYTES = 2**29  # the largest float32 block of layers a deferred reduction stacks and reduces at once


def query_row_span(queries: torch.Tensor) -> tuple[int, int]:
    """(first, stop): the positions between the first and the last query of any row of a [batch, token] bool mask
    (on the host), the attention rows a deferred reduction keeps; (0, 0) without queries."""
    rows = torch.nonzero(queries.cpu().any(dim=0)).flatten().tolist()
    return (rows[0], rows[-1] + 1) if rows else (0, 0)


def layer_blocks(layers: list[int], kept: dict[int, torch.Tensor], block_bytes: int = BLOCK_BYTES) -> list[list[int]]:
    """`layers` (keys of `kept`, in order) cut into runs of consecutive entries whose tensors sit on one device (a
    model split across GPUs keeps each layer where it ran), each run at most `block_bytes` bytes in float32: the
    blocks a deferred reduction stacks and reduces at once."""
    blocks: list[list[int]] = []
    for layer in layers:
        size = max(1, block_bytes // max(1, 4 * kept[layer].numel()))  # layers per block
        if blocks and len(blocks[-1]) < size and kept[blocks[-1][0]].device == kept[layer].device:
            blocks[-1].append(layer)
        else:
            blocks.append([layer])
    return blocks


KEEP_BYTES = 2**31  # what a deferred in-trace part may hold of a batch's layer inputs before it reduces them


class KeptLayers:
    """The store of a deferred in-trace part: each layer's inputs by kind ("residual", "attention": layer ->
    tensor), reduced in blocks of layers by the part's `reduce(kept) -> list` (which pops what it reduces).

    `keep` copies a layer's tensor in; when a layer's residual state would take the store past `keep_bytes`, the
    layers kept so far (complete: residual and attention) are reduced first, on their device, with nothing read
    back, and their results kept in `reduced`. So the store holds about `keep_bytes` (plus one layer) whatever
    the number of layers, tokens and query rows: a text-only LM with a long prompt keeps whole attention maps.
    `drain()` reduces the rest and returns every result in layer order."""

    def __init__(self, reduce: Callable[[dict], list], keep_bytes: int = KEEP_BYTES):
        self.kept: dict[str, dict[int, torch.Tensor]] = {"residual": {}, "attention": {}}
        self.reduced: list = []
        self.bytes = 0
        self._reduce, self.keep_bytes = reduce, keep_bytes

    def keep(self, kind: str, layer: int, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if kind == "residual" and self.kept["residual"] and self.bytes + size > self.keep_bytes:
            self.reduced += self._reduce(self.kept)
            self.bytes = 0
        self.kept[kind][layer] = tensor.clone()
        self.bytes += size

    def drain(self) -> list:
        out = self.reduced + self._reduce(self.kept)
        self.reduced, self.bytes = [], 0
        return out


def payloads_to_host(payloads: list) -> list:
    """The payloads (tensors in nested dicts, lists or tuples) with every tensor on the CPU, brought over in one copy
    per (device, dtype): each copy from a GPU waits for it, so a batch waits once per device, not once per layer and
    tensor. CPU tensors are returned as they are; the others become views of one CPU tensor per (device, dtype)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    leaves, spec = tree_flatten(payloads)
    groups: dict = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "cpu":
            groups.setdefault((leaf.device, leaf.dtype), []).append(i)
    for at in groups.values():
        flat = torch.cat([leaves[i].reshape(-1) for i in at]).cpu()
        for i, part in zip(at, flat.split([leaves[i].numel() for i in at])):
            leaves[i] = part.view(leaves[i].shape)
    return tree_unflatten(leaves, spec)


class SinkAwareReducer:
    """Base reducer: per layer, phi and the sink masks of the batch (subclasses add measures).

    After `residual(layer, states)`: self.phi[layer] [batch, token], self.sink[layer] (any real
    token with phi >= tau), self.visual_sink[layer], on the layer's device while the forward runs (so that
    `attention` can use them there, and no layer waits for a copy); `end()` brings them to the CPU in one copy
    per (device, dtype). self.queries [batch, token] = text tokens after the last image token (CPU).
    Subclasses that override `end` call `super().end(*own)`, which brings their own payloads over in the same copies.
    """

    def __init__(self, dims: list[int], tau: float, eps: float, score: str = "rms"):
        self.dims, self.tau, self.eps, self.score = list(dims), float(tau), eps, score
        self.phi: dict[int, torch.Tensor] = {}
        self.sink: dict[int, torch.Tensor] = {}
        self.visual_sink: dict[int, torch.Tensor] = {}

    def begin(self, info: BatchInfo) -> None:
        self.info = info
        self.kinds = info.token_kinds
        self.real = self.kinds.real_mask
        self.visual = self.kinds.visual_mask
        self.queries = text_queries_after_image(info)
        self.phi, self.sink, self.visual_sink = {}, {}, {}
        self._scores = SinkScores(self.dims, self.eps, self.score, self.real, host=False,
                                  extra_masks={"visual": self.visual, "queries": self.queries})

    def on(self, device) -> dict[str, torch.Tensor]:
        """The batch's masks (real, visual, queries) on `device`, sent there once per batch, not once per layer."""
        return self._scores.on(device)

    def residual(self, layer: int, states: torch.Tensor) -> None:
        self._take_phi(layer, self._scores.residual(layer, states))

    def _take_phi(self, layer: int, phi: torch.Tensor) -> None:
        """phi [batch, token] of `layer` -> self.phi, self.sink, self.visual_sink (on phi's device)."""
        there = self.on(phi.device)
        self.phi[layer] = phi
        self.sink[layer] = (phi >= self.tau) & there["real"]
        self.visual_sink[layer] = self.sink[layer] & there["visual"]

    def attention(self, layer: int, probs: torch.Tensor) -> None:
        pass

    def end(self, *own):
        """phi and the sink masks to the CPU, with `own` (a subclass' payloads), in one copy per (device, dtype);
        returns `own` on the CPU."""
        self.phi, self.sink, self.visual_sink, *own = payloads_to_host([self.phi, self.sink, self.visual_sink, *own])
        return own


class InTraceReducer(SinkAwareReducer):
    """A sink-aware reducer whose per-layer work is an in-trace part (`in_trace(host)`, torch only) and whose tables
    come from its payloads (`take(kind, layer, payload)`, then `build()`).

    Run here, the part runs with host=False: each layer's payloads stay where the layer ran until `end()`, which
    brings all of the batch's payloads to the CPU at once (`payloads_to_host`) and hands them to `take` in the
    order they were made; so the forward never waits for a copy. A part may also keep its inputs and reduce them
    after the forward, in blocks of layers: its calls then return None and its `finish()` gives the
    (kind, layer, payload) triples, each layer's residual before its attention. Run remotely, the tracer sends the part
    (host=True) and hands its payloads to `take` after the trace; `end()` then builds."""

    def begin(self, info: BatchInfo) -> None:
        super().begin(info)
        self._part = None  # this batch's in-trace part, when the trace runs here
        self._kept: list[tuple[str, int, object]] = []  # (kind, layer, payload on the layer's device)

    def in_trace(self, host: bool = True):
        raise NotImplementedError

    def take(self, kind: str, layer: int, payload) -> None:
        raise NotImplementedError

    def build(self) -> None:
        """The batch's tables, from what `take` kept."""

    def _keep(self, kind: str, layer: int, payload) -> None:
        if payload is not None:
            self._kept.append((kind, layer, payload))

    def residual(self, layer: int, states: torch.Tensor) -> None:
        if self._part is None:
            self._part = self.in_trace(host=False)
        self._keep("residual", layer, self._part.residual(layer, states))

    def site(self, name: str, x: torch.Tensor) -> None:
        """A module's input before the decoder layers (`Tracer.run(sites=...)`), for a part that has `site`."""
        if self._part is None:
            self._part = self.in_trace(host=False)
        if hasattr(self._part, "site"):
            self._keep("site", name, self._part.site(name, x))

    def values(self, layer: int, v: torch.Tensor) -> None:
        if hasattr(self._part, "values"):
            self._keep("values", layer, self._part.values(layer, v))

    def attention(self, layer: int, probs: torch.Tensor) -> None:
        self._keep("attention", layer, self._part.attention(layer, probs))

    def end(self) -> None:
        if hasattr(self._part, "finish"):  # a part that deferred its reductions to the end of the forward
            for kind, layer, payload in self._part.finish():
                self._keep(kind, layer, payload)
        kept, self._kept, self._part = self._kept, [], None
        for (kind, layer, _), payload in zip(kept, payloads_to_host([p for _, _, p in kept])):
            self.take(kind, layer, payload)
        self.build()


def cluster_bootstrap(n_groups: int, statistic: Callable[[np.ndarray], float], n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of `statistic(group_indices)` resampling whole groups (samples) with replacement.

    statistic gets an int array of group indices (with repeats) and returns a float. Uses
    scipy.stats.bootstrap. Returns (nan, nan) with fewer than 2 groups or a degenerate statistic.
    """
    from scipy import stats

    if n_groups < 2:
        return math.nan, math.nan

    def stat(idx):
        return statistic(np.asarray(idx, dtype=int))

    try:
        res = stats.bootstrap((np.arange(n_groups),), stat, n_resamples=n_boot, vectorized=False,
                              confidence_level=level, method="percentile", random_state=np.random.default_rng(seed))
    except (ValueError, FloatingPointError):
        return math.nan, math.nan
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return lo, hi


def fmt_ci(value: float, low: float, high: float, digits: int = 3) -> str:
    """'0.123 (95% CI 0.1 to 0.15)'; 'n/a' pieces where undefined."""
    def f(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"
    return f"{f(value)} (95% CI {f(low)} to {f(high)})"


# ----------------------------------------------------------------------------- the per-chunk loop, yes/no answers

def traced_chunks(s: Setup, batch_size: int, name: str, make_reducer: Callable[[], object], per_request: int = 1,
                  **trace_kw):
    """The loop of an analysis that traces one reducer per chunk: for each chunk of `s.todo` (progress bar `name`), a
    fresh `make_reducer()` traced over the chunk's batch (`trace_kw`: Tracer.run's options), yielded as
    (chunk, reducer) for the caller to store its rows; the chunk is marked done when the caller asks for the next.
    per_request: chunks traced together (`Tracer.run_many`: one request of a remote run), then yielded in order."""
    for chunks in request_groups(s.todo, batch_size, per_request, name):
        jobs = [(prepare_batch(s.adapter, c), [make_reducer()], [x.sample_id for x in c]) for c in chunks]
        s.tracer.run_many(jobs, **trace_kw)
        for chunk, (_, (red,), _) in zip(chunks, jobs):
            yield chunk, red
            s.folder.mark_done([x.sample_id for x in chunk])


def yes_no_labels(samples: list[Sample], what: str) -> dict[str, str]:
    """Each sample's reference answer, "yes" or "no" (stripped, lower case), by sample id; an error that names the
    fix when a sample has none. what: the analysis, for the message."""
    labels = {x.sample_id: (x.answer or "").strip().lower() for x in samples}
    bad = [sid for sid, a in labels.items() if a not in ("yes", "no")]
    if bad:
        raise SinkscopeError(f"{what} needs yes/no questions with a reference answer; {len(bad)} samples have none "
                             f"(e.g. {bad[0]}). Use --data demo:pope-adversarial or a POPE .jsonl with 'label'")
    return labels


def answer_token_ids(adapter) -> tuple[int, int]:
    """(yes id, no id): the first token of each word as the model would write it."""
    tok = getattr(adapter.processor, "tokenizer", adapter.processor)
    ids = []
    for word in ("yes", "no"):
        enc = tok(word, add_special_tokens=False).input_ids
        if not enc:
            raise SinkscopeError(f"the tokenizer cannot encode {word!r}; ablation needs yes/no answers")
        ids.append(int(enc[0]))
    return ids[0], ids[1]
