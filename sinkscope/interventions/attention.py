"""One attention-edit mechanism: a registered transformers attention function and scoped edits.

Knockout and VAR (and anything else that changes post-softmax attention) are `AttentionEdit`s run
by a single attention function, registered with transformers under `ATTENTION_NAME` and selected
for the language model only (the vision tower keeps its own attention):

    from sinkscope.interventions.attention import edit_attention, AttentionEdit

    class Halve(AttentionEdit):
        def layers(self, n_layers):
            return {3}
        def edit(self, probs, *, layer, query_positions, state):
            return probs  # [batch, head, query, key], float32, rows sum to 1

    with edit_attention(adapter_or_model, Halve()):
        model(**inputs) / model.generate(...)

How a layer is computed inside the block:
  - a layer some edit names: eager attention (GQA via repeat_kv semantics, softcapping where the
    module passes one, the model's own mask, so sliding windows and Gemma 3's bidirectional image
    attention are kept), the post-softmax probabilities in float32 go through the edits in order,
    are cast to the query dtype, then multiply V. `output_attentions=True` returns exactly these;
  - any other layer: transformers' SDPA function (eager when `output_attentions=True` is asked,
    or with `fallback="eager"`).
Edited rows differ; every other entry is computed by the same operations as transformers' eager
attention, so it is bitwise equal to it.

Where the state lives: an `EditSession` set as an attribute on each attention module of the language
model (and forward hooks on the model) for the duration of the block; leaving it, also by an
exception, removes them and restores the previous attention implementation. Nothing is kept at
module level (the registered function and mask are constants).

Per forward call (prefill or a decode step), a `StepState` says where the queries are: the model
sees `query_length` new tokens after `past_length` cached ones (KV cache), so the absolute query
positions are `past_length + arange(query_length)`. The prompt's token kinds (`[batch, token]`) are
taken from `input_ids` at prefill and kept for the decode steps that follow.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch

from sinkscope.eager import eager_output, eager_probabilities, register_attention
from sinkscope.errors import SinkscopeError, UnsupportedModelError
from sinkscope.kinds import TokenKinds

ATTENTION_NAME = "sinkscope_edit"
SESSION_ATTR = "_sinkscope_edit_session"
FALLBACKS = ("sdpa", "eager")


# ---------------------------------------------------------------------------------------
# edits and per-step state
# ---------------------------------------------------------------------------------------

class AttentionEdit:
    """Base class of an edit of post-softmax attention probabilities.

    Subclasses override `layers` (the layers they edit; others run on SDPA) and `edit`. Optional:
    `attach` (install hooks for the session, returned as removable handles) and `begin_prompt`
    (validate / precompute when a new prompt is seen at prefill).
    """

    def layers(self, n_layers: int) -> set[int]:
        """Layers this edit changes (default: all)."""
        return set(range(n_layers))

    def edit(self, probs: torch.Tensor, *, layer: int, query_positions: torch.Tensor,
             state: "StepState") -> torch.Tensor:
        """probs: [batch, head, query, key] float32 post-softmax of `layer`; query_positions: [query] long
        absolute positions. Returns probabilities of the same shape (rows should sum to 1). The edit
        owns `probs` (a fresh tensor) and may change it in place when autograd does not need it."""
        return probs

    def attach(self, session: "EditSession") -> list:
        """Install hooks the edit needs for this session; return their handles (removed on exit)."""
        return []

    def begin_prompt(self, session: "EditSession", prompt: "PromptInfo") -> None:
        """Called at each prefill with the new prompt (validate shapes here)."""


@dataclass
class PromptInfo:
    """The prompt of the current generation. kinds: token kinds [batch, prompt_len] on the model device."""

    kinds: TokenKinds
    attention_mask: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        return int(self.kinds.kind.shape[0])

    @property
    def length(self) -> int:
        return int(self.kinds.kind.shape[1])

    def first_query(self) -> int:
        """The first position that is a default query in any row (prompt length if none). One host sync."""
        any_row = self.queries_after_image().any(dim=0)
        if not any_row.numel():
            return 0
        positions = torch.arange(any_row.shape[0], device=any_row.device)
        return int(torch.where(any_row, positions, any_row.shape[0]).min())

    def queries_after_image(self) -> torch.Tensor:
        """[batch, prompt_len] bool: text tokens after the row's last image token (all text if no image)."""
        return self.kinds.queries_after_image()


