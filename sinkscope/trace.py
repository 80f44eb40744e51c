"""Run a model once and hand what the measures need to streaming reducers (torch hooks here, nnsight remotely).

For each requested layer of the language model, one forward pass exposes
  - the residual stream entering the layer: [batch, token, dim] (= `output_hidden_states[l]`);
  - the post-softmax attention probabilities: [batch, head, query, key] (= eager
    `output_attentions[l]`): in a local run, handed over by sinkscope's own eager attention function
    (`sinkscope.eager.capturing`, bitwise eager), with the value states when asked for; in a remote run
    (or a local one with `via_source`), read through nnsight from the op that follows softmax inside the
    attention function, found by inspection (nnsight op labels change between versions).

Reducers receive these tensors layer by layer while the forward pass runs and keep only what
they need, so a scan over N samples never holds N samples of attention maps:

    tracer = Tracer(adapter)
    cache = tracer.run_with_cache(batch)              # keep everything (notebooks, tests)
    tracer.run(batch, [MyReducer()], layers=[2, 3])   # stream (scans)
    tracer.run(batch, [MyReducer()], remote="local")  # the trace serialised as for NDIF (see RemoteReducer)
    Tracer(models.load_hosted(hub_id)).run(batch, [MyReducer()], remote="ndif")  # run by NDIF
    tracer.run_many([(batch, [MyReducer()], None) for batch in batches], remote="ndif")  # one request (a session)

Remote runs (`remote="local"`, nnsight's serverless dry run of NDIF: the trace is serialised,
deserialised with sinkscope's modules hidden, and run here; `remote="ndif"` or a server's URL: the same
trace sent to NDIF, which runs the model) take reducers that split in two: a small
torch-only part that runs inside the trace and returns reductions ([batch, token], [batch, head],
[batch, k]: never [layer, head, query, key]), and the reducer itself, which builds its tables from
those reductions after the trace. A local run goes through the same split, so both give the same tables.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol

import torch

from sinkscope.errors import SinkscopeError
from sinkscope.models.base import ModelAdapter, TokenKinds
from sinkscope.runconfig import check_remote, is_server


class Reducer(Protocol):
    """Receives one batch, layer by layer; keeps only what it needs."""

    def begin(self, batch: "BatchInfo") -> None: ...

    def residual(self, layer: int, states: torch.Tensor) -> None:
        """states: [batch, token, dim], the residual stream entering `layer`."""

    def attention(self, layer: int, probs: torch.Tensor) -> None:
        """probs: [batch, head, query, key] post-softmax attention of `layer`."""

    def end(self) -> None: ...

    # optional: `values(layer, v)` with v [batch, kv_head, key, head_dim], the value states the
    # attention function multiplies the probabilities with (run with values=True)


class RemoteReducer(Protocol):
    """A reducer that can run remotely: `in_trace()` (after `begin`) gives the part that runs inside the
    trace, with `residual(layer, states)` / `attention(layer, probs)` (and optionally `values`) returning a
    payload of small tensors or None; `take(kind, layer, payload)` receives each payload after the trace."""

    def in_trace(self): ...

    def take(self, kind: str, layer: int, payload) -> None: ...


class _PersistentObjects:
    """What nnsight's local-simulation backend asks a remotable model for: the ids its pickles refer to.

    A plain `NNsight` wrapper is not remotable; the ids are the ones `Envoy.__getstate__` tags (the
    interleaver and every module by path), as nnsight's `Remotable` builds them.
    """

    def __init__(self, envoy):
        self.envoy = envoy

    def _remoteable_persistent_objects(self) -> dict:
        objects = {"Interleaver": self.envoy.interleaver}
        for envoy in self.envoy.modules():
            objects[f"Module:{envoy.path}"] = envoy._module
        return objects


def remote_trace_kwargs(envoy, remote) -> dict:
    """The keyword arguments of `envoy.trace` for a remote run: "local" = nnsight's local-simulation backend
    (serialise, deserialise with local modules hidden, run here); "ndif" or a URL = nnsight's `remote=`, which
    sends the trace to the server under the model's hub key (the envoy must be a hosted model:
    `sinkscope.models.load_hosted`)."""
    remote = check_remote(remote)
    if remote == "local":
        from nnsight.intervention.backends.local import LocalSimulationBackend

        return {"backend": LocalSimulationBackend(_PersistentObjects(envoy))}
    if not hasattr(envoy, "to_model_key"):
        raise SinkscopeError(f"--remote {remote}: the model was loaded here, so NDIF does not know it; load it as a "
                             "hosted model by its hub id (sinkscope.models.load_hosted(hub_id), or the CLI's --model "
                             "HUB_ID with --remote), or use --remote local for the dry run")
    return {"remote": True if remote == "ndif" else remote}


@dataclass
class BatchInfo:
    """What reducers know about the batch being traced."""

    input_ids: torch.Tensor  # [batch, token]
    token_kinds: TokenKinds
    sample_ids: list = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])


class AttentionOpNotFound(SinkscopeError):
    pass


@dataclass
class ActivationCache:
    """Everything one forward pass exposed (TransformerLens-style `run_with_cache`).

    residual: layer -> [batch, token, dim]; attention: layer -> [batch, head, query, key].
    """

    batch: BatchInfo
    residual: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        """'resid_pre.3' or 'pattern.3' (TransformerLens names): one layer's tensor."""
        name, _, layer = key.rpartition(".")
        store = {"resid_pre": self.residual, "pattern": self.attention}.get(name)
        if store is None or not layer.isdigit():
            raise KeyError(f"{key!r}: use 'resid_pre.<layer>' or 'pattern.<layer>'")
        return store[int(layer)]

    def stacked_residual(self) -> torch.Tensor:
        """[layer, batch, token, dim] over the cached layers, in layer order, on the first cached layer's device (a
        model split across GPUs leaves each layer's states where it ran)."""
        layers = sorted(self.residual)
        device = self.residual[layers[0]].device if layers else None
        return torch.stack([self.residual[i].to(device) for i in layers])


