"""Causal tests of the sink mechanism: write the sink signature into tokens, or take it away.

The paper's evidence that sinks are sinks *because* they carry massive values in the sink dims is
correlational. These edits change the residual stream entering one decoder layer (at prefill),
on chosen tokens and in chosen coordinates only; every other coordinate and token is left bitwise
unchanged:

  - `inject_sink(adapter, token_mask, layer, scale)`: x_j[D] <- scale * x_first[D] for the chosen
    tokens j (D = the sink dims, x_first = the first real token of the row, same layer, same forward);
  - `remove_sink(adapter, token_mask, layer, to="zero" | "mean" | "chosen_mean")`: x_j[D] <- 0, or <- the
    mean of x[D] over ordinary tokens (real tokens that are neither chosen nor sinks by the rule), or <-
    the chosen tokens' own mean over the batch (Sun et al.'s "set to the mean", a constant);
  - controls for an injection (same tokens): `control="random_dim"` adds the same magnitude
    ||x'_j - x_j|| along one random non-sink dim; `control="rescale"` rescales the token's whole
    state to the norm the injection would give it.

They run on the one edit mechanism (`sinkscope.interventions.attention`): each is an
`AttentionEdit` that edits no attention and installs, through `attach`, a forward pre-hook on the
decoder layer it acts on, for the session of one `with` block on one model instance:

    sig = SinkSignature.discover(adapter, batch)          # sink dims, onset layer and tau from data
    with inject_sink(adapter, token_mask, scale=1.0, signature=sig):
        adapter.model(**inputs); adapter.model.generate(**inputs)
    with remove_sink(adapter, "sinks", to="mean", signature=sig):
        ...

Masks are `[batch, prompt_len]` bool over the prompt; a mask may also be "first", "sinks" (every
real token whose score is >= tau entering the layer) or "visual_sinks" (the image tokens among them).
Under `generate` the prompt's tokens are edited at prefill (their keys and values go into the KV
cache edited); generated tokens are never edited. Layers whose attention nothing edits run as the
model's own implementation does (eager stays eager), so an empty mask is the unmodified forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from sinkscope.errors import SinkscopeError
from sinkscope.interventions.attention import AttentionEdit, EditSession, as_adapter, edit_attention
from sinkscope.kinds import PAD, TokenKinds

TARGETS = ("first", "sinks", "visual_sinks")
REMOVE_TO = ("zero", "mean", "chosen_mean")
CONTROLS = ("random_dim", "rescale")


# ---------------------------------------------------------------------------------------
# the signature: which dims, from which layer, above which score
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SinkSignature:
    """Sink dims D, the layer where the first token's massive values appear (onset), and the sink rule.

    tau / score: the scan's rule (score "rms" = the paper's phi, "layer" = layer-relative); tau None
    means masks "sinks" / "visual_sinks" and the mean over ordinary tokens cannot use the rule.
    """

    dims: tuple[int, ...]
    layer: int
    tau: float | None = None
    score: str = "rms"
    eps: float = 1e-6

    def __post_init__(self):
        if not self.dims:
            raise SinkscopeError("a sink signature needs at least one sink dim; none were found or given (pin them "
                                 "with SinkSignature(dims=(...), layer=...) or discover them on more samples)")

    @classmethod
    def from_discovery(cls, sink_dims, tau=None, score: str = "rms", eps: float = 1e-6,
                       layer: int | None = None) -> "SinkSignature":
        """From a `measures.massive.SinkDims` (the scan's discovery): onset = first layer where a sink dim is massive."""
        dims = tuple(int(d) for d in sink_dims.dims)
        if not dims:
            raise SinkscopeError(f"the discovery found no sink dims ({sink_dims.reason}); nothing to inject or remove")
        if layer is None:
            layer = onset_layer(sink_dims)
        return cls(dims, int(layer), None if tau is None else float(tau), score, eps)

    @classmethod
    @torch.no_grad()
    def discover(cls, model_or_adapter, batch, start_layer: int = 2, score: str = "rms") -> "SinkSignature":
        """Discover dims, onset layer and tau on one processor batch (as `var.calibrate` and the scan do)."""
        from sinkscope.interventions.var import VARConfig, calibrate
        from sinkscope.measures.massive import discover_sink_dims

        adapter = as_adapter(model_or_adapter)
        inputs = adapter.device_inputs(batch)
        kinds = adapter.token_kinds(inputs["input_ids"], inputs.get("attention_mask"))
        hidden = adapter.model(**inputs, **adapter.without_logits(), output_hidden_states=True).hidden_states  # L + 1
        rows = torch.arange(kinds.kind.shape[0])
        first = first_positions(kinds)
        bos = torch.stack([hidden[l][rows, first].float().cpu() for l in range(adapter.num_layers)], dim=1)
        found = discover_sink_dims(bos, start_layer=start_layer, eps=adapter.rms_norm_eps)
        if not found.dims:
            raise SinkscopeError(f"no sink dims found on this batch ({found.reason}); pin them with "
                                 "SinkSignature(dims=(...), layer=...)")
        config = calibrate(adapter, batch, VARConfig(sink_dims=list(found.dims), sink_score=score),
                           start_layer=start_layer)
        return cls.from_discovery(found, config.tau, score, adapter.rms_norm_eps)


def onset_layer(sink_dims) -> int:
    """The first layer in the discovery's support where one of the sink dims is massive (else its first layer)."""
    sup = sink_dims.support
    if len(sup):
        hit = sup[sup["dim"].isin(list(sink_dims.dims)) & sup["massive"].astype(bool)]
        if len(hit):
            return int(hit["layer"].min())
    if sink_dims.layers:
        return int(min(sink_dims.layers))
    raise SinkscopeError("the discovery records no layers; give the layer explicitly")


# ---------------------------------------------------------------------------------------
# pure tensor functions: states [batch, token, dim] -> states
# ---------------------------------------------------------------------------------------

def first_positions(kinds: TokenKinds) -> torch.Tensor:
    """[batch] long: the first real (non-padding) position of each row (BOS, or the first token)."""
    real = kinds.kind != PAD
    return real.float().argmax(dim=1)


def _set_dims(states: torch.Tensor, token_mask: torch.Tensor, dims: Sequence[int], values: torch.Tensor) -> torch.Tensor:
    """Copy of states with states[b, t, dims] = values[b, (t,) :] where token_mask[b, t]; nothing else changes.

    values: [batch, len(dims)] (one vector per row) or [batch, token, len(dims)].
    """
    out = states.clone()
    idx = torch.as_tensor(list(dims), device=states.device, dtype=torch.long)
    current = out.index_select(-1, idx)  # [B, T, k]
    if values.dim() == 2:
        values = values[:, None, :].expand_as(current)
    new = torch.where(token_mask[:, :, None].to(states.device), values.to(states.dtype), current)
    out.index_copy_(-1, idx, new)
    return out


def inject_states(states: torch.Tensor, token_mask: torch.Tensor, first: torch.Tensor, dims: Sequence[int],
                  scale) -> torch.Tensor:
    """x_j[D] <- scale * x_first(b)[D] for tokens with token_mask[b, j].

    states: [batch, token, dim]; token_mask: [batch, token] bool; first: [batch] long positions;
    scale: float or [batch] tensor (one scale per row). Other coordinates and tokens: unchanged.
    """
    idx = torch.as_tensor(list(dims), device=states.device, dtype=torch.long)
    rows = torch.arange(states.shape[0], device=states.device)
    source = states[rows, first.to(states.device)].index_select(-1, idx)  # [B, k]
    s = torch.as_tensor(scale, dtype=states.dtype, device=states.device)
    s = s[:, None] if s.dim() == 1 else s
    return _set_dims(states, token_mask, dims, source * s)


def remove_states(states: torch.Tensor, token_mask: torch.Tensor, dims: Sequence[int], to: str = "zero",
                  ordinary: torch.Tensor | None = None, mean: torch.Tensor | None = None) -> torch.Tensor:
    """x_j[D] <- 0 ("zero"), the mean of x[D] over ordinary tokens ("mean"), or the mean of the chosen
    tokens' own x[D] over the batch ("chosen_mean": Sun et al.'s replacement of massive activations by
    their mean over inputs, a constant per dim) for tokens with token_mask.

    ordinary: [batch, token] bool, the tokens the "mean" is taken over (all rows pooled); mean: a given
    [len(dims)] vector instead (either mean). Returns a copy; other coordinates and tokens unchanged.
    """
    if to not in REMOVE_TO:
        raise SinkscopeError(f"remove_sink(to=...) must be one of {REMOVE_TO}, got {to!r}")
    k = len(list(dims))
    if to == "zero":
        values = torch.zeros(states.shape[0], k, dtype=states.dtype, device=states.device)
    else:
        if mean is None and to == "chosen_mean":
            idx = torch.as_tensor(list(dims), device=states.device, dtype=torch.long)
            mean = states.index_select(-1, idx)[token_mask.to(states.device)].float().mean(dim=0)
        if mean is None:
            if ordinary is None or not ordinary.any():
                raise SinkscopeError("remove_sink(to='mean') found no ordinary token to average over (every real "
                                     "token is chosen or a sink); pass mean=... explicitly")
            idx = torch.as_tensor(list(dims), device=states.device, dtype=torch.long)
            mean = states.index_select(-1, idx)[ordinary.to(states.device)].float().mean(dim=0)
        values = mean.to(states.dtype).to(states.device)[None].expand(states.shape[0], k)
    return _set_dims(states, token_mask, dims, values)


def random_dim_states(states: torch.Tensor, token_mask: torch.Tensor, reference: torch.Tensor, dim: int) -> torch.Tensor:
    """Control: add ||reference_j - states_j|| along one dim (for tokens with token_mask).

    reference: [batch, token, dim] the injected states (the added magnitude to match); dim: a non-sink dim.
    """
    added = (reference.float() - states.float()).norm(dim=-1)  # [B, T]
    out = states.clone()
    new = states[..., dim] + added.to(states.dtype)
    out[..., dim] = torch.where(token_mask.to(states.device), new, states[..., dim])
    return out


def rescale_states(states: torch.Tensor, token_mask: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Control: x_j <- x_j * ||reference_j|| / ||x_j|| (the norm an injection gives, no change of direction)."""
    norm = states.float().norm(dim=-1).clamp_min(1e-12)
    factor = (reference.float().norm(dim=-1) / norm).to(states.dtype)  # [B, T]
    return torch.where(token_mask[:, :, None].to(states.device), states * factor[:, :, None], states)


def sink_mask_of(states: torch.Tensor, kinds: TokenKinds, signature: SinkSignature) -> torch.Tensor:
    """[batch, token] bool: real tokens whose sink score (the scan's rule) is >= tau."""
    from sinkscope.measures.sinks import sink_score

    if signature.tau is None:
        raise SinkscopeError("masks 'sinks' / 'visual_sinks' need the sink rule's tau: give SinkSignature(tau=...) "
                             "or build it with SinkSignature.discover / from_discovery(..., tau=...)")
    real = (kinds.kind != PAD).to(states.device)
    score = sink_score(states, list(signature.dims), signature.score, token_mask=real, eps=signature.eps)
    return (score >= signature.tau) & real


def resolve_mask(target, states: torch.Tensor, kinds: TokenKinds, signature: SinkSignature) -> torch.Tensor:
    """A [batch, token] bool mask from a tensor or one of TARGETS, for the states entering the layer."""
    if isinstance(target, str):
        if target == "first":
            mask = torch.zeros(kinds.kind.shape, dtype=torch.bool, device=states.device)
            mask[torch.arange(mask.shape[0], device=states.device), first_positions(kinds).to(states.device)] = True
            return mask & (kinds.kind != PAD).to(states.device)
        if target == "sinks":
            return sink_mask_of(states, kinds, signature)
        if target == "visual_sinks":
            return sink_mask_of(states, kinds, signature) & kinds.visual_mask.to(states.device)
        raise SinkscopeError(f"token mask must be a [batch, token] bool tensor or one of {TARGETS}; got {target!r}")
    return target.to(states.device).bool()


# ---------------------------------------------------------------------------------------
# the edit: a residual rewrite on the layer's input, through the session's hooks
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResidualChange:
    """What one edit does. kind: inject | remove | random_dim | rescale; scale: float or [batch] tensor
    (inject, random_dim, rescale); to: zero | mean | chosen_mean (remove); dim: the control's dim
    (random_dim); mean: a given [len(dims)] vector for remove to a mean, or {layer: vector} per edited layer
    (a layer without a vector is left unchanged)."""

    kind: str
    scale: object = 1.0
    to: str = "zero"
    dim: int | None = None
    mean: torch.Tensor | dict | None = None


class ResidualEdit(AttentionEdit):
    """Rewrite the residual stream entering `layers` (prefill only) on the tokens of `target`.

    Edits no attention probabilities (`layers` -> empty set); installs one forward pre-hook per layer
    through `attach`. After a prefill, `session.memory(edit)["masks"][layer]` holds the [batch, token]
    mask that was edited and, with keep_states, `["states"][layer]` the edited [batch, token, dim] state.
    """

    def __init__(self, target, layers: Sequence[int], signature: SinkSignature, change: ResidualChange,
                 keep_states: bool = False):
        self.keep_states = keep_states
        if change.kind not in ("inject", "remove", *CONTROLS):
            raise SinkscopeError(f"unknown residual change {change.kind!r}")
        if change.kind == "remove" and change.to not in REMOVE_TO:
            raise SinkscopeError(f"remove_sink(to=...) must be one of {REMOVE_TO}, got {change.to!r}")
        if change.kind == "random_dim" and (change.dim is None or int(change.dim) in signature.dims):
            raise SinkscopeError(f"the random-dim control needs a dim outside the sink dims {list(signature.dims)}; "
                                 f"got {change.dim}")
        if torch.is_tensor(target):
            if target.dim() != 2:
                raise SinkscopeError(f"token_mask must be [batch, token] bool over the prompt, got {tuple(target.shape)}")
            target = target.bool()
        elif target not in TARGETS:
            raise SinkscopeError(f"token_mask must be a [batch, token] bool tensor or one of {TARGETS}; got {target!r}")
        self.target, self.signature, self.change = target, signature, change
        self.edit_layers = sorted({int(l) for l in layers})

    def layers(self, n_layers: int) -> set[int]:
        return set()  # no attention is edited

    def attach(self, session: EditSession) -> list:
        n = session.adapter.num_layers
        bad = [l for l in self.edit_layers if not 0 <= l < n]
        if bad:
            raise SinkscopeError(f"layers {bad} are out of range: the model has {n} layers (valid 0..{n - 1})")
        if max(self.signature.dims) >= session.adapter.hidden_size:
            raise SinkscopeError(f"sink dims {list(self.signature.dims)} do not fit hidden size "
                                 f"{session.adapter.hidden_size}: are they another model's?")
        return [session.adapter.layers[l].register_forward_pre_hook(_Rewrite(self, session, l), with_kwargs=True)
                for l in self.edit_layers]

    def begin_prompt(self, session: EditSession, prompt) -> None:
        if torch.is_tensor(self.target) and tuple(self.target.shape) != (prompt.batch_size, prompt.length):
            raise SinkscopeError(f"token_mask is {tuple(self.target.shape)} but the prompt is [batch, token] = "
                                 f"{(prompt.batch_size, prompt.length)}; build the mask from this batch's input_ids "
                                 "(generate with num_beams or num_return_sequences repeats rows: repeat the mask too)")
        session.memory(self)["masks"] = {}
        session.memory(self)["states"] = {}

    def rewrite(self, states: torch.Tensor, kinds: TokenKinds, mask: torch.Tensor, layer: int | None = None
                ) -> torch.Tensor:
        """states: [batch, token, dim] entering `layer` at prefill; mask: [batch, token] bool."""
        sig, c = self.signature, self.change
        if c.kind == "remove":
            ordinary = None
            mean = c.mean
            if isinstance(mean, dict):
                if mean.get(layer) is None:
                    return states  # no vector for this layer (e.g. no such token when it was measured): left as is
                mean = torch.as_tensor(mean[layer])
            if c.to == "mean" and mean is None:
                real = (kinds.kind != PAD).to(states.device)
                ordinary = real & ~mask
                if sig.tau is not None:
                    ordinary &= ~sink_mask_of(states, kinds, sig)
            return remove_states(states, mask, sig.dims, c.to, ordinary, mean)
        injected = inject_states(states, mask, first_positions(kinds), sig.dims, c.scale)
        if c.kind == "inject":
            return injected
        if c.kind == "random_dim":
            return random_dim_states(states, mask, injected, int(c.dim))
        return rescale_states(states, mask, injected)


def _hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Rewrite:
    """Forward pre-hook of one decoder layer: apply the edit's rewrite to the prompt at prefill."""

    def __init__(self, edit: ResidualEdit, session: EditSession, layer: int):
        self.edit, self.session, self.layer = edit, session, layer

    def __call__(self, module, args, kwargs):
        step = self.session.step
        if step is None:
            raise SinkscopeError("sink edits need the model's top-level forward (model(...) or model.generate)")
        if not step.prefill:
            return None  # decode steps: the prompt's edited keys/values are in the cache; new tokens stay as they are
        prompt = step.require_prompt()
        states = _hidden_of(args, kwargs)
        mask = resolve_mask(self.edit.target, states, prompt.kinds, self.edit.signature)
        memory = self.session.memory(self.edit)
        memory.setdefault("masks", {})[self.layer] = mask
        if not bool(mask.any()):
            if self.edit.keep_states:
                memory.setdefault("states", {})[self.layer] = states.detach()
            return None  # nothing chosen: the unmodified forward, bitwise
        new = self.edit.rewrite(states, prompt.kinds, mask, self.layer)
        if self.edit.keep_states:
            memory.setdefault("states", {})[self.layer] = new.detach()
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}


# ---------------------------------------------------------------------------------------
# the context managers
# ---------------------------------------------------------------------------------------

def _layers(layer, signature: SinkSignature) -> list[int]:
    if layer is None:
        return [signature.layer]
    if isinstance(layer, int):
        return [layer]
    return [int(l) for l in layer]


def _signature(signature: SinkSignature | None, dims, layer) -> SinkSignature:
    if signature is not None:
        return signature if dims is None else SinkSignature(tuple(int(d) for d in dims), signature.layer, signature.tau,
                                                            signature.score, signature.eps)
    if dims is None or layer is None:
        raise SinkscopeError("give the sink signature (signature=SinkSignature.discover(adapter, batch), or "
                             "SinkSignature.from_discovery(scan_dims, tau)) or both dims=[...] and layer=...")
    first = layer if isinstance(layer, int) else min(int(l) for l in layer)
    return SinkSignature(tuple(int(d) for d in dims), int(first))


def _fallback(adapter) -> str:
    return "eager" if adapter.text_attention == "eager" else "sdpa"


@contextlib.contextmanager
def residual_edit(model_or_adapter, target, change: ResidualChange, layer=None, *,
                  signature: SinkSignature | None = None, dims=None, keep_states: bool = False
                  ) -> Iterator[EditSession]:
    """Any `ResidualChange` on `target` tokens entering `layer` (an int, a list, or None = the onset layer).

    Yields the EditSession; its last edit (`session.edits[-1]`) is the ResidualEdit, whose memory
    (`session.memory(edit)`) holds the edited masks (and states, with keep_states) per layer.
    """
    adapter = as_adapter(model_or_adapter)
    sig = _signature(signature, dims, layer)
    edit = ResidualEdit(target, _layers(layer, sig), sig, change, keep_states)
    with edit_attention(adapter, edit, fallback=_fallback(adapter)) as session:
        yield session


def inject_sink(model_or_adapter, token_mask, layer=None, scale=1.0, *, signature: SinkSignature | None = None,
                dims=None, control: str | None = None, control_dim: int | None = None,
                keep_states: bool = False) -> contextlib.AbstractContextManager:
    """Set the sink-dim coordinates of the chosen tokens to `scale` x the first token's, entering `layer`.

    token_mask: [batch, prompt_len] bool (or "first" / "sinks" / "visual_sinks"); layer: int, list, or
    None (the signature's onset layer); scale: float or [batch] tensor. control: None, "random_dim"
    (the same added magnitude along `control_dim`, a non-sink dim) or "rescale" (the token's state
    rescaled to the injected norm). Use as `with inject_sink(...):`; yields the EditSession.
    """
    if control is not None and control not in CONTROLS:
        raise SinkscopeError(f"control must be None or one of {CONTROLS}; got {control!r}")
    change = ResidualChange(control or "inject", scale=scale, dim=control_dim)
    return residual_edit(model_or_adapter, token_mask, change, layer, signature=signature, dims=dims,
                         keep_states=keep_states)


def remove_sink(model_or_adapter, token_mask="sinks", layer=None, to: str = "zero", *,
                signature: SinkSignature | None = None, dims=None, mean: torch.Tensor | dict | None = None,
                keep_states: bool = False) -> contextlib.AbstractContextManager:
    """Set the sink-dim coordinates of the chosen tokens to zero or to their mean over ordinary tokens.

    token_mask: [batch, prompt_len] bool or "sinks" (default: real tokens with score >= tau entering
    the layer), "visual_sinks", "first". to: "zero" | "mean" (mean over real tokens neither chosen nor
    sinks, pooled over the batch) | "chosen_mean" (the chosen tokens' own mean over the batch, Sun et al.'s
    replacement by the mean); `mean` gives the vector instead ([len(dims)], or {layer: [len(dims)]} when
    several layers are edited). Yields the EditSession.
    """
    if to not in REMOVE_TO:
        raise SinkscopeError(f"remove_sink(to=...) must be one of {REMOVE_TO}, got {to!r}")
    return residual_edit(model_or_adapter, token_mask, ResidualChange("remove", to=to, mean=mean), layer,
                         signature=signature, dims=dims, keep_states=keep_states)
