"""VAR, Visual Attention Redistribution (Kang et al., ICLR 2025), as an attention edit.

The paper's equations (shared paper-notes, sections 2, 4, 5). At layer l, with S = all sink tokens
(text and visual: phi(x_j^l) >= tau on the residual state entering layer l in prefill) and
N = image tokens that are not sinks, for every selected (head h, query i):
  1. a'_ij = (1 - p) a_ij                          for j in S
  2. W = p * sum_{j in S} a_ij
  3. a'_ij = a_ij + W * a_ij / sum_{k in N} a_ik   for j in N
  4. every other entry unchanged (the row still sums to 1).
Selection ("image_centric"): sum_{j in I_vis} a_ij >= summ and r_i = sum_{N} a_ij / sum_{I_vis} a_ij >= rho.
Queries: text tokens after the image in prefill and every generated token. Sinks are found at
prefill and reused for generated tokens. Default layers: all but the first two and the last.

Options beyond the paper, each named:
  - mode="reference": the reference code's semantics (paper-notes section 7, items 1-2): it keeps
    p of the sink mass and moves 1 - p, selects a head when the visual *sink* fraction is <= rho,
    and selects no head in a (sample, layer) without a visual sink;
  - head_selection="all" (every head of every query: the paper's collapse ablation) or "random"
    (per (layer, query) as many heads as image-centric selection picks, drawn at random among heads
    that have attention on the budget's targets, seeded);
  - budget_target="text": the budget goes to non-sink text tokens instead (a paper ablation).

    import sinkscope
    cfg = sinkscope.interventions.var.calibrate(adapter, batch)        # sink dims + tau from data
    with sinkscope.var(adapter, cfg):
        adapter.model.generate(**batch)
    handle = sinkscope.interventions.var.enable(adapter, cfg)            # permanent, for pipelines
    ...; handle.disable()

The slow literal transcription of the equations lives in tests/test_var.py.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from sinkscope.errors import SinkscopeError
from sinkscope.interventions.attention import (AttentionEdit, EditHandle, EditSession, StepState, as_adapter,
                                               edit_attention, with_rows_from)
from sinkscope.kinds import PAD
from sinkscope.measures.sinks import PAPER_TAU, needs_phi_for_tau, sink_threshold
from sinkscope.runconfig import resolve_sink_score

MODES = ("paper", "reference")
HEAD_SELECTIONS = ("image_centric", "all", "random")
BUDGET_TARGETS = ("image_nonsink", "text")
SINK_SCORES = ("auto", "rms", "layer")


@dataclass
class VARConfig:
    """VAR hyperparameters (paper defaults).

    tau: sink threshold on phi; None = as the scan chooses it (20 when sqrt(hidden) >= 40, else
      from `calibrate`). rho: minimum visual non-sink ratio of a selected head. p: share of the sink
      attention moved. summ: minimum attention to the image of a selected head. layers: None = all
      but the first two and the last. sink_dims: None = discovered by `calibrate`, or pinned.
    mode / head_selection / budget_target: see the module docstring. seed: for head_selection="random".
    sink_score: "auto" (as every command: `runconfig.resolve_sink_score`, phi when sqrt(hidden) >= 40, else
      the layer-relative score), "rms" (the paper's phi) or "layer" (the scan's layer-relative score).
    eps: RMS epsilon of phi (paper: 1e-6).
    """

    tau: float | None = None
    rho: float = 0.5
    p: float = 0.6
    summ: float = 0.2
    layers: list[int] | None = None
    sink_dims: list[int] | None = None
    mode: str = "paper"
    head_selection: str = "image_centric"
    budget_target: str = "image_nonsink"
    seed: int = 0
    sink_score: str = "auto"
    eps: float = 1e-6

    def validate(self) -> "VARConfig":
        for name in ("p", "rho", "summ"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise SinkscopeError(f"VARConfig.{name} must be in [0, 1], got {v!r}")
        if self.tau is not None and (not isinstance(self.tau, (int, float)) or not float(self.tau) > 0
                                     or not math.isfinite(float(self.tau))):
            raise SinkscopeError(f"VARConfig.tau must be a positive number (phi is in multiples of the token RMS) or None, "
                                 f"got {self.tau!r}")
        for name, allowed in (("mode", MODES), ("head_selection", HEAD_SELECTIONS),
                              ("budget_target", BUDGET_TARGETS), ("sink_score", SINK_SCORES)):
            if getattr(self, name) not in allowed:
                raise SinkscopeError(f"VARConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.sink_dims is not None and any(int(d) < 0 for d in self.sink_dims):
            raise SinkscopeError(f"VARConfig.sink_dims must be feature indices >= 0, got {self.sink_dims}")
        return self


@dataclass(frozen=True)
class ResolvedVAR:
    """A VARConfig made concrete for one model: layers, sink dims and tau are known."""

    config: VARConfig
    layers: tuple[int, ...]
    sink_dims: tuple[int, ...]
    tau: float


def default_layers(n_layers: int) -> list[int]:
    """All layers but the first two and the last."""
    return list(range(2, max(2, n_layers - 1)))


def resolve(config: VARConfig, adapter) -> ResolvedVAR:
    """Check `config` against the model and fill layers and tau; clear errors for what is missing."""
    config.validate()
    n, hidden = adapter.num_layers, adapter.hidden_size
    layers = default_layers(n) if config.layers is None else [int(l) for l in config.layers]
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise SinkscopeError(f"VARConfig.layers {bad} are out of range: the model has {n} layers (valid 0..{n - 1})")
    if config.sink_dims is None:
        raise SinkscopeError("VAR needs the sink dimensions: call sinkscope.interventions.var.calibrate(adapter, batch) "
                             "to discover them from data, or pin them with VARConfig(sink_dims=[...])")
    dims = tuple(int(d) for d in config.sink_dims)
    if any(d >= hidden for d in dims):
        raise SinkscopeError(f"VARConfig.sink_dims {list(dims)} do not fit hidden size {hidden}: are they another model's?")
    config = replace(config, sink_score=resolve_sink_score(config.sink_score, hidden))
    tau = config.tau
    if tau is None:  # the one tau rule (measures.sinks.sink_threshold), without data
        if needs_phi_for_tau(config.sink_score, hidden):
            raise SinkscopeError(
                f"hidden size {hidden} is too small for the paper's tau={PAPER_TAU:g} (phi <= sqrt(hidden) = "
                f"{math.sqrt(hidden):.3g}): set VARConfig(tau=...) or call "
                "sinkscope.interventions.var.calibrate(adapter, batch), which chooses tau as the scan does")
        tau = sink_threshold(config.sink_score, hidden).value
    return ResolvedVAR(config, tuple(layers), dims, float(tau))


# ---------------------------------------------------------------------------------------
# the equations, vectorised
# ---------------------------------------------------------------------------------------

def _random_heads(count: torch.Tensor, eligible: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Per (batch, query), `count` heads drawn uniformly among eligible ones. count [batch, query];
    eligible [batch, head, query] -> bool [batch, head, query]."""
    scores = torch.rand(eligible.shape, generator=generator, device=eligible.device)
    scores = scores.masked_fill(~eligible, 2.0)  # ineligible heads rank last
    order = scores.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(eligible.shape[1], device=eligible.device)[None, :, None].expand_as(order).contiguous())
    return (rank < count[:, None, :]) & eligible


