"""Where does the demo look when it answers "what color is the circle ?" or "where is the red circle ?"

    python analyses/demo_readout.py --out runs/readout [--assets DIR] [--n 200]

A test of where the demo's binding errors arise (`analyses/demo_errors.py`: its wrong colours and positions
are mostly another object's). At the last prompt token (the position whose next token is the answer), the
attention each layer gives to the image tokens of the *asked* object, of the object whose colour / position
the model *named* (when the answer is another object's), of the other objects and of the background (heads
averaged; patches assigned by the world's exact `Scene.patch_owner`). On scenes with 2-4 objects:
- asked share = attention to the asked object's tokens / attention to all object tokens, and its
  selectivity = asked share / the asked object's share of the object tokens (1: no more than uniform
  attention would give, which matters because objects differ in size);
- for binding errors, the named object's selectivity beside the asked one's: if the last token looks more at
  the named object, the question selected the wrong object (the pairing is lost in the readout); if it looks
  at the asked object and still names another's value, what it reads there is wrong; if it selects neither,
  the answer is not read by this position's attention at all.
Answers come from greedy generation, as in the card (`eval.accuracy`).

Per head as well (head_selectivity.csv): the heads whose right answers single out the asked object most, since
an average over heads can hide a few selective ones.

Writes attention.csv (question x layer), head_selectivity.csv, summary.json, readout.png; prints the summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from sinkscope import world
from sinkscope.eval import stats
from sinkscope.eval.accuracy import normalize_answer

TASKS = ("color", "position")


def asked_and_named(scene: world.Scene, task: str, category: str, answer: str) -> tuple[int, list[int]]:
    """(index of the asked object, by its category; indices of the *other* objects whose colour / position
    the answer names)."""
    asked = scene.index_of(category)
    return asked, [k for k in scene.objects_answering(task, normalize_answer(answer)) if k != asked]


def attention_masses(image_attention: np.ndarray, owner: np.ndarray, asked: int, named: list[int]) -> dict:
    """Split one layer's head-averaged attention to the image tokens by what the tokens show.

    image_attention: [image tokens] (row-major patches); owner: [image tokens] object index or -1.
    Returns the masses (asked, named, other objects, background) and the shares of object attention.
    """
    is_asked, is_named = owner == asked, np.isin(owner, named)
    is_object = owner >= 0
    objects = float(image_attention[is_object].sum())
    out = {"asked": float(image_attention[is_asked].sum()), "named": float(image_attention[is_named].sum()),
           "other_objects": float(image_attention[is_object & ~is_asked & ~is_named].sum()),
           "background": float(image_attention[~is_object].sum()), "image": float(image_attention.sum())}
    out["asked_share"] = out["asked"] / objects if objects > 0 else np.nan
    out["named_share"] = out["named"] / objects if objects > 0 and named else np.nan
    out["asked_token_share"] = float(is_asked.sum() / is_object.sum())
    out["named_token_share"] = float(is_named.sum() / is_object.sum()) if named else np.nan
    out["asked_selectivity"] = out["asked_share"] / out["asked_token_share"]  # 1: no more than uniform
    out["named_selectivity"] = out["named_share"] / out["named_token_share"] if named else np.nan
    return out


def head_selectivity(head_attention: np.ndarray, owner: np.ndarray, asked: int) -> np.ndarray:
    """[heads] asked-object selectivity per head (share of the head's object attention on the asked object over
    the asked object's share of object tokens). head_attention: [heads, image tokens]; owner: [image tokens]."""
    is_object = owner >= 0
    objects = head_attention[:, is_object].sum(-1)
    share = np.divide(head_attention[:, owner == asked].sum(-1), objects, out=np.full(len(objects), np.nan),
                      where=objects > 0)
    return share / ((owner == asked).sum() / is_object.sum())


def top_heads(frame: pd.DataFrame, k: int = 3) -> list[str]:
    """Per task, the k (layer, head) pairs whose right answers attend most selectively to the asked object, with
    the same heads' selectivity in binding errors. frame: rows of task, outcome, layer, head, asked_selectivity."""
    lines = []
    means = frame.groupby(["task", "outcome", "layer", "head"]).asked_selectivity.mean()
    for task in TASKS:
        if (task, "correct") not in means.index.droplevel([2, 3]):
            continue
        best = means.loc[(task, "correct")].sort_values(ascending=False).head(k)
        parts = []
        for (layer, head), value in best.items():
            err = means.get((task, "binding error", layer, head), np.nan)
            parts.append(f"L{layer}.H{head} {value:.2f} (binding errors {err:.2f})")
        lines.append(f"{task}, most selective heads for right answers (times uniform): " + ", ".join(parts))
    return lines


def summarize(frame: pd.DataFrame) -> list[dict]:
    """Per task, outcome (correct / binding error) and layer: mean shares with 95% bootstrap CIs."""
    rows = []
    for (task, outcome, layer), g in frame.groupby(["task", "outcome", "layer"]):
        row = {"task": task, "outcome": outcome, "layer": int(layer), "n": len(g)}
        for col in ("asked_share", "named_share", "asked_token_share", "named_token_share", "asked_selectivity",
                    "named_selectivity", "image"):
            values = g[col].dropna().to_numpy()
            row[col] = float(values.mean()) if len(values) else np.nan
            low, high = stats.bootstrap_ci(values) if len(values) >= 2 else (np.nan, np.nan)
            row[col + "_low"], row[col + "_high"] = low, high
        rows.append(row)
    return rows


def summary_lines(table: pd.DataFrame) -> list[str]:
    """Per task: the layer where right answers attend most selectively to the asked object, and both
    outcomes there (selectivity = share of object attention / share of object tokens; 1 = uniform)."""
    def ci(row, col: str) -> str:
        return f"{row[col]:.2f} [{row[col + '_low']:.2f}, {row[col + '_high']:.2f}]"
    lines = []
    for task in TASKS:
        t = table[table.task == task]
        right, wrong = t[t.outcome == "correct"], t[t.outcome == "binding error"]
        if right.empty:
            continue
        best = right.loc[right.asked_selectivity.idxmax()]
        line = (f"{task}: at layer {best.layer} (where right answers are most selective) right answers attend to "
                f"the asked object {ci(best, 'asked_selectivity')} times uniform ({best.asked_share:.2f} of object "
                f"attention on {best.asked_token_share:.2f} of object tokens, n {best.n})")
        w = wrong[wrong.layer == best.layer]
        if len(w):
            w = w.iloc[0]
            line += (f"; binding errors attend to the asked object {ci(w, 'asked_selectivity')} times uniform and to "
                     f"the object whose value they name {ci(w, 'named_selectivity')} (object-token shares "
                     f"{w.asked_token_share:.2f} and {w.named_token_share:.2f}, n {w.n})")
        lines.append(line)
    return lines


def main(argv=None) -> None:
    import torch

    from sinkscope import plots
    from sinkscope.analyses.common import prepare_batch
    from sinkscope.eval.accuracy import generate_answers
    from sinkscope.eval.tasks import load_samples
    from sinkscope.models.embedded import smolvlm
    from sinkscope.models.registry import adapter_for_model
    from sinkscope.trace import Tracer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--assets", default=str(smolvlm.ASSETS))
    parser.add_argument("--n", type=int, default=200, help="questions per task (the card's first n)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    model, processor = smolvlm.load_demo(args.assets)
    adapter = adapter_for_model(model, processor, "demo")
    adapter.set_text_attention("eager")
    tracer = Tracer(adapter)
    records, head_records = [], []
    for task in TASKS:
        samples = [s for s in load_samples(f"demo:{task}", args.n)
                   if len(world.scene("test", s.meta["scene"]).objects) > 1]
        answers = generate_answers(adapter, samples, max_new_tokens=4, batch_size=50)
        for start in range(0, len(samples), args.batch_size):
            chunk = samples[start:start + args.batch_size]
            batch = prepare_batch(adapter, chunk)
            with torch.no_grad():
                cache = tracer.run_with_cache(batch)
            visual = adapter.token_kinds(batch["input_ids"]).visual_mask  # [batch, token]
            for i, sample in enumerate(chunk):
                scene = world.scene("test", sample.meta["scene"])
                answer = answers[start + i]
                asked, named = asked_and_named(scene, task, sample.meta["category"], answer)
                correct = normalize_answer(answer) == normalize_answer(sample.answer)
                outcome = "correct" if correct else ("binding error" if named else "other error")
                positions = visual[i].nonzero().squeeze(-1)
                for layer, pattern in sorted(cache.attention.items()):
                    per_head = pattern[i, :, -1, positions].float().numpy()  # [heads, image]; left padding: -1 is last
                    image_attention = per_head.mean(0)
                    for head, value in enumerate(head_selectivity(per_head, scene.patch_owner.reshape(-1), asked)):
                        head_records.append({"task": task, "outcome": outcome, "layer": layer, "head": head,
                                             "asked_selectivity": float(value)})
                    records.append({"task": task, "scene": sample.meta["scene"], "question": sample.question,
                                    "answer": answer.strip(), "truth": sample.answer, "outcome": outcome,
                                    "n_objects": len(scene.objects), "layer": layer,
                                    **attention_masses(image_attention, scene.patch_owner.reshape(-1), asked, named)})
        print(f"{task}: {len(samples)} questions on 2-4 object scenes", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(records)
    frame.to_csv(out / "attention.csv", index=False)
    table = pd.DataFrame(summarize(frame))
    table.to_csv(out / "summary.csv", index=False)
    heads = pd.DataFrame(head_records)
    heads.groupby(["task", "outcome", "layer", "head"]).asked_selectivity.agg(["mean", "count"]).reset_index().to_csv(
        out / "head_selectivity.csv", index=False)
    lines = summary_lines(table) + top_heads(heads)
    counts = frame[frame.layer == frame.layer.min()].groupby(["task", "outcome"]).size().to_dict()
    (out / "summary.json").write_text(json.dumps({"assets": str(args.assets), "lines": lines,
                                                  "questions": {f"{k[0]} {k[1]}": int(v) for k, v in counts.items()}},
                                                 indent=1))
    plots.readout_shares(table, out / "readout.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