@dataclass
class StepState:
    """One forward call inside an edit session (prefill, or a decode step with KV cache).

    past_length: tokens already in the cache; query_length: new tokens in this call;
    prompt: the prompt of the current generation (None when the forward got no input_ids).
    cache_seen: whether the call carried a KV cache (a transformers `Cache`, found by type).
    default_query_start: index (within this step's queries) of the first query of the default query
      mask in any row; edits that use that mask may leave earlier queries alone without looking
      (at prefill the image and the text before it, ~90% of the rows for LLaVA: a large saving).
    """

    session: "EditSession"
    batch_size: int
    past_length: int
    query_length: int
    output_attentions: bool
    prompt: PromptInfo | None
    default_query_start: int = 0
    cache_seen: bool = False
    _memo: dict = field(default_factory=dict)

    @property
    def total_length(self) -> int:
        return self.past_length + self.query_length

    @property
    def prefill(self) -> bool:
        return self.past_length == 0

    @property
    def only_generated(self) -> bool:
        """Every query of this call is a generated token: the whole prompt is in the cache (needs the prompt)."""
        return self.past_length >= self.require_prompt().length

    def require_prompt(self) -> PromptInfo:
        if self.prompt is None:
            raise SinkscopeError("this attention edit needs the prompt's token ids: call the model with input_ids "
                                 "(not only inputs_embeds), e.g. model(**processor(...)) or model.generate(**batch)")
        return self.prompt

    def memory(self, edit: AttentionEdit) -> dict:
        """Scratch space of `edit` for this session (kept across steps, reset by nothing)."""
        return self.session.memory(edit)

    def cached(self, key, make):
        """`make()`, made once per step (forward call) under `key` and shared by every layer's edit."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def query_positions(self, device) -> torch.Tensor:
        """[query] long absolute positions of this step's queries."""
        return self.cached(("qpos", str(device)), lambda: torch.arange(
            self.past_length, self.total_length, device=device))

    def key_mask(self, prompt_mask: torch.Tensor, n_keys: int, fill: bool = False) -> torch.Tensor:
        """A [batch, prompt_len] mask over the prompt as [batch, n_keys] over this layer's keys.

        Keys after the prompt (generated tokens) get `fill`. Layers whose cache keeps only the last
        n_keys tokens (sliding windows) get the matching slice; a static cache longer than the
        sequence is padded with `fill`.
        """
        t = prompt_mask.shape[1]
        total = self.total_length
        width = max(total, n_keys)
        full = torch.nn.functional.pad(prompt_mask, (0, width - t), value=fill) if width > t else prompt_mask[:, :width]
        return full[:, :n_keys] if n_keys >= total else full[:, total - n_keys: total]

    def prompt_query_mask(self, prompt_mask: torch.Tensor, generated: bool = True) -> torch.Tensor:
        """A [batch, prompt_len] query mask as [batch, query_length] for this step's queries.

        Queries beyond the prompt (generated tokens) are selected when `generated`.
        """
        t = prompt_mask.shape[1]
        if self.past_length >= t:
            return torch.full((prompt_mask.shape[0], self.query_length), generated, dtype=torch.bool,
                              device=prompt_mask.device)
        width = max(self.total_length, t)
        full = torch.nn.functional.pad(prompt_mask, (0, width - t), value=generated)
        return full[:, self.past_length: self.total_length]

    def default_query_mask(self) -> torch.Tensor:
        """[batch, query_length] bool: text tokens after the last image token of the prompt, and every
        generated token (the queries of knockout and VAR)."""
        def make():
            prompt = self.require_prompt()
            return self.prompt_query_mask(prompt.queries_after_image(), generated=True)
        return self.cached("default_queries", make)


