"""`sinkscope ablate`: do visual sinks matter? Knock them out and compare with matched controls.

Kang et al. 2025, evidence 4: block attention from the text queries after the image (and every
generated token) to a set of keys, in all layers (or chosen ones), rows renormalised
(sinkscope.interventions.knockout), and measure yes/no answers. Conditions:
  - none: the unmodified model;
  - visual_sinks: image tokens with phi >= tau in any layer >= start_layer (prefill);
  - random_visual: the same number of image tokens drawn at random from image tokens only, one
    set used in every layer, `n_random` seeds (metrics averaged over seeds per sample); each sample's
    draws come from its own generator, seeded from (--seed, the sample's index in the data), so they
    do not depend on the batch or shard the sample runs in;
  - top_nonsink: the same number of the most-attended image tokens that are not sinks;
  - bos: the first token.
Swept over tau. Metrics: yes/no accuracy and F1 from greedy generation, and the logit
difference of the correct answer (logit of the correct word minus the other, at the answer
position). CIs: percentile bootstrap over samples; p-values against `none`, paired over samples:
Wilcoxon signed-rank for the logit difference, exact McNemar (binomial on discordant pairs) for
correctness, the bootstrap of the paired difference for F1.

Writes: run.json, sink_dims.json, ablation_per_sample.csv, ablation.csv, ablation.png, index.md.
Sharded (--shard i/n: the samples whose index modulo n is i): `sinkscope merge` joins the shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.common import (AnalysisConfig, SinkAwareReducer, answer_token_ids, cluster_bootstrap,
                                      prepare_batch, report_step_for, setup, yes_no_labels)
from sinkscope.analyses.step_findings import bootstrap_mean_ci, run_meta
from sinkscope.errors import SinkscopeError
from sinkscope.eval.pope import parse_yes_no
from sinkscope.eval.tasks import progress
from sinkscope.findings import (NOTHING_TO_TEST, Estimate, Finding, effect_clause, nothing_clause, nothing_to_act_on,
                                num)
from sinkscope.runconfig import analysis_default, sample_seed
from sinkscope.runfolder import RunFolder

CONDITIONS = ("none", "visual_sinks", "random_visual", "top_nonsink", "bos")


@dataclass
class AblateConfig(AnalysisConfig):
    data: str = analysis_default("ablate", "data")
    taus: list[float] | None = None  # default: the calibrated tau x (0.75, 1, 1.5)
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    n_random: int = 5
    layers: list[int] | None = None  # knockout layers (default all)
    max_new_tokens: int = 4
    renormalize: bool = True  # False: blocked entries zeroed, rows not rescaled (removes only what the keys write)

    def validate(self) -> None:
        super().validate()
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad or "none" not in self.conditions:
            raise SinkscopeError(f"--conditions must include 'none' and come from {', '.join(CONDITIONS)}; got {self.conditions}")
        if self.n_random < 1:
            raise SinkscopeError(f"--n-random must be >= 1; got {self.n_random}")
        if self.taus is not None and any(not t > 0 for t in self.taus):
            raise SinkscopeError(f"--taus must all be > 0; got {self.taus}")


def check_layers(layers, n_layers: int) -> None:
    """A clear error for knockout layers outside the model."""
    if layers is None:
        return
    bad = [l for l in layers if not 0 <= int(l) < n_layers]
    if bad:
        raise SinkscopeError(f"knockout layers {bad} are out of range: the model has {n_layers} layers (0..{n_layers - 1}); "
                             "pass --layers within that range, or leave it out to knock out in every layer")



class _PhiAttention(SinkAwareReducer):
    """Prefill phi per layer and the attention each token receives from text queries (layers >= start)."""

    def __init__(self, dims, tau, eps, score, start_layer):
        super().__init__(dims, tau, eps, score)
        self.start = start_layer
        self.received = None

    def attention(self, layer, probs):
        """Summed on the probabilities' device ([batch, token]); brought to the host once, in `end`."""
        if layer < self.start:
            return
        q = self.on(probs.device)["queries"]
        r = (probs.detach().float().mean(dim=1) * q[:, :, None].float()).sum(dim=1) / q.sum(1).clamp_min(1)[:, None]
        self.received = r if self.received is None else self.received + r.to(self.received.device)

    def end(self) -> None:
        self.received, = super().end(self.received)

    def max_phi(self) -> torch.Tensor:
        late = [l for l in self.phi if l >= self.start] or list(self.phi)
        return torch.stack([self.phi[l] for l in late]).amax(dim=0)  # [batch, token]


