"""`sinkscope view RUN_DIR`: one self-contained HTML page to look at attention and sinks image by image.

A scan run folder keeps per-layer, per-head summaries, not attention maps. The viewer reads the
run's settings from run.json (model, data, sink dims, tau, sink score), re-traces its first N
finished samples with `Tracer`, and writes one HTML file holding everything inline: the
images (PNG data URIs), the data (base64 typed arrays in a JSON block) and the script. No
server, no network, no CDN.

Per sample it stores, for every layer and head, the attention of each text query after the
image to the image tokens of the first image (uint8, scaled by the row's maximum, which is
kept as float32), and exactly (float32): the run's sink score (phi or the layer-relative score,
as run.json records) of every image token per layer, the sink mask,
and per (layer, head, query) the attention to the image and the visual non-sink ratio (the
quantities the scan averages into head_scores_per_sample.csv), and their means over every text query.

At real size the maps are what weighs: 32 layers x 32 heads x 576 image tokens is 0.8 MB per query in the page
(LLaVA-1.5-7B; ~4 MB at LLaVA-NeXT's 2,880 image tokens), and a question has tens of queries. The page keeps
the maps within `max_mb`: where a sample's would not fit its share, it stores the maps of as many queries as fit,
evenly spaced from the first to the last (the answer position), and says so; the mean view is over every query.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sinkscope.errors import SinkscopeError

DEFAULT_SAMPLES = 4
DEFAULT_MAX_MB = 64.0  # the per-query attention maps of all samples, as stored in the page
MAX_IMAGE_SIDE = 448


# ----------------------------------------------------------------------------- collecting


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _b64_size(n_bytes: int) -> int:
    return 4 * math.ceil(n_bytes / 3)


def kept_queries(n_queries: int, bytes_per_query: int, budget_bytes: float) -> np.ndarray:
    """Indices of the text queries whose attention maps a sample stores: every one where they fit `budget_bytes`,
    else as many as fit (at least the last, the answer position), evenly spaced from the first to the last."""
    if n_queries * bytes_per_query <= budget_bytes:
        return np.arange(n_queries)
    k = max(1, int(budget_bytes // max(bytes_per_query, 1)))
    if k == 1:
        return np.array([n_queries - 1])
    return np.unique(np.rint(np.linspace(0, n_queries - 1, k)).astype(int))


def _scaled_maps(attn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """attention [..., image token] -> (uint8 values relative to each row's maximum, the maxima as float32)."""
    row_max = attn.max(axis=-1)
    scaled = np.where(row_max[..., None] > 0, attn / np.maximum(row_max[..., None], 1e-30), 0.0)
    return np.rint(scaled * 255).astype(np.uint8), row_max.astype(np.float32)


def _grid(n: int) -> tuple[int, int]:
    """(rows, cols) of the image-token grid: square when n is a square, else the closest fit."""
    side = int(round(math.sqrt(n)))
    if side * side == n:
        return side, side
    rows = max(1, int(math.floor(math.sqrt(n))))
    return rows, int(math.ceil(n / rows))


def _image_uri(image) -> str:
    """The image as the vision tower sees it (CLIP-style centre square crop), as a PNG data URI."""
    im = image.convert("RGB")
    w, h = im.size
    side = min(w, h)
    im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if side > MAX_IMAGE_SIDE:
        im = im.resize((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _ViewerReducer:
    """One sample (batch of 1): the sink score of the image tokens, attention of text queries to them, per layer."""

    def __init__(self, dims, tau: float, score: str, eps: float):
        self.dims, self.tau, self.score, self.eps = list(dims), float(tau), score, eps
        self.phi, self.sink, self.attn, self.image_att, self.ratio = {}, {}, {}, {}, {}

    def begin(self, info):
        kinds = info.token_kinds
        self.kinds = kinds
        self.real = kinds.real_mask
        self.visual = kinds.visual_mask & (kinds.image_index == 0)  # the first image's tokens
        self.all_visual = kinds.visual_mask
        self.queries = kinds.queries_after_image(include_generated=True)  # text queries after the image
        self.visual_pos = torch.nonzero(self.visual[0]).flatten()
        self.query_pos = torch.nonzero(self.queries[0]).flatten()

    def residual(self, layer, states):
        from sinkscope.measures import sinks

        if self.dims:
            phi = sinks.sink_score(states.detach(), self.dims, self.score, self.real.to(states.device), self.eps)
            phi = phi.float().cpu()
        else:
            phi = torch.zeros(states.shape[:2])
        self._phi_full = phi
        self.phi[layer] = phi[0, self.visual_pos].numpy()
        self.sink[layer] = ((phi >= self.tau) & self.real)

    def attention(self, layer, probs):
        from sinkscope.measures import heads as head_measures

        probs = probs.detach().float()  # reduced where it is; only the [head, query (, image token)] parts move
        sink = self.sink[layer]
        stats = head_measures.visual_attention_stats(probs, self.all_visual, sink, self.queries)
        q, v = self.query_pos.to(probs.device), self.visual_pos.to(probs.device)
        self.image_att[layer] = stats.image_attention[0][:, q].cpu().numpy()  # [head, query]
        self.ratio[layer] = stats.visual_nonsink_ratio[0][:, q].cpu().numpy()
        self.attn[layer] = probs[0][:, q][:, :, v].cpu().numpy()  # [head, query, visual]
        self.sink[layer] = sink[0, self.visual_pos].numpy()

    def end(self):
        pass


def sink_score_of_run(meta: dict) -> str:
    """The sink score a run used ("rms" or "layer"): run.json's params, else what its tau says."""
    score = meta.get("params", {}).get("sink_score")
    if score in ("rms", "layer"):
        return score
    tau = meta.get("tau") or {}
    if tau.get("method") == "layer-default" or "layer-relative" in str(tau.get("reason", "")):
        return "layer"
    return "rms"


def _run_tables(run: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    def read(name):
        path = run / f"{name}.csv"
        return pd.read_csv(path, dtype={"sample": str}) if path.exists() else None

    return read("head_scores"), read("head_scores_per_sample")


def collect(run_dir: str | Path, adapter=None, n_samples: int = DEFAULT_SAMPLES, model: str | None = None,
            data: str | None = None, device: str | None = None, dtype: str | None = None, log=print,
            max_mb: float = DEFAULT_MAX_MB) -> dict:
    """The viewer's data for the first `n_samples` finished samples of a scan run folder; the per-query attention
    maps of all samples within `max_mb` megabytes (MiB) of the page (`kept_queries`)."""
    from sinkscope.eval.data import load_data
    from sinkscope.plots import SCORE_FORMULAS, score_name
    from sinkscope.trace import Tracer

    run = Path(run_dir)
    meta_path = run / "run.json"
    if not meta_path.exists():
        raise SinkscopeError(f"{run} is not a run folder (no run.json); give the --out folder of `sinkscope scan`")
    meta = json.loads(meta_path.read_text())
    params = meta.get("params", {})
    if meta.get("analysis") not in ("scan", None) and not meta.get("tau"):
        raise SinkscopeError(f"{run} holds a {meta.get('analysis')} run without sinks; view a scan run folder")
    if not meta.get("tau") or "sink_dims" not in meta:
        raise SinkscopeError(f"{run}/run.json has no tau or sink dims: the scan did not get past calibration; "
                             "finish it (run the same `sinkscope scan` command again) before viewing")
    if n_samples < 1:
        raise SinkscopeError(f"--limit must be >= 1 sample to view; got {n_samples}")
    if not (isinstance(max_mb, (int, float)) and math.isfinite(max_mb) and max_mb > 0):
        raise SinkscopeError(f"--max-mb must be a number of megabytes > 0 (default {DEFAULT_MAX_MB:g}); got {max_mb}")
    tau = float(meta["tau"]["value"])
    dims = list(meta["sink_dims"])
    score = sink_score_of_run(meta)
    if adapter is None:
        from sinkscope.models import load

        adapter = load(model or params.get("model", "demo"), device=device or params.get("device"),
                       dtype=dtype or params.get("dtype"))
    samples = load_data(data or params.get("data", "demo"), params.get("limit"),
                        params.get("question", "describe the image ."), params.get("image_root"))
    done_file = run / "samples_done.txt"
    done = set(done_file.read_text().split("\n")) - {""} if done_file.exists() else None
    if done is not None:
        samples = [s for s in samples if s.sample_id in done]
    samples = [s for s in samples if s.image_path is not None or s._image is not None][:n_samples]
    if not samples:
        raise SinkscopeError(f"{run} has no finished samples with an image; the viewer shows attention over images")
    head_scores, per_sample = _run_tables(run)
    tracer = Tracer(adapter)
    out = []
    budget = max_mb * 2**20 / len(samples)  # bytes of maps per sample
    for s in samples:
        image = s.image()
        batch = adapter.prepare([s.question], None if image is None else [image])
        red = _ViewerReducer(dims, tau, score, adapter.rms_norm_eps)
        tracer.run(batch, [red], sample_ids=[s.sample_id])
        if len(red.visual_pos) == 0:
            log(f"viewer: sample {s.sample_id} has no image tokens; left out")
            continue
        layers = sorted(red.attn)
        attn = np.stack([red.attn[i] for i in layers])  # [layer, head, query, visual]
        image_attention = np.stack([red.image_att[i] for i in layers])  # [layer, head, query]
        ratio = np.stack([red.ratio[i] for i in layers])
        n_layers, n_heads, n_queries, n_visual = attn.shape
        kept = kept_queries(n_queries, _b64_size(n_layers * n_heads * n_visual) + 3 * _b64_size(n_layers * n_heads * 4),
                            budget)
        if len(kept) < n_queries:
            log(f"viewer: sample {s.sample_id}: attention maps of {len(kept)} of its {n_queries} text queries kept "
                f"(--max-mb {max_mb:g} for {len(samples)} samples); the mean view is over all {n_queries}")
        maps, maps_max = _scaled_maps(attn[:, :, kept])
        mean_map, mean_max = _scaled_maps(attn.mean(axis=2, dtype=np.float64))  # [layer, head, visual]
        strings = adapter.token_strings(batch["input_ids"])[0]
        entry = {
            "id": s.sample_id, "question": s.question, "answer": s.answer, "image": _image_uri(image),
            "grid": list(_grid(len(red.visual_pos))), "n_visual": int(len(red.visual_pos)),
            "visual_positions": red.visual_pos.tolist(), "n_queries": int(n_queries),
            "queries": [{"position": int(p), "token": strings[int(p)]} for p in red.query_pos[kept]],
            "phi": _b64(np.stack([red.phi[i] for i in layers]).astype(np.float32)),
            "sink": _b64(np.stack([red.sink[i] for i in layers]).astype(np.uint8)),
            "attn": _b64(maps), "attn_max": _b64(maps_max),
            "image_attention": _b64(image_attention[:, :, kept].astype(np.float32)),
            "nonsink_ratio": _b64(ratio[:, :, kept].astype(np.float32)),
            # over every text query, whatever was kept: [layer, head, visual] and [layer, head]
            "attn_mean": _b64(mean_map), "attn_mean_max": _b64(mean_max),
            "image_attention_mean": _b64(image_attention.mean(axis=2, dtype=np.float64).astype(np.float32)),
            "nonsink_ratio_mean": _b64(ratio.mean(axis=2, dtype=np.float64).astype(np.float32)),
        }
        if per_sample is not None and len(per_sample):
            rows = per_sample[per_sample["sample"] == s.sample_id]
            if len(rows):
                entry["table_nonsink_ratio"] = _head_matrix(rows, adapter.num_layers, adapter.num_heads)
        out.append(entry)
        log(f"viewer: traced {s.sample_id}")
    return {
        "run": str(run), "model": meta.get("model", {}).get("name", params.get("model")),
        "data": params.get("data"), "planted": bool(meta.get("planted")),
        "tau": tau, "tau_method": meta["tau"].get("method"), "sink_dims": dims, "sink_score": score,
        "sink_score_name": score_name(score), "sink_score_formula": SCORE_FORMULAS.get(score, ""),
        "layers": adapter.num_layers, "heads": adapter.num_heads, "samples": out,
        "run_nonsink_ratio": _head_matrix(head_scores, adapter.num_layers, adapter.num_heads)
        if head_scores is not None and len(head_scores) else None,
    }


def _head_matrix(frame: pd.DataFrame, n_layers: int, n_heads: int) -> list[list[float | None]]:
    """[layer][head] visual non-sink ratio from a head-score table (None where the table has no row)."""
    m: list[list[float | None]] = [[None] * n_heads for _ in range(n_layers)]
    for layer, head, value in zip(frame["layer"], frame["head"], frame["visual_nonsink_ratio"]):
        if 0 <= int(layer) < n_layers and 0 <= int(head) < n_heads and value == value:
            m[int(layer)][int(head)] = float(value)
    return m


# ----------------------------------------------------------------------------- the page


def render(data: dict) -> str:
    """The self-contained page for `collect`'s data."""
    payload = json.dumps(data).replace("</", "<\\/")  # nothing in the data can close the script element
    title = html.escape(f"sinkscope viewer: {data.get('model')} on {data.get('data')}")
    banner = ('<p class="planted"><b>PLANTED MECHANISM.</b> <code>organism</code> has a sink mechanism installed '
              "by hand-made weight edits, to validate sinkscope; it is not a finding about a trained model.</p>"
              if data.get("planted") else "")
    return (_PAGE.replace("__TITLE__", title).replace("__BANNER__", banner)
            .replace("__DATA__", payload).replace("__SCRIPT__", _SCRIPT))


def write_viewer(run_dir: str | Path, out: str | Path | None = None, adapter=None, n_samples: int = DEFAULT_SAMPLES,
                 model: str | None = None, data: str | None = None, device: str | None = None,
                 dtype: str | None = None, log=print, max_mb: float = DEFAULT_MAX_MB) -> Path:
    """Collect the viewer's data for a scan run folder and write the HTML page (default RUN_DIR/viewer.html)."""
    from sinkscope.runfolder import atomic_write_text

    payload = collect(run_dir, adapter=adapter, n_samples=n_samples, model=model, data=data, device=device,
                      dtype=dtype, log=log, max_mb=max_mb)
    path = Path(out) if out is not None else Path(run_dir) / "viewer.html"
    atomic_write_text(path, render(payload))
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>__TITLE__</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
.controls label { margin-right: 14px; }
.panels { display: flex; gap: 24px; margin-top: 12px; flex-wrap: wrap; }
.panel h3 { margin: 4px 0; font-size: 14px; }
canvas { border: 1px solid #ccc; image-rendering: auto; }
#readout { margin-top: 10px; font-family: ui-monospace, monospace; white-space: pre-wrap; }
#hover { font-family: ui-monospace, monospace; color: #555; min-height: 1.4em; }
.planted { background: #fff3cd; padding: 6px 10px; border: 1px solid #e0c36c; }
.legend { color: #555; font-size: 12px; max-width: 980px; }
.colorbar { display: block; border: 1px solid #ccc; margin-top: 4px; }
.scale { display: flex; justify-content: space-between; width: 450px; font: 12px ui-monospace, monospace; color: #333; }
.key { font-size: 12px; color: #333; margin-top: 2px; }
.sinkbox { display: inline-block; width: 10px; height: 10px; border: 2px solid #00e5ff; vertical-align: middle; }
</style></head>
<body>
<h2>__TITLE__</h2>
__BANNER__
<p class="legend" id="meta"></p>
<div class="controls">
 <label>sample <select id="sample"></select></label>
 <label>layer <input id="layer" type="range" min="0" value="0"> <output id="layer-value"></output></label>
 <label>head <select id="head"></select></label>
 <label>text token <select id="token"></select></label>
</div>
<div class="panels">
 <div class="panel"><h3>attention of the token to each image token (head, layer); sinks outlined</h3>
  <canvas id="attention" width="448" height="448"></canvas>
  <canvas class="colorbar" id="attention-legend" width="448" height="12"></canvas>
  <div class="scale"><span>0</span><span id="attention-max"></span></div>
  <div class="key">colour: attention to the image token (drawn over the image, more opaque where larger);
   <span class="sinkbox"></span> visual sink</div></div>
 <div class="panel"><h3 id="score-heading"></h3>
  <canvas id="phi" width="448" height="448"></canvas>
  <canvas class="colorbar" id="score-legend" width="448" height="12"></canvas>
  <div class="scale"><span>0</span><span id="score-max"></span></div>
  <div class="key" id="score-key"></div></div>
</div>
<div id="hover"></div>
<p class="legend" id="sample-note"></p>
<div id="readout"></div>
<p class="legend">Attention: the selected text query's post-softmax attention to the image tokens of the first
image (or its mean over the text queries after the image), drawn relative to the largest cell; values are stored
at 8 bits per cell relative to that row's maximum. <span id="score-legend-text"></span> Visual non-sink ratio: attention to non-sink image tokens over
attention to all image tokens, per query, averaged over the text queries in the mean view (as in
head_scores_per_sample.csv).</p>
<script id="viewer-data" type="application/json">__DATA__</script>
<script>__SCRIPT__</script>
</body></html>
"""

_SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("viewer-data").textContent);
function decode(b64, Type) {
  const bin = atob(b64); const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Type(bytes.buffer);
}
for (const s of DATA.samples) {
  s.phiA = decode(s.phi, Float32Array); s.sinkA = decode(s.sink, Uint8Array);
  s.attnA = decode(s.attn, Uint8Array); s.attnMaxA = decode(s.attn_max, Float32Array);
  s.imgAttA = decode(s.image_attention, Float32Array); s.ratioA = decode(s.nonsink_ratio, Float32Array);
  s.attnMeanA = decode(s.attn_mean, Uint8Array); s.attnMeanMaxA = decode(s.attn_mean_max, Float32Array);
  s.imgAttMeanA = decode(s.image_attention_mean, Float32Array); s.ratioMeanA = decode(s.nonsink_ratio_mean, Float32Array);
  s.img = new Image(); s.img.src = s.image; s.img.onload = () => draw();
}
const $ = id => document.getElementById(id);
const fmt = x => (x === null || x === undefined || Number.isNaN(x)) ? "n/a" : Number(x).toPrecision(4);
const SCORE = DATA.sink_score_name || "sink score";
$("meta").textContent = `run ${DATA.run}; model ${DATA.model}; sink dims [${DATA.sink_dims.join(", ")}]; ` +
  `sink score: ${SCORE}` + (DATA.sink_score_formula ? ` = ${DATA.sink_score_formula}` : "") +
  `; tau ${fmt(DATA.tau)} (${DATA.tau_method}); ${DATA.layers} layers, ${DATA.heads} heads.`;
$("score-heading").textContent = `${SCORE} of each image token (this layer); sinks outlined`;
$("score-key").innerHTML = "";
$("score-key").append(`colour: ${SCORE} (cyan tick on the scale: tau = ${fmt(DATA.tau)}); `);
{ const box = document.createElement("span"); box.className = "sinkbox"; $("score-key").append(box, ` visual sink (${SCORE} \u2265 tau)`); }
$("score-legend-text").textContent = `${SCORE}: the run's sink score` +
  (DATA.sink_score_formula ? ` (${DATA.sink_score_formula})` : "") +
  ` over the run's sink dimensions; sinks are image tokens with ${SCORE} \u2265 tau.`;
DATA.samples.forEach((s, i) => $("sample").add(new Option(`${s.id}: ${s.question}`, i)));
for (let h = 0; h < DATA.heads; h++) $("head").add(new Option(`head ${h}`, h));
$("layer").max = DATA.layers - 1;
const HEAT = v => { const t = Math.max(0, Math.min(1, v));
  return [Math.round(255 * Math.min(1, 2 * t)), Math.round(255 * Math.max(0, 2 * t - 1)), Math.round(60 * (1 - t))]; };

function colorbar(canvas, tauShare) {
  const ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  for (let x = 0; x < w; x++) { const [R, G, B] = HEAT(x / (w - 1)); ctx.fillStyle = `rgb(${R},${G},${B})`; ctx.fillRect(x, 0, 1, h); }
  if (tauShare !== undefined) { const x = Math.round(tauShare * (w - 1)); ctx.fillStyle = "#00e5ff"; ctx.fillRect(x - 1, 0, 3, h); }
}

function fillTokens() {
  const s = DATA.samples[+$("sample").value];
  const sel = $("token"); const keep = sel.value; sel.innerHTML = "";
  sel.add(new Option(`mean over the ${s.n_queries} text queries after the image`, "mean"));
  s.queries.forEach((q, i) => sel.add(new Option(`${q.position}: ${JSON.stringify(q.token)}`, i)));
  if ([...sel.options].some(o => o.value === keep)) sel.value = keep;
  $("sample-note").textContent = s.queries.length < s.n_queries ?
    `Attention maps of ${s.queries.length} of this sample's ${s.n_queries} text queries are stored (evenly spaced, ` +
    `the last included), to keep the page within the viewer's size budget (sinkscope view --max-mb); the mean view ` +
    `is over all ${s.n_queries}.` : "";
}

function state() {
  const s = DATA.samples[+$("sample").value];
  const layer = +$("layer").value, head = +$("head").value, tok = $("token").value;
  const V = s.n_visual, Q = s.queries.length, H = DATA.heads;
  const attn = new Float64Array(V); let imgAtt, ratio;
  if (tok === "mean") {  // stored over every text query
    const row = layer * H + head, mx = s.attnMeanMaxA[row];
    for (let v = 0; v < V; v++) attn[v] = s.attnMeanA[row * V + v] / 255 * mx;
    imgAtt = s.imgAttMeanA[row]; ratio = s.ratioMeanA[row];
  } else {
    const row = (layer * H + head) * Q + (+tok), mx = s.attnMaxA[row];
    for (let v = 0; v < V; v++) attn[v] = s.attnA[row * V + v] / 255 * mx;
    imgAtt = s.imgAttA[row]; ratio = s.ratioA[row];
  }
  const phi = Array.from(s.phiA.subarray(layer * V, (layer + 1) * V));
  const sinks = []; for (let v = 0; v < V; v++) if (s.sinkA[layer * V + v]) sinks.push(v);
  return { s, layer, head, tok, attn, phi, sinks, imgAtt, ratio };
}

function cells(canvas, s) {
  const [R, C] = s.grid; return { R, C, w: canvas.width / C, h: canvas.height / R };
}

function outline(ctx, g, sinks) {
  ctx.strokeStyle = "#00e5ff"; ctx.lineWidth = 3; let n = 0;
  for (const v of sinks) { const r = Math.floor(v / g.C), c = v % g.C;
    ctx.strokeRect(c * g.w + 1.5, r * g.h + 1.5, g.w - 3, g.h - 3); n++; }
  return n;
}

function draw() {
  if (!DATA.samples.length) return;
  const st = state(); const s = st.s;
  // attention over the image
  const ca = $("attention"), a = ca.getContext("2d"), g = cells(ca, s);
  a.clearRect(0, 0, ca.width, ca.height);
  if (s.img.complete) a.drawImage(s.img, 0, 0, ca.width, ca.height);
  const amax = Math.max(...st.attn, 1e-12);
  for (let v = 0; v < s.n_visual; v++) {
    const r = Math.floor(v / g.C), c = v % g.C, t = st.attn[v] / amax, [R, G, B] = HEAT(t);
    a.fillStyle = `rgba(${R},${G},${B},${0.05 + 0.6 * t})`; a.fillRect(c * g.w, r * g.h, g.w, g.h);
  }
  const drawnA = outline(a, g, st.sinks);
  // phi per image token
  const cp = $("phi"), p = cp.getContext("2d"), gp = cells(cp, s);
  p.clearRect(0, 0, cp.width, cp.height);
  const pmax = Math.max(DATA.tau, ...st.phi, 1e-12);
  for (let v = 0; v < s.n_visual; v++) {
    const r = Math.floor(v / gp.C), c = v % gp.C, [R, G, B] = HEAT(st.phi[v] / pmax);
    p.fillStyle = `rgb(${R},${G},${B})`; p.fillRect(c * gp.w, r * gp.h, gp.w, gp.h);
    if (gp.w >= 34) { p.fillStyle = st.phi[v] / pmax > 0.6 ? "#000" : "#fff"; p.font = "11px monospace";
      p.fillText(st.phi[v] >= 1000 ? st.phi[v].toExponential(1) : st.phi[v].toFixed(2), c * gp.w + 3, r * gp.h + gp.h / 2 + 4); }
  }
  const drawnP = outline(p, gp, st.sinks);
  // colour legends: the scale of each grid as drawn now
  colorbar($("attention-legend"));
  $("attention-max").textContent = fmt(amax);
  colorbar($("score-legend"), DATA.tau / pmax);
  $("score-max").textContent = fmt(pmax);
  Object.assign($("readout").dataset, { legendAttentionMax: amax, legendScoreMax: pmax });
  // readout
  let best = 0; for (let v = 1; v < s.n_visual; v++) if (st.attn[v] > st.attn[best]) best = v;
  const runRatio = DATA.run_nonsink_ratio ? DATA.run_nonsink_ratio[st.layer][st.head] : null;
  const tableSample = s.table_nonsink_ratio ? s.table_nonsink_ratio[st.layer][st.head] : null;
  const tokLabel = st.tok === "mean" ? "mean over text queries" : `${s.queries[+st.tok].position} ${JSON.stringify(s.queries[+st.tok].token)}`;
  const ro = $("readout");
  Object.assign(ro.dataset, { sample: s.id, layer: st.layer, head: st.head,
    query: st.tok === "mean" ? "mean" : s.queries[+st.tok].position,
    nonsinkRatio: st.ratio, imageAttention: st.imgAtt, runNonsinkRatio: runRatio ?? "",
    tableNonsinkRatio: tableSample ?? "", sinks: JSON.stringify(st.sinks),
    outlinesDrawn: drawnA + drawnP, phi: JSON.stringify(st.phi), attention: JSON.stringify(Array.from(st.attn)),
    maxAttentionToken: best });
  ro.textContent =
    `sample ${s.id}  layer ${st.layer}  head ${st.head}  token ${tokLabel}\n` +
    `visual non-sink ratio: ${fmt(st.ratio)} (this selection)` +
    (st.tok === "mean" && tableSample !== null ? `, ${fmt(tableSample)} in head_scores_per_sample.csv` : "") +
    (runRatio !== null ? `; run mean ${fmt(runRatio)} (head_scores.csv)` : "") + "\n" +
    `attention to the image: ${fmt(st.imgAtt)}; most attended image token ${best} ` +
    `(attention ${fmt(st.attn[best])}, ${SCORE} ${fmt(st.phi[best])})\n` +
    `visual sinks in this layer (${SCORE} >= ${fmt(DATA.tau)}): ${st.sinks.length} [${st.sinks.join(", ")}]`;
  $("layer-value").textContent = st.layer;
}

function hover(ev) {
  const st = state(), s = st.s, canvas = ev.target, g = cells(canvas, s);
  const c = Math.floor(ev.offsetX / g.w), r = Math.floor(ev.offsetY / g.h), v = r * g.C + c;
  if (c < 0 || c >= g.C || v < 0 || v >= s.n_visual) { $("hover").textContent = ""; return; }
  $("hover").textContent = `image token ${v} (row ${r}, col ${c}, sequence position ${s.visual_positions[v]}): ` +
    `attention ${fmt(st.attn[v])}, ${SCORE} ${fmt(st.phi[v])}${st.sinks.includes(v) ? ", sink" : ""}`;
}

$("sample").addEventListener("change", () => { fillTokens(); draw(); });
for (const id of ["layer", "head", "token"]) $(id).addEventListener("input", draw);
for (const id of ["layer", "head", "token"]) $(id).addEventListener("change", draw);
for (const id of ["attention", "phi"]) $(id).addEventListener("mousemove", hover);
fillTokens(); draw();
"""