def with_rows_from(probs: torch.Tensor, start: int, tail: torch.Tensor) -> torch.Tensor:
    """probs [batch, head, query, key] with its query rows from `start` on replaced by tail [batch, head, query -
    start, key], the edit of those rows only: in place (the edit owns probs), or a new tensor when autograd needs
    probs; tail itself when start is 0."""
    if start == 0:
        return tail
    if probs.requires_grad:
        return torch.cat([probs[:, :, :start], tail], dim=2)
    probs[:, :, start:] = tail
    return probs


def find_cache(args: tuple, kwargs: dict):
    """The KV cache of a forward call: the first transformers `Cache` among its arguments, or None.

    Found by type, not by argument name: transformers 5.24 renamed `past_key_values` to `cache`
    (keeping the old name as a deprecated alias), and the edits must not depend on either name.
    """
    from transformers.cache_utils import Cache

    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


def check_not_a_missed_decode_step(query_length: int, n_keys: int, past_seen: bool, where: str) -> None:
    """Fail by name when a decode step reached the attention edits as if it were a new prompt.

    Without a cache, the keys of a call (and the columns of its 2-D attention mask) are its own
    tokens, so more of them than queries means the model holds a KV cache that the session did
    not see (a renamed or unrecognised cache argument): every edit would then place its queries
    and the prompt's token kinds wrongly. Shapes only; no host sync.
    """
    if not past_seen and n_keys > query_length:
        raise SinkscopeError(
            f"{where}: a decode step reached the attention edits as a new prompt ({query_length} "
            f"queries, {n_keys} keys, and no KV cache among the forward's arguments). The model was called "
            "with a cache that sinkscope could not find: it looks for a transformers `Cache` object among the "
            "arguments (find_cache in sinkscope/interventions/attention.py). Pass the KV cache as a transformers "
            "Cache (e.g. DynamicCache), not a legacy tuple; if generate passed it, this transformers version moved "
            "the cache somewhere find_cache does not look: report it with the version")


# ---------------------------------------------------------------------------------------
# the session: what one `with` block installs on one model
# ---------------------------------------------------------------------------------------