def drained_share(p: float, mode: str) -> float:
    """The share of the sink attention VAR moves: p (the paper), 1 - p (the reference code keeps p)."""
    return float(p) if mode == "paper" else 1.0 - float(p)


@dataclass(frozen=True)
class KeyLayout:
    """Everything VAR needs of a layer's keys and settings, as small tensors built once per prompt and layer, so
    that a decode step costs a few operations whatever the model (7 launches: two matrix products, a comparison
    and its reduction, a fused division and addition, a select and the product with the row).

    columns [batch, key, 6]: a row's probabilities times columns give its masses (image, centric, sink, 0, 0,
      target; `row_products`),
      where "centric" is the selection test made linear: paper mode non-sink image - rho * image (>= 0 iff the
      non-sink ratio is >= rho), reference mode rho * image - visual sink (>= 0 iff the sink fraction is <= rho);
      the target column is 0 in a sample without any sink (no budget there).
    thresholds [batch, 1, 1, 6]: a row is selected iff masses >= thresholds in every column: summ on the image
      (or the dtype's smallest normal number when summ is 0, so that the image must get attention), 0 on
      "centric" (+inf in reference mode for a sample without a visual sink, -inf for head_selection="all"),
      -inf on the sink and the zeros, and the dtype's smallest normal number on the target: a row whose targets
      get less has nowhere to put the budget (its gain p * sink / target would overflow a half-precision float).
    factor_base [3]: (1, keep, 1), so that factor_base + drained * (sink, 0, 0) / target = (gain, keep, 1), where
      drained is the share of the sink mass moved (p; 1 - p in reference mode) and keep = 1 - drained.
    placement [batch, 3, key]: target, sink, other (exactly one 1 per key), so that
      (gain, keep, 1) @ placement is the per-entry factor, exact.
    """

    columns: torch.Tensor
    thresholds: torch.Tensor
    factor_base: torch.Tensor
    placement: torch.Tensor
    drained: float


