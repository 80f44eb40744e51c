"""Does the demo use its image? Knockout of every image token, whole-image swap, visual sinks per image.

    python analyses/demo_image_use.py --out runs/image-use [--assets DIR] [--n 300] [--split test]

On POPE questions of the demo world (test split unless --split, e.g. `heldout`):
1. knockout: POPE accuracy by greedy generation with every image token blocked as a key for the text
   queries after the image and the generated tokens (`sinkscope.interventions.knockout`), against
   the same questions without it; a model that reads its image falls to chance (0.5).
2. swap: the same question asked about a second scene whose answer is the opposite (sources as in
   `sinkscope patch`, `analyses.patching.pick_sources`); ld = logit(yes) - logit(no) at the answer
   position, effect = sign * (ld(source image) - ld(target image)) with sign = +1 for a yes target
   (negative: the answer moves towards the source's), bootstrap CI; flip rate = share of pairs whose
   yes/no decision differs between the two images.
3. visual sinks per image: image tokens whose layer-relative sink score (|x_d| over the layer's median
   token RMS, sink dims discovered on the first token) is >= tau = 100, the most in one layer >= 2,
   per image, with a bootstrap CI over images; the largest image score and, in that layer, the share
   of text-query attention the sinks take.

Writes summary.json and per-sample CSVs into --out. Float32 unless --dtype.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.common import answer_token_ids
from sinkscope.analyses.patching import pick_sources
from sinkscope.models.embedded import smolvlm
from sinkscope import world
from sinkscope.eval import stats
from sinkscope.eval.accuracy import generate_answers
from sinkscope.eval.pope import parse_yes_no, pope_metrics
from sinkscope.eval.tasks import Sample, batches
from sinkscope.interventions.knockout import knockout
from sinkscope.models.registry import adapter_for_model

STRATEGIES = ("random", "popular", "adversarial")


def pope_samples(split: str, strategy: str, n: int, start: int = 0) -> list[Sample]:
    """n balanced POPE questions of one strategy on `split` scenes from `start` on."""
    out = []
    for q in world.pope_questions(split, strategy, (n + 1) // 2, start)[:n]:
        s = world.scene(split, q.scene_index)
        out.append(Sample(f"{split}-{q.scene_index}-{strategy}-{q.label}", q.question, None, q.answer,
                          task=f"existence-{strategy}",
                          meta={"scene": q.scene_index, "split": split, "category": q.category, "label": q.label,
                                "background_patches": s.background_patch_mask.tolist()},
                          _image=s.pil()))
    return out


@torch.no_grad()
def knocked_out_answers(adapter, samples: list[Sample], batch_size: int = 50) -> list[str]:
    """Greedy answers with every image token blocked as a key (text queries after the image + generated)."""
    tok = adapter.processor.tokenizer
    out = []
    for chunk in batches(samples, batch_size):
        batch = adapter.prepare([s.question for s in chunk], [s.image() for s in chunk])
        kinds = adapter.token_kinds(batch["input_ids"], batch["attention_mask"])
        inputs = adapter.forward_inputs(batch)
        with knockout(adapter, kinds.visual_mask):
            ids = adapter.model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        out += [tok.decode(r, skip_special_tokens=True) for r in ids[:, inputs["input_ids"].shape[1]:]]
    return out


@torch.no_grad()
def answer_logit_diff(adapter, samples: list[Sample], batch_size: int = 50) -> np.ndarray:
    """[n] logit(yes) - logit(no) at the answer position."""
    yes, no = answer_token_ids(adapter)
    out = []
    for chunk in batches(samples, batch_size):
        batch = adapter.prepare([s.question for s in chunk], [s.image() for s in chunk])
        logits = adapter.model(**adapter.forward_inputs(batch)).logits[:, -1].float()
        out.append((logits[:, yes] - logits[:, no]).numpy())
    return np.concatenate(out)


def swap_table(adapter, samples: list[Sample]) -> pd.DataFrame:
    pairs = pick_sources(samples, samples)
    sources = [s for s, _ in pairs]
    ld_t, ld_s = answer_logit_diff(adapter, samples), answer_logit_diff(adapter, sources)
    sign = np.array([1.0 if s.answer == "yes" else -1.0 for s in samples])
    return pd.DataFrame({"sample": [s.sample_id for s in samples], "source": [s.sample_id for s in sources],
                         "label": [s.answer for s in samples], "source_label": [a for _, a in pairs],
                         "ld_target": ld_t, "ld_source": ld_s, "effect": sign * (ld_s - ld_t),
                         "target_correct": sign * ld_t > 0, "flipped": (ld_t > 0) != (ld_s > 0)})


@torch.no_grad()
def visual_sinks_per_image(adapter, split: str, n_images: int, start: int = 0, tau: float | None = None) -> pd.DataFrame:
    """Per image: image tokens with layer-relative score >= tau, most in one layer >= 2; largest image score."""
    from sinkscope.measures import massive, sinks

    tau = sinks.LAYER_SCORE_TAU if tau is None else tau
    model = adapter.model
    rows = []
    for chunk_start in range(start, start + n_images, 8):
        idx = list(range(chunk_start, min(chunk_start + 8, start + n_images)))
        qs = [world.pope_questions(split, "random", 1, i)[0] for i in idx]
        batch = adapter.prepare([q.question for q in qs], [world.scene(split, i).pil() for i in idx])
        out = model.model(**adapter.forward_inputs(batch), output_hidden_states=True, output_attentions=True)
        n_layers = len(out.attentions)
        states = torch.stack(out.hidden_states[:n_layers], 1).float()  # [B, L, T, D]
        mask = batch["attention_mask"].bool()
        kinds = adapter.token_kinds(batch["input_ids"], batch["attention_mask"])
        first = mask.float().argmax(1)
        dims = massive.discover_sink_dims(states[torch.arange(len(idx)), :, first]).dims
        score = sinks.phi_layer_relative(states, dims, mask)  # [B, L, T]
        is_image = kinds.visual_mask
        last_image = torch.where(is_image, torch.arange(is_image.shape[1]), -1).max(1).values
        text_query = (torch.arange(is_image.shape[1])[None] > last_image[:, None]) & mask
        for b, i in enumerate(idx):
            counts = [(int((is_image[b] & (score[b, l] >= tau)).sum()), l) for l in range(2, n_layers)]
            n_sinks, layer = max(counts)
            sink = is_image[b] & (score[b, layer] >= tau)
            att = out.attentions[layer][b].float().mean(0)[text_query[b]]  # [queries, keys]
            rows.append({"split": split, "scene": i, "visual_sinks": n_sinks, "layer": layer,
                         "max_image_score": float(score[b, 2:][:, is_image[b]].max()),
                         "sink_attention_share": float(att[:, sink].sum(-1).mean()) if n_sinks else 0.0,
                         "sink_dims": " ".join(map(str, dims))})
    return pd.DataFrame(rows)


def summarize(knock: pd.DataFrame, swap: pd.DataFrame, vis: pd.DataFrame) -> dict:
    out = {"knockout": {}, "swap": {}, "visual_sinks": {}}
    for strategy, g in knock.groupby("strategy"):
        base = pope_metrics(list(g["pred"]), list(g["label"]))
        ko = pope_metrics(list(g["pred_knockout"]), list(g["label"]))
        out["knockout"][strategy] = {"n": len(g), "accuracy": base.accuracy, "yes_ratio": base.yes_ratio,
                                     "accuracy_knockout": ko.accuracy, "yes_ratio_knockout": ko.yes_ratio,
                                     "ci_knockout": stats.bootstrap_ci(
                                         (g["pred_knockout"] == g["label"]).astype(float))}
    lo, hi = stats.bootstrap_ci(swap["effect"])
    correct = swap[swap["target_correct"]]
    out["swap"] = {"n": len(swap), "effect_mean": float(swap["effect"].mean()), "ci": [lo, hi],
                   "flip_rate": float(swap["flipped"].mean()), "flip_ci": list(stats.bootstrap_ci(swap["flipped"].astype(float))),
                   "flip_rate_when_target_correct": float(correct["flipped"].mean()) if len(correct) else float("nan"),
                   "n_target_correct": len(correct)}
    lo, hi = stats.bootstrap_ci(vis["visual_sinks"])
    out["visual_sinks"] = {"n_images": len(vis), "per_image_mean": float(vis["visual_sinks"].mean()), "ci": [lo, hi],
                           "images_with_any": float((vis["visual_sinks"] > 0).mean()),
                           "max_image_score_median": float(vis["max_image_score"].median()),
                           "max_image_score_max": float(vis["max_image_score"].max()),
                           "sink_attention_share_mean": float(vis["sink_attention_share"].mean()),
                           "sink_dims": vis["sink_dims"].mode().iloc[0] if len(vis) else ""}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--assets", default=str(smolvlm.ASSETS))
    parser.add_argument("--n", type=int, default=300, help="questions per POPE strategy (knockout)")
    parser.add_argument("--n-swap", type=int, default=300, help="adversarial questions for the swap")
    parser.add_argument("--n-sink-images", type=int, default=64)
    parser.add_argument("--split", default="test")
    parser.add_argument("--start", type=int, default=0, help="first scene index")
    parser.add_argument("--skip-knockout", action="store_true")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: float32)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = smolvlm.load_demo(args.assets, dtype=getattr(torch, args.dtype) if args.dtype else None)
    adapter = adapter_for_model(model, processor, "demo")
    vis = visual_sinks_per_image(adapter, args.split, args.n_sink_images, args.start)
    vis.to_csv(out / "visual_sinks_per_image.csv", index=False)
    swap = swap_table(adapter, pope_samples(args.split, "adversarial", args.n_swap, args.start))
    swap.to_csv(out / "swap_per_sample.csv", index=False)
    rows = []
    for strategy in ([] if args.skip_knockout else STRATEGIES):
        samples = pope_samples(args.split, strategy, args.n, args.start)
        plain = generate_answers(adapter, samples, max_new_tokens=4, batch_size=50)
        blocked = knocked_out_answers(adapter, samples)
        rows += [{"sample": s.sample_id, "strategy": strategy, "label": s.answer, "pred": parse_yes_no(a),
                  "pred_knockout": parse_yes_no(b), "answer": a, "answer_knockout": b}
                 for s, a, b in zip(samples, plain, blocked)]
    knock = pd.DataFrame(rows, columns=["sample", "strategy", "label", "pred", "pred_knockout", "answer", "answer_knockout"])
    knock.to_csv(out / "knockout_per_sample.csv", index=False)
    summary = {"split": args.split, "start": args.start, "assets": args.assets, **summarize(knock, swap, vis)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    print(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
