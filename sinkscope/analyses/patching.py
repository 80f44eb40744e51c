"""`sinkscope patch`: do visual sinks carry the answer? Causal patching across images, and VAR's path.

For each yes/no question (the target run), a source run asks the *same question about another
image* whose answer is the opposite where that is known (demo world: a scene of the same split
with / without the asked object; POPE files: an image with the same question and the other
label). Both prompts have the same token layout, so activations move position by position
(sinkscope.interventions.patching, nnsight, two traces). The effect of a patch is the change of
the logit difference of the target's correct answer,
    ld = sign * (logit(yes) - logit(no)) at the answer position, sign = +1 if the label is yes else -1,
    effect = ld(patched) - ld(clean target);
negative = the patch moves the answer towards the source image's. `full_effect` is the same change
for running the source image entirely (the most any patch can do).

Sites (layer -1 = every layer at once, otherwise the single layer named):
  (a) visual_sinks: residual stream of the image tokens that are sinks (phi >= tau entering that layer,
      layers >= start_layer, in the source or the target run), in the layers where they are sinks;
  (a') random_nonsink: per layer as many image tokens that are sinks in no layer, drawn at random
      (matched-count control);
  (b) object_tokens: image tokens covering an object in either image (demo ground truth) that are
      sinks in no layer, or nonsink_image (all such image tokens) when no object masks exist;
  (c) image_centric_heads: outputs of the heads that are image-centric for a query (image attention
      >= summ, visual non-sink ratio >= rho) at the text queries after the image; other_heads: as
      many other heads per (layer, query), at random (fewer where not enough other heads exist:
      n_tokens says how many (head, query) pairs were patched);
  (d) VAR: var_full = VAR on against off; var_selected_heads = the outputs of the (head, query) VAR
      edited, taken from the VAR run and patched into the baseline run (all VAR layers at once);
      var_other_heads = as many unedited heads per (layer, query). If VAR's effect runs through the
      heads it selects, var_selected_heads ~ var_full and var_other_heads ~ 0.
  self: every image token patched from the target's own run (the invariant: exactly 0).
The random controls ((a'), other_heads, var_other_heads) are drawn per sample from a generator seeded by (seed, the
sample's index in the data), so a sample draws the same whatever batch or shard (--shard i/n) it runs in.

Writes: run.json, sink_dims.json, patching_per_sample.csv, patching.csv (source, target, site,
layer, n_tokens, effect, ci_low, ci_high, p_value, n_samples, full_effect, fraction_of_full),
patching.png, index.md. Resumable per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.common import (AnalysisConfig, Setup, SinkAwareReducer, answer_token_ids, prepare_batch,
                                      report_step_config, setup, yes_no_labels)
from sinkscope.analyses.step_findings import bootstrap_mean_ci
from sinkscope.errors import SinkscopeError
from sinkscope.eval import stats
from sinkscope.eval.tasks import Sample, progress
from sinkscope.findings import (EFFECT, NOTHING_TO_TEST, Estimate, Finding, effect_clause, nothing_clause,
                                nothing_to_act_on, num, share_clause)
from sinkscope.interventions.patching import Patch, Patcher, check_aligned, logit_diff, matched_heads, matched_tokens
from sinkscope.measures.heads import image_centric_from_stats, visual_attention_stats
from sinkscope.runconfig import analysis_default, sample_seed
from sinkscope.runfolder import RunFolder

if TYPE_CHECKING:
    from sinkscope.interventions.var import VARConfig

PER_SAMPLE_COLUMNS = ["sample", "source_sample", "source", "target", "site", "layer", "n_tokens", "ld_clean",
                      "ld_patched", "effect", "full_effect"]
TABLE_COLUMNS = ["source", "target", "site", "layer", "n_tokens", "effect", "ci_low", "ci_high", "p_value",
                 "n_samples", "full_effect", "fraction_of_full"]
ALL_LAYERS = -1


@dataclass
class PatchConfig(AnalysisConfig):
    data: str = analysis_default("patching", "data")
    batch_size: int = analysis_default("patching", "batch_size")
    layers: list[int] | None = None  # single-layer sites (default all); layer -1 rows always patch every layer
    rho: float = 0.5
    summ: float = 0.2
    p: float = 0.6  # VAR's p for the (d) sites
    var: bool = True  # run the (d) sites

    def check_layers(self) -> None:
        """--layers: single-layer sites; an empty list means whole-model sites only (layer -1 rows)."""
        if self.layers is not None and len(self.layers) == 0:
            return
        super().check_layers()

    def validate(self) -> None:
        super().validate()
        for name in ("rho", "summ", "p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SinkscopeError(f"--{name} must be in [0, 1]; got {getattr(self, name)}")


# ----------------------------------------------------------------------------- sources


def _demo_source(target: Sample) -> tuple[Sample, str | None]:
    """A demo scene of the target's split whose answer to the target's question is the opposite."""
    import sinkscope.world as world

    split, scene, category = target.meta.get("split", "test"), int(target.meta["scene"]), target.meta["category"]
    want_present = (target.answer or "").lower() != "yes"
    for k in range(1, 2000):
        other = world.scene(split, scene + 7919 * k)  # far from the evaluated scenes, deterministic
        if (category in other.categories) == want_present:
            source = Sample(f"{split}-{other.index}", target.question, None, "yes" if want_present else "no",
                            task=target.task, meta={"scene": other.index, "split": split,
                                                    "background_patches": other.background_patch_mask.tolist()},
                            _image=other.pil())
            return source, source.answer
    raise SinkscopeError(f"no counterfactual scene found for {target.sample_id}")


def pick_sources(targets: list[Sample], pool: list[Sample]) -> list[tuple[Sample, str | None]]:
    """For each target: (source sample with the target's question, the source's answer or None if unknown).

    Demo samples (meta has scene and category): a scene with the opposite answer. Otherwise a sample of
    `pool` with the same question text and the other label, else the next sample with another image.
    """
    out = []
    for i, t in enumerate(targets):
        if "scene" in t.meta and "category" in t.meta:
            out.append(_demo_source(t))
            continue
        norm = " ".join(t.question.lower().split())
        match = [s for s in pool if s.image_path != t.image_path and " ".join(s.question.lower().split()) == norm
                 and (s.answer or "").lower() not in ("", (t.answer or "").lower())]
        if match:
            s = match[0]
            out.append((Sample(s.sample_id, t.question, s.image_path, s.answer, task=t.task, meta=dict(s.meta)), s.answer))
            continue
        others = [s for s in pool if s.image_path != t.image_path]
        if not others:
            raise SinkscopeError("patching needs at least two different images in the data")
        s = others[(pool.index(t) if t in pool else i) % len(others)]
        out.append((Sample(s.sample_id, t.question, s.image_path, None, task=t.task, meta=dict(s.meta)), None))
    return out


# ----------------------------------------------------------------------------- what the target run shows


class _SinksAndHeads(SinkAwareReducer):
    """Per layer: sinks (as SinkAwareReducer) and image-centric (head, query) [batch, head, token] bool."""

    def __init__(self, dims, tau, eps, score, rho, summ, start_layer):
        super().__init__(dims, tau, eps, score)
        self.rho, self.summ, self.start = rho, summ, start_layer
        self.centric: dict[int, torch.Tensor] = {}

    def begin(self, info):
        super().begin(info)
        self.centric = {}

    def attention(self, layer, probs):
        """Reduced on the probabilities' device; only the [batch, head, token] mask comes to the host, in `end`."""
        there = self.on(probs.device)
        st = visual_attention_stats(probs.detach().float(), there["visual"], self.sink[layer], there["queries"])
        self.centric[layer] = image_centric_from_stats(st, self.rho, self.summ)

    def end(self) -> None:
        self.centric, = super().end(self.centric)