class EditSession:
    """The edits active on one model, the hooks that feed them, and the current step."""

    def __init__(self, adapter, edits: Sequence[AttentionEdit], fallback: str = "sdpa",
                 outer: "EditSession | None" = None):
        """edits: this block's own edits; outer: the session of an enclosing block on the same model, whose edits
        run first here and keep their hooks, prompt handling and memory there (nothing of theirs runs twice)."""
        if fallback not in FALLBACKS:
            raise SinkscopeError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        self.adapter = adapter
        self.model = adapter.model
        self.outer = outer
        self.own_edits = list(edits)
        self.edits = (outer.edits if outer is not None else []) + self.own_edits
        self.fallback = fallback
        n = adapter.num_layers
        self.layer_edits: dict[int, tuple[AttentionEdit, ...]] = {}
        for e in self.edits:
            if not isinstance(e, AttentionEdit):
                raise SinkscopeError(f"edit_attention takes AttentionEdit objects, got {type(e).__name__}")
            chosen = e.layers(n)
            bad = sorted(int(l) for l in chosen if not 0 <= int(l) < n)
            if bad:
                raise SinkscopeError(f"{type(e).__name__}: layers {bad} are out of range; the model has {n} layers "
                                     f"(valid: 0..{n - 1})")
            for l in chosen:
                self.layer_edits[int(l)] = self.layer_edits.get(int(l), ()) + (e,)
        self.step: StepState | None = None
        self.prompt: PromptInfo | None = None
        self._memory: dict[int, dict] = {}
        # callables (layer, probabilities [batch, head, query, key] float32, after the layer's edits) that see every
        # layer's attention while set; every layer then computes eager probabilities (an analysis reduces them as
        # they come instead of asking the model for output_attentions, which holds every layer's maps at once)
        self.observers: list = []

    def memory(self, edit: AttentionEdit) -> dict:
        """Scratch space of `edit`: the enclosing block's for its edits (one memory per edit however blocks nest)."""
        if self.outer is not None and any(edit is e for e in self.outer.edits):
            return self.outer.memory(edit)
        return self._memory.setdefault(id(edit), {})

    def edits_at(self, layer) -> tuple[AttentionEdit, ...]:
        return self.layer_edits.get(layer, ())

    @contextlib.contextmanager
    def observing(self, observe) -> Iterator[None]:
        """`observe(layer, probabilities)` sees every layer's attention inside the block (see `observers`)."""
        self.observers.append(observe)
        try:
            yield
        finally:
            self.observers.remove(observe)

    # -- the top-level hook: what this forward call is ---------------------------------
    def begin_forward(self, module, args, kwargs) -> None:
        if self.outer is not None:  # the enclosing block's hook ran first on this same call: take its reading
            self.prompt = self.outer.prompt
            self.step = replace(self.outer.step, session=self, _memo={})
            if self.step.prefill and self.prompt is not None:
                for e in self.own_edits:
                    e.begin_prompt(self, self.prompt)
            return
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            raise SinkscopeError("the model was called without input_ids or inputs_embeds; edits cannot place queries")
        batch, q_len = int(ref.shape[0]), int(ref.shape[1])
        past = find_cache(args, kwargs)
        past_len = int(past.get_seq_length()) if past is not None else 0
        mask = kwargs.get("attention_mask")
        if past is None and mask is not None and mask.dim() == 2:
            check_not_a_missed_decode_step(q_len, int(mask.shape[1]), past_seen=False, where="the model's input")
        if past_len == 0:
            self.prompt = None
            if input_ids is not None:
                kinds = self.adapter.token_kinds(input_ids, mask if mask is not None and mask.dim() == 2 else None)
                self.prompt = PromptInfo(kinds.to(input_ids.device), mask)
                for e in self.own_edits:
                    e.begin_prompt(self, self.prompt)
        elif self.prompt is not None and self.prompt.batch_size != batch:
            raise SinkscopeError(f"a decode step has batch {batch} but the prompt had {self.prompt.batch_size} rows")
        wants = kwargs.get("output_attentions")
        if wants is None:
            wants = bool(getattr(self.model.config, "output_attentions", False))
        # one host sync per prefill, none per layer or decode step
        start = self.prompt.first_query() if past_len == 0 and self.prompt is not None else 0
        self.step = StepState(self, batch, past_len, q_len, bool(wants), self.prompt, start, cache_seen=past is not None)

    def install(self) -> list:
        """Hooks of the session: the top-level forward pre-hook and the edits' own."""
        handles = [self.model.register_forward_pre_hook(self.begin_forward, with_kwargs=True)]
        try:
            for e in self.own_edits:
                handles += list(e.attach(self))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return handles


# ---------------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------------

