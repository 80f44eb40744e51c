"""Run a model once and hand what the measures need to streaming reducers (nnsight).

For each requested layer of the language model, one forward pass exposes
  - the residual stream entering the layer: [batch, token, dim] (= `output_hidden_states[l]`);
  - the post-softmax attention probabilities: [batch, head, query, key] (= eager
    `output_attentions[l]`), read from the op that follows softmax inside the attention
    function, found by inspection (nnsight op labels change between versions).

Reducers receive these tensors layer by layer while the forward pass runs and keep only what
they need, so a scan over N samples never holds N samples of attention maps:

    tracer = Tracer(adapter)
    cache = tracer.run_with_cache(batch)              # keep everything (notebooks, tests)
    tracer.run(batch, [MyReducer()], layers=[2, 3])   # stream (scans)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from sinkscope.models.base import ModelAdapter, SinkscopeError, TokenKinds


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
        """[layer, batch, token, dim] over the cached layers, in layer order."""
        return torch.stack([self.residual[i] for i in sorted(self.residual)])


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


class Tracer:
    """Wraps an adapter's model in nnsight and streams per-layer tensors to reducers."""

    def __init__(self, adapter: ModelAdapter):
        from nnsight import NNsight

        self.adapter = adapter
        self.envoy = NNsight(adapter.model)
        self._labels: tuple[str, str] | None = None  # (attention call, probabilities op)
        self._envoys = None  # (decoder-layer envoys, {layer: attention envoy})

    # -- locating the probabilities ----------------------------------------------------
    def _layer_envoys(self):
        """The envoys of the decoder layers (same path as the adapter's module tree)."""
        target = self.adapter.layers
        for name, module in self.adapter.model.named_modules():
            if module is target:
                envoy = self.envoy
                for part in name.split("."):
                    envoy = getattr(envoy, part) if not part.isdigit() else envoy[int(part)]
                return envoy
        raise SinkscopeError("could not locate the decoder layers inside the model")

    def _attention_envoy(self, layers_envoy, layer: int):
        attn_module = self.adapter.attention(layer)
        layer_module = self.adapter.layers[layer]
        for name, module in layer_module.named_modules():
            if module is attn_module:
                envoy = layers_envoy[layer]
                for part in name.split("."):
                    envoy = getattr(envoy, part)
                return envoy
        raise SinkscopeError(f"attention module of layer {layer} not found")

    @staticmethod
    def _find_probability_op(attn_envoy) -> tuple[str, str]:
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

    def _probs_envoy(self, attn_envoy):
        call, op = self._labels
        return getattr(getattr(attn_envoy.source, call).source, op)

    # -- running -----------------------------------------------------------------------
    def batch_info(self, batch, sample_ids=None, prompt_length=None) -> BatchInfo:
        ids = batch["input_ids"]
        kinds = self.adapter.token_kinds(ids, batch.get("attention_mask"), prompt_length)
        return BatchInfo(ids, kinds, list(sample_ids) if sample_ids is not None else list(range(ids.shape[0])))

    def run(self, batch, reducers, layers=None, residual: bool = True, attention: bool = True,
            sample_ids=None, return_logits: bool = False, values: bool = False):
        """One forward pass; feed each requested layer's tensors to every reducer.

        batch: processor output (input_ids, attention_mask, pixel_values, ...).
        layers: iterable of layer indices (default: all). Returns logits [batch, token, vocab]
        when `return_logits`, else None. values: also hand reducers that have a `values` method
        the value states [batch, kv_head, key, head_dim] given to the attention function (before
        any repeat for grouped-query attention), read from that call's inputs.
        """
        if attention and self.adapter.text_attention != "eager":
            raise SinkscopeError(
                f"attention probabilities need eager attention, but the language model uses "
                f"{self.adapter.text_attention!r}; call adapter.set_text_attention('eager')"
            )
        n = self.adapter.num_layers
        layers = sorted(set(range(n) if layers is None else layers))
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise SinkscopeError(f"layers {bad} out of range: the model has {n} layers (0..{n - 1})")
        info = self.batch_info(batch, sample_ids)
        for r in reducers:
            r.begin(info)
        inputs = {k: v.to(self.adapter.device) if torch.is_tensor(v) else v
                  for k, v in self.adapter.forward_inputs(batch).items()}
        if self._envoys is None:  # module lookups once per tracer, not once per batch
            layer_envoys = self._layer_envoys()
            self._envoys = (layer_envoys, {i: self._attention_envoy(layer_envoys, i) for i in range(n)})
        layer_envoys, attn_envoys = self._envoys
        if values and self._labels is None and layers:
            # locate the ops once in a pass of their own: the call's inputs come before its inner ops
            self.run(batch, [], layers=[layers[0]], residual=False, attention=True)
        holder: dict = {}
        with torch.no_grad(), self.envoy.trace(**inputs):
            for i in layers:
                if residual:
                    states = layer_envoys[i].input
                    for r in reducers:
                        r.residual(i, states)
                if attention or values:
                    if self._labels is None:  # first use: locate the op (after this layer's input)
                        self._labels = self._find_probability_op(attn_envoys[i])
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