class _CacheReducer:
    def __init__(self, cache: ActivationCache):
        self.cache = cache

    def begin(self, batch):
        pass

    def residual(self, layer, states):
        self.cache.residual[layer] = states.detach().clone()

    def attention(self, layer, probs):
        self.cache.attention[layer] = probs.detach().clone()

    def end(self):
        pass


def envoy_at(root_envoy, root_module: torch.nn.Module, target: torch.nn.Module, what: str = ""):
    """The nnsight envoy of `target`, a submodule of `root_module` (wrapped by `root_envoy`): found by identity in
    the module tree and reached along its dotted name (numeric parts index a ModuleList)."""
    for name, module in root_module.named_modules():
        if module is target:
            envoy = root_envoy
            for part in name.split(".") if name else []:
                envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
            return envoy
    raise SinkscopeError(f"could not locate {what or type(target).__name__} inside the model")


@contextlib.contextmanager
def _server_errors(remote, model: str):
    """A request a server refused or failed (nnsight's RemoteError: a missing or wrong key, a model it does not run, an
    error in the job, running out of memory) as a SinkscopeError that says what to do; a run resumes after it."""
    if not is_server(remote):
        yield
        return
    from nnsight.intervention.backends.remote import RemoteError

    try:
        yield
    except RemoteError as err:
        raise SinkscopeError(f"the NDIF request for {model} failed: {err}. Check the API key (`nnsight login` or "
                             "NDIF_API_KEY) and that NDIF runs the model (nnsight.status()); a smaller --batch-size "
                             "helps a job that ran out of memory; rerun the same command to resume") from err


def find_probability_op(attn_envoy) -> tuple[str, str]:
    """(label of the attention-function call, label of the op holding probabilities).

    Must run inside a trace. The probabilities are the output of the op right after
    softmax (dropout in transformers' eager function), i.e. what multiplies V.
    """
    from nnsight.intervention.source import SourceNotAvailable

    call = None
    for label in attn_envoy.source.names:
        if "attention_interface" not in label:
            continue
        try:
            inner = getattr(attn_envoy.source, label).source
        except SourceNotAvailable:
            continue
        call = label
        break
    if call is None:
        raise AttentionOpNotFound(
            "no attention-function call found in the attention module's forward; this family's "
            "attention does not go through transformers' attention interface"
        )
    names = list(inner.names)
    dropout = [n for n in names if "dropout" in n]
    if dropout:
        return call, dropout[0]
    softmax = [i for i, n in enumerate(names) if "softmax" in n]
    if softmax:
        return call, names[softmax[-1]]
    raise AttentionOpNotFound(f"no softmax in the attention function (ops: {names[:20]}...)")


