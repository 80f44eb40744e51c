"""`sinkscope inject`: does writing the sink signature into a token make it a sink? A dose-response.

The paper's evidence that sinks are sinks because of their massive sink-dim values is
correlational. Here the signature is written in (sinkscope.interventions.sink_signature): at the
residual stream entering the injection layer (default: the first layer, from the onset of the scan's
discovery on, where the first token is a sink by the scan's own rule: the signature of a sink), the
sink-dim coordinates of chosen tokens are set to `scale` x the first token's, over a log grid
of scales. Tokens: `n_tokens` per sample from each group (background image tokens, object image
tokens, prompt text tokens before the queries; never a token that already is a sink there, nor
the first token), matched counts, `n_seeds` draws. Controls on the same tokens: `random_dim` (the
same added magnitude along a random non-sink dim), `rescale` (the token's state rescaled to the
injected norm), `none` (no injection).

Measured at the injection layer and every later layer, per injected token (then averaged over the
tokens of a draw): the attention it receives from the text queries after the image (mean over
queries; mean and max over heads, and per head for `inject` and `none`), its sink score and
whether the scan's own rule (score >= tau) calls it a sink, its value norm ||v_j||, its mean OV norm
||W_O^h v_j|| and OV contribution a * ||W_O^h v_j|| (does it stop writing?), and the change of the
answer's logit difference (correct minus other yes/no word, last prompt position).

What VAR does to injected sinks (`var=True`): background tokens injected at `var_scale`; VAR (the
same sink dims and tau) with and without the injection: the share of injected tokens VAR's sink
detector flags, and yes/no accuracy from greedy answers, beside VAR on the uninjected model.

Random draws: a sample's tokens (per group and draw, and for the VAR comparison) come from its own generator,
seeded from (--seed, the sample's index in the data), so they do not depend on the batch or shard the sample runs
in; the control's random dims (one per group and draw) come from a generator seeded by --seed alone, drawn once
before the samples (run.json: control_dims), the same in every shard.

Writes: inject_per_sample.csv, inject_heads_per_sample.csv, inject_answers_per_sample.csv, inject.csv
(CIs: percentile bootstrap over samples, scipy), inject_heads.csv, inject_var_per_sample.csv,
inject_var.csv, dose_response.png, index.md.
Sharded (--shard i/n: the samples whose index modulo n is i): `sinkscope merge` joins the shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.common import AnalysisConfig, fmt_ci, output_grams, prepare_batch, report_step_config, setup
from sinkscope.errors import SinkscopeError
from sinkscope.eval import stats
from sinkscope.eval.tasks import progress
from sinkscope.findings import MEASURED, Estimate, Finding, effect_clause, num
from sinkscope.interventions.attention import edit_attention
from sinkscope.interventions.sink_signature import SinkSignature, first_positions, inject_sink, sink_mask_of
from sinkscope.kinds import PAD, TokenKinds
from sinkscope.measures import contributions as ov
from sinkscope.measures.sinks import sink_score
from sinkscope.runconfig import analysis_default, sample_seed
from sinkscope.runfolder import RunFolder

GROUPS = ("background", "object", "text")
CONTROLS = ("random_dim", "rescale")
TREATMENTS = ("inject", *CONTROLS)
DEFAULT_SCALES = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
METRICS = ("attention", "attention_max_head", "is_sink", "score", "value_norm", "ov_norm", "contribution")


@dataclass
class InjectConfig(AnalysisConfig):
    data: str = analysis_default("inject", "data")
    limit: int | None = analysis_default("inject", "limit")
    scales: list[float] = field(default_factory=lambda: list(DEFAULT_SCALES))
    groups: list[str] = field(default_factory=lambda: list(GROUPS))
    treatments: list[str] = field(default_factory=lambda: list(TREATMENTS))
    n_tokens: int = 2  # injected tokens per sample and group (matched counts)
    n_seeds: int = 2  # draws of tokens (and of the control's random dim)
    layer: int | None = None  # injection layer (default: first layer where the first token is a sink by the rule)
    var: bool = True  # what VAR does to injected sinks
    var_scale: float = 1.0
    max_new_tokens: int = 4

    def validate(self) -> None:
        super().validate()
        if not self.scales or any(not (0.0 <= float(s) <= 1.0) for s in self.scales):
            raise SinkscopeError(f"--scales must be numbers in [0, 1] (multiples of the first token's sink-dim "
                                 f"values); got {self.scales}")
        bad = [g for g in self.groups if g not in GROUPS]
        if bad or not self.groups:
            raise SinkscopeError(f"--groups must come from {', '.join(GROUPS)}; got {self.groups}")
        bad = [t for t in self.treatments if t not in TREATMENTS]
        if bad or "inject" not in self.treatments:
            raise SinkscopeError(f"--treatments must include 'inject' and come from {', '.join(TREATMENTS)}; "
                                 f"got {self.treatments}")
        if self.n_tokens < 1 or self.n_seeds < 1:
            raise SinkscopeError(f"--n-tokens and --n-seeds must be >= 1; got {self.n_tokens}, {self.n_seeds}")


# ---------------------------------------------------------------------------------------
# helpers shared with `sinkscope remove`
# ---------------------------------------------------------------------------------------

def value_states(adapter, layer: int, states: torch.Tensor) -> torch.Tensor:
    """The value states the attention of `layer` computes from `states`: [batch, kv_head, token, head_dim].

    states: [batch, token, dim] entering the layer. Needs the layer's `input_layernorm` and the
    attention's `v_proj` (LLaMA-style blocks: LLaVA, Qwen, Gemma, SmolLM2); LoRA wrappers act as loaded.
    """
    block, attn = adapter.layers[layer], adapter.attention(layer)
    norm, v_proj = getattr(block, "input_layernorm", None), getattr(attn, "v_proj", None)
    if norm is None or v_proj is None:
        raise SinkscopeError(f"{type(block).__name__} has no input_layernorm / self_attn.v_proj: value norms and OV "
                             "contributions need a LLaMA-style block; run without them or add the family's value path")
    b, t = states.shape[:2]
    v = v_proj(norm(states))
    return v.view(b, t, adapter.num_kv_heads, adapter.head_dim).transpose(1, 2)


def answer_sign(samples) -> torch.Tensor | None:
    """[batch] +1 for 'yes', -1 for 'no' references; None when any sample is not a yes/no question."""
    signs = []
    for s in samples:
        a = (s.answer or "").strip().lower()
        if a not in ("yes", "no"):
            return None
        signs.append(1.0 if a == "yes" else -1.0)
    return torch.tensor(signs)


def logit_diff(logits: torch.Tensor, sign: torch.Tensor | None, yes_no: tuple[int, int]) -> torch.Tensor:
    """[batch]: logit of the correct yes/no word minus the other's at the last position (NaN without answers)."""
    if sign is None:
        return torch.full((logits.shape[0],), float("nan"))
    last = logits[:, -1].float().cpu()
    return (last[:, yes_no[0]] - last[:, yes_no[1]]) * sign