def random_visual_keys(visual_mask: torch.Tensor, n_per_row, generators: list[torch.Generator]) -> torch.Tensor:
    """[batch, token] bool: row b holds n_per_row[b] of its image tokens drawn at random with generators[b].

    The draw is a permutation of the row's image tokens only (not of every position), so padding and the other rows
    of the batch do not change it: a sample's keys depend on its generator's seed alone.
    """
    keys = torch.zeros_like(visual_mask, dtype=torch.bool)
    for b, gen in enumerate(generators):
        where = visual_mask[b].nonzero().flatten()
        n = int(n_per_row[b])
        if n > len(where):
            raise SinkscopeError(f"cannot draw {n} random image tokens from {len(where)} in sample row {b}")
        keys[b, where[torch.randperm(len(where), generator=gen)[:n]]] = True
    return keys


@torch.no_grad()
def _measure(adapter, batch, yes_id, no_id, labels, max_new_tokens):
    """Per row: logit difference of the correct answer at the answer position, the parsed generated answer. Both
    from one `generate` (`eval.accuracy.answer_batch`: the logits its first step chose the answer from)."""
    from sinkscope.eval.accuracy import answer_batch

    texts, logits = answer_batch(adapter, adapter.device_inputs(batch), max_new_tokens)
    diff = logits[:, yes_id] - logits[:, no_id]
    sign = torch.tensor([1.0 if y == "yes" else -1.0 for y in labels])
    return (diff * sign).tolist(), [parse_yes_no(t) for t in texts]


def run_ablate(out: str, cfg: AblateConfig, adapter=None, resume: bool = True, log=print, calibration=None,
               figures: bool = True) -> RunFolder:
    s = setup(out, "ablate", cfg, adapter, resume, log, calibration=calibration)
    adapter = s.adapter
    check_layers(cfg.layers, adapter.num_layers)
    from sinkscope.interventions.knockout import knockout, top_nonsink_image_keys

    labels_all = yes_no_labels(s.samples, "ablation")
    yes_id, no_id = answer_token_ids(adapter)
    taus = cfg.taus or [s.tau.value * f for f in (0.75, 1.0, 1.5)]
    s.folder.update_meta(taus=taus)
    index = {x.sample_id: k for k, x in enumerate(s.samples)}  # the sample's index in the data: its random draws
    for chunk in progress(s.todo, cfg.batch_size, "ablate"):
        gens = [torch.Generator().manual_seed(sample_seed(cfg.seed, index[x.sample_id])) for x in chunk]
        batch = prepare_batch(adapter, chunk)
        red = _PhiAttention(s.dims.dims, s.tau.value, adapter.rms_norm_eps, cfg.sink_score, cfg.start_layer)
        s.tracer.run(batch, [red])
        kinds, labels = red.kinds, [labels_all[x.sample_id] for x in chunk]
        received = red.received if red.received is not None else torch.zeros(kinds.kind.shape)
        rows = []
        unmodified = {}

        def record(condition, tau, seed, key_mask):
            n_tokens = key_mask.sum(dim=1).tolist() if key_mask is not None else [0] * len(chunk)
            if key_mask is None or not key_mask.any():  # nothing to knock out: the unmodified forward, measured once
                if not unmodified:
                    unmodified["result"] = _measure(adapter, batch, yes_id, no_id, labels, cfg.max_new_tokens)
                diffs, answers = unmodified["result"]
            else:
                with knockout(adapter, key_mask.to(adapter.device), layers=cfg.layers, renormalize=cfg.renormalize):
                    diffs, answers = _measure(adapter, batch, yes_id, no_id, labels, cfg.max_new_tokens)
            for x, d, a, y, n in zip(chunk, diffs, answers, labels, n_tokens):
                rows.append({"sample": x.sample_id, "condition": condition, "tau": tau, "seed": seed, "n_tokens": int(n),
                             "label": y, "answer": a, "correct": a == y, "logit_diff": d})

        record("none", math.nan, -1, None)
        for tau in taus:
            sinks = (red.max_phi() >= tau) & kinds.visual_mask  # [batch, token]
            n_per_row = sinks.sum(dim=1)
            if "visual_sinks" in cfg.conditions:
                record("visual_sinks", tau, -1, sinks)
            if "random_visual" in cfg.conditions:
                for seed in range(cfg.n_random):
                    record("random_visual", tau, seed, random_visual_keys(kinds.visual_mask, n_per_row, gens))
            if "top_nonsink" in cfg.conditions:
                record("top_nonsink", tau, -1, top_nonsink_image_keys(received, kinds.visual_mask, sinks, n_per_row))
        if "bos" in cfg.conditions:
            record("bos", math.nan, -1, kinds.bos_mask)
        s.folder.append_rows("ablation_per_sample", pd.DataFrame(rows))
        s.folder.mark_done([x.sample_id for x in chunk])
    return summarize_ablation(s.folder, cfg, figures)