def key_layout(sink_mask: torch.Tensor, image_mask: torch.Tensor, *, p: float = 0.6, rho: float = 0.5,
               summ: float = 0.2, mode: str = "paper", head_selection: str = "image_centric",
               budget_target: str = "image_nonsink", dtype: torch.dtype = torch.float32, device=None) -> KeyLayout:
    """KeyLayout of [batch, key] bool masks (sinks S of any kind, image tokens) and VAR's settings.

    With head_selection="random" the thresholds are image-centric selection's: the first two columns give the
    number of heads to draw, the target column the heads that may be drawn.
    """
    device = sink_mask.device if device is None else device
    sink = sink_mask.to(device).bool()
    image = image_mask.to(device).bool()
    nonsink_image = image & ~sink
    visual_sink = image & sink
    target = nonsink_image if budget_target == "image_nonsink" else ~image & ~sink
    other = ~sink & ~target
    budget = target & sink.any(dim=-1, keepdim=True)  # no sink in the row: no budget, nothing selected
    as_float = {name: m.to(dtype) for name, m in (("image", image), ("nonsink", nonsink_image),
                                                   ("visual_sink", visual_sink), ("sink", sink), ("budget", budget))}
    if mode == "paper":
        centric = as_float["nonsink"] - rho * as_float["image"]
    else:
        centric = rho * as_float["image"] - as_float["visual_sink"]
    zero = torch.zeros_like(as_float["sink"])
    columns = torch.stack([as_float["image"], centric, as_float["sink"], zero, zero, as_float["budget"]],
                          dim=-1)  # [B, K, 6]
    tiny, inf = torch.finfo(dtype).tiny, float("inf")
    if head_selection == "all":
        row = [-inf, -inf, -inf, -inf, -inf, tiny]
    else:
        row = [summ if summ > 0 else tiny, 0.0, -inf, -inf, -inf, tiny]
    thresholds = torch.tensor(row, dtype=dtype, device=device).repeat(sink.shape[0], 1)  # [B, 6]
    if mode == "reference" and head_selection != "all":  # the reference code edits no sample without a visual sink
        thresholds[:, 1] = torch.where(visual_sink.any(dim=-1), 0.0, inf).to(dtype)
    drained = drained_share(p, mode)
    factor_base = torch.tensor([1.0, 1.0 - drained, 1.0], dtype=dtype, device=device)
    placement = torch.stack([target, sink, other], dim=1).to(dtype)  # [B, 3, K]
    return KeyLayout(columns, thresholds[:, None, None], factor_base, placement, float(drained))