@dataclass
class _RemotePlan:
    """What a remote trace reads: the envoys of the requested layers (and their attention modules, sites and output
    projections) and which tensors; it travels with the request."""

    layers: list
    residual: bool
    attention: bool
    values: bool
    layer_at: dict
    attn_at: dict
    site_at: dict
    out_proj_at: dict


def _read_in_trace(plan: _RemotePlan, parts: list, labels, collected: list, found: list) -> None:
    """The body of a remote trace (it runs where the model runs): hands each site's input, and each requested layer's
    residual, value states and probabilities, to the in-trace parts, and appends (part, kind, layer, payload) to
    `collected`. labels: (attention call, probabilities op), or None to find them at the first layer read (appended
    to `found`, which travels back with `collected`)."""
    for name, site in plan.site_at.items():
        x = site.input
        for j, part in enumerate(parts):
            if hasattr(part, "site"):
                collected.append((j, "site", name, part.site(name, x)))
    for i in plan.layers:
        if plan.residual:
            states = plan.layer_at[i].input
            for j, part in enumerate(parts):
                collected.append((j, "residual", i, part.residual(i, states)))
        if plan.attention or plan.values:
            if labels is None:  # first use: after the layer's input, as a local run
                labels = find_probability_op(plan.attn_at[i])
                found.extend(labels)
            call, op = labels
        if plan.out_proj_at:
            for part in parts:
                if getattr(part, "needs_output_weight", False):
                    part.output_weight(i, plan.out_proj_at[i].weight)
        if plan.values:
            v = getattr(plan.attn_at[i].source, call).inputs[0][3]
            for j, part in enumerate(parts):
                if hasattr(part, "values"):
                    collected.append((j, "values", i, part.values(i, v)))
        if plan.attention:
            probs = getattr(getattr(plan.attn_at[i].source, call).source, op).output
            for j, part in enumerate(parts):
                collected.append((j, "attention", i, part.attention(i, probs)))


