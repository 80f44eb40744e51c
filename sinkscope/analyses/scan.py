"""`sinkscope scan`: massive activations, sink dimensions, sink tokens, head scores.

Three passes, all streaming (nothing grows with the number of samples but the tables):
  1. calibration, residual only, on the first `calibration` samples: the BOS token's state
     per layer -> sink dimensions (discovered, or pinned by the user);
  2. calibration again: phi of every token -> the sink threshold tau (given, the paper's 20
     when the model is wide enough, or the gap rule for small models);
  3. every sample: per layer, top activations, phi, sink tokens, attention each token receives
     from the text queries after the image, and per-head visual attention ratios.

Writes: run.json, massive_activations.csv, layer_magnitudes.csv, sink_dims.json,
sink_tokens.csv, token_stats.csv, head_scores.csv, dim_profile.csv, figures, index.md.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.common import (BLOCK_BYTES, KEEP_BYTES, AnalysisConfig, DeviceCopies,  # noqa: F401 (re-exported)
                                       KeptLayers, layer_blocks, open_calibration, prepare_batch, prepare_readable,
                                       query_row_span, report_step_config, text_queries_after_image)
from sinkscope.analyses.step_findings import bootstrap_mean_ci, run_meta
from sinkscope.eval.data import load_data
from sinkscope.calibration import Calibration
from sinkscope.eval.tasks import Sample, batches, progress, request_groups  # noqa: F401  (batches, progress re-exported)
from sinkscope.measures import heads as head_measures
from sinkscope.measures import by_class, massive, sinks
from sinkscope.errors import SinkscopeError
from sinkscope.findings import NOTHING_TO_TEST, Estimate, Finding, num
from sinkscope.models.base import KIND_NAMES, ModelAdapter
from sinkscope.launcher import parse_shard
from sinkscope.runconfig import resolve_sink_score
from sinkscope.runfolder import RunFolder, check_resumable
from sinkscope.trace import BatchInfo, Tracer


@dataclass
class ScanConfig(AnalysisConfig):
    """The run's settings (`RunConfig`, via AnalysisConfig) and the scan's own."""

    top_k: int = 5
    rho: float = 0.5
    summ: float = 0.2
    token_stats: str = "auto"  # all | sinks | auto (all while the table stays under ~2M rows)

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.rho <= 1:
            raise SinkscopeError(f"--rho must be in [0, 1]; got {self.rho}")
        if not 0 <= self.summ <= 1:
            raise SinkscopeError(f"--summ must be in [0, 1]; got {self.summ}")
        if self.token_stats not in ("all", "sinks", "auto"):
            raise SinkscopeError(f"--token-stats must be all, sinks or auto; got {self.token_stats!r}")
        if self.top_k < 1:
            raise SinkscopeError(f"--top-k must be >= 1; got {self.top_k}")


# ----------------------------------------------------------------------------- helpers


class ScanLayerReduction:
    """The scan's per-layer reductions, torch only: they run inside the trace (also remotely) and return
    what the tables need, never a [head, query, key] map.

    residual -> phi [batch, token]; the top_k |x| of each sample (value, position, dim, token RMS) and
    its median |x|; the top 3 |x|; with `profile`, sample 0's RMS-normalised rows ([dim]) of BOS, the
    highest-phi image token and the median text token.
    attention -> attention each token receives from the text queries after the image (mean over heads)
    [batch, token]; per head, the query-averaged image attention, visual-sink attention, visual non-sink
    ratio and image-centric share [batch, head].

    Every measure is computed for a block of layers at once ([batch, layer, ...]); the two ways to run:
    - per layer (`defer=False`, what a remote trace runs): each call reduces its own layer and returns its
      payload, moved to the CPU when `host` (what the remote trace sends back);
    - deferred (`defer=True`, the local scan): a call keeps the layer's residual state and the query rows of
      its attention (one copy each) and returns None; `finish()` then reduces the kept layers in blocks of
      layers after the forward and returns every payload, moved to the CPU once per block when `host` (one
      copy per measure and block, not per layer). The per-layer work in the forward is then two copies,
      instead of ~90 operations, for a GPU whose batch-1 forward waits on launches.
    Neither reads a device value back: the token kinds are known on the host (`kinds` is a CPU TokenKinds), so
    every choice that depends on them (which rows of a sample are real, where its BOS is, which rows are
    queries) is made here, in Python.
    block_bytes: the largest float32 block (layers x batch x tokens x width, or x heads x query rows x keys)
    `finish()` reduces at once. keep_bytes: what the deferred layers may hold before they are reduced during the
    forward (`KeptLayers`; a long text-only prompt keeps whole attention maps).
    asynchronous: copies from a CUDA device to the host are queued (`non_blocking`) and `copied` holds an event per
    device recorded after them; whoever reads the payloads waits for them first (`ScanReducer.build`). The host can
    then do other work (the previous batch's tables) while the device runs the reductions and the copies.
    """

    def __init__(self, dims, tau, top_k, rho, summ, eps, score, kinds, queries, profile: bool, host: bool = True,
                 defer: bool = False, block_bytes: int = BLOCK_BYTES, asynchronous: bool = False,
                 keep_bytes: int = KEEP_BYTES):
        self.dims, self.tau, self.top_k, self.rho, self.summ, self.eps = dims, tau, top_k, rho, summ, eps
        self.score, self.kinds, self.queries, self.profile, self.host = score, kinds, queries, profile, host
        self.defer, self.block_bytes, self.asynchronous = defer, block_bytes, asynchronous
        self.copied: list = []  # events recorded after queued copies (asynchronous, CUDA only)
        self._queued: set = set()  # devices with copies queued since the last event
        self.phi: dict = {}
        self._store = KeptLayers(self._reduce_kept, keep_bytes)
        kinds = kinds.to("cpu")
        self.bos_position = _first(kinds.bos_mask[0])
        self.has_visual = bool(kinds.visual_mask[0].any())
        self.text_positions = torch.nonzero(kinds.text_mask[0]).flatten()
        self.query_rows = query_row_span(queries)
        self._copies = DeviceCopies({"kinds": self.kinds, "queries": self.queries,
                                     "text_positions": self.text_positions}, dims)

    def _device(self, device):
        """(kinds, queries, text positions of row 0) on `device`, copied there once per batch."""
        there = self._copies.on(device)
        return there["kinds"], there["queries"], there["text_positions"]

    def _dims_on(self, states: torch.Tensor):
        """The sink dims as an index on the states' device (checked against their width), made once per batch;
        the list itself when there are none."""
        return self._copies.on(states.device, states)["dims"]

    def _out(self, out: dict) -> dict:
        if not self.host:
            return out
        moved = {}
        for k, v in out.items():
            if self.asynchronous and v.device.type == "cuda":
                moved[k] = v.to("cpu", non_blocking=True)  # pinned host memory, valid once the copy event has passed
                self._queued.add(v.device)
            else:
                moved[k] = v.cpu()
        return moved

    def _record_copies(self) -> None:
        for device in self._queued:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self.copied.append(event)
        self._queued.clear()

    # -- the two ways to run -----------------------------------------------------------
    def residual(self, layer, states):
        if self.defer:
            self._store.keep("residual", layer, states.detach())
            return None
        block = self._residual_block(states.detach()[:, None])
        self.phi[layer] = block["phi"][:, 0]
        return self._out(layer_of(block, 0))

    def attention(self, layer, probs):
        first, stop = self.query_rows
        if self.defer:
            self._store.keep("attention", layer, probs.detach()[:, :, first:stop])
            return None
        phi = self.phi[layer].to(probs.device)[:, None]  # phi: where the layer input was
        return self._out(layer_of(self._attention_block(probs.detach()[:, None, :, first:stop], phi), 0))

    def finish(self) -> list[tuple[str, list[int], dict]]:
        """The kept layers' payloads as blocks (kind, layers, payload [batch, layer, ...]; profile rows [layer,
        ...]), reduced in blocks of layers, never split per layer (`layer_of` gives one), moved to the host once per
        block and measure; empties the store."""
        out = [(kind, layers, self._out(block)) for kind, layers, block in self._store.drain()]
        self._record_copies()
        return out

    def _reduce_kept(self, kept: dict) -> list[tuple[str, list[int], dict]]:
        """What `kept` holds, reduced in blocks where it is (popped from it): residual blocks, then attention."""
        out = []
        layers = sorted(kept["residual"])
        phi = {}  # block of layers -> phi [batch, layer, token] where the states were, for the attention blocks
        for block_layers in layer_blocks(layers, kept["residual"], self.block_bytes):
            block = self._residual_block(torch.stack([kept["residual"].pop(l) for l in block_layers], dim=1))
            phi[tuple(block_layers)] = block["phi"]
            out.append(("residual", block_layers, block))
        layers = sorted(kept["attention"])
        for block_layers in layer_blocks(layers, kept["attention"], self.block_bytes):
            probs = torch.stack([kept["attention"].pop(l) for l in block_layers], dim=1)
            block_phi = phi.get(tuple(block_layers))  # the residual blocks are the same when both kinds were kept
            if block_phi is None:
                by_layer = {l: p[:, i] for ls, p in phi.items() for i, l in enumerate(ls)}
                block_phi = torch.stack([by_layer[l].to(probs.device) for l in block_layers], dim=1)
            out.append(("attention", block_layers, self._attention_block(probs, block_phi.to(probs.device))))
        return out

    # -- the measures, on a block of layers ----------------------------------------------
    def _residual_block(self, states: torch.Tensor) -> dict:
        """states [batch, layer, token, dim] -> payload tensors [batch, layer, ...] (profile ones [layer, ...])."""
        x = states.float()
        kinds, _, text_positions = self._device(x.device)
        dims = self._dims_on(x)
        real = kinds.real_mask
        batch, n_layers, n_tok, dim = x.shape
        rms = torch.sqrt(x.pow(2).mean(dim=-1) + self.eps)  # [batch, layer, token]
        padding = ~real[:, None, :, None]
        mags = x.abs().masked_fill(padding, -1.0).reshape(batch, n_layers, -1)  # -1 only on padding
        top = mags.topk(min(self.top_k, n_tok * dim), dim=-1)
        position = torch.div(top.indices, dim, rounding_mode="floor")
        k3 = mags.topk(min(3, n_tok * dim), dim=-1).values
        median = massive.row_median_abs(states, real[:, None, :, None], row_dims=2)  # [batch, layer], real tokens
        phi = sinks.sink_score(states, dims, self.score, real, self.eps).float()  # [batch, layer, token]
        out = {"phi": phi, "top_value": x.reshape(batch, n_layers, -1).gather(-1, top.indices),
               "top_position": position, "top_dim": top.indices % dim, "top_rms": rms.gather(-1, position),
               "top3": k3, "median": median, "n_real": real.sum(dim=1)[:, None].expand(batch, n_layers)}
        if self.profile:
            normed = massive.rms_normalize(x[0], self.eps)  # [layer, token, dim]
            if self.bos_position is not None:
                out["profile_bos"] = normed[:, self.bos_position]
            if self.has_visual:
                pos = torch.where(kinds.visual_mask[0], phi[0], torch.full_like(phi[0], -1.0)).argmax(dim=-1)
                out["profile_visual"] = normed[torch.arange(n_layers, device=x.device), pos]
                out["profile_visual_position"] = pos
            if text_positions.numel():
                out["profile_text_median"] = normed.index_select(1, text_positions).median(dim=1).values
        return out

    def _attention_block(self, probs: torch.Tensor, phi: torch.Tensor) -> dict:
        """probs [batch, layer, head, query row, key] (the rows `query_rows`), phi [batch, layer, key] ->
        payload tensors [batch, layer, ...]."""
        probs = probs.float()
        kinds, queries, _ = self._device(probs.device)
        first, stop = self.query_rows
        queries = queries[:, first:stop]  # [batch, query row]
        sink = (phi >= self.tau) & kinds.real_mask[:, None, :]  # [batch, layer, key]
        return head_measures.query_averaged_head_measures(probs, kinds.visual_mask, sink, queries, self.rho, self.summ)


def layer_of(block: dict, i: int) -> dict:
    """Layer i's payload from a block's: [batch, layer, ...] -> [batch, ...]; profile rows [layer, ...] -> [...]."""
    return {k: (v[i] if k.startswith("profile") else v[:, i]) for k, v in block.items()}


def block_of(payload: dict) -> dict:
    """One layer's payload as a block of one layer (the inverse of `layer_of(block, 0)`)."""
    return {k: (v[None] if k.startswith("profile") else v[:, None]) for k, v in payload.items()}


