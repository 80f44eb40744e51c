"""Massive activations (Sun et al. 2024) and sink-dimension discovery (Kang et al. 2025).

Pure tensor functions. Residual states are the hidden states entering a decoder layer:
`[batch, token, dim]` for one layer, `[layer, batch, token, dim]` for a stack. Values are in
the units of the residual stream ("raw"); `rms_value` is the value divided by the token's
RMS over dims (plain RMS normalisation in float32, no learned gain), which is scale-free:
for any token, |rms_value| <= sqrt(dim).

Sink dimensions are the few feature dims where the BOS token (the canonical attention sink)
carries a massive activation; they are discovered from data here (`discover_sink_dims`), and
published dims are kept only as references (`PUBLISHED_SINK_DIMS`, `pinned_sink_dims`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd
import torch

from sinkscope.kinds import KIND_NAMES, PAD

# Sink dims published for language backbones (Kang et al. 2025; Sun et al. 2024). References
# to compare discovered dims against, never used silently.
PUBLISHED_SINK_DIMS: dict[str, list[int]] = {
    "llama-2-7b / llava-1.5-7b": [1415, 2533],
    "llama-2-13b / llava-1.5-13b": [2100, 4743],
    "qwen2-7b / qwen2-vl-7b": [458, 2570],
}


def _kind_codes(token_kinds) -> torch.Tensor:
    """[batch, token] long kind codes from a TokenKinds or a tensor."""
    kind = getattr(token_kinds, "kind", token_kinds)
    if not isinstance(kind, torch.Tensor):
        kind = torch.as_tensor(kind)
    return kind.long()


def rms_normalize(states: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean_k x_k^2 + eps) over the last dim, in float32, no learned gain.

    states: [..., dim] (any dtype). Returns float32 [..., dim]; units: multiples of the token's
    RMS, so every entry lies in [-sqrt(dim), sqrt(dim)].
    """
    x = states.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------
# massive activations
# ---------------------------------------------------------------------------------------


@dataclass
class MassiveCriterion:
    """Sun et al. 2024: an activation is massive if |x| > absolute AND |x| >= ratio * median|x|.

    median|x| is the median magnitude of the layer (over real tokens and all dims). Set
    `absolute=None` for a ratio-only (scale-free) rule and `ratio=None` for an absolute-only
    one. The defaults (100, 1000) fit billion-parameter models whose residual stream reaches
    thousands; small models (hidden size in the hundreds, e.g. the demo LMM) never reach
    |x| > 100, so use `MassiveCriterion.ratio_only(...)` with a ratio matched to the model
    (e.g. 20-100).
    """

    absolute: float | None = 100.0
    ratio: float | None = 1000.0

    def __post_init__(self):
        if self.absolute is None and self.ratio is None:
            raise ValueError("MassiveCriterion needs at least one of absolute or ratio (both are None)")
        if self.absolute is not None and self.absolute < 0:
            raise ValueError(f"absolute threshold must be >= 0, got {self.absolute}")
        if self.ratio is not None and self.ratio <= 0:
            raise ValueError(f"ratio must be > 0, got {self.ratio}")

    @classmethod
    def ratio_only(cls, ratio: float = 100.0) -> "MassiveCriterion":
        return cls(absolute=None, ratio=ratio)

    def __call__(self, values: torch.Tensor, median: torch.Tensor | float) -> torch.Tensor:
        """values: any shape (raw activations); median: scalar or broadcastable. Returns bool."""
        mag = torch.as_tensor(values).float().abs()
        out = torch.ones_like(mag, dtype=torch.bool)
        if self.absolute is not None:
            out &= mag > self.absolute
        if self.ratio is not None:
            out &= mag >= self.ratio * torch.as_tensor(median, dtype=torch.float32)
        return out

    def describe(self) -> str:
        parts = []
        if self.absolute is not None:
            parts.append(f"|x| > {self.absolute:g}")
        if self.ratio is not None:
            parts.append(f"|x| >= {self.ratio:g} x layer median |x|")
        return " and ".join(parts)


