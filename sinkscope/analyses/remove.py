"""`sinkscope remove`: take the sink signature away and see what breaks.

Sun et al. (massive activations) set the massive activations of LLMs to zero (the model breaks) or to
their mean (it does not). Here (sinkscope.interventions.sink_signature.remove_sink), at the residual
stream entering the onset layer (or every layer from it on, `layers="all"`), the sink-dim
coordinates of a target set are replaced:
  - targets: `first` (the first token), `sinks` (every token the scan's rule calls a sink entering
    the layer), `visual_sinks` (the image tokens among them);
  - to: `zero`; `mean` (the mean over ordinary tokens of the same batch: neither chosen nor sinks);
    `chosen_mean` (the target tokens' own mean over the calibration samples: a constant per dim, the
    replacement Sun et al. call "set to the mean").
Measured against the unmodified model, per sample:
  - attention redistribution: at layers >= the onset, the share of the text queries' attention on
    the first token, on the other removed tokens, on other text and on image tokens (mean over
    heads and layers): where the first token's attention goes;
  - answer accuracy (greedy answers, exact match / yes-no parsing) when the samples have answers
    (`--data demo:mixed`: existence, colour, position, count);
  - perplexity of the prompt text (next-token NLL) for text prompts, e.g. `--data plain-text` (a
    small public-domain set shipped in sinkscope/world/text/, see SOURCES.md there) with
    `--model smollm2` (the demo's language model on its own).

Writes: remove_per_sample.csv, remove_attention_per_sample.csv, remove.csv (CIs: percentile bootstrap
over samples; accuracy p: exact McNemar vs none; NLL p: Wilcoxon vs none), remove_attention.csv, index.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.common import AnalysisConfig, prepare_batch, report_step_config, setup
from sinkscope.analyses.inject import signature_of
from sinkscope.errors import SinkscopeError
from sinkscope.eval import stats
from sinkscope.eval.tasks import progress
from sinkscope.findings import (MEASURED, NOTHING_TO_TEST, Estimate, Finding, effect_clause, exact_test_clause,
                                findings_section, num)
from sinkscope.interventions.attention import edit_attention
from sinkscope.interventions.sink_signature import REMOVE_TO, TARGETS, remove_sink, resolve_mask
from sinkscope.kinds import PAD
from sinkscope.measures.contributions import received_by_key
from sinkscope.measures.perplexity import token_nll
from sinkscope.runconfig import analysis_default
from sinkscope.runfolder import RunFolder

PLAIN_TEXT = Path(__file__).resolve().parent.parent / "world" / "text" / "public_domain.txt"
CLASSES = ("first", "removed", "other_text", "image")


@dataclass
class RemoveConfig(AnalysisConfig):
    data: str = analysis_default("remove", "data")
    limit: int | None = analysis_default("remove", "limit")
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    to: list[str] = field(default_factory=lambda: list(REMOVE_TO))
    layers: str = "onset"  # onset: the layer of the signature only | all: every layer from it on
    layer: int | None = None  # default: the discovery's onset layer
    max_new_tokens: int = 4

    def check_layers(self) -> None:
        if self.layers not in ("onset", "all"):
            raise SinkscopeError(f"--layers must be 'onset' or 'all'; got {self.layers!r}")

    def validate(self) -> None:
        super().validate()
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise SinkscopeError(f"--targets must come from {', '.join(TARGETS)}; got {self.targets}")
        bad = [t for t in self.to if t not in REMOVE_TO]
        if bad or not self.to:
            raise SinkscopeError(f"--to must come from {', '.join(REMOVE_TO)}; got {self.to}")


def named_specs(model: str, data: str) -> tuple[str, str]:
    """Names this analysis adds: --model smollm2 (the demo's language model on its own, a local folder once
    cached) and --data plain-text (the shipped public-domain text set). Other specs pass through."""
    if model == "smollm2":
        from sinkscope.models.embedded import smollm

        model = str(smollm.ensure_cached())
    if data == "plain-text":
        data = str(PLAIN_TEXT)
    return model, data


def resolve_specs(cfg: AnalysisConfig) -> None:
    cfg.model, cfg.data = named_specs(cfg.model, cfg.data)


@torch.no_grad()
def chosen_means(adapter, samples, sig, targets, layers: list[int], n: int, batch_size: int
                 ) -> dict[str, dict[int, list[float]] | None]:
    """Per target and edited layer: the mean of the target tokens' sink-dim values entering that layer over
    the first n samples of the unmodified model. Layers without such a token get no vector (not edited to a
    mean there); a target with none in any layer gets None."""
    sums = {t: {l: torch.zeros(len(sig.dims), dtype=torch.float64) for l in layers} for t in targets}
    counts = {t: {l: 0 for l in layers} for t in targets}
    for i in range(0, min(n, len(samples)), batch_size):
        chunk = samples[i: min(i + batch_size, n)]
        inputs = adapter.device_inputs(prepare_batch(adapter, chunk))
        kinds = adapter.token_kinds(inputs["input_ids"], inputs.get("attention_mask"))
        hidden = adapter.model(**inputs, **adapter.without_logits(), output_hidden_states=True).hidden_states
        for t in targets:
            for l in layers:
                mask = resolve_mask(t, hidden[l], kinds, sig)
                values = hidden[l][..., list(sig.dims)][mask].double().cpu()
                sums[t][l] += values.sum(dim=0)
                counts[t][l] += int(values.shape[0])
    return {t: ({l: (sums[t][l] / counts[t][l]).tolist() for l in layers if counts[t][l]} or None) for t in targets}


def class_masks(kinds, first_mask, removed) -> dict[str, torch.Tensor]:
    real = kinds.kind != PAD
    return {"first": first_mask, "removed": removed & ~first_mask,
            "other_text": real & (kinds.text_mask | kinds.bos_mask) & ~removed & ~first_mask,
            "image": kinds.visual_mask & ~removed}


def run_remove(out: str, cfg: RemoveConfig, adapter=None, resume: bool = True, log=print, calibration=None) -> RunFolder:
    resolve_specs(cfg)
    s = setup(out, "remove", cfg, adapter, resume, log, calibration=calibration)
    adapter = s.adapter
    sig = signature_of(s, cfg)
    if adapter.text_attention != "eager":
        adapter.set_text_attention("eager")
    layers = [sig.layer] if cfg.layers == "onset" else list(range(sig.layer, adapter.num_layers))
    means = s.folder.meta.get("chosen_means")
    if "chosen_mean" in cfg.to and means is None:
        means = chosen_means(adapter, s.samples, sig, cfg.targets, layers, cfg.calibration, cfg.batch_size)
    s.folder.update_meta(signature={"dims": list(sig.dims), "layer": sig.layer, "tau": sig.tau, "score": sig.score},
                         edited_layers=layers, chosen_means=means, plain_text_source=str(PLAIN_TEXT.parent / "SOURCES.md"))
    from sinkscope.eval.accuracy import score_samples

    tok = getattr(adapter.processor, "tokenizer", adapter.processor)
    for chunk in progress(s.todo, cfg.batch_size, "remove"):
        batch = prepare_batch(adapter, chunk)
        inputs = adapter.device_inputs(batch)
        kinds = adapter.token_kinds(inputs["input_ids"], inputs.get("attention_mask")).to("cpu")
        queries = kinds.queries_after_image()
        text_only = not bool(kinds.visual_mask.any())
        answered = all(x.answer for x in chunk)
        first = kinds.bos_mask
        rows, att_rows = [], []
        baseline: dict = {}  # the unmodified forward's attention received per layer (measured first)
        n_queries = queries.sum(dim=1).to(adapter.device).float()  # [batch]

        def class_share(received: dict, key_mask) -> torch.Tensor:
            """[batch]: share of the text queries' attention on key_mask (`measures.attention_share`, from each
            layer's attention received per key), mean over heads and layers >= onset."""
            mask = key_mask.to(n_queries.device).float()[:, None, :]
            shares = torch.stack([(received[l] * mask).sum(dim=-1).mean(dim=1) for l in sorted(received)]).mean(dim=0)
            return torch.where(n_queries > 0, shares, torch.nan).cpu()

        def measure(condition_target, to, context):
            received = {}  # layer >= onset -> [batch, head, key]: attention from the text queries, their mean

            def observe(layer, probs):  # each layer's probabilities reduced as they come (no layer's maps kept)
                if layer >= sig.layer:
                    received[layer] = received_by_key(probs, queries) / n_queries.clamp_min(1)[:, None, None]

            with context as session, torch.no_grad():
                with session.observing(observe):  # every position's logits only for a text prompt's perplexity
                    output = adapter.model(**inputs, **({} if text_only else adapter.without_logits()))
                per_layer = session.memory(session.edits[-1]).get("masks", {}) if session.edits else {}
                edited = torch.stack([m.cpu() for m in per_layer.values()]).any(dim=0) if per_layer else None
                gen = (adapter.model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                              pad_token_id=getattr(tok, "pad_token_id", None))
                       if answered else None)
            removed = edited.cpu() if edited is not None else torch.zeros_like(first)
            if text_only:
                nll, n_pred = token_nll(output.logits, inputs["input_ids"], inputs.get("attention_mask"))
            else:  # a prompt with image tokens has no text perplexity to speak of
                nll, n_pred = torch.full((len(chunk),), math.nan, dtype=torch.float64), torch.zeros(len(chunk), dtype=torch.long)
            correct = [None] * len(chunk)
            answers = [None] * len(chunk)
            if gen is not None:
                new = gen[:, inputs["input_ids"].shape[1]:]
                answers = [tok.decode(r, skip_special_tokens=True) for r in new]
                correct = score_samples(chunk, answers)["correct"].tolist()
            masks = class_masks(kinds, first, removed)
            if "received" not in baseline:
                baseline["received"] = received
            shares, before = ({c: class_share(got, m) for c, m in masks.items()}  # class -> [batch]
                              for got in (received, baseline["received"]))
            for b, x in enumerate(chunk):
                meta = {"sample": x.sample_id, "target": condition_target, "to": to}
                rows.append({**meta, "task": x.task, "n_removed": int(removed[b].sum()),
                             "nll": float(nll[b]), "n_predicted": int(n_pred[b]),
                             "answer": None if answers[b] is None else answers[b].strip(), "correct": correct[b]})
                att_rows.extend({**meta, "key_class": c, "attention": float(shares[c][b]),
                                 "attention_before": float(before[c][b])} for c in CLASSES)

        measure("none", "none", edit_attention(adapter, fallback="eager"))  # no edit: the model's own forward
        for target in cfg.targets:
            if target == "visual_sinks" and text_only:
                continue
            for to in cfg.to:
                mean = None
                if to == "chosen_mean":
                    if not (means or {}).get(target):
                        continue  # no such tokens in the calibration samples
                    mean = {int(l): torch.tensor(v) for l, v in means[target].items()}  # keys: str after JSON
                measure(target, to, remove_sink(adapter, target, layer=layers, to=to, signature=sig, mean=mean))
        s.folder.append_rows("remove_per_sample", pd.DataFrame(rows))
        s.folder.append_rows("remove_attention_per_sample", pd.DataFrame(att_rows))
        s.folder.mark_done([x.sample_id for x in chunk])
    return summarize_remove(s.folder, cfg, sig)


