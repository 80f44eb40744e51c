"""What do the demo's image tokens carry? Linear probes of each object patch's colour and shape.

    python analyses/demo_probe.py --out runs/probe [--assets DIR] [--fit-scenes 700] [--eval-scenes 300]

A colour question names its object by shape ("what color is the circle ?"): the answer position can select
the asked object's tokens only if they carry its shape. For every image token that an object owns
(`world.Scene.patch_owner`, exact), a multinomial logistic regression (scikit-learn, standardised features)
predicts the owner's shape and its colour from:
- the vision tower's patch features (what the projector reads),
- the LLM's residual stream at the image tokens, at its input (the projector's output, layer 0) and after
  every few layers. The image tokens come before the question, so under causal attention their states do not
  depend on it.
Fitted on the object patches of test scenes [eval-scenes, eval-scenes + fit-scenes), scored on scenes
[0, eval-scenes): disjoint scenes, none from training. Accuracy overall and on the patches of small objects in
multi-object scenes (where the demo's colour errors concentrate), beside the majority-class rate.

Writes probes.csv, summary.json, probes.png; prints the summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from sinkscope import world

TARGETS = ("shape", "colour")


def object_patch_targets(scene: world.Scene) -> pd.DataFrame:
    """One row per image token an object owns (row-major patch order, as the image tokens): patch index, the
    owner's shape and colour (indices into world.SHAPES / world.COLORS), and whether the owner is a small object
    in a multi-object scene."""
    owner = scene.patch_owner.reshape(-1)
    rows = [{"patch": p, "shape": world.SHAPES.index(scene.objects[k].shape),
             "colour": world.COLORS.index(scene.objects[k].color),
             "small_in_multi": scene.objects[k].size == "small" and len(scene.objects) > 1}
            for p, k in enumerate(owner) if k >= 0]
    return pd.DataFrame(rows, columns=["patch", "shape", "colour", "small_in_multi"])


def probe_accuracy(fit_x: np.ndarray, fit_y: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray) -> np.ndarray:
    """Per evaluated row, whether a multinomial logistic regression fitted on (fit_x [n, d], fit_y [n]) predicts
    eval_y from eval_x ([m, d]): [m] bool."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(fit_x, fit_y)
    return probe.predict(eval_x) == eval_y


def probe_table(fit: dict[str, np.ndarray], fit_targets: pd.DataFrame, evaluated: dict[str, np.ndarray],
                eval_targets: pd.DataFrame) -> pd.DataFrame:
    """Rows of site, target, subset (all | small in multi-object), accuracy, n, majority (the rate of always
    answering the fit set's most frequent class). fit / evaluated: site -> [object patches, d] features, rows
    aligned with the targets frames."""
    rows = []
    small = eval_targets.small_in_multi.to_numpy(bool)
    for site in fit:
        for target in TARGETS:
            correct = probe_accuracy(fit[site], fit_targets[target].to_numpy(), evaluated[site],
                                     eval_targets[target].to_numpy())
            majority_class = fit_targets[target].mode().iloc[0]
            for subset, keep in (("all", np.ones_like(small)), ("small object, multi-object scene", small)):
                rows.append({"site": site, "target": target, "subset": subset, "accuracy": float(correct[keep].mean()),
                             "n": int(keep.sum()),
                             "majority": float((eval_targets[target].to_numpy()[keep] == majority_class).mean())})
    return pd.DataFrame(rows)


def summary_lines(table: pd.DataFrame) -> list[str]:
    """Sentences for the card: shape and colour at the LLM's input and at its last probed layer."""
    def acc(site, target, subset="all"):
        row = table[(table.site == site) & (table.target == target) & (table.subset == subset)].iloc[0]
        return f"{row.accuracy:.3f}"

    llm_sites = [s for s in dict.fromkeys(table.site) if s.startswith("layer")]
    first, last = llm_sites[0], llm_sites[-1]
    small = "small object, multi-object scene"
    return [f"owner's shape read linearly from the image tokens: vision features {acc('vision', 'shape')}, LLM "
            f"input {acc(first, 'shape')}, {last} {acc(last, 'shape')} (small objects in multi-object scenes: "
            f"{acc('vision', 'shape', small)}, {acc(first, 'shape', small)}, {acc(last, 'shape', small)})",
            f"owner's colour: vision features {acc('vision', 'colour')}, LLM input {acc(first, 'colour')}, {last} "
            f"{acc(last, 'colour')}"]


def _features(model, adapter, start: int, n: int, layers: list[int], batch_size: int = 32):
    """(site -> [object patches, d] float32 features, targets frame) for test scenes [start, start + n)."""
    import torch

    from sinkscope.analyses.common import prepare_batch
    from sinkscope.eval.tasks import load_samples

    samples = load_samples("demo:count", n, start=start)  # one prompt per scene; the question does not matter
    sites: dict[str, list[np.ndarray]] = {"vision": [], **{f"layer {l}": [] for l in layers}}
    targets = []
    feature_layer = model.config.vision_feature_layer
    for b in range(0, len(samples), batch_size):
        chunk = samples[b:b + batch_size]
        batch = prepare_batch(adapter, chunk)
        with torch.no_grad():
            vision = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
            patches = vision.hidden_states[feature_layer][:, 1:]  # CLS dropped, as the projector reads them
            out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=batch["pixel_values"], output_hidden_states=True)
        visual = adapter.token_kinds(batch["input_ids"]).visual_mask
        for i, sample in enumerate(chunk):
            frame = object_patch_targets(world.scene("test", sample.meta["scene"]))
            keep = torch.tensor(frame.patch.to_numpy(), dtype=torch.long)  # a copy: pandas hands out read-only arrays
            positions = visual[i].nonzero().squeeze(-1)[keep]
            sites["vision"].append(patches[i, keep].float().numpy())
            for l in layers:
                sites[f"layer {l}"].append(out.hidden_states[l][i, positions].float().numpy())
            targets.append(frame)
    return {k: np.concatenate(v) for k, v in sites.items()}, pd.concat(targets, ignore_index=True)


def main(argv=None) -> None:
    from sinkscope import plots
    from sinkscope.models.embedded import smolvlm
    from sinkscope.models.registry import adapter_for_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--assets", default=str(smolvlm.ASSETS))
    parser.add_argument("--fit-scenes", type=int, default=700)
    parser.add_argument("--eval-scenes", type=int, default=300)
    parser.add_argument("--every", type=int, default=5, help="probe the LLM's residual stream every N layers")
    args = parser.parse_args(argv)
    model, processor = smolvlm.load_demo(args.assets)
    adapter = adapter_for_model(model, processor, "demo")
    n_layers = model.config.text_config.num_hidden_layers
    layers = sorted(set(range(0, n_layers + 1, args.every)) | {n_layers})
    fit, fit_targets = _features(model, adapter, args.eval_scenes, args.fit_scenes, layers)
    evaluated, eval_targets = _features(model, adapter, 0, args.eval_scenes, layers)
    table = probe_table(fit, fit_targets, evaluated, eval_targets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "probes.csv", index=False)
    lines = summary_lines(table)
    (out / "summary.json").write_text(json.dumps({"assets": str(args.assets), "lines": lines,
                                                  "fit_patches": len(fit_targets), "eval_patches": len(eval_targets)},
                                                 indent=1))
    plots.probe_accuracies(table, out / "probes.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