def _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("output_attentions", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def sinkscope_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function (eager signature).

    query [batch, head, query, dim], key/value [batch, kv_head, key, dim]. Returns
    (attn_output [batch, query, head, dim], probabilities [batch, head, query, key] or None).
    """
    session: EditSession | None = getattr(module, SESSION_ATTR, None)
    layer = getattr(module, "layer_idx", None)
    edits = session.edits_at(layer) if session is not None else ()
    step = session.step if session is not None else None
    weights = bool(kwargs.get("output_attentions")) or (step is not None and step.output_attentions)
    softcap = kwargs.get("softcap")
    observers = session.observers if session is not None else ()
    eager = weights or softcap is not None or bool(observers) or (session is not None and session.fallback == "eager")
    if not edits and not eager:
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    probs = eager_probabilities(module, query, key, attention_mask, scaling, softcap)
    if edits:
        if step is None:
            raise SinkscopeError("attention edits need the model's top-level forward (model(...) or model.generate); "
                                 "the language model was called on its own")
        check_not_a_missed_decode_step(step.query_length, int(key.shape[-2]), step.cache_seen, f"layer {layer}")
        positions = step.query_positions(probs.device)
        for e in edits:
            probs = e.edit(probs, layer=layer, query_positions=positions, state=step)
    for observe in observers:
        observe(layer, probs)
    return eager_output(module, probs, query, value, dropout)


def register() -> str:
    """Register the attention function and its (eager, additive) mask with transformers; idempotent."""
    return register_attention(ATTENTION_NAME, sinkscope_attention)


register()


# ---------------------------------------------------------------------------------------
# the context manager
# ---------------------------------------------------------------------------------------

def as_adapter(model_or_adapter):
    """A ModelAdapter for an adapter (returned as is) or a loaded Hugging Face model."""
    from sinkscope.models.base import ModelAdapter

    if isinstance(model_or_adapter, ModelAdapter):
        return model_or_adapter
    from sinkscope.models import adapter_for_model

    return adapter_for_model(model_or_adapter)


def _attention_modules(adapter) -> list:
    modules = []
    for i in range(adapter.num_layers):
        attn = adapter.attention(i)
        if getattr(attn, "layer_idx", None) != i:
            raise UnsupportedModelError(
                f"{adapter.name}: attention module of layer {i} ({type(attn).__name__}) has no layer_idx {i}; sinkscope "
                "can edit attention only in models whose attention goes through transformers' AttentionInterface")
        modules.append(attn)
    return modules


def _switch(adapter, implementation: str) -> None:
    model = adapter.model
    can = getattr(model, "_can_set_attn_implementation", None)
    if can is not None and not can():
        raise UnsupportedModelError(
            f"{adapter.name} ({type(model).__name__}) cannot switch its attention implementation: its attention does "
            "not go through transformers' AttentionInterface, so sinkscope cannot edit it. Use a family listed by "
            "sinkscope.supported()")
    adapter.set_text_attention(implementation)
    if adapter.text_attention != implementation:
        raise UnsupportedModelError(
            f"{adapter.name}: setting the language model's attention to {implementation!r} did not take effect "
            f"(it is {adapter.text_attention!r}); this model's attention cannot be edited")


@contextlib.contextmanager
def edit_attention(model_or_adapter, *edits: AttentionEdit, fallback: str = "sdpa") -> Iterator[EditSession]:
    """Apply `edits` to the language model's post-softmax attention inside the block.

    model_or_adapter: a sinkscope ModelAdapter or a loaded Hugging Face model of a supported family.
    fallback: how layers that no edit names are computed: "sdpa" (fast; eager anyway when
      output_attentions=True) or "eager" (bitwise equal to a model loaded with eager attention).
    Yields the EditSession. Blocks nest (the inner one applies the outer edits first, then its own).
    On exit (also by an exception) hooks and attributes are removed and the previous attention
    implementation is restored.
    """
    adapter = as_adapter(model_or_adapter)
    if adapter.hosted is not None:
        raise SinkscopeError(f"{adapter.name} is served by NDIF (its weights are not in this process): attention edits "
                             "run in the process that runs the model; load the checkpoint here (models.load) to edit it")
    modules = _attention_modules(adapter)
    outer: EditSession | None = getattr(modules[0], SESSION_ATTR, None) if modules else None
    session = EditSession(adapter, list(edits), fallback, outer=outer)
    previous = adapter.text_attention
    handles = session.install()
    try:
        for m in modules:
            setattr(m, SESSION_ATTR, session)
        if previous != ATTENTION_NAME:
            _switch(adapter, ATTENTION_NAME)
        yield session
    finally:
        for h in handles:
            h.remove()
        for m in modules:
            if outer is not None:
                setattr(m, SESSION_ATTR, outer)
            elif SESSION_ATTR in m.__dict__:
                delattr(m, SESSION_ATTR)
        if adapter.text_attention != previous:
            adapter.set_text_attention(previous)


class EditHandle:
    """An edit session left on (see `enable`); `.disable()` restores the model."""

    def __init__(self, context):
        self._context = context
        self.session: EditSession = context.__enter__()
        self.active = True

    def disable(self) -> None:
        if self.active:
            self.active = False
            self._context.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()


def enable(model_or_adapter, *edits: AttentionEdit, fallback: str = "sdpa") -> EditHandle:
    """Switch `edits` on until `.disable()` (for pipelines that cannot wrap their calls in a `with`).

    The language model's attention implementation is then `ATTENTION_NAME` ("sinkscope_edit").
    """
    return EditHandle(edit_attention(model_or_adapter, *edits, fallback=fallback))