def joined(chunks: list[tuple[list[int], dict]]) -> tuple[list[int], dict]:
    """Blocks of layers (layers, payload) joined along the layer dim, in the order given."""
    if len(chunks) == 1:
        return chunks[0]
    layers = [layer for block_layers, _ in chunks for layer in block_layers]
    return layers, {k: torch.cat([block[k] for _, block in chunks], dim=0 if k.startswith("profile") else 1)
                    for k in chunks[0][1]}


def _first(mask_row: torch.Tensor) -> int | None:
    where = torch.nonzero(mask_row).flatten().tolist()
    return where[0] if where else None


MASSIVE_COLUMNS = ("sample", "layer", "position", "token_kind", "dim", "value", "rms_value", "ratio_to_median", "rank")
MAGNITUDE_COLUMNS = ("sample", "layer", "top1", "top2", "top3", "median")


TOP_VISUAL = 8  # image tokens per sample and layer kept in token_stats besides BOS and sinks (--token-stats sinks)


@dataclass(frozen=True)
class _Classes:
    """Classes of a batch's tokens: names [class] (sorted), member [class, batch, token] bools."""

    names: np.ndarray
    member: torch.Tensor


def _rank_in_image(image_index: torch.Tensor) -> torch.Tensor:
    """[batch, token] image index (-1: not an image token) -> each image token's rank among its image's tokens
    (0, 1, ... in position order), -1 elsewhere."""
    n_images = int(image_index.max()) + 1 if image_index.numel() else 0
    if n_images <= 0:
        return torch.full_like(image_index, -1)
    one_hot = torch.nn.functional.one_hot(image_index.clamp(min=0), n_images) * (image_index >= 0)[..., None]
    earlier = one_hot.cumsum(dim=1) - one_hot  # [batch, token, image]: that image's tokens before this one
    rank = earlier.gather(2, image_index.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(image_index >= 0, rank, -1)


def _on_background(static: dict, samples: list[Sample]) -> np.ndarray:
    """Per real token of the batch (static columns' order): whether an image token lies on a background patch,
    from the demo world's ground truth (`meta["background_patches"]`, indexed by rank in the image); None where
    unknown (text tokens, samples without a mask, ranks past the mask)."""
    values = np.full(len(static["sample"]), None, dtype=object)
    sample_column = np.asarray(static["sample"], dtype=object)
    rank = static["visual_rank"]
    for s in samples:
        mask = s.meta.get("background_patches")
        if mask is None:
            continue
        mask = np.asarray(mask, dtype=bool)
        rows = np.flatnonzero((sample_column == s.sample_id) & (rank >= 0) & (rank < len(mask)))
        values[rows] = mask[rank[rows]].tolist()  # Python bools, as the table has always held
    return values


class ScanReducer:
    """Per-layer measures of one batch, streamed; its tables (`head_rows`, `massive_rows`, `magnitude_rows`,
    `count_rows`, `role_rows`: lists of frames, and the token rows: `token_rows`, `token_table`, `sink_table`) are
    built once the forward has ended.

    Run here, a layer costs two copies during the trace (its state and the query rows of its attention,
    `ScanLayerReduction(defer=True)`); `end()` reduces the kept layers in blocks, brings each block's payload to
    the CPU at once and makes rows, strings and pandas in one vectorised pass per table, so nothing between a layer
    and the next waits for the device. Run remotely, the payloads arrive per layer through `take`.

    tables_later: `end()` only queues the reductions and their copies to the host (asynchronous on CUDA) and
    returns; `build()` waits for the copies and makes the tables. `run_scan` builds a batch's tables while the
    device runs the next batch's forward.
    """

    def __init__(self, dims: list[int], tau: float, top_k: int, rho: float, summ: float, eps: float,
                 samples: list[Sample], want_profile: bool, token_strings=None, score: str = "rms",
                 tables_later: bool = False):
        self.tables_later = tables_later
        self._copies: list = []  # events of queued device-to-host copies, waited for in build()
        self.dims, self.tau, self.top_k, self.rho, self.summ, self.eps = dims, tau, top_k, rho, summ, eps
        self.score = score
        self.samples = samples
        self.want_profile = want_profile
        self.massive_rows: list[pd.DataFrame] = []
        self.magnitude_rows: list[pd.DataFrame] = []
        self.head_rows: list[pd.DataFrame] = []
        self.count_rows: list[pd.DataFrame] = []  # per (sample, layer, token kind): counts and sums
        self.role_rows: list[pd.DataFrame] = []  # per (sample, layer, role): phi quantiles
        self._token_blocks: list[tuple[list[int], dict]] = []  # per end(): layers, [layer, batch, token] tensors
        self._token_frames: list[pd.DataFrame] | None = None
        self.profile: dict[int, dict] = {}
        self._payloads: dict[str, list[tuple[list[int], dict]]] = {"residual": [], "attention": []}  # blocks
        self.token_strings = token_strings  # callable: [batch, token] ids -> decoded strings

    def begin(self, info: BatchInfo):
        self.info = info
        self.kinds = info.token_kinds
        self.real = self.kinds.real_mask
        # tables give positions among the row's real tokens (BOS = 0), not in the padded batch,
        # so a sample's rows do not depend on which samples it was batched with
        self.real_pos = self.real.long().cumsum(dim=1) - 1
        self.queries = text_queries_after_image(info)
        self.sample_ids = info.sample_ids
        self._payloads = {"residual": [], "attention": []}
        self._local = None  # this batch's in-trace part, when the trace runs here

    def in_trace(self, host: bool = True, defer: bool = False, asynchronous: bool = False) -> ScanLayerReduction:
        return ScanLayerReduction(self.dims, self.tau, self.top_k, self.rho, self.summ, self.eps, self.score,
                                  self.kinds, self.queries, self.want_profile, host=host, defer=defer,
                                  asynchronous=asynchronous)

    def residual(self, layer: int, states: torch.Tensor):
        if getattr(self, "_local", None) is None:  # kept per layer, reduced (and sent to the host) after the forward
            self._local = self.in_trace(defer=True, asynchronous=self.tables_later)
        self._local.residual(layer, states)

    def attention(self, layer: int, probs: torch.Tensor):
        self._local.attention(layer, probs)

    def take(self, kind: str, layer: int, payload: dict) -> None:
        """Keep one layer's reductions (ScanLayerReduction), sent by a remote trace; tables in `end()`."""
        if kind in self._payloads:
            self._payloads[kind].append(([layer], block_of(payload)))

    def _profile_entry(self, p: dict) -> dict:
        entry = {"bos": p["profile_bos"]}
        if "profile_visual" in p:
            pos = int(p["profile_visual_position"])
            entry.update(visual=p["profile_visual"], visual_position=int(self.real_pos[0, pos]),
                         visual_phi=float(p["phi"][0, pos]))
        if "profile_text_median" in p:
            entry["text_median"] = p["profile_text_median"]
        return entry

    def end(self):
        """Reduce what the local trace kept (in blocks of layers, brought to the CPU once per block: the only waits
        for the device in a batch) and build the batch's tables (unless `tables_later`: then `build()` does)."""
        if getattr(self, "_local", None) is not None:
            for kind, layers, block in self._local.finish():
                self._payloads[kind].append((layers, block))
            self._copies += self._local.copied
            self._local = None
        if not self.tables_later:
            self.build()

    def build(self):
        """The batch's tables (layer order as traced, then sample, then rank) from the payloads `end()` collected,
        once their copies to the host have arrived. Every payload is on the CPU here, local or remote. A second
        call finds nothing new and does nothing."""
        for event in self._copies:
            event.synchronize()
        self._copies = []
        if not any(self._payloads.values()):
            return
        self._sample_columns()
        phi_at, phi = {}, None  # layer -> its index in the residual block, and that block's phi
        if self._payloads["residual"]:
            layers, block = joined(self._payloads["residual"])
            if self.want_profile and "profile_bos" in block:
                self.profile.update({layer: self._profile_entry(layer_of(block, i)) for i, layer in enumerate(layers)})
            self._residual_tables(layers, block)
            phi_at = {layer: i for i, layer in enumerate(layers)}
            phi = block["phi"]
        if self._payloads["attention"]:
            layers, block = joined(self._payloads["attention"])
            at = [phi_at[layer] for layer in layers]
            at_phi = phi if at == list(range(phi.shape[1])) else phi[:, at]  # [batch, layer, token]
            self._token_summaries(layers, block, at_phi)
            self.head_rows.append(self._head_table(layers, block))
        self._payloads = {"residual": [], "attention": []}

    def _sample_columns(self) -> None:
        """The columns of a layer's token rows that no layer changes (sample, positions, kinds, roles, strings),
        one row per real token in (sample, position) order."""
        strings = self.token_strings(self.info.input_ids) if self.token_strings else None
        kind_codes = self.kinds.kind.tolist()
        columns: dict[str, list] = {name: [] for name in ("sample", "token_kind", "role", "token")}
        for b, sid in enumerate(self.sample_ids):
            pos = torch.nonzero(self.real[b]).flatten().tolist()
            names = [KIND_NAMES[kind_codes[b][p]] for p in pos]
            text = [strings[b][p] if strings and name != "visual" else "" for name, p in zip(names, pos)]
            columns["sample"] += [sid] * len(pos)
            columns["token_kind"] += names
            columns["role"] += sinks.token_roles(names, text)
            columns["token"] += text
        image_index = self.kinds.image_index
        visual_rank = _rank_in_image(image_index)
        self._static = {**columns, "position": self.real_pos[self.real].numpy(),
                        "image_index": image_index[self.real].numpy(), "visual_rank": visual_rank[self.real].numpy()}
        self._static["on_background"] = _on_background(self._static, self.samples)
        self._text = {name: pd.Series(columns[name]).array for name in columns}  # pandas arrays, made once
        self._static_row = torch.full(self.real.shape, -1, dtype=torch.long)  # [batch, token] -> static row
        self._static_row[self.real] = torch.arange(int(self.real.sum()))
        self._sample_order = np.argsort(np.asarray(self.sample_ids), kind="stable")  # sorted ids, as tables list them

    def _residual_tables(self, layers: list[int], block: dict) -> None:
        """massive_rows: per (layer, sample, rank) the top_k |activations|; magnitude_rows: per (layer, sample)
        the top 3 and the median |activation|. Samples without real tokens get no rows. One vectorised pass over
        every layer of the batch (rows in layer, sample, rank order). block: [batch, layer, ...] payloads."""
        keep = [b for b, n in enumerate(block["n_real"][:, 0].tolist()) if n > 0]  # the same in every layer
        if not keep:
            self.massive_rows.append(pd.DataFrame(columns=list(MASSIVE_COLUMNS)))
            self.magnitude_rows.append(pd.DataFrame(columns=list(MAGNITUDE_COLUMNS)))
            return
        rows = torch.tensor(keep, dtype=torch.long)

        def stacked(key: str) -> torch.Tensor:  # [layer, kept sample, ...]
            return block[key].index_select(0, rows).transpose(0, 1)

        top_position = stacked("top_position")  # [layer, sample, k]
        n_layers, n_kept, k = top_position.shape
        value = stacked("top_value").double().numpy().reshape(-1)
        median = stacked("median").double().numpy()  # [layer, sample]
        codes = torch.gather(self.kinds.kind.index_select(0, rows).expand(n_layers, -1, -1), 2, top_position)
        kind_names = np.array([KIND_NAMES.get(c, str(c)) for c in range(min(KIND_NAMES), max(KIND_NAMES) + 1)])
        sample_ids = [self.sample_ids[b] for b in keep]
        massive = {
            "sample": np.tile(np.repeat(np.asarray(sample_ids), k), n_layers),
            "layer": np.repeat(np.array(layers), n_kept * k),
            "position": torch.gather(self.real_pos.index_select(0, rows).expand(n_layers, -1, -1), 2,
                                     top_position).reshape(-1).numpy(),
            "token_kind": kind_names[(codes - min(KIND_NAMES)).reshape(-1).numpy()],
            "dim": stacked("top_dim").reshape(-1).numpy(),
            "value": value,
            "rms_value": value / stacked("top_rms").double().numpy().reshape(-1),
            "ratio_to_median": np.abs(value) / np.repeat(median.reshape(-1), k).clip(min=1e-12),
            "rank": np.tile(np.arange(1, k + 1), n_layers * n_kept),
        }
        top3 = stacked("top3").double().numpy().reshape(n_layers * n_kept, -1)
        top3 = np.concatenate([top3, np.full((top3.shape[0], 3 - top3.shape[1]), np.nan)], axis=1)
        magnitude = {"sample": np.tile(np.asarray(sample_ids), n_layers),
                     "layer": np.repeat(np.array(layers), n_kept),
                     "top1": top3[:, 0], "top2": top3[:, 1], "top3": top3[:, 2], "median": median.reshape(-1)}
        self.massive_rows.append(pd.DataFrame(massive, columns=list(MASSIVE_COLUMNS)))
        self.magnitude_rows.append(pd.DataFrame(magnitude, columns=list(MAGNITUDE_COLUMNS)))

    def _token_summaries(self, layers: list[int], block: dict, phi: torch.Tensor) -> None:
        """Keep the token values of a block (phi [batch, layer, token] of the block's layers) for the token rows,
        and make the per-sample summaries from them: `count_rows` per (sample, layer, token kind) and `role_rows`
        per (sample, layer, role), groups in (sample, layer, class) order, sums in float64 stored in float32."""
        phi = phi.transpose(0, 1)  # [layer, sample, token]
        values = {"phi": phi, "is_sink": (phi >= self.tau) & self.real,
                  "attention_received": block["received"].transpose(0, 1)}
        self._token_blocks.append((layers, values))
        self._token_frames = None
        static = self._static
        kind = self._class_member(static["token_kind"])
        counts = {"n_tokens": by_class.class_count(kind.member)}
        sink, received = values["is_sink"], values["attention_received"]
        counts["n_sinks"] = by_class.class_count(kind.member, sink)
        counts["sum_phi"] = by_class.class_sum(phi, kind.member).to(phi.dtype)
        counts["max_phi"] = by_class.class_max(phi, kind.member)
        counts["sum_attention"] = by_class.class_sum(received, kind.member).to(received.dtype)
        counts["sum_sink_attention"] = by_class.class_sum(torch.where(sink, received, 0.0), kind.member).to(
            received.dtype)
        marks = static["on_background"]  # True, False or None (unknown) per real token
        known = kind.member & self._per_token([v is not None for v in marks])
        background = kind.member & self._per_token([v is True for v in marks])
        counts["n_known_background"] = by_class.class_count(known)
        counts["n_background"] = by_class.class_count(background)
        counts["n_sink_known_background"] = by_class.class_count(known, sink)
        counts["n_sink_background"] = by_class.class_count(background, sink)
        self.count_rows.append(self._class_frame(layers, kind, "token_kind", counts))
        role = self._class_member(static["role"])
        median, p90 = by_class.class_quantiles(phi, role.member, (0.5, 0.9))
        self.role_rows.append(self._class_frame(layers, role, "role", {
            "n_tokens": by_class.class_count(role.member),
            "n_sinks": by_class.class_count(role.member, sink),
            "phi_median": median.to(phi.dtype), "phi_p90": p90.to(phi.dtype),
            "phi_max": by_class.class_max(phi, role.member),
            "attention_received": by_class.class_sum(received, role.member).to(received.dtype)}))

    def _per_token(self, column) -> torch.Tensor:
        """A static column (one entry per real token, (sample, position) order) as [batch, token] (False at
        padding)."""
        out = torch.zeros(self.real.shape, dtype=torch.bool)
        out[self.real] = torch.as_tensor(np.asarray(column, dtype=bool))
        return out

    def _class_member(self, column) -> _Classes:
        """Classes of the batch's real tokens by a static text column: names sorted, [class, batch, token] member."""
        names, codes = np.unique(np.asarray(column, dtype=object).astype(str), return_inverse=True)
        code = torch.full(self.real.shape, -1, dtype=torch.long)  # -1: padding, in no class
        code[self.real] = torch.as_tensor(codes.reshape(-1), dtype=torch.long)
        return _Classes(names, code[None] == torch.arange(len(names))[:, None, None])

    def _class_frame(self, layers: list[int], classes: _Classes, key: str, columns: dict) -> pd.DataFrame:
        """Rows (sample, layer, class) of [batch, class] or [layer, batch, class] columns, in sorted key order,
        classes present in the sample only."""
        n_layers = len(layers)
        sample_order, layer_order = self._sample_order, np.argsort(np.asarray(layers), kind="stable")

        def arranged(values: torch.Tensor) -> np.ndarray:  # -> [sample, layer, class] in key order
            values = values.numpy()
            values = np.broadcast_to(values, (n_layers, *values.shape)) if values.ndim == 2 else values
            return values[layer_order][:, sample_order].transpose(1, 0, 2)

        present = arranged(by_class.class_count(classes.member)) > 0
        sample_ids = np.asarray(self.sample_ids, dtype=object)[sample_order]
        keys = {"sample": np.broadcast_to(sample_ids[:, None, None], present.shape)[present],
                "layer": np.broadcast_to(np.asarray(layers, dtype=np.int64)[layer_order][None, :, None],
                                         present.shape)[present],
                key: np.broadcast_to(classes.names[None, None, :], present.shape)[present]}
        keys.update({name: pd.array(keys[name], dtype=self._text[name].dtype) for name in ("sample", key)})
        return pd.DataFrame({**keys, **{name: arranged(values)[present] for name, values in columns.items()}})

    @property
    def n_token_rows(self) -> int:
        """Token rows of every end() so far: real tokens x layers."""
        return sum(len(layers) * int(self.real.sum()) for layers, _ in self._token_blocks)

    @property
    def token_rows(self) -> list[pd.DataFrame]:
        """One frame per end(): a row per (layer, sample, real token) in that order: phi, sink or not, attention
        received from the text queries, with the token's static columns."""
        if self._token_frames is None:
            self._token_frames = [self._token_frame(layers, values, torch.ones_like(values["is_sink"]))
                                  for layers, values in self._token_blocks]
        return self._token_frames

    def token_table(self, detail: str) -> pd.DataFrame:
        """detail "all": every token row ((layer, sample, position) order); "sinks": BOS, every sink and the
        `TOP_VISUAL` highest-phi image tokens of each sample and layer (ties: the earlier token), in (sample,
        layer, position) order, with samples in sorted id order. Rows are chosen on the tensors, before any frame."""
        if detail == "all":
            return pd.concat(self.token_rows, ignore_index=True)
        bos, visual = self.kinds.bos_mask & self.real, self.kinds.visual_mask & self.real
        frames = []
        for layers, values in self._token_blocks:
            keep = values["is_sink"] | bos | by_class.top_in_class(values["phi"], visual, TOP_VISUAL)
            frames.append(self._token_frame(layers, values, keep, sample_major=True))
        return pd.concat(frames, ignore_index=True)

    def sink_table(self) -> pd.DataFrame:
        """The sink rows ((layer, sample, position) order): sample, layer, position, kind, role, string, phi."""
        frames = [self._token_frame(layers, values, values["is_sink"]) for layers, values in self._token_blocks]
        return pd.concat(frames, ignore_index=True)[["sample", "layer", "position", "token_kind", "role", "token",
                                                     "phi"]]

    def _token_frame(self, layers: list[int], values: dict, keep: torch.Tensor,
                     sample_major: bool = False) -> pd.DataFrame:
        """Token rows where `keep` [layer, batch, token] (and the token is real), in (layer, sample, position)
        order, or (sample, layer, position) with samples in sorted id order and layers ascending (sample_major).
        Text columns: one pandas array per batch taken at the rows' static indices (no per-row Python strings)."""
        static = self._static
        keep = keep & self.real
        layer_index = torch.arange(len(layers))[:, None, None].expand_as(keep)
        columns = {"static": self._static_row.expand_as(keep), "layer": layer_index, **values}
        if sample_major:
            sample_order = torch.as_tensor(self._sample_order)
            layer_order = torch.as_tensor(np.argsort(np.asarray(layers), kind="stable"))
            columns = {k: v[layer_order][:, sample_order].transpose(0, 1) for k, v in columns.items()}
            keep = keep[layer_order][:, sample_order].transpose(0, 1)
        picked = {k: v[keep].numpy() for k, v in columns.items()}
        rows = picked["static"]
        return pd.DataFrame({
            "sample": self._text["sample"].take(rows),
            "layer": np.asarray(layers, dtype=np.int64)[picked["layer"]],
            "position": static["position"][rows],
            **{name: self._text[name].take(rows) for name in ("token_kind", "role", "token")},
            "image_index": static["image_index"][rows],
            "phi": picked["phi"],
            "is_sink": picked["is_sink"],
            "attention_received": picked["attention_received"],
            "visual_rank": static["visual_rank"][rows],
            "on_background": static["on_background"][rows],
        })

    def _head_table(self, layers: list[int], block: dict) -> pd.DataFrame:
        """One row per (layer, sample, head): the head's visual-attention measures over the sample's text queries.
        block: [batch, layer, head] payloads."""
        names = ("image_attention", "visual_sink_attention", "visual_nonsink_ratio", "image_centric")
        n_queries = self.queries.sum(dim=1).tolist()
        n_heads = block["image_attention"].shape[2]
        n_samples = len(self.sample_ids)
        return pd.DataFrame({
            "sample": [sid for sid in self.sample_ids for _ in range(n_heads)] * len(layers),
            "layer": np.repeat(np.array(layers, dtype=np.int64), n_samples * n_heads),
            "head": np.tile(np.arange(n_heads, dtype=np.int64), n_samples * len(layers)),
            **{name: block[name].transpose(0, 1).reshape(-1).numpy() for name in names},
            "n_queries": np.tile(np.repeat(np.array(n_queries, dtype=np.int64), n_heads), len(layers)),
        })


# ----------------------------------------------------------------------------- scan


def batch_tables(reducer: ScanReducer, detail: str) -> dict[str, pd.DataFrame]:
    """The per-sample tables of one traced batch, by run-folder table name, in the order they are appended.
    detail: --token-stats resolved ("all": every token row; "sinks": BOS, the sinks and the top image tokens of
    each sample and layer). The summaries are computed from every token either way."""
    reducer.build()
    return {
        "massive_activations": pd.concat(reducer.massive_rows, ignore_index=True),
        "layer_magnitudes_per_sample": pd.concat(reducer.magnitude_rows, ignore_index=True),
        "token_summary_per_sample": pd.concat(reducer.count_rows, ignore_index=True),
        "token_stats": reducer.token_table(detail),
        "sink_tokens": reducer.sink_table(),
        "role_phi_per_sample": pd.concat(reducer.role_rows, ignore_index=True),
        "head_scores_per_sample": pd.concat(reducer.head_rows, ignore_index=True),
    }


def run_scan(out: str, cfg: ScanConfig, adapter: ModelAdapter | None = None, resume: bool = True,
             log=print, figures: bool = True, calibration: Calibration | None = None) -> RunFolder:
    """Run the scan and write its run folder; resumes an interrupted run in `out`. calibration: sink dims and tau
    found already (a report calibrates once for every step); default: calibrated here."""
    from sinkscope.models import load_placed

    cfg.validate()
    torch.manual_seed(cfg.seed)
    samples = load_data(cfg.data, cfg.limit, cfg.question, cfg.image_root)  # bad data fails before the model loads
    check_resumable(out, "scan", asdict(cfg), resume, unresolved=("sink_score",) if cfg.sink_score == "auto" else ())
    adapter = adapter or load_placed(cfg)  # fail on a bad --model before touching --out
    cfg = replace(cfg, sink_score=resolve_sink_score(cfg.sink_score, adapter.hidden_size))  # run.json: the score used
    params = asdict(cfg)
    folder = RunFolder(out, "scan", params, resume=resume, fingerprint=adapter.weights_fingerprint())
    skipped = list(getattr(samples, "skipped", []))  # unreadable or missing images: left out, reported
    n_load_skipped = len(skipped)
    for s in skipped:
        log(f"skipped sample {s['sample']}: {s['reason']}")
    folder.update_meta(model=adapter.describe(), n_samples=len(samples),
                       planted=bool(getattr(adapter, "planted", False)), skipped=skipped)
    tracer = Tracer(adapter)
    cal = open_calibration(folder, adapter, samples, cfg, tracer, calibration, log=log)
    dims, tau = cal.dims, cal.tau
    done = folder.done_samples()
    shard_i, shard_n = parse_shard(cfg.shard, {}) or (0, 1)  # calibration above: the whole data's first samples
    mine = list(samples)[shard_i::shard_n]  # sample index modulo n
    todo = [s for s in mine if s.sample_id not in done]
    elsewhere = f" (shard {shard_i}/{shard_n}; {len(samples) - len(mine)} in other shards)" if shard_n > 1 else ""
    log(f"{len(mine) - len(todo)} samples already done, {len(todo)} to go{elsewhere}")
    t0 = time.time()
    detail = folder.meta.get("token_stats")

    def write(reducer: ScanReducer, chunk: list[Sample], n: int) -> None:
        """A traced batch's tables appended, its samples marked done."""
        nonlocal detail
        reducer.build()
        if detail is None:  # decide once, from the first batch's size
            rows = reducer.n_token_rows / len(chunk) * len(samples)
            detail = cfg.token_stats if cfg.token_stats != "auto" else ("all" if rows <= TOKEN_ROWS_LIMIT else "sinks")
            folder.update_meta(token_stats=detail)
        for table, frame in batch_tables(reducer, detail).items():
            folder.append_rows(table, frame)
        if reducer.profile:
            folder.write_table("dim_profile", _profile_frame(reducer.profile, chunk[0].sample_id))
        folder.mark_done([s.sample_id for s in chunk])
        log(f"  {min((n + 1) * cfg.batch_size, len(todo))}/{len(todo)} samples, {time.time() - t0:.1f}s")

    # One batch in flight: its forward is queued on the device while the host writes the previous batch's tables
    # (on a CPU nothing is queued and this is the plain order). An error writes what was traced before it.
    pending: tuple[ScanReducer, list[Sample], int] | None = None
    n = 0  # batches prepared
    try:
        # a remote run sends --batches-per-request batches as one request; their tables follow in order
        for chunks in request_groups(todo, cfg.batch_size, cfg.batches_per_request, "scan"):
            traced = []
            for chunk in chunks:
                n_skipped = len(skipped)
                batch, chunk = prepare_readable(adapter, chunk, skipped)
                if len(skipped) > n_skipped:
                    for s in skipped[n_skipped:]:
                        log(f"skipped sample {s['sample']}: {s['reason']}")
                    folder.update_meta(skipped=skipped, n_samples=len(samples) - (len(skipped) - n_load_skipped))
                n += 1
                if not chunk:
                    continue
                reducer = ScanReducer(dims.dims, tau.value, cfg.top_k, cfg.rho, cfg.summ, adapter.rms_norm_eps, chunk,
                                      want_profile=(not done and n == 1), token_strings=adapter.token_strings,
                                      score=cfg.sink_score, tables_later=True)
                traced.append((batch, reducer, chunk, n - 1))
            tracer.run_many([(batch, [reducer], [s.sample_id for s in chunk]) for batch, reducer, chunk, _ in traced],
                            remote=cfg.remote)
            for _, reducer, chunk, k in traced:
                if pending is not None:
                    written, pending = pending, None  # taken first: a failing write is not retried below
                    write(*written)
                pending = (reducer, chunk, k)
    finally:
        if pending is not None:
            write(*pending)
    summarize(folder, dims, tau, adapter, figures=figures)
    folder.finish()
    return folder


def _profile_frame(profile: dict[int, dict], sample_id) -> pd.DataFrame:
    rows = []
    for layer, entry in profile.items():
        dim = entry["bos"].shape[0]
        for d in range(dim):
            rows.append({
                "sample": sample_id, "layer": layer, "dim": d, "bos": float(entry["bos"][d]),
                "visual": float(entry["visual"][d]) if "visual" in entry else math.nan,
                "text_median": float(entry["text_median"][d]) if "text_median" in entry else math.nan,
                "visual_position": entry.get("visual_position", -1), "visual_phi": entry.get("visual_phi", math.nan),
            })
    return pd.DataFrame(rows)


def summarize(folder: RunFolder, dims, tau, adapter: ModelAdapter, figures: bool = True) -> dict:
    """Aggregate per-sample tables into summaries, figures and index.md."""
    from sinkscope import plots
    from sinkscope.analyses import pages

    mags = folder.read("layer_magnitudes_per_sample")
    magnitudes = mags.groupby("layer")[["top1", "top2", "top3", "median"]].mean().reset_index()
    magnitudes["top1_over_median"] = magnitudes["top1"] / magnitudes["median"]
    folder.write_table("layer_magnitudes", magnitudes)
    heads = folder.read("head_scores_per_sample")
    head_scores = heads[heads["n_queries"] > 0].groupby(["layer", "head"])[
        ["image_attention", "visual_sink_attention", "visual_nonsink_ratio", "image_centric"]].mean().reset_index()
    folder.write_table("head_scores", head_scores)
    tokens = folder.read("token_stats")
    summary = sink_summary(folder.read("token_summary_per_sample"))
    folder.write_table("sink_summary", summary)
    roles = folder.read("role_phi_per_sample")
    role_summary = pd.DataFrame()
    if roles is not None and len(roles):
        g = roles.groupby(["layer", "role"])
        role_summary = g[["n_tokens", "n_sinks", "attention_received"]].sum().join(
            g[["phi_median", "phi_p90"]].mean()).join(g["phi_max"].max()).reset_index()
        role_summary["sinks_per_sample"] = role_summary["n_sinks"] / roles["sample"].nunique()
        role_summary["attention_received"] /= roles["sample"].nunique()  # per sample, summed over the role's tokens
        folder.write_table("role_summary", role_summary)
    text_sinks = delimiter_sinks(tokens) if "role" in tokens else pd.DataFrame()
    folder.write_table("text_sink_tokens", text_sinks)
    figs = {}
    if figures:
        score = folder.meta.get("params", {}).get("sink_score", "rms")
        figs = plots.scan_figures(folder.path, magnitudes, folder.read("dim_profile"), tokens, head_scores, dims.dims,
                                 tau.value, score=score)
        if len(role_summary) and dims.dims:
            figs["roles"] = plots.phi_by_role(role_summary, tau.value, adapter.hidden_size, folder.path / "phi_by_role.png",
                                              score=score)
    pages.write_scan_index(folder, dims, tau, adapter, magnitudes, summary, head_scores, tokens, figs, findings,
                           role_summary=role_summary, text_sinks=text_sinks)
    return {"magnitudes": magnitudes, "head_scores": head_scores, "summary": summary}


TOKEN_ROWS_LIMIT = 2_000_000
COUNT_COLUMNS = ["n_tokens", "n_sinks", "sum_phi", "sum_attention", "sum_sink_attention", "n_known_background",
                 "n_background", "n_sink_known_background", "n_sink_background"]


def delimiter_sinks(tokens: pd.DataFrame) -> pd.DataFrame:
    """Which text strings are sinks: per (role, token), sink count, layers, mean phi and attention received."""
    sinks_only = tokens[tokens["is_sink"] & tokens["role"].isin(["first", "delimiter", "text"])]
    if sinks_only.empty:
        return pd.DataFrame(columns=["role", "token", "n_sinks", "n_layers", "mean_phi", "mean_attention_received"])
    g = sinks_only.groupby(["role", "token"])
    out = g.agg(n_sinks=("phi", "size"), n_layers=("layer", "nunique"), mean_phi=("phi", "mean"),
                mean_attention_received=("attention_received", "mean")).reset_index()
    return out.sort_values("n_sinks", ascending=False)


def sink_summary(counts: pd.DataFrame) -> pd.DataFrame:
    """Per layer and token kind: tokens, sinks, sinks per sample, mean phi, attention received.

    counts: token_summary_per_sample rows of every sample (`ScanReducer.count_rows`). For visual tokens with a
    known background mask (demo world): the share of visual sinks on background and the base rate.
    """
    if counts.empty:
        return pd.DataFrame()
    n_samples = counts["sample"].nunique()
    g = counts.groupby(["layer", "token_kind"])
    out = g[COUNT_COLUMNS].sum().join(g["max_phi"].max()).reset_index()
    out["sinks_per_sample"] = out["n_sinks"] / n_samples
    out["mean_phi"] = out["sum_phi"] / out["n_tokens"]
    out["mean_attention_received"] = out["sum_attention"] / out["n_tokens"]
    out["sink_attention_received"] = (out["sum_sink_attention"] / out["n_sinks"]).where(out["n_sinks"] > 0)
    known = out["n_known_background"] > 0
    out["background_base_rate"] = (out["n_background"] / out["n_known_background"]).where(known)
    out["sink_background_share"] = (out["n_sink_background"] / out["n_sink_known_background"]).where(
        out["n_sink_known_background"] > 0)
    cols = ["layer", "token_kind", "n_tokens", "n_sinks", "sinks_per_sample", "mean_phi", "max_phi",
            "mean_attention_received", "sink_attention_received", "sink_background_share", "background_base_rate"]
    return out[cols]


# ----------------------------------------------------------------------------- the report step

FIGURES = ("massive_activations.png", "phi_by_role.png", "phi_vs_attention.png", "dim_profile.png",
           "head_nonsink_ratio.png")  # the report shows these first, in this order


def report_config(report_cfg, sink_score: str) -> ScanConfig:
    """The scan a report runs (and calibrates the report with): the report's settings (`report_step_config`)."""
    return report_step_config(ScanConfig, report_cfg, sink_score)


def report_step(folder: Path, report_cfg, adapter, sink_score: str, log, calibration=None) -> None:
    """`sinkscope report` step: the scan on the report's data."""
    run_scan(str(folder), report_config(report_cfg, sink_score), adapter=adapter, log=log, calibration=calibration)


def findings(folder: Path) -> list[Finding]:
    """The scan's findings: sink dims, visual sinks per image, the attention they and the first token receive."""
    run = run_meta(folder)
    dims = json.loads((folder / "sink_dims.json").read_text())
    n = run.get("n_samples")
    tau = run.get("tau", {})
    score = run.get("params", {}).get("sink_score", "rms")
    how = (f"tau = {num(tau.get('value', math.nan))} ({tau.get('method')}, score: "
           f"{'phi' if score == 'rms' else 'layer-relative'})")
    out = [Finding("scan", "sink dims", float(len(dims["dims"])), n=n, sentence=(
        f"Sink dims {dims['dims']} found by {dims['method']} on the first token; {how}." if dims["dims"] else
        f"No sink dimension found ({dims['method']}): no activation of the first token stands out; {how}."))]
    counts = _token_counts(folder)
    per_image = _per_image(counts)
    if per_image is not None:
        out.append(Finding("scan", "visual sinks per image (busiest layer)", per_image.value, per_image.ci_low,
                           per_image.ci_high, n=per_image.n, sentence=(
                               "Image tokens at or above tau in the layer where they are most numerous, mean over "
                               "images." if per_image.value > 0 else
                               "No image token reaches tau in any layer >= 2: no visual sinks at this threshold.")))
        vis = counts[(counts["layer"] >= 2) & (counts["token_kind"] == "visual")]
        if per_image.value > 0:
            m, lo, hi = bootstrap_mean_ci(vis.groupby("sample")["sum_sink_attention"].max().values)
            out.append(Finding("scan", "text-query attention to visual sinks (busiest layer)", m, lo, hi, n=per_image.n,
                               sentence="Share of the attention of text queries after the image that visual sinks "
                                        "receive."))
        else:
            out.append(Finding("scan", "text-query attention to visual sinks", math.nan, n=per_image.n,
                               status=NOTHING_TO_TEST, sentence="No visual sinks: no attention to them to measure."))
    first = counts[(counts["layer"] >= 2) & (counts["token_kind"] == "bos")]
    if len(first):
        per_sample = first.groupby("sample")["sum_attention"].mean()
        m, lo, hi = bootstrap_mean_ci(per_sample.values)
        out.append(Finding("scan", "attention to the first token (mean over layers >= 2)", m, lo, hi,
                           n=len(per_sample), sentence="Share of text-query attention that the first token receives."))
    return out


def _token_counts(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "token_summary_per_sample.csv")


def visual_sinks_per_image(folder: Path) -> Estimate | None:
    """Visual sinks per image in its busiest layer >= 2, mean over images with 95% CI; None without image tokens."""
    return _per_image(_token_counts(folder))


def _per_image(counts: pd.DataFrame) -> Estimate | None:
    """counts: the scan's token_summary_per_sample.csv (sample, layer, token_kind, n_sinks, ...)."""
    vis = counts[(counts["layer"] >= 2) & (counts["token_kind"] == "visual")]
    if not len(vis):
        return None
    per_sample = vis.groupby("sample")["n_sinks"].max()
    m, lo, hi = bootstrap_mean_ci(per_sample.values)
    return Estimate(m, lo, hi, len(per_sample))