def var_factors(masses: torch.Tensor, query_mask: torch.Tensor | None, thresholds: torch.Tensor,
                factor_base: torch.Tensor, *, drained: float, head_selection: str = "image_centric",
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection and per-row factors of VAR from a row's masses (`row_products` with KeyLayout.columns).

    masses: [batch, head, query, 6]; query_mask: [batch, query] bool, or None when every query may be
    edited (decode steps); thresholds, factor_base, drained: a KeyLayout's.
    Returns (factors [batch, head, query, 3] = (gain, keep, 1), selected [batch, head, query] bool).
    Unselected rows get (1, 1, 1). Elementwise on [batch, head, query]: no loops, no host syncs.
    """
    passed = masses >= thresholds
    queries = None if query_mask is None else query_mask.to(masses.device).bool()[:, None, :]
    if head_selection == "random":
        centric = passed[..., :2].all(dim=-1)
        eligible = passed[..., 5]
        if queries is not None:
            centric, eligible = centric & queries, eligible & queries
        selected = _random_heads(centric.sum(dim=1), eligible, generator)
    else:
        selected = passed.all(dim=-1)
        if queries is not None:
            selected = selected & queries
    # (1 + drained * sink / target, keep, 1): finite where selected (target >= the smallest normal number), and
    # exactly keep and 1 there (0 / target = 0); elsewhere discarded
    factors = torch.addcdiv(factor_base, masses[..., 2:5], masses[..., 5:6], value=drained)
    return torch.where(selected[..., None], factors, factor_base[2]), selected


def var_probs(probs: torch.Tensor, sink_mask: torch.Tensor, image_mask: torch.Tensor, query_mask: torch.Tensor, *,
              p: float = 0.6, rho: float = 0.5, summ: float = 0.2, mode: str = "paper",
              head_selection: str = "image_centric", budget_target: str = "image_nonsink",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR on one layer's attention.

    probs: [batch, head, query, key] post-softmax (float32 recommended); sink_mask: [batch, key]
    bool, S (sinks of any kind); image_mask: [batch, key] bool, image tokens; query_mask:
    [batch, query] bool, the queries VAR may edit.
    Returns (edited probs [batch, head, query, key], selected [batch, head, query] bool).
    Rows not selected are returned bitwise unchanged; sink entries of selected rows are exactly
    a_ij * (1 - p) (the scale factor is placed by a product with 0/1 masks, which is exact). A row is
    never selected when its budget targets receive no attention (nowhere to put the budget) or its
    sample has no sink.

    Cost: two small matrix products against [batch, key, 6] and [batch, 3, key] matrices (the row masses,
    and the per-entry factor), a few elementwise ops on [batch, head, query] and one elementwise
    product; no loops, no host syncs.
    """
    layout = key_layout(sink_mask, image_mask, p=p, rho=rho, summ=summ, mode=mode, head_selection=head_selection,
                        budget_target=budget_target, dtype=probs.dtype, device=probs.device)
    return var_region(probs, *_tensors(layout), query_mask, drained=layout.drained, head_selection=head_selection,
                      generator=generator)


def _tensors(layout: KeyLayout) -> tuple[torch.Tensor, ...]:
    """A KeyLayout's tensors in var_region's order (a compiled function takes tensors, not the dataclass)."""
    return layout.columns, layout.thresholds, layout.factor_base, layout.placement


def row_products(rows: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """rows [batch, head, query, n] times matrix [batch, n, m] -> [batch, head, query, m] without expanding the
    matrix over the heads (a 4-D matmul copies it, [batch, head, n, m], on every call when batch > 1): a larger
    batch is one product per sample over its [head * query] rows; batch 1 stays a 4-D matmul, which folds the rows
    into one product without a copy (and which torch.compile fuses with the rest of the edit)."""
    if rows.shape[0] == 1:
        return torch.matmul(rows, matrix[:, None])
    batch, heads, queries, n = rows.shape
    flat = rows.reshape(batch, heads * queries, n)  # a view wherever the rows allow it (a decode step)
    return torch.matmul(flat, matrix).view(batch, heads, queries, matrix.shape[-1])


def var_region(region: torch.Tensor, columns: torch.Tensor, thresholds: torch.Tensor, factor_base: torch.Tensor,
               placement: torch.Tensor, query_mask: torch.Tensor | None, *, drained: float, head_selection: str,
               generator: torch.Generator | None = None, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR on a block of rows whose keys are exactly a KeyLayout's: (edited rows, selected).

    region: [batch, head, query, key]; columns, thresholds, factor_base, placement, drained: a KeyLayout's (which
    hold p, rho, summ and the mode); query_mask: [batch, query] bool or None (every query). inplace: scale `region`
    itself (returned) instead of a copy. The whole edit is one function of tensors, so that `torch.compile` can
    fuse it (VAREdit with compile=True, which passes no generator: not for head_selection="random").
    """
    factors, selected = var_factors(row_products(region, columns), query_mask, thresholds, factor_base,
                                    drained=drained, head_selection=head_selection, generator=generator)
    scale = row_products(factors, placement)
    return (region.mul_(scale) if inplace else region * scale), selected


# ---------------------------------------------------------------------------------------
# the edit
# ---------------------------------------------------------------------------------------

def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class VAREdit(AttentionEdit):
    """VAR on the layers of a ResolvedVAR; sinks found by pre-hooks on those decoder layers at prefill."""

    def __init__(self, resolved: ResolvedVAR, compile: bool = False):
        self.resolved = resolved
        self.config = resolved.config
        self._compiled, self._compiled_ok = None, False
        if compile:
            c = self.config
            if c.head_selection == "random":
                raise SinkscopeError("compile=True cannot draw random heads (torch.compile does not trace a "
                                     "torch.Generator): use compile=False with head_selection='random'")
            selection, drained = c.head_selection, drained_share(c.p, c.mode)

            def region_edit(region, columns, thresholds, factor_base, placement, query_mask):
                return var_region(region, columns, thresholds, factor_base, placement, query_mask, drained=drained,
                                  head_selection=selection)
            # dynamic: one graph for every prompt length and decode step; fullgraph: a break would bring back
            # the separate operations this exists to fuse
            self._compiled = torch.compile(region_edit, dynamic=True, fullgraph=True)

    def layers(self, n_layers: int) -> set[int]:
        return set(self.resolved.layers)

    def attach(self, session: EditSession) -> list:
        handles = []
        for layer in self.resolved.layers:
            hook = _SinkDetector(self, session, layer)
            handles.append(session.adapter.layers[layer].register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    def begin_prompt(self, session: EditSession, prompt) -> None:
        memory = session.memory(self)
        memory["sinks"] = {}
        memory["selected"] = {}
        memory["layouts"] = {}

    def detect(self, states: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """[batch, token, dim] residual states entering a layer -> [batch, token] bool sinks (pad never)."""
        from sinkscope.measures.sinks import sink_score

        score = sink_score(states, list(self.resolved.sink_dims), self.config.sink_score, token_mask=real,
                           eps=self.config.eps)
        return (score >= self.resolved.tau) & real

    def _generator(self, memory: dict, device) -> torch.Generator:
        key = ("generator", str(device))
        if key not in memory:
            memory[key] = torch.Generator(device=device).manual_seed(int(self.config.seed))
        return memory[key]

    def edit(self, probs, *, layer, query_positions, state: StepState):
        prompt = state.require_prompt()
        memory = state.memory(self)
        sinks = memory.get("sinks", {}).get(layer)
        if sinks is None:
            raise SinkscopeError(f"VAR found no sink mask for layer {layer}: the prompt must be run through the model "
                                 "(prefill) inside the VAR block before decoding")
        n_keys, n_queries = probs.shape[-1], probs.shape[2]
        c = self.config
        start = min(state.default_query_start, n_queries)  # queries before it are never VAR queries
        generator = self._generator(memory, probs.device) if c.head_selection == "random" else None
        if n_keys >= state.total_length >= prompt.length and not probs.requires_grad:
            # the cache holds every key since the prompt, so the prompt's keys are the first prompt.length and
            # every later key is a generated token (neither sink nor image: factor 1). Only the prompt's keys are
            # read and scaled, in place, with the layout built once per prompt; at a decode step every query is
            # a generated token, so no query mask either.
            layout = self._layout(memory, layer, sinks, prompt, probs)
            region = probs[:, :, start:, : prompt.length]
            queries = None if state.only_generated else state.default_query_mask()[:, start:]
            if self._compiled is not None:
                edited, selected_tail = self._run_compiled(region, layout, queries)
                region.copy_(edited)
            else:
                _, selected_tail = var_region(region, *_tensors(layout), queries, drained=layout.drained,
                                              head_selection=c.head_selection, generator=generator, inplace=True)
            out = probs
        else:  # sliding-window caches, a prompt fed in chunks, or autograd: the general path
            tail, selected_tail = var_probs(
                probs[:, :, start:], state.key_mask(sinks, n_keys), state.key_mask(prompt.kinds.visual_mask, n_keys),
                state.default_query_mask()[:, start:], p=c.p, rho=c.rho, summ=c.summ, mode=c.mode,
                head_selection=c.head_selection, budget_target=c.budget_target, generator=generator)
            out = with_rows_from(probs, start, tail)
        selected = selected_tail if start == 0 else torch.nn.functional.pad(selected_tail, (start, 0), value=False)
        memory["selected"][layer] = selected
        return out

    def _run_compiled(self, region: torch.Tensor, layout: KeyLayout, queries):
        """The compiled region edit; its first call compiles (seconds), and a failure to compile names the way out."""
        if self._compiled_ok:
            return self._compiled(region, *_tensors(layout), queries)
        try:
            result = self._compiled(region, *_tensors(layout), queries)
        except Exception as error:  # the backend's own errors vary with the device and toolchain
            raise SinkscopeError(f"VAR with compile=True: torch.compile failed on {region.device} ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''}); on the CPU it needs a C++ "
                                 "compiler, on a GPU Triton. Run with compile=False (the same edit, unfused)") from error
        self._compiled_ok = True
        return result

    def _layout(self, memory: dict, layer: int, sinks: torch.Tensor, prompt, probs: torch.Tensor) -> KeyLayout:
        """The KeyLayout of `layer` over the prompt's keys, made at its first use after each prefill."""
        layouts = memory.setdefault("layouts", {})
        key = (layer, probs.dtype, str(probs.device))
        if key not in layouts:
            c = self.config
            layouts[key] = key_layout(sinks, prompt.kinds.visual_mask, p=c.p, rho=c.rho, summ=c.summ, mode=c.mode,
                                      head_selection=c.head_selection, budget_target=c.budget_target,
                                      dtype=probs.dtype, device=probs.device)
        return layouts[key]


class _SinkDetector:
    """Forward pre-hook of one decoder layer: the sinks of the residual stream entering it, at prefill."""

    def __init__(self, edit: VAREdit, session: EditSession, layer: int):
        self.edit, self.session, self.layer = edit, session, layer

    def __call__(self, module, args, kwargs):
        step = self.session.step
        if step is None or not step.prefill or step.prompt is None:
            return None
        states = _hidden(args, kwargs)
        real = step.prompt.kinds.kind != PAD
        self.session.memory(self.edit).setdefault("sinks", {})[self.layer] = self.edit.detect(states, real.to(states.device))
        return None


@dataclass
class VARRun:
    """What `var(...)` yields: the resolved settings and, for inspection, the last step's sinks and selections."""

    resolved: ResolvedVAR
    edit: VAREdit
    session: EditSession

    def sinks(self, layer: int) -> torch.Tensor:
        """[batch, prompt_len] bool: the sinks found at prefill entering `layer`."""
        return self.session.memory(self.edit)["sinks"][layer]

    def selected(self, layer: int) -> torch.Tensor:
        """[batch, head, query] bool: the (head, query) VAR edited in `layer` at the last forward step."""
        return self.session.memory(self.edit)["selected"][layer]


@contextlib.contextmanager
def var(model_or_adapter, config: VARConfig | None = None, *, calibration=None,
        fallback: str = "sdpa", compile: bool = False) -> Iterator[VARRun]:
    """VAR on the language model inside the block (any `model(...)` / `model.generate(...)`).

    config: VARConfig (default: paper defaults; sink_dims must be pinned or calibrated).
    calibration: a processor batch (or list of batches / eval samples); when given and the config
      lacks sink_dims or tau, `calibrate` fills them first.
    fallback: how layers VAR does not edit are computed ("sdpa", or "eager" for bitwise comparisons
      with an eager model). Yields a VARRun. The model is restored on exit, also after an exception.
    compile: fuse the edit of each layer (masses, selection, factors, product) with `torch.compile`: one
      kernel instead of 7 operations per layer and step, for GPUs where a decode step waits on kernel
      launches. The first call compiles (seconds to a minute); not with head_selection="random". On a CPU
      it is slower than the unfused edit (a compiled call's own overhead, ~20 us, exceeds the 7 operations').
    """
    adapter = as_adapter(model_or_adapter)
    config = (config or VARConfig()).validate()
    if calibration is not None and (config.sink_dims is None or config.tau is None):
        config = calibrate(adapter, calibration, config)
    resolved = resolve(config, adapter)
    edit = VAREdit(resolved, compile=compile)
    with edit_attention(adapter, edit, fallback=fallback) as session:
        yield VARRun(resolved, edit, session)


def enable(model_or_adapter, config: VARConfig | None = None, *, calibration=None,
           fallback: str = "sdpa", compile: bool = False) -> EditHandle:
    """Switch VAR on for a loaded model until `handle.disable()`.

    For pipelines that call the model themselves: the language model's attention implementation
    becomes "sinkscope_edit" (ATTENTION_NAME) with VAR attached to this model instance; other
    models are untouched. `handle.session` is the EditSession.
    """
    return EditHandle(var(model_or_adapter, config, calibration=calibration, fallback=fallback, compile=compile))


# ---------------------------------------------------------------------------------------
# calibration: sink dims and tau from data, as the scan finds them
# ---------------------------------------------------------------------------------------

def _as_batches(adapter, data) -> list:
    if isinstance(data, Mapping) or (hasattr(data, "keys") and "input_ids" in data.keys()):
        return [data]
    items = list(data)
    if items and all(hasattr(x, "question") for x in items):
        images = [x.image() for x in items]
        return [adapter.prepare([x.question for x in items], None if all(im is None for im in images) else images)]
    return items


def calibrate(model_or_adapter, batch_or_samples, config: VARConfig | None = None,
              start_layer: int = 2) -> VARConfig:
    """A copy of `config` with sink_dims (discovered unless pinned) and tau (chosen unless given).

    batch_or_samples: a processor batch, a list of batches, or a list of eval Samples.
    The one calibration of every run (`sinkscope.calibration.calibrate`: the BOS state's massive dims
    from `start_layer` on, and the one tau rule `measures.sinks.sink_threshold`); the returned config
    carries the resolved sink score. Two forward passes per batch at most.
    """
    config = (config or VARConfig()).validate()
    return with_calibration(config, calibration_of(model_or_adapter, batch_or_samples, config, start_layer))


def calibration_of(model_or_adapter, batch_or_samples, config: VARConfig | None = None, start_layer: int = 2):
    """The `sinkscope.calibration.Calibration` that `calibrate` applies (warns when no sink dim is found)."""
    from sinkscope.calibration import calibrate as calibrate_run

    adapter = as_adapter(model_or_adapter)
    config = (config or VARConfig()).validate()
    batches = _as_batches(adapter, batch_or_samples)
    if not batches:
        raise SinkscopeError("calibrate needs at least one batch (processor outputs) or sample")
    cal = calibrate_run(adapter, batches, sink_score=config.sink_score, tau=config.tau, sink_dims=config.sink_dims,
                        start_layer=start_layer, eps=config.eps, log=lambda message: None)
    if not cal.dims.dims:
        warnings.warn(f"calibrate found no sink dims ({cal.dims.reason}); VAR will change nothing", UserWarning)
    return cal


def with_calibration(config: VARConfig, calibration) -> VARConfig:
    """`config` with the sink dims, tau and sink score of a `sinkscope.calibration.Calibration`."""
    return replace(config, sink_dims=[int(d) for d in calibration.dims.dims], tau=float(calibration.tau.value),
                   sink_score=calibration.sink_score)
