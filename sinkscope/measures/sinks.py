"""Sink tokens: phi (Kang et al. 2025, section 2) and the threshold tau.

phi(x) = max_{d in D_sink} |x_d / RMS(x)|, RMS(x) = sqrt(mean_k x_k^2 + eps), float32, no
learned gain, on the residual state entering a layer. A token is a sink at layer l if
phi(x_j^l) >= tau (paper: tau = 20). phi is scale-free and bounded: phi <= sqrt(dim), reached
only when all of a token's energy sits in one sink dim.

Layout: phi values are `[batch, layer, token]` (or any `[...]` matching the states' leading
dims); token kinds are `[batch, token]` codes from `sinkscope.kinds`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from sinkscope.kinds import BOS, KIND_NAMES, PAD, VISUAL
from sinkscope.measures.massive import SinkDims, _kind_codes

PAPER_TAU = 20.0


def _dims_list(sink_dims) -> list[int]:
    dims = sink_dims.dims if isinstance(sink_dims, SinkDims) else sink_dims
    return [int(d) for d in dims]


def _dims_index(sink_dims, states: torch.Tensor) -> torch.Tensor | None:
    """The sink dims as a long index on the states' device (None when there are none); a list is checked
    against the width, a tensor is taken as is (see `phi`)."""
    if isinstance(sink_dims, torch.Tensor):
        return sink_dims.to(states.device) if sink_dims.numel() else None
    dims = _dims_list(sink_dims)
    if not dims:
        return None
    dim = states.shape[-1]
    bad = [d for d in dims if not 0 <= d < dim]
    if bad:
        raise ValueError(f"sink dims {bad} are outside [0, {dim}): do they belong to another model?")
    return torch.tensor(dims, dtype=torch.long, device=states.device)


def phi(states: torch.Tensor, sink_dims, eps: float = 1e-6) -> torch.Tensor:
    """Sink score of each token: max over d in sink_dims of |x_d / RMS(x)|.

    states: [..., dim] raw residual states (e.g. [batch, layer, token, dim]).
    sink_dims: list of dims or a SinkDims (checked against the width), or a long tensor of dims already on the
      states' device (taken as is: a per-layer caller builds it once, so no index crosses to the device per call).
      Empty -> all zeros (no token can be a sink).
    Returns float32 [...]; units: multiples of the token RMS, in [0, sqrt(dim)].
    """
    index = _dims_index(sink_dims, states)
    if index is None:
        return torch.zeros(states.shape[:-1], dtype=torch.float32, device=states.device)
    x = states.float()
    rms = torch.sqrt(x.pow(2).mean(dim=-1) + eps)
    return x.index_select(-1, index).abs().amax(dim=-1) / rms


SINK_SCORES = ("rms", "layer")


def phi_layer_relative(states: torch.Tensor, sink_dims, token_mask: torch.Tensor | None = None,
                       eps: float = 1e-6) -> torch.Tensor:
    """Layer-relative sink score: max over d in sink_dims of |x_d| / (median RMS of the row's real tokens).

    An extension beyond the paper for narrow models, where phi (normalised by the token's own
    RMS, so at most sqrt(dim)) saturates: in SmolLM2-135M the sink dim dominates the residual
    of most tokens in middle layers, so ordinary tokens reach phi 14-22 of a ceiling of 24,
    while in absolute terms the first token's value is 100x theirs. This score keeps the
    magnitude, in units of the typical token's RMS at that layer (Sun et al.'s "relative to the
    median" criterion), and has no ceiling.

    states: [batch, token, dim] or [batch, layer, token, dim]; token_mask: [batch, token] bool
    (real tokens; padding is left out of the median). Returns float32 [batch, (layer,) token].
    """
    index = _dims_index(sink_dims, states)
    if index is None:
        return torch.zeros(states.shape[:-1], dtype=torch.float32, device=states.device)
    x = states.float()
    rms = torch.sqrt(x.pow(2).mean(dim=-1) + eps)  # [batch, (layer,) token]
    if token_mask is not None:
        mask = token_mask.bool().to(rms.device)
        if rms.dim() == 3:
            mask = mask[:, None, :]
        rms_for_median = torch.where(mask.expand_as(rms), rms, torch.full_like(rms, float("nan")))
    else:
        rms_for_median = rms
    typical = torch.nanmedian(rms_for_median, dim=-1, keepdim=True).values.clamp_min(eps)
    return x.index_select(-1, index).abs().amax(dim=-1) / typical


def sink_score(states: torch.Tensor, sink_dims, score: str = "rms", token_mask: torch.Tensor | None = None,
               eps: float = 1e-6) -> torch.Tensor:
    """phi ("rms": the paper's, per token) or the layer-relative score ("layer"); shapes as `phi`."""
    if score == "rms":
        return phi(states, sink_dims, eps)
    if score == "layer":
        return phi_layer_relative(states, sink_dims, token_mask, eps)
    raise ValueError(f"sink score must be one of {SINK_SCORES}, got {score!r}")


LAYER_SCORE_TAU = 100.0


def choose_tau_layer_relative(tau: float | None = None) -> "SinkThreshold":
    """tau for the layer-relative score: given, or 100 (a sink-dim value >= 100x the typical token's RMS).

    Why a fixed value and not the gap rule: across layers the scores of the first token and of
    secondary sinks form a continuum (in SmolLM2-135M: 96 at layer 2, 194 at layer 5, 3,677 at
    layer 15), so no single gap separates them; 100x sits in the range Sun et al. call massive
    (they ask for ~1000x the median |x|, and the median |x| is below the RMS).
    """
    if tau is None:
        return SinkThreshold(LAYER_SCORE_TAU, "layer-default",
                             f"layer-relative score: a token is a sink where a sink-dim value is >= {LAYER_SCORE_TAU:g}x "
                             "the median token RMS of its layer (fixed default; --tau overrides)")
    tau = float(tau)
    if not tau > 0 or not math.isfinite(tau):
        raise ValueError(f"tau must be > 0 and finite, got {tau}")
    return SinkThreshold(tau, "given", f"tau={tau:g} given (layer-relative score, no ceiling)")


@dataclass
class SinkThreshold:
    """tau and how it was chosen. method: "given", "paper" or "gap"; reason: one sentence
    (it carries the warning when a given tau is unreachable)."""

    value: float
    method: str
    reason: str

    def __float__(self) -> float:
        return float(self.value)


def _tau_value(tau) -> float:
    return float(tau.value if isinstance(tau, SinkThreshold) else tau)


def choose_tau(phi_values: torch.Tensor | None, hidden_size: int, tau: float | None = None,
               token_kinds=None, min_gap: float = 1.5) -> SinkThreshold:
    """Pick the sink threshold tau.

    phi_values: [batch, layer, token] or [batch, token] phi of a calibration set (may be None
      when tau is given or hidden_size >= 1600).
    token_kinds: [batch, token] codes (or TokenKinds); BOS and pad are left out of the gap rule.
      Without it every value counts.
    - tau given: must be > 0 (ValueError otherwise); if tau > sqrt(hidden_size) the reason says
      no token can reach it (and a UserWarning is issued).
    - tau None and sqrt(hidden_size) >= 40: the paper's tau = 20.
    - tau None, smaller models: 20 would be out of reach (or nearly), so a scale-free choice:
      the largest multiplicative gap in the sorted phi of non-BOS tokens, with values below the
      floor 0.25 * sqrt(hidden_size) lifted to the floor (so the gap must lie above it); tau is
      the geometric middle of the gap. If that gap is smaller than `min_gap` there is no
      separated group: tau = min(sqrt(hidden), max(floor, min_gap x the largest non-BOS phi)),
      i.e. no text or visual token is a sink.
    """
    if hidden_size is None or hidden_size <= 0:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size}")
    ceiling = math.sqrt(hidden_size)
    if tau is not None:
        tau = float(tau)
        if not tau > 0 or not math.isfinite(tau):
            raise ValueError(f"tau must be > 0 and finite (phi is in multiples of the token RMS), got {tau}")
        if tau > ceiling:
            reason = (f"warning: tau={tau:g} exceeds sqrt(hidden_size)={ceiling:.3g}, the largest phi any token can "
                      "have: no token can reach it, so nothing will be a sink")
            warnings.warn(reason, UserWarning, stacklevel=2)
            return SinkThreshold(tau, "given", reason)
        return SinkThreshold(tau, "given", f"tau={tau:g} given (sqrt(hidden_size)={ceiling:.3g})")
    if ceiling >= 2 * PAPER_TAU:
        return SinkThreshold(PAPER_TAU, "paper",
                             f"paper default tau={PAPER_TAU:g} (sqrt(hidden_size)={ceiling:.3g} >= {2 * PAPER_TAU:g})")
    floor = 0.25 * ceiling
    if phi_values is None:
        raise ValueError(f"hidden_size={hidden_size} is too small for the paper's tau={PAPER_TAU:g}: pass phi_values "
                         "(a calibration set) to choose tau from the data, or pass tau explicitly")
    values = phi_values.float()
    if token_kinds is not None:
        kinds = _kind_codes(token_kinds).to(values.device)
        keep = (kinds != BOS) & (kinds != PAD)
        if values.dim() == 3:
            keep = keep[:, None, :].expand_as(values)
        values = values[keep]
        who = "non-BOS tokens"
    else:
        who = "all tokens (no token kinds given, BOS included)"
    values = values.reshape(-1)
    values = values[torch.isfinite(values)]
    above = values[values > floor]
    if above.numel() == 0:
        return SinkThreshold(floor, "gap", f"no phi of {who} exceeds the floor 0.25*sqrt(hidden_size)={floor:.3g}; "
                                           f"tau set to the floor")
    v = torch.sort(torch.cat([above, above.new_tensor([floor])])).values.double()  # floor = lowest point
    logs = v.log()
    gaps = logs[1:] - logs[:-1]
    i = int(gaps.argmax())
    gap = math.exp(float(gaps[i]))
    if gap < min_gap:
        value = min(ceiling, max(floor, min_gap * float(v[-1])))
        return SinkThreshold(value, "gap", f"no gap of x{min_gap:g} in the phi of {who} above the floor {floor:.3g} "
                                           f"(largest x{gap:.2f}); tau={value:.3g} puts every such token below it")
    value = math.exp(float(logs[i] + logs[i + 1]) / 2)
    n_sinks = int((above >= value).sum())
    return SinkThreshold(value, "gap", f"largest gap (x{gap:.2f}) in the sorted phi of {who} between {float(v[i]):.3g} "
                                       f"and {float(v[i + 1]):.3g}, above the floor 0.25*sqrt(hidden_size)={floor:.3g}; "
                                       f"{n_sinks} of {values.numel()} values reach tau={value:.3g}")


def needs_phi_for_tau(score: str, hidden_size: int, tau: float | None = None) -> bool:
    """Whether `sink_threshold` needs the calibration set's phi: only phi (rms) with tau unset on a model too
    narrow for the paper's tau (sqrt(hidden) < 40), where the gap rule reads the data."""
    return score == "rms" and tau is None and math.sqrt(hidden_size) < 2 * PAPER_TAU


def sink_threshold(score: str, hidden_size: int, phi_values: torch.Tensor | None = None, tau: float | None = None,
                   token_kinds=None, has_dims: bool = True) -> SinkThreshold:
    """The one tau rule (the scan, every analysis, VAR and the report use it).

    score: the resolved sink score, "rms" (phi) or "layer" (layer-relative); has_dims: False when no sink
    dimension was found (phi is 0 everywhere, so no threshold makes a sink).
    - no sink dims: the given tau, else sqrt(hidden_size) (method "none");
    - layer-relative score: `choose_tau_layer_relative` (given, or 100);
    - phi: `choose_tau` (given; the paper's 20 when sqrt(hidden) >= 40; else the gap rule on `phi_values`,
      which must then be given: see `needs_phi_for_tau`).
    """
    if not has_dims:
        value = float(tau) if tau is not None else math.sqrt(hidden_size)
        return SinkThreshold(value, "none", "no sink dims were found, so phi is 0 for every token and no "
                             "token is a sink at any threshold")
    if score == "layer":
        return choose_tau_layer_relative(tau)
    return choose_tau(phi_values, hidden_size, tau, token_kinds=token_kinds)


def sink_mask(phi_values: torch.Tensor, tau) -> torch.Tensor:
    """phi >= tau. phi_values: any shape; tau: float or SinkThreshold. Returns bool, same shape."""
    return phi_values >= _tau_value(tau)


def _kinds_like(phi_values: torch.Tensor, token_kinds) -> torch.Tensor:
    kinds = _kind_codes(token_kinds).to(phi_values.device)
    if phi_values.dim() == 3:
        if kinds.shape != (phi_values.shape[0], phi_values.shape[2]):
            raise ValueError(f"token_kinds {tuple(kinds.shape)} does not match phi [batch, layer, token] "
                             f"{tuple(phi_values.shape)}")
        return kinds[:, None, :].expand_as(phi_values)
    if kinds.shape != phi_values.shape:
        raise ValueError(f"token_kinds {tuple(kinds.shape)} does not match phi {tuple(phi_values.shape)}")
    return kinds


def visual_sink_mask(phi_values: torch.Tensor, token_kinds, tau) -> torch.Tensor:
    """Visual sinks: image tokens with phi >= tau.

    phi_values: [batch, layer, token] (or [batch, token]); token_kinds: [batch, token].
    Returns bool of phi_values' shape.
    """
    return sink_mask(phi_values, tau) & (_kinds_like(phi_values, token_kinds) == VISUAL)


def sink_mask_all(phi_values: torch.Tensor, token_kinds, tau) -> torch.Tensor:
    """Sinks of any kind (BOS, text, visual, generated; pad never): the set S that VAR drains.

    phi_values: [batch, layer, token] (or [batch, token]); token_kinds: [batch, token].
    """
    return sink_mask(phi_values, tau) & (_kinds_like(phi_values, token_kinds) != PAD)


def sink_tokens_table(phi_values: torch.Tensor, token_kinds, tau, layer_ids: Sequence[int] | None = None,
                      sample_ids: Sequence | None = None) -> pd.DataFrame:
    """One row per sink token: sample, layer, position, token_kind (bos|text|visual|generated), phi.

    phi_values: [batch, layer, token]; token_kinds: [batch, token] codes (or TokenKinds).
    layer_ids: the model layer of each phi layer (default 0..); sample_ids: names of batch rows.
    """
    if phi_values.dim() != 3:
        raise ValueError(f"phi_values must be [batch, layer, token], got {tuple(phi_values.shape)}")
    batch, n_layers, _ = phi_values.shape
    layer_ids = list(range(n_layers)) if layer_ids is None else list(layer_ids)
    sample_ids = list(range(batch)) if sample_ids is None else list(sample_ids)
    if len(layer_ids) != n_layers or len(sample_ids) != batch:
        raise ValueError(f"got {len(sample_ids)} sample_ids / {len(layer_ids)} layer_ids for phi {tuple(phi_values.shape)}")
    mask = sink_mask_all(phi_values, token_kinds, tau)
    kinds = _kind_codes(token_kinds).cpu()
    idx = torch.nonzero(mask.cpu())
    vals = phi_values.detach().float().cpu()[mask.cpu()]
    rows = {
        "sample": [sample_ids[int(b)] for b in idx[:, 0]],
        "layer": [layer_ids[int(l)] for l in idx[:, 1]],
        "position": idx[:, 2].tolist(),
        "token_kind": [KIND_NAMES[int(kinds[b, t])] for b, t in zip(idx[:, 0].tolist(), idx[:, 2].tolist())],
        "phi": vals.tolist(),
    }
    return pd.DataFrame(rows, columns=["sample", "layer", "position", "token_kind", "phi"])


ROLES = ("first", "delimiter", "text", "visual", "generated")


def is_delimiter(token: str) -> bool:
    """A delimiter: a special token (``<|im_end|>``, ``</s>``) or one made only of whitespace and punctuation."""
    stripped = token.strip()
    if not stripped:
        return bool(token)  # whitespace such as "\n" is a delimiter; the empty string is not a token
    if stripped.startswith("<") and stripped.endswith(">") and len(stripped) > 2:
        return True
    return all(not ch.isalnum() for ch in stripped)


def token_roles(kind_names: Sequence[str], tokens: Sequence[str]) -> list[str]:
    """Per token: first (the row's first token: BOS or a chat-template token) | delimiter | text | visual | generated.

    kind_names: token kinds as names (bos / text / visual / generated / pad); tokens: the decoded strings.
    """
    out = []
    for kind, token in zip(kind_names, tokens):
        if kind == "bos":
            out.append("first")
        elif kind == "text":
            out.append("delimiter" if is_delimiter(token) else "text")
        else:
            out.append(kind)
    return out