class Tracer:
    """Streams per-layer tensors of an adapter's model to reducers: in a local run through torch hooks and the
    capture function, in a remote run (or one reading `.source`) through nnsight."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self._envoy = None
        self._labels: tuple[str, str] | None = None  # (attention call, probabilities op)
        self._envoys = None  # (decoder-layer envoys, {layer: attention envoy})

    @property
    def envoy(self):
        """The model wrapped by nnsight, made on first use: wrapping patches every module's forward for good (~50
        Python calls per layer on each later forward), so a tracer that only runs locally never wraps it."""
        if self._envoy is None:
            if self.adapter.hosted is not None:  # a model NDIF serves: its nnsight wrapper, keyed by hub id
                self._envoy = self.adapter.hosted
            else:
                from nnsight import NNsight

                self._envoy = NNsight(self.adapter.model)
        return self._envoy

    def _envoys_of_layers(self):
        """(decoder-layer envoys, {layer: attention envoy}): module lookups once per tracer, not once per batch."""
        if self._envoys is None:
            layer_envoys = self._layer_envoys()
            self._envoys = (layer_envoys, {i: self._attention_envoy(layer_envoys, i)
                                           for i in range(self.adapter.num_layers)})
        return self._envoys

    # -- locating the probabilities ----------------------------------------------------
    def _layer_envoys(self):
        """The envoys of the decoder layers (same path as the adapter's module tree)."""
        return envoy_at(self.envoy, self.adapter.model, self.adapter.layers, "the decoder layers")

    def _attention_envoy(self, layers_envoy, layer: int):
        return envoy_at(layers_envoy[layer], self.adapter.layers[layer], self.adapter.attention(layer),
                        f"the attention module of layer {layer}")

    def _probs_envoy(self, attn_envoy):
        call, op = self._labels
        return getattr(getattr(attn_envoy.source, call).source, op)

    # -- running -----------------------------------------------------------------------
    def batch_info(self, batch, sample_ids=None, prompt_length=None) -> BatchInfo:
        """The batch's ids and token kinds, on the CPU whatever device the batch is on (reducers move masks
        to the device of the tensors they index, and build their tables on the CPU)."""
        ids = batch["input_ids"].cpu()
        mask = batch.get("attention_mask")
        kinds = self.adapter.token_kinds(ids, None if mask is None else mask.cpu(), prompt_length)
        return BatchInfo(ids, kinds, list(sample_ids) if sample_ids is not None else list(range(ids.shape[0])))

    def run(self, batch, reducers, layers=None, residual: bool = True, attention: bool = True,
            sample_ids=None, return_logits: bool = False, values: bool = False, remote: str | None = None,
            via_source: bool = False, sites: dict | None = None):
        """One forward pass; feed each requested layer's tensors to every reducer.

        batch: processor output (input_ids, attention_mask, pixel_values, ...).
        layers: iterable of layer indices (default: all). Returns logits [batch, token, vocab]
        when `return_logits`, else None. values: also hand reducers that have a `values` method
        the value states [batch, kv_head, key, head_dim] given to the attention function (before
        any repeat for grouped-query attention), read from that call's inputs.
        remote: None (run here), "local" (nnsight's serialised dry run of NDIF), "ndif" or a server URL (the adapter
        then a hosted model, `models.load_hosted`): every reducer must be a `RemoteReducer`; only its in-trace
        part's payloads come back.
        via_source: read the probabilities through nnsight's `.source` also in a local run (as remote runs and
        runs with `values` do; a local run otherwise takes them from `sinkscope.eager.capturing`).
        sites: {name: module} that runs before the decoder layers (e.g. an LMM's projector): its first input is
        handed to the reducers that have a `site(name, tensor)` method, before layer 0's residual, here and remotely.
        """
        layers = self._checked(layers, attention, remote)
        if remote and return_logits:
            raise SinkscopeError("a remote trace brings back reductions only, not the logits")
        info = self.batch_info(batch, sample_ids)
        for r in reducers:
            r.begin(info)
        if remote:
            self._remote([(batch, reducers)], layers, residual, attention, values, remote, sites or {})
            return None
        inputs = {**self.adapter.device_inputs(batch), **({} if return_logits else self.adapter.without_logits())}
        holder: dict = {}
        if not via_source:
            # torch hooks, and the probabilities (and value states) from sinkscope's capture function rather than
            # nnsight's `.source` (which would wrap every operation of every attention forward): the tensors eager
            # attention multiplies
            self._run_local(inputs, reducers, layers, residual, attention, values, holder if return_logits else None,
                            sites or {})
            for r in reducers:
                r.end()
            return holder.get("logits")
        if values and self._labels is None and layers:
            # locate the ops once in a pass of their own: the call's inputs come before its inner ops
            self.run(batch, [], layers=[layers[0]], residual=False, attention=True, via_source=True)
        layer_envoys, attn_envoys = self._envoys_of_layers()
        site_envoys = self._site_envoys(sites or {})
        with torch.no_grad(), self.envoy.trace(**inputs):
            for name, site in site_envoys.items():
                x = site.input
                for r in reducers:
                    if hasattr(r, "site"):
                        r.site(name, x)
            for i in layers:
                if residual:
                    states = layer_envoys[i].input
                    for r in reducers:
                        r.residual(i, states)
                if attention or values:
                    if self._labels is None:  # first use: locate the op (after this layer's input)
                        self._labels = find_probability_op(attn_envoys[i])
                if values:
                    v = getattr(attn_envoys[i].source, self._labels[0]).inputs[0][3]
                    for r in reducers:
                        if hasattr(r, "values"):
                            r.values(i, v)
                if attention:
                    probs = self._probs_envoy(attn_envoys[i]).output
                    for r in reducers:
                        r.attention(i, probs)
            if return_logits:
                holder["logits"] = self.envoy.output.logits.detach().clone()
        for r in reducers:
            r.end()
        return holder.get("logits")

    def run_many(self, jobs, layers=None, residual: bool = True, attention: bool = True, values: bool = False,
                 remote: str | None = None, sites: dict | None = None) -> None:
        """`run` over several batches: jobs = [(batch, reducers, sample_ids or None)], each batch with its own
        reducers, the options shared. Remotely (`remote` set) the batches travel as one request, an nnsight session
        of one trace per batch (one job in NDIF's queue instead of one per batch); the reducers receive the same
        payloads as from one `run` per batch, after the whole request has come back. Here, one `run` per batch."""
        jobs = list(jobs)
        every = [id(r) for _, reducers, _ in jobs for r in reducers]
        if len(set(every)) < len(every):  # begun per batch, its payloads come back after every batch has run
            raise SinkscopeError("run_many: a reducer appears in more than one batch; give each batch reducers of its "
                                 "own (or call run once per batch)")
        if not remote or len(jobs) == 1:
            for batch, reducers, sample_ids in jobs:
                self.run(batch, reducers, layers, residual=residual, attention=attention, sample_ids=sample_ids,
                         values=values, remote=remote, sites=sites)
            return
        layers = self._checked(layers, attention, remote)
        for batch, reducers, sample_ids in jobs:
            info = self.batch_info(batch, sample_ids)
            for r in reducers:
                r.begin(info)
        self._remote([(batch, reducers) for batch, reducers, _ in jobs], layers, residual, attention, values, remote,
                     sites or {})

    def _checked(self, layers, attention: bool, remote) -> list[int]:
        """The requested layers, sorted; errors naming the fix for a model that cannot be traced so."""
        if attention and self.adapter.text_attention != "eager":
            raise SinkscopeError(
                f"attention probabilities need eager attention, but the language model uses "
                f"{self.adapter.text_attention!r}; call adapter.set_text_attention('eager')"
            )
        if self.adapter.hosted is not None and not is_server(remote):
            raise SinkscopeError(f"{self.adapter.name} is served by NDIF and its weights are not in this process: "
                                 "trace it with remote='ndif' (or the server's URL), or load it here (models.load)")
        n = self.adapter.num_layers
        layers = sorted(set(range(n) if layers is None else layers))
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise SinkscopeError(f"layers {bad} out of range: the model has {n} layers (0..{n - 1})")
        return layers

    def _remote(self, jobs, layers, residual, attention, values, remote, sites) -> None:
        """Remote runs of [(batch, reducers)] whose reducers have begun: one request, then each reducer's `end`."""
        # a server places the inputs on its own devices; the dry run runs the model here
        prepare = self.adapter.forward_inputs if is_server(remote) else self.adapter.device_inputs
        jobs = [({**prepare(batch), **self.adapter.without_logits()}, reducers) for batch, reducers in jobs]
        with _server_errors(remote, self.adapter.name):
            if values and self._labels is None and layers:
                self._locate_remotely(jobs[0][0], layers[0], remote)  # the call's inputs come before its inner ops
            self._run_remote(jobs, layers, residual, attention, values, remote, sites)
        for _, reducers in jobs:
            for r in reducers:
                r.end()

    def _site_envoys(self, sites: dict) -> dict:
        """{name: envoy} of the `sites` modules, in the order given (the order they run in)."""
        return {name: envoy_at(self.envoy, self.adapter.model, module, f"site {name!r}") for name, module in sites.items()}

    def _run_local(self, inputs, reducers, layers, residual: bool, attention: bool, values: bool,
                   holder: dict | None, sites: dict | None = None) -> None:
        """A local run: the residual state entering each layer from a forward pre-hook on the decoder layer, the
        value states (with `values`) and probabilities handed over by the registered capture function as each layer
        computes them, so a reducer sees layer i's residual, then its values, then its attention, then layer
        i + 1's. Plain torch hooks and one plain forward:
        nnsight's interleaver (which checks every module's inputs and outputs, ~40 calls per layer) is only
        needed for a remote run or a `.source` read."""
        from sinkscope.eager import capturing

        wanted = set(layers)

        def hand(layer, probs):
            if layer in wanted:
                for r in reducers:
                    r.attention(layer, probs)

        def hand_values(layer, v):
            if layer in wanted:
                for r in reducers:
                    if hasattr(r, "values"):
                        r.values(layer, v)

        def handing(method: str, key):
            """A forward pre-hook handing the module's first input (as nnsight's `.input`) to every reducer's
            `method(key, x)`, for those that have it."""
            def hook(module, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                for r in reducers:
                    if hasattr(r, method):
                        getattr(r, method)(key, x)
            return hook

        hooked = [("site", name, module) for name, module in (sites or {}).items()]  # they run before the layers
        hooked += [("residual", i, self.adapter.layers[i]) for i in layers] if residual else []
        handles = []
        try:
            handles = [module.register_forward_pre_hook(handing(method, key), with_kwargs=True)
                       for method, key, module in hooked]
            capture = (capturing(self.adapter, hand if attention else None, hand_values if values else None)
                       if attention or values else contextlib.nullcontext())
            with capture, torch.no_grad():
                out = self.adapter.model(**inputs)
        finally:
            for h in handles:
                h.remove()
        if holder is not None:
            holder["logits"] = out.logits.detach()

    def _locate_remotely(self, inputs, layer: int, remote) -> None:
        """Find the attention call and probabilities op where the model runs (on the server for NDIF), in a trace of
        their own: a run that reads the value states (the call's inputs) needs the labels before its trace."""
        import nnsight

        _, attn_envoys = self._envoys_of_layers()
        attn_envoy, find = attn_envoys[layer], find_probability_op
        with torch.no_grad(), self.envoy.trace(**inputs, **remote_trace_kwargs(self.envoy, remote)):
            labels = nnsight.save(list(find(attn_envoy)))
        self._labels = (labels[0], labels[1])

    def _run_remote(self, jobs, layers, residual, attention, values, remote, sites=None) -> None:
        """The trace of a remote run of [(inputs, reducers)], one trace per batch (several in one nnsight session, one
        request): only envoys, op labels, in-trace parts, inputs and payloads cross the wire. The first trace that
        reads attention (and not the value states) finds the op labels where the model runs (a hosted model runs only
        on the server) and sends them back with the payloads; a session's later traces use them."""
        import nnsight

        missing = sorted({type(r).__name__ for _, reducers in jobs for r in reducers
                          if not (hasattr(r, "in_trace") and hasattr(r, "take"))})
        if missing:
            raise SinkscopeError(f"{', '.join(missing)} cannot run remotely: a remote trace returns reductions only, "
                                 "and this reducer needs the full tensors (give it in_trace() and take(); see "
                                 "sinkscope.trace.RemoteReducer), or run without --remote")
        parts_of = [[r.in_trace() for r in reducers] for _, reducers in jobs]
        layer_envoys, attn_envoys = self._envoys_of_layers()
        # parts that make W_O's grams where the model runs (a hosted model's weights are only there), before values
        weighing = values and any(getattr(part, "needs_output_weight", False) for parts in parts_of for part in parts)
        plan = _RemotePlan(
            layers=list(layers), residual=residual, attention=attention, values=values,
            layer_at={i: layer_envoys[i] for i in layers}, attn_at={i: attn_envoys[i] for i in layers},
            site_at=self._site_envoys(sites or {}),
            out_proj_at={i: envoy_at(attn_envoys[i], self.adapter.attention(i), self.adapter.output_projection(i),
                                     f"the attention output projection of layer {i}") for i in layers} if weighing else {})
        envoy, labels, read = self.envoy, self._labels, _read_in_trace
        if len(jobs) == 1:
            with torch.no_grad(), envoy.trace(**jobs[0][0], **remote_trace_kwargs(envoy, remote)):
                collected, found = nnsight.save([]), nnsight.save([])
                read(plan, parts_of[0], labels, collected, found)
            results = [collected]
        else:
            with torch.no_grad(), envoy.session(**remote_trace_kwargs(envoy, remote)):
                results, found = nnsight.save([]), nnsight.save([])
                for (inputs, _), parts in zip(jobs, parts_of):
                    known = (found[0], found[1]) if found else labels  # found by the session's first trace
                    with envoy.trace(**inputs):
                        collected = []
                        read(plan, parts, known, collected, found)
                        results.append(collected)
        if found:
            self._labels = (found[0], found[1])
        for (_, reducers), collected in zip(jobs, results):
            for j, kind, layer, payload in collected:
                if payload is not None:
                    reducers[j].take(kind, layer, payload)

    def run_with_cache(self, batch, layers=None, sample_ids=None) -> ActivationCache:
        """Run once and keep every requested layer's residual and attention."""
        cache = ActivationCache(self.batch_info(batch, sample_ids))
        cache.logits = self.run(batch, [_CacheReducer(cache)], layers=layers, sample_ids=sample_ids,
                                return_logits=True)
        return cache

    def validate(self, batch) -> dict[str, float]:
        """Check the located op really holds probabilities: shape, rows sum to 1."""
        cache = self.run_with_cache(batch, layers=[0])
        probs = cache.attention[0]
        b, t = batch["input_ids"].shape
        if probs.dim() != 4 or probs.shape[0] != b or probs.shape[-1] != t:
            raise AttentionOpNotFound(f"op {self._labels} has shape {tuple(probs.shape)}, not [batch, head, {t}, {t}]")
        mask = batch.get("attention_mask")
        rows = probs.sum(-1)
        if mask is not None:
            rows = rows[mask.bool()[:, None, :].expand_as(rows)]
        err = float((rows - 1).abs().max())
        if err > 1e-3:
            raise AttentionOpNotFound(f"op {self._labels} rows sum to 1 +- {err}: not probabilities")
        return {"row_sum_error": err}