def signature_of(s, cfg) -> SinkSignature:
    """The sink signature of a run's setup (scan discovery, tau, score), at cfg.layer when given."""
    sig = SinkSignature.from_discovery(s.dims, s.tau.value, cfg.sink_score, s.adapter.rms_norm_eps, cfg.layer)
    n = s.adapter.num_layers
    if not 0 <= sig.layer < n:
        raise SinkscopeError(f"--layer {sig.layer} is out of range: the model has {n} layers (0..{n - 1})")
    return sig


@torch.no_grad()
def first_sink_layer(adapter, samples, sig: SinkSignature, n: int, batch_size: int) -> tuple[int, str]:
    """The first layer, from the discovery's onset on, where the first token is a sink by the scan's rule
    (median score over the first n samples >= tau), and why; the onset itself when no layer qualifies."""
    scores = []
    for i in range(0, min(n, len(samples)), batch_size):
        chunk = samples[i: min(i + batch_size, n)]
        inputs = adapter.device_inputs(prepare_batch(adapter, chunk))
        kinds = adapter.token_kinds(inputs["input_ids"], inputs.get("attention_mask"))
        hidden = adapter.model(**inputs, **adapter.without_logits(), output_hidden_states=True).hidden_states
        rows, first = torch.arange(len(chunk)), first_positions(kinds)
        real = (kinds.kind != PAD)
        scores.append(torch.stack([sink_score(hidden[l], list(sig.dims), sig.score, token_mask=real, eps=sig.eps)
                                   [rows, first].float().cpu() for l in range(adapter.num_layers)], dim=1))
    median = torch.cat(scores).median(dim=0).values  # [layer]
    for layer in range(sig.layer, adapter.num_layers):
        if sig.tau is not None and float(median[layer]) >= sig.tau:
            return layer, (f"the first layer from the discovery's onset ({sig.layer}) where the first token is a sink by "
                           f"the scan's rule (median score {float(median[layer]):.3g} >= tau {sig.tau:.3g})")
    return sig.layer, (f"the discovery's onset: the first token's median score never reaches tau {sig.tau} "
                       f"(largest {float(median.max()):.3g})")


def background_mask(samples, kinds: TokenKinds) -> torch.Tensor | None:
    """[batch, token] bool: image tokens on background patches (demo world ground truth), None if unknown."""
    out = torch.zeros_like(kinds.visual_mask)
    for b, s in enumerate(samples):
        bg = s.meta.get("background_patches") if s.meta else None
        positions = kinds.visual_mask[b].nonzero().flatten()
        if bg is None or len(bg) != len(positions):
            return None
        out[b, positions] = torch.tensor(bg, dtype=torch.bool)
    return out