def is_massive(values: torch.Tensor, median: torch.Tensor | float, absolute: float | None = 100.0,
               ratio: float | None = 1000.0) -> torch.Tensor:
    """Bool mask of massive activations; see `MassiveCriterion` (None disables a threshold)."""
    return MassiveCriterion(absolute, ratio)(values, median)


def _median_abs(states: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Median |x| over real tokens and all dims. states [batch, token, dim], real [batch, token]."""
    mags = states.float().abs()[real]
    if mags.numel() == 0:
        return torch.tensor(float("nan"))
    return mags.median()


def row_median_abs(x: torch.Tensor, valid: torch.Tensor, row_dims: int = 1) -> torch.Tensor:
    """The (lower) median |x| over each row's valid entries, exactly. x: its first `row_dims` dims index rows,
    the rest hold a row's entries (e.g. [batch, layer, token, dim] with row_dims=2), any float dtype; valid: bool,
    broadcastable to x -> float32 [rows...], nan for a row without valid entries.

    16-bit x (float16, bfloat16: what a GPU model holds) goes through a histogram of its bit patterns: |x|
    has at most 2^15 values, ordered as their patterns, so counting the patterns per row (one bincount for every
    row) and finding where the running count passes the middle gives the median exactly, reading x once. A
    median along a dim on CUDA runs one thread block per row (slow for rows of millions of entries) and a
    median of a whole tensor sorts it; this costs neither. Other dtypes: a NaN-masked `nanmedian` along the row
    (a NaN entry of x is then left out; the histogram counts it above infinity).
    """
    shape = x.shape[:row_dims]
    rows = math.prod(shape)
    if x.dtype not in (torch.float16, torch.bfloat16):
        masked = x.float().abs().masked_fill_(~valid, float("nan"))
        return masked.reshape(rows, -1).nanmedian(dim=-1).values.reshape(shape)
    n_bins = 1 << 15  # non-negative 16-bit patterns; one more bin takes the entries that are not valid
    patterns = x.contiguous().view(torch.int16).to(torch.int32).bitwise_and_(n_bins - 1)  # the pattern of |x|
    patterns = patterns.masked_fill_(~valid, n_bins).reshape(rows, -1)
    patterns.add_(torch.arange(rows, device=x.device, dtype=torch.int32)[:, None] * (n_bins + 1))
    counts = torch.bincount(patterns.flatten(), minlength=rows * (n_bins + 1)).view(rows, n_bins + 1)[:, :n_bins]
    running = counts.cumsum(dim=1)  # [rows, pattern]
    n_valid = running[:, -1]
    middle = torch.div(n_valid - 1, 2, rounding_mode="floor") + 1  # entries up to the lower median
    pattern = torch.searchsorted(running, middle[:, None].clamp_min(1)).squeeze(1).clamp_max(n_bins - 1)
    median = pattern.to(torch.int16).view(x.dtype).float()
    return torch.where(n_valid > 0, median, torch.full_like(median, float("nan"))).reshape(shape)


_TOP_COLUMNS = ["sample", "layer", "position", "token_kind", "dim", "value", "rms_value",
                "ratio_to_median", "rank"]


def top_activations(states: torch.Tensor, token_kinds, k: int = 3, sample_ids: Sequence | None = None,
                    layer: int | None = None, median_over: str = "sample", eps: float = 1e-6,
                    criterion: MassiveCriterion | None = None) -> pd.DataFrame:
    """The k largest |activations| of each sample at one layer, as a tidy frame.

    states: [batch, token, dim] residual states entering one layer (raw units).
    token_kinds: [batch, token] long kind codes (or a TokenKinds); pad tokens are never counted,
      neither as candidates nor in the median.
    sample_ids: names for the batch rows (default 0..batch-1); layer: written to a `layer` column
      (omitted when None).
    median_over: "sample" (default: the median |x| of that sample's real tokens at this layer, so
      results do not depend on how samples are batched) or "batch" (pooled over the batch).
    criterion: when given, adds a bool `massive` column.
    Columns: sample, [layer,] position, token_kind (name), dim, value (signed raw), rms_value
      (value / token RMS), ratio_to_median (|value| / median |x|), rank (1 = largest per sample).
    """
    if states.dim() != 3:
        raise ValueError(f"states must be [batch, token, dim], got shape {tuple(states.shape)}")
    if median_over not in ("sample", "batch"):
        raise ValueError(f"median_over must be 'sample' or 'batch', got {median_over!r}")
    kinds = _kind_codes(token_kinds).to(states.device)
    if kinds.shape != states.shape[:2]:
        raise ValueError(f"token_kinds shape {tuple(kinds.shape)} does not match states {tuple(states.shape[:2])}")
    batch, n_tok, dim = states.shape
    sample_ids = list(range(batch)) if sample_ids is None else list(sample_ids)
    if len(sample_ids) != batch:
        raise ValueError(f"{len(sample_ids)} sample_ids for a batch of {batch}")
    real = kinds != PAD
    x = states.float()
    rms = torch.sqrt(x.pow(2).mean(dim=-1) + eps)  # [batch, token]
    batch_median = _median_abs(x, real) if median_over == "batch" else None
    rows = []
    for b in range(batch):
        n_real = int(real[b].sum())
        if n_real == 0:
            continue
        median = batch_median if batch_median is not None else _median_abs(x[b:b + 1], real[b:b + 1])
        mags = x[b].abs().masked_fill(~real[b, :, None], -1.0).reshape(-1)
        kk = min(k, n_real * dim)
        top = mags.topk(kk)
        for rank, flat in enumerate(top.indices.tolist(), start=1):
            pos, d = divmod(flat, dim)
            value = float(x[b, pos, d])
            row = {
                "sample": sample_ids[b], "layer": layer, "position": pos,
                "token_kind": KIND_NAMES.get(int(kinds[b, pos]), str(int(kinds[b, pos]))),
                "dim": d, "value": value, "rms_value": value / float(rms[b, pos]),
                "ratio_to_median": abs(value) / max(float(median), 1e-12), "rank": rank,
            }
            if criterion is not None:
                row["massive"] = bool(criterion(torch.tensor(value), median))
            rows.append(row)
    columns = list(_TOP_COLUMNS) + (["massive"] if criterion is not None else [])
    frame = pd.DataFrame(rows, columns=columns)
    if layer is None:
        frame = frame.drop(columns="layer")
    return frame


def sample_magnitudes(states: torch.Tensor, token_kinds=None, k: int = 3, sample_ids: Sequence | None = None,
                      layer: int | None = None) -> pd.DataFrame:
    """Top-k and median |activation| of each sample at one layer (streams: one row per sample).

    states: [batch, token, dim] raw residual states; token_kinds: [batch, token] codes (or
    TokenKinds), pad ignored; None = all real. Columns: sample, [layer,] top1..topk, median;
    NaN where a sample has fewer than k real values.
    """
    batch, n_tok, _ = states.shape
    sample_ids = list(range(batch)) if sample_ids is None else list(sample_ids)
    if token_kinds is None:
        real = torch.ones(batch, n_tok, dtype=torch.bool, device=states.device)
    else:
        real = _kind_codes(token_kinds).to(states.device) != PAD
    rows = []
    for b, sid in enumerate(sample_ids):
        mags = states[b].float().abs()[real[b]].reshape(-1)
        if mags.numel() == 0:
            continue
        t = mags.topk(min(k, mags.numel())).values.tolist() + [float("nan")] * max(0, k - mags.numel())
        row = {"sample": sid} if layer is None else {"sample": sid, "layer": layer}
        row.update({f"top{i + 1}": t[i] for i in range(k)})
        row["median"] = float(mags.median())
        rows.append(row)
    cols = ["sample"] + ([] if layer is None else ["layer"]) + [f"top{i + 1}" for i in range(k)] + ["median"]
    return pd.DataFrame(rows, columns=cols)


def layer_magnitude_profile(states: torch.Tensor, token_kinds=None, k: int = 3,
                            layer_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """Top-k and median |activation| per layer (Sun et al.'s classic per-layer plot).

    states: [layer, batch, token, dim] or one layer [batch, token, dim] (raw units).
    token_kinds: [batch, token] kind codes (or TokenKinds); pad tokens are ignored. None = all real.
    For each layer and sample the k largest |x| over (token, dim) and the median |x| are taken
    (`sample_magnitudes`), then averaged over samples. Returns columns layer, top1..topk, median,
    n_samples.
    """
    if states.dim() == 3:
        states = states[None]
    if states.dim() != 4:
        raise ValueError(f"states must be [layer, batch, token, dim] or [batch, token, dim], got {tuple(states.shape)}")
    layer_ids = list(range(states.shape[0])) if layer_ids is None else list(layer_ids)
    if len(layer_ids) != states.shape[0]:
        raise ValueError(f"{len(layer_ids)} layer_ids for {states.shape[0]} layers")
    cols = [f"top{i + 1}" for i in range(k)] + ["median"]
    rows = []
    for li, layer in enumerate(layer_ids):
        per_sample = sample_magnitudes(states[li], token_kinds, k)
        row = {"layer": layer, **{c: float(per_sample[c].mean()) if len(per_sample) else float("nan") for c in cols}}
        row["n_samples"] = len(per_sample)
        rows.append(row)
    return pd.DataFrame(rows, columns=["layer"] + cols + ["n_samples"])


# ---------------------------------------------------------------------------------------
# sink dimensions
# ---------------------------------------------------------------------------------------

_SUPPORT_COLUMNS = ["layer", "dim", "fraction_of_samples", "median_rms_value", "massive", "threshold",
                    "ratio_to_median"]


def _empty_support() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
        _SUPPORT_COLUMNS, ["int64", "int64", "float64", "float64", "bool", "float64", "float64"])})


def _json_float(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


@dataclass
class SinkDims:
    """Sink dimensions and how they were found.

    dims: sorted feature dims. method: "auto-gap", "threshold" or "pinned". threshold: the
    |rms_value| threshold used (median over layers for the per-layer auto rule; NaN if none).
    support: one row per (layer, candidate dim): layer, dim, fraction_of_samples (share of
      samples whose BOS |rms_value| reaches the layer threshold), median_rms_value (median over
      samples of |rms_value|), massive (fraction >= min_sample_fraction), threshold (that
      layer's), ratio_to_median (median_rms_value / the layer's median |rms_value|).
    reason: one sentence on why these dims (or why none).
    """

    dims: list[int]
    method: str
    threshold: float = float("nan")
    support: pd.DataFrame = field(default_factory=_empty_support)
    reason: str = ""
    layers: list[int] = field(default_factory=list)
    n_samples: int = 0

    def references(self) -> dict:
        return {name: {"dims": list(ref), "shared": sorted(set(ref) & set(self.dims))}
                for name, ref in PUBLISHED_SINK_DIMS.items()}

    def to_dict(self) -> dict:
        """JSON-ready dict: dims, how found, per-layer support, known references."""
        sup = self.support
        if len(sup):
            if self.dims:
                sup = sup[sup["dim"].isin(self.dims)]
            else:  # nothing found: show how close the best candidates came, two per layer
                sup = sup.sort_values(["layer", "median_rms_value"], ascending=[True, False]).groupby("layer").head(2)
        per_layer = [{k: (_json_float(v) if isinstance(v, float) else (bool(v) if isinstance(v, bool) else int(v)))
                      for k, v in rec.items()} for rec in sup.to_dict("records")]
        return {
            "dims": [int(d) for d in self.dims], "method": self.method,
            "threshold": _json_float(float(self.threshold)), "reason": self.reason,
            "layers": [int(x) for x in self.layers], "n_samples": int(self.n_samples),
            "per_layer_support": per_layer, "references": self.references(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "SinkDims":
        support = pd.DataFrame(d.get("per_layer_support") or [])
        if support.empty:
            support = _empty_support()
        thr = d.get("threshold")
        return cls(dims=[int(x) for x in d["dims"]], method=d.get("method", "loaded"),
                   threshold=float("nan") if thr is None else float(thr), support=support,
                   reason=d.get("reason", ""), layers=list(d.get("layers", [])), n_samples=int(d.get("n_samples", 0)))

    @classmethod
    def from_json(cls, text: str) -> "SinkDims":
        return cls.from_dict(json.loads(text))


def pinned_sink_dims(dims: Sequence[int], reason: str = "pinned by the user",
                     hidden_size: int | None = None) -> SinkDims:
    """SinkDims with method "pinned" (e.g. `PUBLISHED_SINK_DIMS[...]` or dims from another run).

    Raises ValueError for negative dims or dims >= hidden_size (when given).
    """
    out = sorted({int(d) for d in dims})
    bad = [d for d in out if d < 0 or (hidden_size is not None and d >= hidden_size)]
    if bad:
        raise ValueError(f"pinned sink dims {bad} are outside [0, {hidden_size if hidden_size else 'hidden_size'})")
    return SinkDims(dims=out, method="pinned", reason=reason)


def discover_sink_dims(bos_states: torch.Tensor, start_layer: int = 2, layers: Sequence[int] | None = None,
                       min_layer_fraction: float = 0.5, min_sample_fraction: float = 0.9,
                       threshold: float | None = None, min_ratio: float = 5.0, top_window: int = 16,
                       min_gap: float = 2.0, min_rms_value: float = 1.0, eps: float = 1e-6) -> SinkDims:
    """Dims where the BOS token's RMS-normalised state is massive across samples and layers.

    bos_states: [n_samples, n_layers, dim] raw residual state of BOS entering each layer
      ([n_layers, dim] for one sample).
    layers: layer indices to consider (default: start_layer .. n_layers-1; the first layers have
      no sinks yet).
    Rule, on |rms_value| = |x_d / RMS(x)| (scale-free, <= sqrt(dim)):
      - threshold=None ("auto-gap"), per layer: sort the median-over-samples |rms_value| of all
        dims, take the top `top_window`, find the largest multiplicative gap between neighbours;
        the layer threshold is the geometric middle of that gap, raised to at least `min_ratio` x
        the layer's median |rms_value| (over samples and dims) and to at least `min_rms_value`
        (the squares of rms_values average 1, so a dim below the token's RMS is not massive, however
        consistent: when two massive dims dominate BOS, its other dims all sit far below 1 and
        the largest gap can fall between two of them). A layer whose largest gap is below
        `min_gap` has no massive dim.
      - threshold=float ("threshold"): that fixed |rms_value| threshold in every layer.
      A (layer, dim) is massive if at least `min_sample_fraction` of samples reach the layer
      threshold; a dim is a sink dim if massive in at least `min_layer_fraction` of the layers.
    Never raises for lack of sink dims: returns empty dims with a `reason`.
    """
    if bos_states.dim() == 2:
        bos_states = bos_states[None]
    if bos_states.dim() != 3:
        raise ValueError(f"bos_states must be [n_samples, n_layers, dim], got {tuple(bos_states.shape)}")
    n_samples, n_layers, dim = bos_states.shape
    layers = list(range(start_layer, n_layers)) if layers is None else [int(x) for x in layers]
    method = "auto-gap" if threshold is None else "threshold"
    if n_samples == 0 or not layers:
        why = "no samples" if n_samples == 0 else f"no layers to consider (start_layer={start_layer}, n_layers={n_layers})"
        return SinkDims([], method, reason=f"no sink dims: {why}", layers=layers, n_samples=n_samples)
    if threshold is not None and not threshold > 0:
        raise ValueError(f"threshold must be > 0 (units of the token RMS), got {threshold}")

    x = rms_normalize(bos_states[:, layers], eps).abs()  # [S, L, D]
    n_l = len(layers)
    med = x.median(dim=0).values  # [L, D] median over samples
    layer_median = x.permute(1, 0, 2).reshape(n_l, -1).median(dim=1).values.clamp_min(1e-12)  # [L]
    window = min(top_window, dim)
    top_vals, top_idx = med.topk(window, dim=1)  # [L, W] descending
    thresholds = torch.full((n_l,), float("inf"))
    best_gaps = torch.ones(n_l)
    if threshold is not None:
        thresholds[:] = float(threshold)
    elif window >= 2:
        gaps = top_vals[:, :-1] / top_vals[:, 1:].clamp_min(1e-12)  # [L, W-1]
        best_gaps, at = gaps.max(dim=1)
        for li in range(n_l):
            if best_gaps[li] >= min_gap:
                i = int(at[li])
                cut = math.sqrt(float(top_vals[li, i]) * float(top_vals[li, i + 1]))
                thresholds[li] = max(cut, min_ratio * float(layer_median[li]), min_rms_value)
    reach = x >= thresholds[None, :, None]  # [S, L, D]
    fraction = reach.float().mean(dim=0)  # [L, D]
    massive = fraction >= min_sample_fraction
    layer_share = massive.float().mean(dim=0)  # [D]
    dims = [int(d) for d in torch.nonzero(layer_share >= min_layer_fraction).flatten()]

    candidates = sorted(set(top_idx.flatten().tolist()) | set(dims) | set(torch.nonzero(massive.any(0)).flatten().tolist()))
    cand = torch.tensor(candidates, dtype=torch.long)
    rows = {
        "layer": [layers[li] for li in range(n_l) for _ in candidates],
        "dim": candidates * n_l,
        "fraction_of_samples": fraction[:, cand].reshape(-1).tolist(),
        "median_rms_value": med[:, cand].reshape(-1).tolist(),
        "massive": massive[:, cand].reshape(-1).tolist(),
        "threshold": thresholds[:, None].expand(n_l, len(candidates)).reshape(-1).tolist(),
        "ratio_to_median": (med[:, cand] / layer_median[:, None]).reshape(-1).tolist(),
    }
    support = pd.DataFrame(rows, columns=_SUPPORT_COLUMNS)
    finite = thresholds[torch.isfinite(thresholds)]
    thr_summary = float(finite.median()) if finite.numel() else float("nan")
    scope = f"layers {layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else f"layers {layers}"
    rule = (f"|x_d/RMS(x)| of BOS above the largest gap (>= x{min_gap:g}) among the top {window} per-layer medians "
            f"and >= {min_ratio:g}x the layer median (and >= {min_rms_value:g})" if threshold is None else f"|x_d/RMS(x)| of BOS >= {threshold:g}")
    if dims:
        reason = (f"found {dims}: {rule}, in >= {min_sample_fraction:.0%} of {n_samples} samples and "
                  f">= {min_layer_fraction:.0%} of {scope}")
    else:
        best = int(layer_share.argmax())
        if threshold is None and not bool((best_gaps >= min_gap).any()):
            detail = (f"no layer shows a gap of x{min_gap:g} among its top {window} dims "
                      f"(largest x{float(best_gaps.max()):.2f})")
        else:
            detail = (f"best candidate dim {best} is massive in {float(layer_share[best]):.0%} of layers "
                      f"(needs {min_layer_fraction:.0%})")
        reason = f"no sink dims: {detail}; rule: {rule}, {scope}, {n_samples} samples"
    return SinkDims(dims=dims, method=method, threshold=thr_summary, support=support, reason=reason,
                    layers=layers, n_samples=n_samples)
