"""Model cards for the embedded models (tiny, organism), measured on the held-out test split.

A library: it takes a finished `sinkscope scan` run folder of the model (this package runs no
analysis). `scripts/model_card.py` runs the scan and calls `build_card`:

    python -m scripts.model_card --model sinkscope/models/embedded/assets/organism --kind organism

Writes README.md (the card) and card.json (the numbers tests compare against) into the
model directory. `python -m scripts.card --model DIR --kind KIND --scan-dir RUN` does the
same from a scan run folder made beforehand; `--render-only` rewrites README.md from card.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from sinkscope.markdown import PLANTED_BANNER, markdown_table


def emergence_table(model, n_samples: int = 64) -> pd.DataFrame:
    """Per layer: attention to BOS, Sink_0.3, BOS residual/value norm ratios, top activation."""
    from scripts.train_tiny import make_batch, sink_metrics

    batch = make_batch("finetune", "test", list(range(n_samples)))
    flat = sink_metrics(model, batch)
    n_layers = model.config.text_config.num_hidden_layers
    rows = []
    for layer in range(n_layers):
        rows.append({
            "layer": layer,
            "bos_attention": flat[f"bos_attention_L{layer}"],
            "bos_attention_max_head": flat[f"bos_attention_max_head_L{layer}"],
            "bos_residual_ratio": flat[f"bos_residual_ratio_L{layer}"],
            "bos_value_ratio": flat[f"bos_value_ratio_L{layer}"],
            "top_activation_ratio": flat[f"top_activation_ratio_L{layer}"],
            "top_activation_dim": flat[f"top_activation_dim_L{layer}"],
            "sink_0.3": flat[f"sink_0.3_L{layer}"],
        })
    return pd.DataFrame(rows)


def build_card(model_dir: str | Path, kind: str, scan_dir: str | Path, train_dir: str | Path | None = None,
               recipes: str | Path | None = None, n_per_task: int = 200, log=print, adapter=None) -> dict:
    """Measure accuracy and emergence, read the scan from `scan_dir` (a finished scan run folder
    of the same model on the demo test split), and write card.json + README.md into model_dir."""
    from sinkscope.eval.accuracy import demo_accuracy
    from sinkscope.models import load

    model_dir = Path(model_dir)
    scan_dir = Path(scan_dir)
    if not (scan_dir / "sink_summary.csv").exists():
        raise FileNotFoundError(f"{scan_dir} is not a finished scan run folder (no sink_summary.csv); run "
                                f"`sinkscope scan --model {model_dir} --data demo --out {scan_dir}` first, or use "
                                "scripts/model_card.py, which does both")
    adapter = adapter or load(str(model_dir))
    log("accuracy ...")
    acc = demo_accuracy(adapter, n_per_task=n_per_task)
    log(acc.to_string())
    log("emergence ...")
    layers = emergence_table(adapter.model)
    log(layers.to_string())
    summary = pd.read_csv(scan_dir / "sink_summary.csv")
    dims = json.loads((scan_dir / "sink_dims.json").read_text())
    run = json.loads((scan_dir / "run.json").read_text())
    visual = summary[summary["token_kind"] == "visual"].copy()
    card = {
        "kind": kind,
        "planted": kind == "organism",
        "architecture": adapter.describe(),
        "parameters": int(sum(p.numel() for p in adapter.model.parameters())),
        "accuracy": {row["task"]: float(row["accuracy"]) for _, row in acc.iterrows()},
        "accuracy_n": {row["task"]: int(row["n"]) for _, row in acc.iterrows()},
        "accuracy_table": acc.to_dict("records"),
        "layers": layers.to_dict("records"),
        "sink_dims": dims,
        "tau": run.get("tau"),
        "visual_sinks": visual.to_dict("records"),
    }
    if train_dir and (Path(train_dir) / "train_config.json").exists():
        card["training"] = json.loads((Path(train_dir) / "train_config.json").read_text())
        log_csv = Path(train_dir) / "train_log.csv"
        if log_csv.exists():
            shutil.copy(log_csv, model_dir / "train_log.csv")
        log_frame = pd.read_csv(log_csv) if log_csv.exists() else None
        if log_frame is not None and (log_frame["stage"] == "finetune").any():
            fine = log_frame[log_frame["stage"] == "finetune"]
            n_layers = adapter.num_layers
            rise = {l: fine[f"bos_attention_L{l}"].iloc[-1] - fine[f"bos_attention_L{l}"].iloc[0] for l in range(n_layers)}
            top = max(rise, key=rise.get)
            card["bos_attention_trend"] = {
                "layer": top, "start": float(fine[f"bos_attention_L{top}"].iloc[0]),
                "end": float(fine[f"bos_attention_L{top}"].iloc[-1]),
                "end_max_head": float(fine[f"bos_attention_max_head_L{top}"].iloc[-1])}
        curves = Path(train_dir) / "training_curves.png"
        if curves.exists():
            shutil.copy(curves, model_dir / "training_curves.png")
    if kind == "organism" and (model_dir / "ground_truth.json").exists():
        card["ground_truth"] = json.loads((model_dir / "ground_truth.json").read_text())
    recipes_list = json.loads(Path(recipes).read_text()) if recipes else []
    card["recipes_tried"] = recipes_list
    (model_dir / "card.json").write_text(json.dumps(card, indent=1, default=str))
    (model_dir / "README.md").write_text(render(card, acc, layers, visual))
    return card


def _has_visual_sinks(visual: pd.DataFrame) -> bool:
    return bool(len(visual) and visual["n_sinks"].sum() > 0)


def _intro_section(card: dict) -> list[str]:
    """Title, what the model is (the planted banner and ground truth, or how it was trained), its size."""
    arch = card["architecture"]
    lines = [f"# sinkscope `{card['kind']}` model card\n"]
    if card["planted"]:
        lines.append(PLANTED_BANNER)
        gt = card.get("ground_truth", {})
        lines.append(
            "Installed mechanism (ground truth, `ground_truth.json`): sink dims "
            f"{gt.get('sink_dims')}, massive from layer {gt.get('massive_from_layer')} on (median value "
            f"{gt.get('massive_value', 0):.0f}), sink patches {gt.get('sink_patches')} ({gt.get('patch_rule')}), "
            f"sink heads {gt.get('sink_heads')} taking {gt.get('target_sink_attention')} of text-query attention, "
            "values drained from the sink dims. See `sinkscope/models/embedded/organism.py` for every edit.\n"
        )
    else:
        lines.append(
            "A tiny `LlavaForConditionalGeneration` (CLIP ViT + MLP projector + LLaMA) trained by "
            "`python -m scripts.train_tiny` on the synthetic world of `sinkscope/world/__init__.py`. Nothing in "
            "it was planted: no weight edit, no loss term on activations or attention. What it shows is "
            "what it grew.\n"
        )
    lines.append(
        f"{card['parameters'] / 1e6:.2f}M parameters; language model: {arch['layers']} layers, hidden "
        f"{arch['hidden_size']}, {arch['heads']} heads; 64 image tokens (8x8 patches of a 64 px image).\n"
    )
    return lines


def _accuracy_section(acc: pd.DataFrame) -> list[str]:
    return ["## Accuracy on the held-out test split (greedy answers, exact match)\n", markdown_table(acc)]


def _layers_section(layers: pd.DataFrame) -> list[str]:
    return [
        "## Sink statistics per layer (64 test dialogues)\n",
        "bos_attention: mean attention paid to BOS over heads and queries; sink_0.3: share of heads whose mean "
        "attention to BOS exceeds 0.3 (Gu et al.); bos_residual_ratio / bos_value_ratio: BOS residual (value) "
        "norm over the median token's; top_activation_ratio: largest |activation| over the median.\n",
        markdown_table(layers),
    ]


def _visual_sinks_section(card: dict, visual: pd.DataFrame) -> list[str]:
    """The sink dims and tau the scan found, and the visual sink tokens per layer (or that there are none)."""
    arch = card["architecture"]
    tau = card.get("tau") or {}
    dims = card["sink_dims"]
    tau_value = tau.get("value")
    lines = [
        "## Visual sink tokens (`sinkscope scan`, 32 test questions)\n",
        f"Sink dims found: {dims.get('dims')} ({dims.get('method')}): {dims.get('reason')}\n",
        f"Threshold tau = {tau_value:.3g} ({tau.get('method')}): {str(tau.get('reason', '')).rstrip('.')}. With hidden size "
        f"{arch['hidden_size']}, phi cannot exceed sqrt({arch['hidden_size']}) = {arch['hidden_size'] ** 0.5:.1f}, "
        "so the paper's tau = 20 is out of reach and the threshold is set on the model's own scale.\n",
    ]
    if _has_visual_sinks(visual):
        cols = [c for c in ("layer", "n_sinks", "sinks_per_sample", "mean_phi", "max_phi", "sink_background_share",
                            "background_base_rate", "sink_attention_received", "mean_attention_received")
                if c in visual]
        lines.append(markdown_table(visual[cols]))
    else:
        lines.append("**No visual sink tokens: this model grew none.**\n")
    return lines


def _recipes_section(card: dict) -> list[str]:
    """The training recipes tried (none: no section)."""
    recipes = card.get("recipes_tried") or []
    if not recipes:
        return []
    frame = pd.DataFrame(recipes)
    lines = ["## Recipes tried\n"]
    if "optimizer" in frame:
        lines.append(f"All: {frame['optimizer'].iloc[0]}. Numbers at the last logged step, on 32 validation "
                     "dialogues; answer_token_accuracy is teacher-forced (first answer token).\n")
        frame = frame.drop(columns=["optimizer"])
    lines.append(markdown_table(frame, max_rows=50))
    lines.append(
        "Earlier trials recorded in the project's notes (a 21-minute two-stage recipe at 2M parameters; "
        "Bigram-Backcopy models of 1-4 layers) grew no sink either, except a 1-layer 1-head model on "
        "Bigram-Backcopy text. Recipe D above is that shape on this world's text: it grew none in 3,000 steps.\n"
    )
    return lines


def _not_emerged_section(card: dict, layers: pd.DataFrame, visual: pd.DataFrame) -> list[str]:
    """For a model that was not planted: which aimed-for phenomena did not appear, and what was noticed instead."""
    if card["planted"]:
        return []
    lines = ["## What did not emerge\n"]
    bos = layers["bos_attention"]
    late = layers[layers["layer"] >= 2]
    said = []
    if (late["bos_attention"] < 0.3).sum() > len(late) / 2:
        said.append(f"no BOS attention sink (mean attention to BOS {bos.min():.2f}-{bos.max():.2f} per layer; "
                    "aim was >= 0.3 in most layers after the first two)")
    if late["bos_residual_ratio"].max() < 10:
        said.append(f"no BOS residual-state peak (BOS norm at most {late['bos_residual_ratio'].max():.1f}x the "
                    "median; aim was >= 10x)")
    if late["top_activation_ratio"].max() < 100:
        said.append(f"no massive activation (largest activation at most {late['top_activation_ratio'].max():.0f}x "
                    "the median; Sun et al.'s massive activations are ~1000x)")
    if not _has_visual_sinks(visual):
        said.append("no visual sink tokens")
    lines.append(("; ".join(said) + ".\n") if said else "All the aimed-for phenomena appeared.\n")
    trend = card.get("bos_attention_trend")
    if trend:
        lines.append(
            f"Noticed: during the finetune stage, mean attention to BOS in layer {trend['layer']} rose from "
            f"{trend['start']:.3f} to {trend['end']:.3f} (its strongest head {trend['end_max_head']:.3f}) and was still "
            "rising when training stopped.\n"
        )
    cont = card.get("continuation")
    if cont:
        lines.append(
            f"A continuation of that run ({cont['steps']} more finetune steps at lr {cont['lr']:g}, not shipped) "
            f"did not take it further: layer {cont['layer']} attention to BOS {cont['range']} at its logged steps, "
            f"Sink_0.3 = {cont['sink_0.3']:g}.\n"
        )
    return lines


def _training_section(card: dict) -> list[str]:
    """The training recipe as run, and its curves (no training record: no section)."""
    if "training" not in card:
        return []
    return ["## Training recipe (as run)\n",
            "```json\n" + json.dumps(card["training"], indent=1) + "\n```\n",
            "![training curves](training_curves.png)\n"]


def render(card: dict, acc: pd.DataFrame, layers: pd.DataFrame, visual: pd.DataFrame) -> str:
    """The model card's markdown: its sections in order, joined by blank lines."""
    sections = [_intro_section(card), _accuracy_section(acc), _layers_section(layers),
                _visual_sinks_section(card, visual), _recipes_section(card),
                _not_emerged_section(card, layers, visual), _training_section(card)]
    return "\n".join(line for section in sections for line in section)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--kind", choices=["demo", "organism"], required=True)
    parser.add_argument("--scan-dir", default=None, help="a finished scan run folder of this model (demo test split)")
    parser.add_argument("--train-dir", default=None)
    parser.add_argument("--recipes", default=None)
    parser.add_argument("--n-per-task", type=int, default=200)
    parser.add_argument("--render-only", action="store_true", help="rewrite README.md from card.json")
    args = parser.parse_args(argv)
    if args.render_only:
        card = json.loads((Path(args.model) / "card.json").read_text())
        acc = pd.DataFrame(card["accuracy_table"])
        (Path(args.model) / "README.md").write_text(
            render(card, acc, pd.DataFrame(card["layers"]), pd.DataFrame(card["visual_sinks"])))
        return
    if not args.scan_dir:
        parser.error("--scan-dir is required (a finished `sinkscope scan` folder); scripts/model_card.py runs the "
                     "scan and writes the card in one go")
    build_card(args.model, args.kind, args.scan_dir, args.train_dir, args.recipes, args.n_per_task)


if __name__ == "__main__":
    main()