def object_tokens(samples: list[Sample], visual: torch.Tensor) -> torch.Tensor | None:
    """[batch, token] image tokens covering an object (demo ground truth), or None without masks."""
    out = torch.zeros_like(visual)
    for b, s in enumerate(samples):
        bg = s.meta.get("background_patches")
        positions = torch.nonzero(visual[b]).flatten()
        if bg is None or len(bg) != len(positions):
            return None
        out[b, positions] = ~torch.tensor(bg, dtype=torch.bool)
    return out


# ----------------------------------------------------------------------------- the run


def run_patching(out: str, cfg: PatchConfig, adapter=None, resume: bool = True, log=print, calibration=None,
                 figures: bool = True) -> RunFolder:
    s = setup(out, "patching", cfg, adapter, resume, log, calibration=calibration)
    adapter = s.adapter
    n_layers = adapter.num_layers
    layers = list(range(n_layers)) if cfg.layers is None else [int(l) for l in cfg.layers]
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise SinkscopeError(f"--layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    yes_no_labels(s.samples, "patching")  # every question needs its yes/no answer (the rows read it from the sample)
    yes_id, no_id = answer_token_ids(adapter)
    var_cfg = None
    if cfg.var:
        from sinkscope.interventions.var import VARConfig

        if s.dims.dims:
            var_cfg = VARConfig(tau=s.tau.value, rho=cfg.rho, p=cfg.p, summ=cfg.summ, sink_dims=list(s.dims.dims),
                                sink_score=cfg.sink_score, seed=cfg.seed)
        else:
            s.folder.update_meta(var_note="no sink dims found: VAR changes nothing, its sites are left out")
    ctx = _PatchContext(s, cfg, Patcher(adapter, s.tracer.envoy), layers, yes_id, no_id, var_cfg)
    index = {x.sample_id: k for k, x in enumerate(s.samples)}  # the sample's index in the data: its random draws
    for chunk in progress(s.todo, cfg.batch_size, "patching"):
        gens = [torch.Generator().manual_seed(sample_seed(cfg.seed, index[x.sample_id])) for x in chunk]
        rows = _patch_batch(ctx, chunk, gens)
        s.folder.append_rows("patching_per_sample", pd.DataFrame(rows, columns=PER_SAMPLE_COLUMNS))
        s.folder.mark_done([x.sample_id for x in chunk])
    return summarize_patching(s.folder, cfg, figures)


@dataclass(frozen=True)
class _PatchContext:
    """What every batch of one patching run shares: set once in `run_patching`, read by `_patch_batch`."""

    s: Setup  # adapter, samples (the sources' pool), tracer, sink dims and tau
    cfg: PatchConfig
    patcher: Patcher
    layers: list[int]  # the layers patched one by one (besides all of them at once)
    yes_id: int
    no_id: int
    var_cfg: VARConfig | None  # None: no VAR sites (--no-var, or no sink dims found)


def _patch_batch(ctx: _PatchContext, chunk: list[Sample], gen: list[torch.Generator]) -> list[dict]:
    """The per-sample rows of one batch; gen: one generator per sample of `chunk` (its random controls' draws)."""
    s, cfg, patcher, layers = ctx.s, ctx.cfg, ctx.patcher, ctx.layers
    yes_id, no_id, var_cfg = ctx.yes_id, ctx.no_id, ctx.var_cfg
    adapter = s.adapter
    sources = pick_sources(chunk, s.samples)
    src_samples = [x for x, _ in sources]
    batch_t, batch_s = prepare_batch(adapter, chunk), prepare_batch(adapter, src_samples)
    check_aligned(batch_t["input_ids"], batch_s["input_ids"])
    inp_t, inp_s = adapter.device_inputs(batch_t), adapter.device_inputs(batch_s)
    red_t = _SinksAndHeads(s.dims.dims, s.tau.value, adapter.rms_norm_eps, cfg.sink_score, cfg.rho, cfg.summ,
                           cfg.start_layer)
    red_s = _SinksAndHeads(s.dims.dims, s.tau.value, adapter.rms_norm_eps, cfg.sink_score, cfg.rho, cfg.summ,
                           cfg.start_layer)
    s.tracer.run(batch_t, [red_t])
    s.tracer.run(batch_s, [red_s], attention=False)
    sign = torch.tensor([1.0 if x.answer.strip().lower() == "yes" else -1.0 for x in chunk])
    every = list(range(adapter.num_layers))
    clean = patcher.run(inp_t, capture=every)
    src = patcher.run(inp_s, capture=every)
    ld_clean = logit_diff(clean.logits, yes_id, no_id, sign)
    full = logit_diff(src.logits, yes_id, no_id, sign) - ld_clean
    visual = red_t.visual
    # a token is patched as a sink in the layers where it is one (in the target or the source run)
    sink_at = {l: (red_t.visual_sink[l] | red_s.visual_sink[l]) if l >= cfg.start_layer else torch.zeros_like(visual)
               for l in every}
    sinks = torch.stack([sink_at[l] for l in every]).any(dim=0)  # [batch, token] sinks in any layer
    objects = object_tokens(chunk, visual)
    objects_s = object_tokens(src_samples, visual)
    if objects is not None and objects_s is not None:
        object_site, object_mask = "object_tokens", (objects | objects_s) & ~sinks
    else:
        object_site, object_mask = "nonsink_image", visual & ~sinks
    control = {l: matched_tokens(sink_at[l].sum(dim=1), visual & ~sinks, gen) for l in every}
    queries = red_t.queries
    rows: list[dict] = []

    def record(source, target, site, layer, n_tokens, patched_logits, reference=ld_clean, full_effect=full):
        ld = logit_diff(patched_logits, yes_id, no_id, sign)
        for b, x in enumerate(chunk):
            rows.append({"sample": x.sample_id, "source_sample": src_samples[b].sample_id if source != "self" else x.sample_id,
                         "source": source, "target": target, "site": site, "layer": layer,
                         "n_tokens": float(n_tokens[b]), "ld_clean": float(reference[b]), "ld_patched": float(ld[b]),
                         "effect": float(ld[b] - reference[b]), "full_effect": float(full_effect[b])})

    # invariant: the target patched with its own activations
    own = patcher.run(inp_t, [Patch("residual", l, visual, clean.residual[l]) for l in every])
    record("self", "clean", "all_image", ALL_LAYERS, visual.sum(1), own.logits, full_effect=torch.zeros_like(full))
    # (a), (a'), (b): residual stream of token sets
    for site, masks in (("visual_sinks", sink_at), ("random_nonsink", control),
                        (object_site, {l: object_mask for l in every})):
        for layer in [ALL_LAYERS] + layers:
            at = every if layer == ALL_LAYERS else [layer]
            run = patcher.run(inp_t, [Patch("residual", l, masks[l], src.residual[l]) for l in at if masks[l].any()])
            n_tokens = torch.stack([masks[l].sum(1) for l in at]).amax(dim=0)  # tokens patched (in their layers)
            record("other_image", "clean", site, layer, n_tokens, run.logits)
    # (c): head outputs at the text queries after the image
    eligible = queries[:, None, :].expand(-1, adapter.num_heads, -1)
    centric = {l: red_t.centric[l] & eligible for l in every}
    others = {l: matched_heads(centric[l], eligible, gen) for l in every}
    for site, masks in (("image_centric_heads", centric), ("other_heads", others)):
        for layer in [ALL_LAYERS] + layers:
            at = every if layer == ALL_LAYERS else [layer]
            run = patcher.run(inp_t, [Patch("heads", l, masks[l], src.heads[l]) for l in at])
            record("other_image", "clean", site, layer, sum(masks[l].sum(dim=(1, 2)) for l in at), run.logits)
    # (d): VAR's edit through the heads it selects
    if var_cfg is not None:
        from sinkscope.interventions.var import var

        with var(adapter, var_cfg, fallback="eager") as vrun:
            edited = patcher.run(inp_t, capture=list(vrun.resolved.layers))
            selected = {l: vrun.selected(l).cpu() for l in vrun.resolved.layers}
        var_layers = sorted(selected)
        n_sel = sum(selected[l].sum(dim=(1, 2)) for l in var_layers)
        var_full = logit_diff(edited.logits, yes_id, no_id, sign) - ld_clean
        record("var", "baseline", "var_full", ALL_LAYERS, n_sel, edited.logits, full_effect=var_full)
        unselected = {l: matched_heads(selected[l] & eligible, eligible, gen) for l in var_layers}
        for site, masks in (("var_selected_heads", selected), ("var_other_heads", unselected)):
            run = patcher.run(inp_t, [Patch("heads", l, masks[l], edited.heads[l]) for l in var_layers])
            record("var", "baseline", site, ALL_LAYERS, sum(masks[l].sum(dim=(1, 2)) for l in var_layers), run.logits,
                   full_effect=var_full)
    return rows


# ----------------------------------------------------------------------------- summary


def patching_table(per: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """patching.csv from the per-sample rows: mean effect per (source, target, site, layer) with a
    bootstrap CI over samples, the Wilcoxon p-value against no change, the mean full effect and the
    fraction of it the site carries (mean effect / mean full effect)."""
    rows = []
    for (source, target, site, layer), g in per.groupby(["source", "target", "site", "layer"], sort=False):
        effect = g["effect"].to_numpy(float)
        lo, hi = stats.bootstrap_ci(effect, n_boot=n_boot, seed=seed)
        full = float(g["full_effect"].mean())
        rows.append({"source": source, "target": target, "site": site, "layer": int(layer),
                     "n_tokens": float(g["n_tokens"].mean()), "effect": float(effect.mean()), "ci_low": lo,
                     "ci_high": hi, "p_value": stats.paired_test(g["ld_patched"], g["ld_clean"]),
                     "n_samples": len(g), "full_effect": full,
                     "fraction_of_full": float(effect.mean()) / full if full else math.nan})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def summarize_patching(folder: RunFolder, cfg: PatchConfig, figures: bool = True) -> RunFolder:
    from sinkscope import plots

    per = folder.read("patching_per_sample")
    table = patching_table(per, cfg.n_boot, cfg.seed) if len(per) else pd.DataFrame(columns=TABLE_COLUMNS)
    folder.write_table("patching", table)
    figs = {}
    if figures and len(table):
        figs["effects"] = plots.patching_effects(table, folder.path / "patching.png")
    _write_index(folder, cfg, table, figs)
    folder.finish()
    return folder


def _write_index(folder, cfg, table, figs) -> None:
    from sinkscope.analyses.pages import index_head
    from sinkscope.markdown import markdown_table

    meta, lines = index_head(folder, cfg, "Activation patching")
    lines.append(f"{meta.get('n_samples')} questions; sink dims {meta.get('sink_dims')}; tau "
                 f"{(meta.get('tau') or {}).get('value')}. Each question is also asked about another image with the "
                 "opposite answer where known; effect = change of the correct answer's logit difference "
                 "(yes - no, signed by the label) when the site is copied from that run (negative: towards the other "
                 "image's answer). Layer -1 = every layer at once. CIs: 95% percentile bootstrap over questions; "
                 "p: Wilcoxon signed-rank of patched against clean.\n")
    if meta.get("var_note"):
        lines.append(f"VAR sites: {meta['var_note']}.\n")
    if table.empty:
        lines.append("No samples.\n")
    else:
        from sinkscope.analyses.pages import step_findings_section

        lines += step_findings_section(findings, folder.path)
    if "effects" in figs:
        lines.append(f"![patching]({figs['effects']})\n")
    # fraction_of_full stays in patching.csv; on the page a share of the full effect is only the findings', which
    # print it where the reference effect's CI excludes 0 (a share of noise reads as a finding)
    lines.append("Every site and layer (patching.csv; its `fraction_of_full`, the effect over the mean full effect "
                 "whether or not that effect is detectable, is left out here):\n")
    lines.append(markdown_table(table.drop(columns=["fraction_of_full"], errors="ignore"), max_rows=200))
    folder.write_text("index.md", "\n".join(lines))


# ----------------------------------------------------------------------------- the report step

FIGURES: tuple[str, ...] = ()  # the report shows the step's figures in name order


def report_step(folder: Path, report_cfg, adapter, sink_score: str, log, calibration=None) -> None:
    """`sinkscope report` step: limit // 2 questions (at least 8), whole-model sites only (layers=[])."""
    config = report_step_config(PatchConfig, report_cfg, sink_score, limit=max(8, report_cfg.limit // 2), layers=[],
                                data=PatchConfig.data)  # its own yes/no pairs, whatever the report's data
    run_patching(str(folder), config, adapter=adapter, log=log, calibration=calibration)


def reference_effect(folder: Path, table: pd.DataFrame, source: str) -> Estimate | None:
    """The effect a share is taken of: the whole-image swap (source other_image, from the per-sample table) or
    VAR's whole effect (var_full); None when it was not measured."""
    if source == "var":
        rows = table[(table["site"] == "var_full") & (table["layer"] == -1)]
        if not len(rows):
            return None
        r = rows.iloc[0]
        return Estimate(float(r["effect"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
    path = folder / "patching_per_sample.csv"
    if not path.exists():
        return None
    per_sample = pd.read_csv(path)
    rows = per_sample[(per_sample["source"] == source) & (per_sample["layer"] == -1)]
    if not len(rows):
        return None
    full = rows.groupby("sample")["full_effect"].first()
    m, lo, hi = bootstrap_mean_ci(full.values)
    return Estimate(m, lo, hi, len(full))


PATCH_MEANINGS = {  # source: (above 0, below 0)
    "other_image": ("the patch moves the answer away from the other image's", "the patch carries the other image's "
                    "answer"),
    "var": ("raises the correct answer's logit difference", "lowers the correct answer's logit difference"),
}


def _count(x) -> str:
    """A mean count per sample: whole numbers from 100 on ('1007', not '1.01e+03')."""
    return f"{float(x):.0f}" if np.isfinite(float(x)) and float(x) >= 100 else num(x)


def findings(folder: Path) -> list[Finding]:
    """The whole-image swap, then every site patched at all layers at once, with its share of the reference effect."""
    table = pd.read_csv(folder / "patching.csv")
    out = []
    swap = reference_effect(folder, table, "other_image")
    if swap is not None:
        status, clause = effect_clause(swap, *PATCH_MEANINGS["other_image"])
        out.append(Finding("patching", "whole image from the other_image run (the most a patch can do)", swap.value,
                           swap.ci_low, swap.ci_high, n=swap.n, status=status, sentence=(
                               f"Running the other image instead: {clause}.")))
    references = {"other_image": (swap, "swapping the whole image"),
                  "var": (reference_effect(folder, table, "var"), "VAR's whole effect")}
    for _, r in table[table["layer"] == -1].iterrows():
        name = f"{r['site']} from the {r['source']} run, all layers"
        est = Estimate(float(r["effect"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
        if r["source"] == "self":
            out.append(Finding("patching", name, est.value, est.ci_low, est.ci_high, n=est.n, sentence=(
                "Check: every image token patched from the target's own run must change nothing (0).")))
            continue
        if nothing_to_act_on(r["n_tokens"]):
            what = "visual sinks" if r["site"] == "visual_sinks" else f"{r['site']} tokens"
            out.append(Finding("patching", name, math.nan, n=est.n, status=NOTHING_TO_TEST,
                               sentence=f"{nothing_clause('patch', what)}."))
            continue
        above, below = PATCH_MEANINGS.get(r["source"], ("raises the correct answer's logit difference",
                                                        "lowers the correct answer's logit difference"))
        status, clause = effect_clause(est, above, below)
        reference, ref_name = references.get(r["source"], (None, ""))
        # a share only of a detectable reference (share_clause) and only for a detectable part: no share of noise
        share = ("" if reference is None or r["site"] == "var_full" or status != EFFECT
                 else share_clause(est.value, reference, ref_name))
        if share and r["site"] == "var_selected_heads":  # the edited heads, patched in layer order, rebuild the VAR run
            share += " (expected by construction: VAR edits only these heads)"
        out.append(Finding("patching", name, est.value, est.ci_low, est.ci_high, n=est.n, status=status, sentence=(
            f"Change of the correct answer's logit difference: {clause}" + (f"; {share}" if share else "")
            + f" ({_count(r['n_tokens'])} positions or heads per question).")))
    return out