def draw_tokens(pool: torch.Tensor, n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n tokens of each row drawn uniformly from pool [batch, token] bool, without replacement.

    generator: one torch.Generator per row (a list), or one for every row in turn. A row's draw is a permutation
    of its own eligible tokens only (not of every position), so padding and the other rows of the batch do not
    change it: with a generator per row seeded from the sample (`runconfig.sample_seed`), a sample draws the same
    tokens whatever batch or shard it runs in. Every row draws once, eligible or not.

    Returns (mask [batch, token] bool, ok [batch] bool); rows with fewer than n eligible tokens get an
    empty mask and ok False (never a smaller set: counts stay matched across groups).
    """
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * pool.shape[0]
    if len(gens) != pool.shape[0]:
        raise SinkscopeError(f"draw_tokens got {len(gens)} generators for {pool.shape[0]} rows")
    mask = torch.zeros_like(pool, dtype=torch.bool)
    ok = pool.sum(dim=1) >= n
    for b, gen in enumerate(gens):
        where = pool[b].nonzero().flatten()
        order = torch.randperm(len(where), generator=gen)
        if ok[b]:
            mask[b, where[order[:n]]] = True
    return mask, ok


def text_pool(ordinary_text: torch.Tensor, queries: torch.Tensor, n: int) -> torch.Tensor:
    """[batch, token] bool: ordinary text tokens before the queries where a row has >= n of them, else every
    ordinary text token but the row's last (the answer position), so prompts without text before the image
    still get a text group."""
    before = ordinary_text & ~queries
    pos = torch.arange(queries.shape[1])[None].expand_as(queries)
    last = torch.where(ordinary_text | queries, pos, torch.full_like(pos, -1)).amax(dim=1)
    anywhere = ordinary_text & (pos < last[:, None])
    enough = before.sum(dim=1) >= n
    return torch.where(enough[:, None], before, anywhere)


def band_start(band: str) -> int:
    """First layer of a band name ('layers 4-9' or 'layer 4'); 'answer' sorts last."""
    return int(str(band).split()[1].split("-")[0]) if str(band).startswith("layer") else 10 ** 6


def layer_bands(first: int, n_layers: int, n_bands: int = 3) -> dict[int, str]:
    """layer -> band name ('layers a-b'), contiguous bands from `first` to the last layer."""
    layers = list(range(first, n_layers))
    chunks = [c for c in np.array_split(np.array(layers), min(n_bands, len(layers))) if len(c)]
    return {int(l): (f"layers {int(c[0])}-{int(c[-1])}" if c[-1] > c[0] else f"layer {int(c[0])}")
            for c in chunks for l in c}


# ---------------------------------------------------------------------------------------
# measuring one forward
# ---------------------------------------------------------------------------------------

@dataclass
class KeptAttention:
    """The probabilities of some keys per layer, kept as a forward computed them: {layer: [batch, head, query,
    n_columns]} float32 on the CPU, of the key positions `columns` (sorted)."""

    columns: torch.Tensor
    probs: dict[int, torch.Tensor]

    def of(self, layer: int, cols: torch.Tensor) -> torch.Tensor:
        """[batch, head, query, len(cols)]: the probabilities of keys `cols` (a subset of `columns`)."""
        return self.probs[layer][..., torch.searchsorted(self.columns, cols.to(self.columns.device))]


def observed_forward(adapter, inputs: dict, session, from_layer: int, columns: torch.Tensor):
    """(output with every layer's hidden states, KeptAttention of `columns` in layers >= from_layer): one forward
    inside the edit `session`, whose observer keeps only those keys' probabilities as each layer computes them
    (not every layer's [batch, head, query, key] maps, as output_attentions would). The logits: the last position's."""
    kept: dict[int, torch.Tensor] = {}
    on_device = columns.to(adapter.device)

    def observe(layer, probs):
        if layer >= from_layer:
            kept[layer] = probs[..., on_device.to(probs.device)].float()

    with session.observing(observe):
        output = adapter.model(**inputs, **adapter.without_logits(), output_hidden_states=True)
    return output, KeptAttention(columns.cpu(), {layer: p.cpu() for layer, p in kept.items()})


@torch.no_grad()
def measure_tokens(adapter, out, attention: KeptAttention, edited_state: torch.Tensor, token_mask: torch.Tensor,
                   queries: torch.Tensor, kinds: TokenKinds, sig: SinkSignature, keep_heads: bool,
                   grams: dict[int, torch.Tensor]) -> tuple[list[dict], list[dict]]:
    """Per row and layer >= sig.layer: what the tokens of token_mask receive and write.

    out: model output with hidden_states; attention: the probabilities of (at least) token_mask's key columns in
    layers >= sig.layer; edited_state: [batch, token, dim] entering sig.layer as edited; grams:
    `output_grams(adapter, host=True)`, made once per run. Returns (layer rows, head rows); rows with an empty mask
    are skipped.
    """
    n_tok = token_mask.sum(dim=1)
    keep = n_tok > 0
    real = (kinds.kind != PAD)
    cols = token_mask.any(dim=0).nonzero().flatten()  # positions injected in some row: values only there
    sub = token_mask[:, cols]  # [batch, n_cols]
    m = sub.float()
    denom = n_tok.clamp_min(1).float()
    rows, heads = [], []
    for layer in range(sig.layer, adapter.num_layers):
        x = edited_state if layer == sig.layer else out.hidden_states[layer]
        score = sink_score(x, list(sig.dims), sig.score, token_mask=real.to(x.device), eps=sig.eps).float().cpu()
        is_sink = (score >= sig.tau) if sig.tau is not None else torch.zeros_like(score, dtype=torch.bool)
        probs = attention.of(layer, cols)  # [batch, head, query, n_cols]
        v = value_states(adapter, layer, x[:, cols.to(x.device)]).float().cpu()  # [batch, kv_head, n_cols, head_dim]
        norms = ov.ov_norms_from_grams(v, grams[layer])  # [batch, head, n_cols]
        means = ov.class_contributions(probs, norms, sub[:, None, :], queries)  # the injected tokens as one class
        att, contrib, ov_norm = (means[k][:, 0] for k in ("attention", "contribution", "ov_norm"))  # [batch, head]
        v_norm = (v.norm(dim=-1).mean(dim=1) * m).sum(-1) / denom
        tok_score = (score[:, cols] * m).sum(-1) / denom
        share = (is_sink[:, cols].float() * m).sum(-1) / denom
        for b in keep.nonzero().flatten().tolist():
            rows.append({"row": b, "layer": layer, "attention": float(att[b].mean()),
                         "attention_max_head": float(att[b].max()), "top_head": int(att[b].argmax()),
                         "is_sink": float(share[b]), "score": float(tok_score[b]), "value_norm": float(v_norm[b]),
                         "ov_norm": float(ov_norm[b].mean()), "contribution": float(contrib[b].mean())})
            if keep_heads:
                heads += [{"row": b, "layer": layer, "head": h, "attention": float(att[b, h])}
                          for h in range(att.shape[1])]
    return rows, heads


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------

def run_inject(out: str, cfg: InjectConfig, adapter=None, resume: bool = True, log=print, calibration=None,
               figures: bool = True) -> RunFolder:
    s = setup(out, "inject", cfg, adapter, resume, log, calibration=calibration)
    adapter = s.adapter
    sig = signature_of(s, cfg)
    known = s.folder.meta.get("signature")
    if cfg.layer is not None:
        why = "given (--layer)"
    elif known:
        why = known["layer_reason"]
        sig = SinkSignature(sig.dims, int(known["layer"]), sig.tau, sig.score, sig.eps)
    else:
        layer, why = first_sink_layer(adapter, s.samples, sig, cfg.calibration, cfg.batch_size)
        sig = SinkSignature(sig.dims, layer, sig.tau, sig.score, sig.eps)
    s.folder.update_meta(signature={"dims": list(sig.dims), "layer": sig.layer, "layer_reason": why, "tau": sig.tau,
                                    "score": sig.score})
    if adapter.text_attention != "eager":
        adapter.set_text_attention("eager")
    from sinkscope.analyses.ablate import answer_token_ids

    yes_no = answer_token_ids(adapter)
    control_dims = draw_control_dims(cfg, adapter.hidden_size, sig)
    s.folder.update_meta(control_dims={f"{g}/{seed}": d for (g, seed), d in control_dims.items()})
    index = {x.sample_id: k for k, x in enumerate(s.samples)}  # the sample's index in the data: its random draws
    grams = output_grams(adapter, host=True)  # W_O's per-head grams, once per run (the norms are made on the CPU)
    for chunk in progress(s.todo, cfg.batch_size, "inject"):
        batch = prepare_batch(adapter, chunk)
        inputs = adapter.device_inputs(batch)
        kinds = adapter.token_kinds(inputs["input_ids"], inputs.get("attention_mask")).to("cpu")
        queries = kinds.queries_after_image()
        sign = answer_sign(chunk)
        with torch.no_grad():  # the states first: the tokens to inject are drawn from them
            base = adapter.model(**inputs, **adapter.without_logits(), output_hidden_states=True)
        base_diff = logit_diff(base.logits, sign, yes_no)
        state = base.hidden_states[sig.layer]
        real = kinds.kind != PAD
        ordinary = real & ~sink_mask_of(state, kinds, sig).cpu() & ~kinds.bos_mask
        bg = background_mask(chunk, kinds)
        pools = {"text": text_pool(ordinary & kinds.text_mask, queries, cfg.n_tokens)}
        if bg is not None:
            pools["background"] = ordinary & bg
            pools["object"] = ordinary & kinds.visual_mask & ~bg
        elif any(g in cfg.groups for g in ("background", "object")):
            pools["background"] = pools["object"] = ordinary & kinds.visual_mask  # no ground truth: any image token
            s.folder.update_meta(groups_note="no background ground truth in the data: background and object groups "
                                             "are both drawn from all ordinary image tokens")
        layer_rows, head_rows, answer_rows = [], [], []

        def record(treatment, group, seed, scale, output, attention, edited, mask, ok):
            rows, heads = measure_tokens(adapter, output, attention, edited, mask, queries, kinds, sig,
                                         keep_heads=treatment in ("none", "inject"), grams=grams)
            meta = {"treatment": treatment, "group": group, "seed": seed, "scale": scale}
            for r in rows:
                layer_rows.append({"sample": chunk[r.pop("row")].sample_id, **meta, **r})
            for r in heads:
                head_rows.append({"sample": chunk[r.pop("row")].sample_id, **meta, **r})
            diff = logit_diff(output.logits, sign, yes_no)
            for b in ok.nonzero().flatten().tolist():
                answer_rows.append({"sample": chunk[b].sample_id, **meta, "n_tokens": int(mask[b].sum()),
                                    "logit_diff": float(diff[b]), "logit_diff_change": float(diff[b] - base_diff[b])})

        draws = []  # (group, seed, tokens to inject, rows with enough of them)
        for group in cfg.groups:
            for seed in range(cfg.n_seeds):
                mask, ok = draw_tokens(pools[group], cfg.n_tokens, _sample_generators(cfg.seed, chunk, index, group,
                                                                                      seed))
                if ok.any():
                    draws.append((group, seed, mask, ok))
        if draws:  # the unedited attention of every drawn token, kept as the layers compute it
            with edit_attention(adapter, fallback="eager") as session, torch.no_grad():
                _, base_attention = observed_forward(adapter, inputs, session, sig.layer,
                                                     _columns(mask for _, _, mask, _ in draws))
        for group, seed, mask, ok in draws:
            record("none", group, seed, math.nan, base, base_attention, state.cpu(), mask, ok)
            control_dim = control_dims[(group, seed)]
            for treatment in cfg.treatments:
                for scale in cfg.scales:
                    control = None if treatment == "inject" else treatment
                    with inject_sink(adapter, mask.to(adapter.device), layer=sig.layer, scale=float(scale),
                                     signature=sig, control=control, control_dim=control_dim,
                                     keep_states=True) as session, torch.no_grad():
                        output, attention = observed_forward(adapter, inputs, session, sig.layer, _columns([mask]))
                        edited = session.memory(session.edits[-1])["states"][sig.layer].cpu()
                    record(treatment, group, seed, float(scale), output, attention, edited, mask, ok)
        var_rows = (_var_rows(adapter, cfg, sig, chunk, batch, inputs, kinds, pools,
                              _sample_generators(cfg.seed, chunk, index, "var"), sign, yes_no) if cfg.var else [])
        s.folder.append_rows("inject_per_sample", pd.DataFrame(layer_rows))
        s.folder.append_rows("inject_heads_per_sample", pd.DataFrame(head_rows))
        s.folder.append_rows("inject_answers_per_sample", pd.DataFrame(answer_rows))
        if var_rows:
            s.folder.append_rows("inject_var_per_sample", pd.DataFrame(var_rows))
        s.folder.mark_done([x.sample_id for x in chunk])
    return summarize_inject(s.folder, cfg, sig, adapter.num_layers, figures)


def _columns(masks) -> torch.Tensor:
    """Sorted key positions that any row of any of `masks` ([batch, token] bool) holds."""
    return torch.stack([m.any(dim=0) for m in masks]).any(dim=0).nonzero().flatten()


def draw_control_dims(cfg: InjectConfig, hidden_size: int, sig: SinkSignature) -> dict[tuple[str, int], int]:
    """(group, draw) -> the random non-sink dim of the `random_dim` control, drawn once per run from a generator
    seeded by --seed alone: it depends on the seed and the calibration's sink dims only, so every shard of a
    sharded run (and a resumed run) uses the same dims."""
    non_sink_dims = [d for d in range(hidden_size) if d not in sig.dims]
    gen = torch.Generator().manual_seed(sample_seed(cfg.seed, "control_dim"))
    return {(group, seed): non_sink_dims[int(torch.randint(len(non_sink_dims), (1,), generator=gen))]
            for group in cfg.groups for seed in range(cfg.n_seeds)}


def _sample_generators(seed: int, chunk, index: dict[str, int], *keys) -> list[torch.Generator]:
    """One generator per sample of the chunk, seeded by (--seed, the sample's index in the whole data, keys): a
    sample's draws are the same whatever batch or shard it runs in."""
    return [torch.Generator().manual_seed(sample_seed(seed, index[x.sample_id], *keys)) for x in chunk]


@torch.no_grad()
def _var_rows(adapter, cfg, sig, chunk, batch, inputs, kinds, pools, gens, sign, yes_no) -> list[dict]:
    """none / var / inject / inject+var on background tokens: answers, logit difference, VAR's detection.

    VAR is calibrated (`interventions.var.calibrate`: sink dims and tau) on the batch as the model sees it:
    with the injection for inject+var, without it for var; its sink detector then decides, per prompt at
    prefill, which tokens are sinks."""
    import contextlib

    from sinkscope.eval.accuracy import answer_batch
    from sinkscope.eval.pope import parse_yes_no
    from sinkscope.interventions.var import VARConfig, var

    pool = pools.get("background")
    if pool is None or sign is None:
        return []
    mask, ok = draw_tokens(pool, cfg.n_tokens, gens)
    from sinkscope.interventions.var import calibrate

    rows = []
    for condition in ("none", "var", "inject", "inject+var"):
        injected = condition.startswith("inject")
        with contextlib.ExitStack() as stack:
            if injected:
                stack.enter_context(inject_sink(adapter, mask.to(adapter.device), layer=sig.layer,
                                                scale=cfg.var_scale, signature=sig))
            config = (calibrate(adapter, batch, VARConfig(sink_score=sig.score), start_layer=cfg.start_layer)
                      if condition.endswith("var") else None)  # under the injection when there is one
            run = stack.enter_context(var(adapter, config, fallback="eager")) if config is not None else None
            texts, logits = answer_batch(adapter, inputs, cfg.max_new_tokens)  # one pass over the prompt
            found = math.nan
            if run is not None:  # VAR's sinks are those it found in the prompt at prefill
                later = [l for l in run.resolved.layers if l >= sig.layer]
                flagged = torch.stack([run.sinks(l).cpu() for l in later]).float().mean(0) if later else None
            diff = logit_diff(logits[:, None], sign, yes_no)
        answers = [parse_yes_no(t) for t in texts]
        for b, x in enumerate(chunk):
            if not ok[b]:
                continue
            if run is not None and flagged is not None:
                found = float((flagged[b] * mask[b].float()).sum() / mask[b].sum())
            rows.append({"sample": x.sample_id, "condition": condition, "n_tokens": int(mask[b].sum()),
                         "answer": answers[b], "correct": answers[b] == x.answer.strip().lower(),
                         "logit_diff": float(diff[b]), "var_flags_injected": found,
                         "var_dims": "" if config is None else "[" + ", ".join(str(d) for d in config.sink_dims) + "]",
                         "var_tau": math.nan if config is None else float(config.tau)})
    return rows


# ---------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------

def inject_table(per: pd.DataFrame, answers: pd.DataFrame, bands: dict[int, str], n_boot: int, seed: int) -> pd.DataFrame:
    """inject.csv: treatment, group, scale, band, metric, value, ci_low, ci_high, n_samples.

    Per sample: the mean over seeds and over the layers of the band; the CI resamples samples.
    attention_change: attention minus `none` on the same tokens (paired per sample); logit_diff_change
    has band 'answer'.
    """
    rows = []
    if len(per):
        per = per.assign(band=per["layer"].map(bands), scale=per["scale"].fillna(-1.0))
        per_sample = per.groupby(["treatment", "group", "scale", "band", "sample"])[list(METRICS)].mean()
        none = (per_sample.xs("none", level="treatment").droplevel("scale")["attention"]
                if "none" in per_sample.index.get_level_values("treatment") else None)
        for (treatment, group, scale, band), g in per_sample.groupby(level=[0, 1, 2, 3]):
            values = {m: g[m].to_numpy(float) for m in METRICS}
            if none is not None and treatment != "none":  # paired with no injection on the same tokens
                ref = none.reindex(pd.MultiIndex.from_tuples([(group, band, x) for x in g.index.get_level_values("sample")]))
                values["attention_change"] = g["attention"].to_numpy(float) - ref.to_numpy(float)
            for metric, x in values.items():
                lo, hi = stats.bootstrap_ci(x, n_boot=n_boot, seed=seed)
                rows.append({"treatment": treatment, "group": group, "scale": math.nan if scale < 0 else scale,
                             "band": band, "metric": metric, "value": float(np.nanmean(x)), "ci_low": lo,
                             "ci_high": hi, "n_samples": int(np.isfinite(x).sum())})
    if len(answers):
        a = answers.assign(scale=answers["scale"].fillna(-1.0))
        for (treatment, group, scale), g in a.groupby(["treatment", "group", "scale"]):
            x = g.groupby("sample")["logit_diff_change"].mean().to_numpy(float)
            lo, hi = stats.bootstrap_ci(x, n_boot=n_boot, seed=seed)
            rows.append({"treatment": treatment, "group": group, "scale": math.nan if scale < 0 else scale,
                         "band": "answer", "metric": "logit_diff_change", "value": float(np.nanmean(x)) if len(x) else math.nan,
                         "ci_low": lo, "ci_high": hi, "n_samples": int(np.isfinite(x).sum())})
    return pd.DataFrame(rows, columns=["treatment", "group", "scale", "band", "metric", "value", "ci_low", "ci_high",
                                       "n_samples"])


def sink_onset_scales(per: pd.DataFrame, layer: int, share: float = 0.5) -> pd.DataFrame:
    """Per group: the smallest scale at which >= `share` of injected tokens are sinks by the scan's rule,
    at the injection layer and, separately, in the last layer (NaN where no scale of the grid reaches it)."""
    rows = []
    inj = per[per["treatment"] == "inject"]
    last = int(per["layer"].max()) if len(per) else layer
    for group, g in inj.groupby("group"):
        out = {"group": group}
        for where, at in (("injection_layer", layer), ("last_layer", last)):
            by_scale = g[g["layer"] == at].groupby("scale")["is_sink"].mean().sort_index()
            reached = by_scale[by_scale >= share]
            out[f"sink_scale_{where}"] = float(reached.index[0]) if len(reached) else math.nan
            out[f"sink_share_at_max_scale_{where}"] = float(by_scale.iloc[-1]) if len(by_scale) else math.nan
        rows.append(out)
    return pd.DataFrame(rows)


def var_table(per: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """inject_var.csv: condition, accuracy (CI), its paired change against `none` (CI; exact McNemar p on the
    pairs where both answers parse, with n_pairs), logit_diff and its paired change (CI), unparseable answers,
    VAR's flag share."""
    if per.empty:
        return pd.DataFrame()
    base = per[per["condition"] == "none"].set_index("sample")
    b_corr = base["correct"].astype(float).to_numpy()
    b_diff = base["logit_diff"].to_numpy(float)
    b_parsed = base["answer"].notna().to_numpy() if "answer" in base else np.ones(len(base), bool)
    rows = []
    for condition in ("none", "var", "inject", "inject+var"):
        g = per[per["condition"] == condition].set_index("sample").reindex(base.index)
        corr = g["correct"].astype(float).to_numpy()
        diff = g["logit_diff"].to_numpy(float)
        parsed = g["answer"].notna().to_numpy() if "answer" in g else np.ones(len(g), bool)
        lo, hi = stats.bootstrap_ci(corr, n_boot=n_boot, seed=seed)
        dlo, dhi = stats.bootstrap_ci(diff, n_boot=n_boot, seed=seed)
        row = {"condition": condition, "accuracy": float(np.mean(corr)), "ci_low": lo, "ci_high": hi}
        if condition != "none":
            test = stats.mcnemar_exact(corr > 0.5, b_corr > 0.5, keep=parsed & b_parsed)
            clo, chi = stats.bootstrap_ci(corr - b_corr, n_boot=n_boot, seed=seed)
            llo, lhi = stats.bootstrap_ci(diff - b_diff, n_boot=n_boot, seed=seed)
            row.update(accuracy_change=float(np.mean(corr - b_corr)), accuracy_change_ci_low=clo,
                       accuracy_change_ci_high=chi, p_value=test.p_value, n_pairs=test.n_pairs,
                       logit_diff_change=float(np.mean(diff - b_diff)), logit_diff_change_ci_low=llo,
                       logit_diff_change_ci_high=lhi)
        else:
            row.update(accuracy_change=math.nan, accuracy_change_ci_low=math.nan, accuracy_change_ci_high=math.nan,
                       p_value=math.nan, n_pairs=len(corr), logit_diff_change=math.nan,
                       logit_diff_change_ci_low=math.nan, logit_diff_change_ci_high=math.nan)
        flags = g["var_flags_injected"].to_numpy(float)
        taus = g["var_tau"].to_numpy(float) if "var_tau" in g else np.array([math.nan])
        row.update({"var_dims": ";".join(sorted(set(str(x) for x in g.get("var_dims", pd.Series(dtype=str)).dropna()))),
                    "var_tau": float(np.nanmedian(taus)) if np.isfinite(taus).any() else math.nan,
                    "logit_diff": float(np.mean(diff)), "logit_diff_ci_low": dlo, "logit_diff_ci_high": dhi,
                    "var_flags_injected": float(np.nanmean(flags)) if np.isfinite(flags).any() else math.nan,
                    "n_unparseable": int(np.sum(~parsed)), "n": len(corr)})
        rows.append(row)
    return pd.DataFrame(rows)


def summarize_inject(folder: RunFolder, cfg: InjectConfig, sig: SinkSignature, n_layers: int,
                     figures: bool = True) -> RunFolder:
    from sinkscope import plots

    per = folder.read("inject_per_sample")
    answers = folder.read("inject_answers_per_sample")
    heads = folder.read("inject_heads_per_sample")
    bands = layer_bands(sig.layer, n_layers)
    table = inject_table(per, answers, bands, cfg.n_boot, cfg.seed)
    folder.write_table("inject", table)
    if len(heads):
        head_means = (heads.assign(scale=heads["scale"].fillna(-1.0))
                      .groupby(["treatment", "group", "scale", "layer", "head"])["attention"].mean().reset_index())
        head_means["scale"] = head_means["scale"].where(head_means["scale"] >= 0)
        folder.write_table("inject_heads", head_means)
    onsets = sink_onset_scales(per, sig.layer) if len(per) else pd.DataFrame()
    folder.write_table("inject_sink_scales", onsets)
    var_per = folder.read("inject_var_per_sample") if (folder.path / "inject_var_per_sample.csv").exists() else pd.DataFrame()
    var_summary = var_table(var_per, cfg.n_boot, cfg.seed) if len(var_per) else pd.DataFrame()
    if len(var_summary):
        folder.write_table("inject_var", var_summary)
    figs = {}
    if figures and len(table):
        figs["dose"] = plots.dose_response(table, folder.path / "dose_response.png")
    _write_index(folder, cfg, sig, table, onsets, var_summary, figs)
    folder.finish()
    return folder


def _pick(table, **where):
    t = table
    for k, v in where.items():
        t = t[t[k].isna()] if isinstance(v, float) and math.isnan(v) else t[t[k] == v]
    return None if t.empty else t.iloc[0]


def _accuracy_change(r: dict) -> tuple[Estimate, str, str]:
    """(estimate, status, clause) of a condition's accuracy change against `none` (inject_var.csv row): stated only
    where its CI excludes 0 and McNemar's exact test on the parsed pairs agrees."""
    from sinkscope.findings import exact_test_clause

    est = Estimate(float(r["accuracy_change"]), float(r["accuracy_change_ci_low"]), float(r["accuracy_change_ci_high"]),
                   int(r["n"]))
    tested = f"the {int(r['n_pairs'])} parsed pairs" if pd.notna(r.get("n_pairs")) else "the parsed pairs"
    return (est, *exact_test_clause(est, r["p_value"], tested, "accuracy rises", "accuracy falls"))


def _var_line(r: dict) -> str:
    """One condition of inject_var.csv as a sentence under the findings rule: accuracy with its CI, the paired change
    against `none` (stated only where its CI excludes 0), McNemar on the parsed pairs, unparseable answers, VAR's
    flags."""
    from sinkscope.findings import unparseable_clause

    n = int(r["n"])
    text = f"`{r['condition']}`: accuracy {fmt_ci(r['accuracy'], r['ci_low'], r['ci_high'])}"
    if r["condition"] != "none" and pd.notna(r.get("accuracy_change")):
        _, _, clause = _accuracy_change(r)
        _, logit = effect_clause(Estimate(r["logit_diff_change"], r["logit_diff_change_ci_low"],
                                          r["logit_diff_change_ci_high"], n), "the logit difference rises",
                                 "the logit difference falls")
        p = "" if pd.isna(r["p_value"]) else f"; exact McNemar p = {num(r['p_value'])} on {int(r['n_pairs'])} parsed pairs"
        text += f"; against `none`: {clause}{p}; {logit}"
    text += f"; {unparseable_clause(r.get('n_unparseable', 0), n)}"
    if pd.notna(r["var_flags_injected"]):
        text += (f"; VAR calibrated to dims {r['var_dims']}, tau {num(r['var_tau'])}, flags "
                 f"{num(r['var_flags_injected'])} of the injected tokens")
    return text + f" (n = {n})."


def _write_index(folder, cfg, sig, table, onsets, var_summary, figs) -> None:
    from sinkscope.analyses.pages import index_head
    from sinkscope.markdown import markdown_table

    meta, lines = index_head(folder, cfg, "Injecting the sink signature")
    lines.append(f"{meta.get('n_samples')} samples. At the residual stream entering layer {sig.layer} "
                 f"({meta.get('signature', {}).get('layer_reason', 'given')}), the sink dims {list(sig.dims)} "
                 f"of {cfg.n_tokens} tokens per sample and group were set to scale x the first token's values, scales "
                 f"{cfg.scales}, {cfg.n_seeds} draws. Controls on the same tokens: the same added magnitude along a "
                 "random non-sink dim (`random_dim`), the token's state rescaled to the injected norm (`rescale`), no "
                 f"injection (`none`). Sink rule: score `{sig.score}` >= tau {sig.tau:.4g}. Attention = mean over the text "
                 "queries after the image and over heads of what each injected token receives. CIs: 95% percentile "
                 "bootstrap over samples (scipy).\n")
    if table.empty:
        lines.append("No samples had tokens to inject into.\n")
        folder.write_text("index.md", "\n".join(lines))
        return
    lines.append("## Findings\n")
    first_band = sorted(table["band"].unique(), key=band_start)[0]
    top = max(cfg.scales)
    for _, o in onsets.iterrows():
        g = o["group"]
        at = o["sink_scale_injection_layer"]
        persist = o["sink_scale_last_layer"]
        when = (f"becomes a sink by the scan's threshold at scale {at:g} (>= half the injected tokens at the injection layer)"
                if not math.isnan(at) else
                f"never becomes a sink by the scan's threshold on this grid (share {o['sink_share_at_max_scale_injection_layer']:.2f} "
                f"at scale {top:g})")
        still = (f"; in the last layer from scale {persist:g}" if not math.isnan(persist)
                 else f"; in the last layer the share is {o['sink_share_at_max_scale_last_layer']:.2f} at scale {top:g}")
        lines.append(f"- **{g}** tokens: an injected token {when}{still}.")
        parts = []
        for treatment, scale in (("none", math.nan), ("inject", top), ("random_dim", top), ("rescale", top)):
            r = _pick(table, treatment=treatment, group=g, band=first_band, metric="attention", scale=scale)
            if r is not None:
                parts.append(f"`{treatment}` {fmt_ci(r['value'], r['ci_low'], r['ci_high'])}")
        if parts:
            lines.append(f"  Attention it receives ({first_band}, scale {top:g}): " + "; ".join(parts) + ".")
        a = _pick(table, treatment="none", group=g, band=first_band, metric="attention_max_head", scale=math.nan)
        b = _pick(table, treatment="inject", group=g, band=first_band, metric="attention_max_head", scale=top)
        if a is not None and b is not None:
            lines.append(f"  In its most attentive head: {a['value']:.3g} without injection, "
                         f"{fmt_ci(b['value'], b['ci_low'], b['ci_high'])} injected at scale {top:g}.")
        for treatment in ("inject", "random_dim"):
            r = _pick(table, treatment=treatment, group=g, band="answer", metric="logit_diff_change", scale=top)
            if r is not None:
                _, clause = effect_clause(Estimate(r["value"], r["ci_low"], r["ci_high"], int(r["n_samples"])),
                                          "the answer's logit difference rises", "the answer's logit difference falls")
                lines.append(f"  Answer logit difference, `{treatment}` at scale {top:g} against no injection: {clause} "
                             f"(n = {int(r['n_samples'])}).")
        for metric in ("value_norm", "contribution"):
            a = _pick(table, treatment="none", group=g, band=first_band, metric=metric, scale=math.nan)
            b = _pick(table, treatment="inject", group=g, band=first_band, metric=metric, scale=top)
            if a is not None and b is not None:
                lines.append(f"  {metric.replace('_', ' ')} ({first_band}): {a['value']:.3g} without injection, "
                             f"{fmt_ci(b['value'], b['ci_low'], b['ci_high'])} injected at scale {top:g}.")
    if len(var_summary):
        lines.append("\n## What VAR does to injected sinks\n")
        lines.append(f"Background image tokens injected at scale {cfg.var_scale:g} ({cfg.n_tokens} per sample); VAR calibrated "
                     "(sink dims and tau) on each batch as the model sees it, with or without the injection (paper "
                     "defaults otherwise). Accuracy: greedy yes/no answers; p: exact McNemar "
                     "against `none`. `var_flags_injected`: share of injected tokens VAR's sink detector flags, mean over "
                     "VAR's layers from the injection layer on.\n")
        for r in var_summary.to_dict("records"):
            lines.append(f"- {_var_line(r)}")
        lines.append("")
    if "dose" in figs:
        lines.append(f"\n![dose response]({figs['dose']})\n")
    lines.append("## Tables\n")
    lines.append("`inject.csv` (every treatment, group, scale, layer band and metric with CIs), `inject_sink_scales.csv`, "
                 "`inject_heads.csv` (mean attention per head), per-sample tables.\n")
    lines.append(markdown_table(onsets, max_rows=10))
    folder.write_text("index.md", "\n".join(lines))


# ---------------------------------------------------------------------------------------
# the report step
# ---------------------------------------------------------------------------------------

FIGURES = ("dose_response.png",)  # the report shows these first, in this order


def report_step(folder, report_cfg, adapter, sink_score: str, log, calibration=None) -> None:
    """`sinkscope report` step: a light grid (4 scales, one draw, at most 8 samples) so it runs in minutes."""
    config = report_step_config(InjectConfig, report_cfg, sink_score, limit=min(int(report_cfg.limit or 8), 8),
                                scales=[0.0, 0.01, 0.1, 1.0], n_seeds=1)
    run_inject(str(folder), config, adapter=adapter, log=log, calibration=calibration)


def findings(folder) -> list[Finding]:
    """Findings of the step: per group, the sink scale and the attention change at the largest scale vs the
    random-dim control; VAR's detection of injected sinks."""
    import json
    from pathlib import Path

    folder = Path(folder)
    run = json.loads((folder / "run.json").read_text())
    n = run.get("n_samples")
    table = pd.read_csv(folder / "inject.csv")
    onsets = pd.read_csv(folder / "inject_sink_scales.csv") if (folder / "inject_sink_scales.csv").exists() else pd.DataFrame()
    sig = run.get("signature", {})
    out = []
    bands = sorted(b for b in table["band"].unique() if b != "answer")
    first_band = min(bands, key=band_start) if bands else None
    top = float(table["scale"].max()) if table["scale"].notna().any() else math.nan
    for _, o in onsets.iterrows():
        at = o["sink_scale_injection_layer"]
        out.append(Finding("inject", f"scale at which an injected {o['group']} token is a sink", float(at), n=n,
                           status=MEASURED, sentence=(
            f"Smallest scale (x the first token's sink-dim values, grid {sorted(table['scale'].dropna().unique().tolist())}) "
            f"at which half the injected tokens reach the scan's threshold (tau {num(sig.get('tau'))}) entering layer "
            f"{sig.get('layer')}" + ("." if math.isfinite(at) else
                                     f": none on this grid (share {num(o['sink_share_at_max_scale_injection_layer'])} at the largest)."))))
        for treatment in ("inject", "random_dim"):
            r = _pick(table, treatment=treatment, group=o["group"], band=first_band, metric="attention_change", scale=top)
            if r is None:
                continue
            est = Estimate(float(r["value"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
            status, clause = effect_clause(est, "it draws more attention", "it draws less attention")
            what = "injected" if treatment == "inject" else "random-dim control"
            out.append(Finding("inject", f"attention change, {o['group']} token, {what}, scale {num(top)}", est.value,
                               est.ci_low, est.ci_high, n=est.n, status=status, sentence=(
                f"Attention from the text queries after the image per token ({first_band}, mean over heads) minus "
                f"the same token without injection: {clause}.")))
        r = _pick(table, treatment="inject", group=o["group"], band="answer", metric="logit_diff_change", scale=top)
        if r is not None:
            est = Estimate(float(r["value"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
            status, clause = effect_clause(est, "the answer's logit difference rises",
                                           "the answer's logit difference falls")
            out.append(Finding("inject", f"answer logit-difference change, {o['group']} token injected, scale {num(top)}",
                               est.value, est.ci_low, est.ci_high, n=est.n, status=status,
                               sentence=f"Against the same prompt without injection: {clause}."))
    if (folder / "inject_var.csv").exists():
        var = pd.read_csv(folder / "inject_var.csv")
        for r in var[var["condition"] != "none"].to_dict("records"):
            n_var = int(r["n"])
            if "accuracy_change" in r and pd.notna(r["accuracy_change"]):
                est, status, _ = _accuracy_change(r)
            else:
                est, status = Estimate(math.nan, n=n_var), MEASURED
            out.append(Finding("inject", f"accuracy change, {r['condition']} against none", est.value, est.ci_low,
                               est.ci_high, n=n_var, status=status, sentence=_var_line(r)))
    return out