def remove_table(per: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """remove.csv: target, to, metric (accuracy | perplexity | nll_per_token | n_removed), value, CI, p vs none."""
    from scipy.stats import binomtest, wilcoxon

    rows = []
    base = per[per["target"] == "none"].set_index("sample")
    for (target, to), g in per.groupby(["target", "to"], sort=False):
        g = g.set_index("sample").reindex(base.index)
        nll_tok = (g["nll"] / g["n_predicted"].clip(lower=1)).to_numpy(float)
        b_nll = (base["nll"] / base["n_predicted"].clip(lower=1)).to_numpy(float)
        metrics = {"n_removed": (g["n_removed"].to_numpy(float), None)}
        if (g["n_predicted"] > 0).any():
            metrics["nll_per_token"] = (nll_tok, b_nll)
        if g["correct"].notna().all() and len(g):
            metrics["accuracy"] = (g["correct"].astype(float).to_numpy(), base["correct"].astype(float).to_numpy())
        for metric, (x, b) in metrics.items():
            lo, hi = stats.bootstrap_ci(x, n_boot=n_boot, seed=seed)
            p = math.nan
            if target != "none" and b is not None:
                if metric == "accuracy":
                    better, worse = int(np.sum(x > b)), int(np.sum(x < b))
                    p = float(binomtest(better, better + worse, 0.5).pvalue) if better + worse else 1.0
                else:
                    d = x - b
                    p = float(wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
            rows.append({"target": target, "to": to, "metric": metric, "value": float(np.nanmean(x)), "ci_low": lo,
                         "ci_high": hi, "p_value": p, "n_samples": int(np.isfinite(x).sum())})
            if target != "none" and b is not None:  # the paired change against the unmodified model, same samples
                d = x - b
                dlo, dhi = stats.bootstrap_ci(d, n_boot=n_boot, seed=seed)
                rows.append({"target": target, "to": to, "metric": f"{metric}_change", "value": float(np.nanmean(d)),
                             "ci_low": dlo, "ci_high": dhi, "p_value": p, "n_samples": int(np.isfinite(d).sum())})
        if "nll_per_token" in metrics:
            # corpus perplexity: exp(total NLL / total predicted tokens); CI by resampling samples
            tot, cnt = g["nll"].to_numpy(float), g["n_predicted"].to_numpy(float)
            value = float(np.exp(tot.sum() / cnt.sum()))
            rng = np.random.default_rng(seed)
            boots = [np.exp(tot[i].sum() / max(cnt[i].sum(), 1)) for i in
                     (rng.integers(0, len(tot), len(tot)) for _ in range(n_boot))] if len(tot) > 1 else []
            lo, hi = (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))) if boots else (math.nan, math.nan)
            rows.append({"target": target, "to": to, "metric": "perplexity", "value": value, "ci_low": lo, "ci_high": hi,
                         "p_value": math.nan, "n_samples": len(tot)})
    return pd.DataFrame(rows, columns=["target", "to", "metric", "value", "ci_low", "ci_high", "p_value", "n_samples"])