def _f1(answers, labels) -> float:
    tp = sum(a == "yes" and y == "yes" for a, y in zip(answers, labels))
    fp = sum(a == "yes" and y == "no" for a, y in zip(answers, labels))
    fn = sum(a != "yes" and y == "yes" for a, y in zip(answers, labels))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _bootstrap_p(stat, n: int, n_boot: int, seed: int) -> float:
    """Two-sided bootstrap p-value that a paired difference statistic is 0 (resampling samples)."""
    if n < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    d = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)])
    if np.all(d == 0):
        return 1.0
    return float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))


def ablation_table(per: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """ablation.csv: condition, tau, n_tokens, metric, value, ci_low, ci_high, p_value (vs none, paired)."""
    from scipy import stats

    base = per[per["condition"] == "none"].set_index("sample")
    samples = list(base.index)
    rows = []
    groups = [(("none", math.nan), per[per["condition"] == "none"])]
    groups += list(per[per["condition"] != "none"].groupby(["condition", "tau"], dropna=False))
    for (condition, tau), g in groups:
        # one row per sample: random seeds averaged (accuracy as the share correct over seeds)
        agg = g.groupby("sample").agg(correct=("correct", "mean"), logit_diff=("logit_diff", "mean"),
                                      n_tokens=("n_tokens", "mean")).reindex(samples)
        answers = g.groupby("sample")["answer"].agg(list).reindex(samples)
        labels = base["label"].to_numpy()
        corr, diff = agg["correct"].to_numpy(float), agg["logit_diff"].to_numpy(float)
        b_corr, b_diff = base["correct"].to_numpy(float), base["logit_diff"].to_numpy(float)
        ans = answers.tolist()

        def f1_of(idx):
            return float(np.mean([_f1([ans[i][k] for i in idx], [labels[i] for i in idx]) for k in range(len(ans[0]))]))

        change = np.abs(diff - b_diff)  # how much the answer moved, either way
        metrics = {
            "accuracy": (float(corr.mean()), lambda i: float(corr[i].mean())),
            "f1": (f1_of(np.arange(len(samples))), f1_of),
            "logit_diff": (float(diff.mean()), lambda i: float(diff[i].mean())),
            "abs_logit_change": (float(change.mean()), lambda i: float(change[i].mean())),
        }
        for metric, (value, stat) in metrics.items():
            lo, hi = cluster_bootstrap(len(samples), stat, n_boot, seed)
            p = math.nan
            if condition != "none":
                if metric == "abs_logit_change":
                    p = math.nan  # |change| >= 0 by construction; conditions are compared in ablation_contrasts.csv
                elif metric == "logit_diff":
                    d = diff - b_diff
                    p = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
                elif metric == "accuracy":
                    worse, better = float(np.sum(np.clip(b_corr - corr, 0, None))), float(np.sum(np.clip(corr - b_corr, 0, None)))
                    n = int(round(worse + better))
                    p = float(stats.binomtest(int(round(better)), n, 0.5).pvalue) if n else 1.0
                else:
                    b_ans = base["answer"].tolist()
                    p = _bootstrap_p(lambda i: f1_of(i) - _f1([b_ans[j] for j in i], [labels[j] for j in i]),
                                     len(samples), n_boot, seed)
            rows.append({"condition": condition, "tau": tau, "n_tokens": float(agg["n_tokens"].mean()), "metric": metric,
                         "value": value, "ci_low": lo, "ci_high": hi, "p_value": p, "n_samples": len(samples)})
    return pd.DataFrame(rows)


def ablation_contrasts(per: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Visual sinks against each control, per tau: mean per-sample |logit change| of each, their
    difference (sinks minus control) with a bootstrap CI, and a paired Wilcoxon p-value.

    The paper's claim in this form: knocking out visual sinks moves answers less than knocking
    out as many random (or top-attended non-sink) image tokens.
    """
    from scipy import stats

    base = per[per["condition"] == "none"].groupby("sample")["logit_diff"].mean()
    change = (per[per["condition"] != "none"].groupby(["condition", "tau", "sample"])["logit_diff"].mean()
              .sub(base, level="sample").abs())
    rows = []
    for tau in sorted(per["tau"].dropna().unique()):
        if ("visual_sinks", tau) not in change.index.droplevel("sample"):
            continue
        sinks_change = change.loc[("visual_sinks", tau)]
        for control in ("random_visual", "top_nonsink"):
            if (control, tau) not in change.index.droplevel("sample"):
                continue
            other = change.loc[(control, tau)].reindex(sinks_change.index)
            d = (sinks_change - other).to_numpy(float)
            lo, hi = cluster_bootstrap(len(d), lambda i: float(d[i].mean()), n_boot, seed)
            p = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
            rows.append({"tau": tau, "control": control, "sinks_abs_change": float(sinks_change.mean()),
                         "control_abs_change": float(other.mean()), "difference": float(d.mean()), "ci_low": lo,
                         "ci_high": hi, "p_value": p, "n_samples": len(d)})
    return pd.DataFrame(rows, columns=["tau", "control", "sinks_abs_change", "control_abs_change", "difference",
                                       "ci_low", "ci_high", "p_value", "n_samples"])


def summarize_ablation(folder: RunFolder, cfg: AblateConfig, figures: bool = True) -> RunFolder:
    from sinkscope import plots

    per = folder.read("ablation_per_sample")
    table = ablation_table(per, cfg.n_boot, cfg.seed) if len(per) else pd.DataFrame()
    folder.write_table("ablation", table)
    contrasts = ablation_contrasts(per, cfg.n_boot, cfg.seed) if len(per) else pd.DataFrame()
    folder.write_table("ablation_contrasts", contrasts)
    figs = {}
    if figures and len(table):
        figs["curves"] = plots.ablation_curves(table, folder.path / "ablation.png")
    _write_index(folder, cfg, table, figs, contrasts)
    folder.finish()
    return folder


def _write_index(folder, cfg, table, figs, contrasts=None) -> None:
    from sinkscope.analyses.pages import index_head
    from sinkscope.markdown import markdown_table

    meta, lines = index_head(folder, cfg, "Knockout")
    lines.append(f"{meta.get('n_samples')} samples; sink dims {meta.get('sink_dims')}; taus {meta.get('taus')}; knockout "
                 f"layers {cfg.layers or 'all'}; queries: text after the image and generated tokens; random control: "
                 f"{cfg.n_random} seeds of image tokens only, matched counts, one set for every layer. CIs: 95% percentile "
                 "bootstrap over samples; p-values paired against `none` (Wilcoxon for the logit difference, exact "
                 "McNemar for accuracy, two-sided bootstrap of the paired difference for F1).\n")
    if table.empty:
        lines.append("No samples.\n")
    else:
        from sinkscope.analyses.pages import step_findings_section

        sinks = table[(table["condition"] == "visual_sinks") & (table["metric"] == "logit_diff")]
        if len(sinks) and (sinks["n_tokens"].fillna(0) <= 0).all():
            lines.append("**No visual sinks found** at any tau swept: the visual-sink conditions and their matched "
                         "controls knocked out nothing (they are the unmodified model again).\n")
        lines += step_findings_section(findings, folder.path)
        lines += contrast_lines(table, contrasts)
        lines.append(f"Knockout rows were {'renormalised to sum to 1' if cfg.renormalize else 'not renormalised (blocked entries zeroed only)'}.\n")
    if "curves" in figs:
        lines.append(f"![ablation]({figs['curves']})\n")
    lines.append("ablation.csv (a row with n_tokens 0 knocked nothing out: it is the unmodified model again, not an "
                 "effect; p-values paired against `none`):\n")
    lines.append(markdown_table(table, max_rows=60))
    folder.write_text("index.md", "\n".join(lines))


def contrast_lines(table: pd.DataFrame, contrasts: pd.DataFrame | None) -> list[str]:
    """Markdown bullets, one per (tau, control) of ablation_contrasts.csv, by the findings rule: at a tau with 0
    visual sinks there is nothing to knock out and no difference is stated; otherwise the difference in mean
    |logit change| (sinks minus control) counts as more or less only where its 95% CI excludes 0.

    table: ablation.csv (n_tokens of visual_sinks per tau); contrasts: ablation_contrasts.csv.
    """
    from sinkscope.findings import Estimate, effect_clause, n_clause, nothing_clause, nothing_to_act_on, num

    if contrasts is None or not len(contrasts):
        return []
    sinks = table[(table["metric"] == "logit_diff") & (table["condition"] == "visual_sinks")]
    lines = ["Every tau swept: how far answers move (mean per-sample |change| of the logit difference) when the visual "
             "sinks are knocked out, against as many control tokens:\n"]
    for _, r in contrasts.iterrows():
        at_tau = sinks[np.isclose(sinks["tau"], r["tau"])]
        n_sinks = float(at_tau["n_tokens"].iloc[0]) if len(at_tau) else math.nan
        where = f"- tau {num(r['tau'])}, sinks vs `{r['control']}`"
        if nothing_to_act_on(n_sinks):
            lines.append(f"{where}: {nothing_clause('knock out', 'visual sinks')}; nothing to compare "
                         f"({n_clause(r['n_samples'])}).")
            continue
        est = Estimate(float(r["difference"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
        _, clause = effect_clause(est, "knocking out the sinks moves answers more than the control",
                                  "knocking out the sinks moves answers less than the control")
        lines.append(f"{where} ({num(n_sinks)} sinks per sample): {clause}; mean |logit change| "
                     f"{num(r['sinks_abs_change'])} against {num(r['control_abs_change'])}, Wilcoxon p = "
                     f"{num(r['p_value'], 2)} ({n_clause(r['n_samples'])}).")
    return lines + [""]


# ----------------------------------------------------------------------------- the report step

FIGURES: tuple[str, ...] = ()  # the report shows the step's figures in name order


report_step = report_step_for(AblateConfig, run_ablate, n_random=3)


def reported_tau(folder: Path, taus) -> float:
    """The tau the findings read: the run's own tau when it was swept, else the middle of the sweep."""
    taus = sorted(t for t in taus if np.isfinite(t))
    if not taus:
        return math.nan
    own = (run_meta(folder).get("tau") or {}).get("value")
    return float(own) if own is not None and any(np.isclose(own, t) for t in taus) else float(taus[len(taus) // 2])


def knocked_out_tokens(table: pd.DataFrame, condition: str, tau: float) -> float:
    """Mean tokens knocked out per sample for `condition` at `tau` (tau-free conditions: their only rows)."""
    rows = table[(table["condition"] == condition) & (np.isclose(table["tau"], tau) | table["tau"].isna())]
    return float(rows["n_tokens"].iloc[0]) if len(rows) else math.nan


def _logit_diff_change(per_sample: pd.DataFrame, condition: str, tau: float) -> Estimate:
    """Change of the logit difference against no knockout, paired per sample (seeds averaged), mean with 95% CI."""
    base = per_sample[per_sample["condition"] == "none"].groupby("sample")["logit_diff"].mean()
    rows = per_sample[(per_sample["condition"] == condition)
                      & (np.isclose(per_sample["tau"], tau) | per_sample["tau"].isna())]
    diff = (rows.groupby("sample")["logit_diff"].mean() - base).dropna()
    m, lo, hi = bootstrap_mean_ci(diff.values)
    return Estimate(m, lo, hi, len(diff))


def findings(folder: Path) -> list[Finding]:
    """At the reported tau: sinks against each matched control, and each knockout's change of the logit difference."""
    table = pd.read_csv(folder / "ablation.csv")
    diff = table[table["metric"] == "logit_diff"]
    tau = reported_tau(folder, diff["tau"].dropna().unique())
    n_sinks = knocked_out_tokens(diff, "visual_sinks", tau)
    out = []
    contrasts = folder / "ablation_contrasts.csv"
    if contrasts.exists():
        c = pd.read_csv(contrasts)
        for _, r in c[np.isclose(c["tau"], tau)].iterrows():
            name = f"|logit change| sinks minus {r['control']} (tau {num(tau)})"
            if nothing_to_act_on(n_sinks):
                out.append(Finding("ablate", name, math.nan, n=int(r["n_samples"]), status=NOTHING_TO_TEST,
                                   sentence=f"{nothing_clause('knock out', 'visual sinks')}; nothing to compare with "
                                            f"{r['control']} tokens."))
                continue
            est = Estimate(float(r["difference"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n_samples"]))
            status, clause = effect_clause(
                est, f"knocking out visual sinks moves answers more than knocking out as many {r['control']} tokens",
                f"knocking out visual sinks moves answers less than knocking out as many {r['control']} tokens")
            out.append(Finding("ablate", name, est.value, est.ci_low, est.ci_high, n=est.n, status=status, sentence=(
                f"{clause}; mean |logit change| {num(r['sinks_abs_change'])} for {num(n_sinks)} sinks per sample, "
                f"{num(r['control_abs_change'])} for {r['control']} (Wilcoxon p = {num(r['p_value'], 2)}).")))
    if not len(diff):
        return out
    per_sample_path = folder / "ablation_per_sample.csv"
    per_sample = pd.read_csv(per_sample_path) if per_sample_path.exists() else None
    for condition in ("none", "visual_sinks", "random_visual", "top_nonsink", "bos"):
        rows = diff[(diff["condition"] == condition) & (np.isclose(diff["tau"], tau) | diff["tau"].isna())]
        if not len(rows):
            continue
        r = rows.iloc[0]
        n = int(r["n_samples"]) if "n_samples" in r and pd.notna(r["n_samples"]) else None
        if condition == "none":
            out.append(Finding("ablate", "logit difference, no knockout (the unmodified model)", float(r["value"]),
                               float(r["ci_low"]), float(r["ci_high"]), n=n, sentence=(
                                   "Correct-answer logit minus the other (yes/no) with nothing knocked out: the "
                                   "reference every knockout is compared with.")))
            continue
        tokens = float(r["n_tokens"])
        at = "" if pd.isna(r["tau"]) else f"tau {num(tau)}, "
        name = f"change of the logit difference, knockout {condition} ({at}{num(tokens)} token(s) per sample)"
        if nothing_to_act_on(tokens):
            out.append(Finding("ablate", name, math.nan, n=n, status=NOTHING_TO_TEST,
                               sentence=f"{nothing_clause('knock out')} (the model ran unmodified)."))
            continue
        p = "" if pd.isna(r["p_value"]) else f"; Wilcoxon p = {num(r['p_value'], 2)} against no knockout"
        if per_sample is None:
            out.append(Finding("ablate", f"logit difference, knockout {condition} ({at}{num(tokens)} token(s) per sample)",
                               float(r["value"]), float(r["ci_low"]), float(r["ci_high"]), n=n,
                               sentence=f"Correct-answer logit minus the other with these keys blocked{p}."))
            continue
        est = _logit_diff_change(per_sample, condition, tau)
        status, clause = effect_clause(est, "knocking them out raises the correct answer's logit difference",
                                       "knocking them out lowers the correct answer's logit difference")
        out.append(Finding("ablate", name, est.value, est.ci_low, est.ci_high, n=est.n, status=status, sentence=(
            f"Text queries after the image (and generated tokens) blocked from these keys: {clause}; logit difference "
            f"{num(r['value'])} against {num(_unmodified(diff))} unmodified{p}.")))
    return out


def _unmodified(diff: pd.DataFrame) -> float:
    rows = diff[diff["condition"] == "none"]
    return float(rows["value"].iloc[0]) if len(rows) else math.nan