def attention_table(att: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """remove_attention.csv: target, to, key_class, attention before and after (share of the text queries'
    attention on the same tokens, unmodified vs removed), change with CI."""
    rows = []
    for (target, to, key_class), g in att.groupby(["target", "to", "key_class"], sort=False):
        change = (g["attention"] - g["attention_before"]).to_numpy(float)
        lo, hi = stats.bootstrap_ci(change, n_boot=n_boot, seed=seed)
        rows.append({"target": target, "to": to, "key_class": key_class, "attention_before": float(g["attention_before"].mean()),
                     "attention": float(g["attention"].mean()), "change": float(np.nanmean(change)),
                     "change_ci_low": lo, "change_ci_high": hi, "n_samples": len(g)})
    return pd.DataFrame(rows)


def summarize_remove(folder: RunFolder, cfg: RemoveConfig, sig) -> RunFolder:
    per = folder.read("remove_per_sample")
    att = folder.read("remove_attention_per_sample")
    table = remove_table(per, cfg.n_boot, cfg.seed) if len(per) else pd.DataFrame()
    folder.write_table("remove", table)
    attention = attention_table(att, cfg.n_boot, cfg.seed) if len(att) else pd.DataFrame()
    folder.write_table("remove_attention", attention)
    _write_index(folder, cfg, sig, table, attention)
    folder.finish()
    return folder


def _write_index(folder, cfg, sig, table, attention) -> None:
    from sinkscope.analyses.pages import index_head
    from sinkscope.markdown import markdown_table

    meta, lines = index_head(folder, cfg, "Removing the sink signature")
    where = f"layer {sig.layer}" if cfg.layers == "onset" else f"every layer from {sig.layer} on"
    lines.append(f"{meta.get('n_samples')} samples. Sink dims {list(sig.dims)} of the target tokens set to zero, to the "
                 f"mean over ordinary tokens (`mean`) or to the targets' own mean over {cfg.calibration} calibration "
                 f"samples (`chosen_mean`, Sun et al.'s replacement), at the residual stream entering {where}. Sinks: "
                 f"score `{sig.score}` >= tau {sig.tau:.4g} entering the layer. CIs: 95% percentile bootstrap over "
                 "samples; p: exact McNemar (accuracy) or Wilcoxon (NLL per token) against `none`.\n")
    if table.empty:
        lines.append("No samples.\n")
        folder.write_text("index.md", "\n".join(lines))
        return
    lines += findings_section(findings(folder.path))
    if len(attention):
        first = attention[(attention["target"] == "first")]
        if len(first):
            lines.append("Where the first token's attention goes (change of the text queries' attention share, layers "
                         f">= {sig.layer}, mean over heads):\n")
            for to, g in first.groupby("to", sort=False):
                parts = [f"{r['key_class']} {r['change']:+.3g} ({r['change_ci_low']:+.3g} to {r['change_ci_high']:+.3g})"
                         for _, r in g.iterrows()]
                lines.append(f"- to `{to}`: " + "; ".join(parts) + ".")
            lines.append("")
    lines.append("## Tables\n")
    lines.append(markdown_table(table, max_rows=60))
    lines.append("")
    lines.append(markdown_table(attention, max_rows=60))
    folder.write_text("index.md", "\n".join(lines))


# ---------------------------------------------------------------------------------------
# the report step
# ---------------------------------------------------------------------------------------

FIGURES: tuple[str, ...] = ()  # the report shows the step's figures in name order


def report_step(folder, report_cfg, adapter, sink_score: str, log, calibration=None) -> None:
    """`sinkscope report` step: every target and replacement, entering every layer from the onset on (at the onset
    alone a narrow model's first token may not yet be a sink by the rule), on the demo's mixed tasks (or the
    report's data)."""
    config = report_step_config(RemoveConfig, report_cfg, sink_score, limit=min(int(report_cfg.limit or 16), 16),
                                layers="all")
    run_remove(str(folder), config, adapter=adapter, log=log, calibration=calibration)


def findings(folder) -> list[Finding]:
    """Findings: accuracy (or perplexity) with each removal against the unmodified model."""
    folder = Path(folder)
    table = pd.read_csv(folder / "remove.csv")
    out = []
    for metric in ("accuracy", "perplexity"):
        t = table[table["metric"] == metric]
        base = t[t["target"] == "none"]
        if base.empty:
            continue
        b = base.iloc[0]
        what = ("answers scored against the questions' labels" if metric == "accuracy"
                else "perplexity of the text, the model's own next-token predictions")
        out.append(Finding("remove", f"{metric}, unmodified", float(b["value"]), float(b["ci_low"]), float(b["ci_high"]),
                           n=int(b["n_samples"]), status=MEASURED,
                           sentence=f"The unmodified model: {what}; every removal below is compared with it."))
        for _, r in t[t["target"] != "none"].iterrows():
            n_removed = table[(table["target"] == r["target"]) & (table["to"] == r["to"]) & (table["metric"] == "n_removed")]
            k = float(n_removed["value"].iloc[0]) if len(n_removed) else math.nan
            if k == 0:
                out.append(Finding("remove", f"{metric}, {r['target']} to {r['to']}", math.nan, n=int(r["n_samples"]),
                                   status=NOTHING_TO_TEST, sentence=f"No `{r['target']}` token in any edited layer: "
                                   "nothing was removed."))
                continue
            change = table[(table["target"] == r["target"]) & (table["to"] == r["to"])
                           & (table["metric"] == ("accuracy_change" if metric == "accuracy" else "nll_per_token_change"))]
            sentence = (f"Sink dims of `{r['target']}` ({num(k)} tokens per sample) set to `{r['to']}`: "
                        f"{num(r['value'])} against {num(b['value'])} unmodified")
            status, value, low, high = MEASURED, float(r["value"]), float(r["ci_low"]), float(r["ci_high"])
            if len(change):
                c = change.iloc[0]
                higher, lower = (("accuracy rises", "accuracy falls") if metric == "accuracy" else
                                 ("NLL per token rises", "NLL per token falls"))
                est = Estimate(float(c["value"]), float(c["ci_low"]), float(c["ci_high"]), int(c["n_samples"]))
                if metric == "accuracy":  # stated only where McNemar's exact test agrees
                    status, clause = exact_test_clause(est, float(r["p_value"]), f"the {est.n} samples", higher, lower)
                else:
                    status, clause = effect_clause(est, higher, lower)
                value, low, high = float(c["value"]), float(c["ci_low"]), float(c["ci_high"])
                sentence += f"; paired change: {clause}"
            if pd.notna(r["p_value"]):
                test = "exact McNemar" if metric == "accuracy" else "Wilcoxon on NLL per token"
                sentence += f"; {test} p = {num(r['p_value'])} against unmodified"
            name = f"{metric if metric == 'accuracy' else 'NLL per token'} change, {r['target']} to {r['to']}"
            out.append(Finding("remove", name, value, low, high, n=int(r["n_samples"]), status=status,
                               sentence=sentence + "."))
    return out
