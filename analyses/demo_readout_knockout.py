"""Is the answer position's look at the asked object causal? Knockout of the asked object for that position only.

    python analyses/demo_readout_knockout.py --out runs/readout-ko [--assets DIR] [--n 200] [--start 200]
        [--layers 20-24]

`analyses/demo_readout.py` found that, for position questions, the answer position (the last prompt token)
attends selectively to the asked object at layers 20-24, and for colour questions it does not. Here, on fresh
questions (test scenes from --start on, after the readout's), the answer position and every generated token may
not attend to (`sinkscope.interventions.knockout`, renormalised rows; every other query untouched):
- `asked`: the asked object's image tokens;
- `control`: as many image tokens drawn at random from the *other* objects (all of them if they have fewer);
each at the readout layers (--layers) and at every layer. If the readout is causal, blocking the asked object at
those layers lowers position accuracy well below the control; if colour reaches the answer by another route,
blocking it for the answer position leaves colour about unchanged. Scenes with 2-4 objects; greedy answers as
in the card. Paired differences against no knockout with 95% bootstrap CIs.

Writes answers.csv, summary.csv, summary.json; prints the summary.
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


def parse_layers(text: str) -> list[int]:
    """'20-24' -> [20, 21, 22, 23, 24]; '3,5' -> [3, 5]."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def object_keys(owner: np.ndarray, asked: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(asked, control) boolean masks over the image tokens: the asked object's tokens, and as many tokens
    drawn at random from the other objects' (all of them if they have fewer). owner: [image tokens]."""
    asked_mask = owner == asked
    others = np.flatnonzero((owner >= 0) & ~asked_mask)
    pick = rng.choice(others, size=min(int(asked_mask.sum()), len(others)), replace=False)
    control = np.zeros_like(asked_mask)
    control[pick] = True
    return asked_mask, control


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task and condition: accuracy, its paired change against no knockout (95% CI), the share of answers
    naming another object's value, n."""
    rows = []
    for task, g in frame.groupby("task"):
        base = g[g.condition == "none"].set_index("key").correct
        for condition, h in g.groupby("condition", sort=False):
            h = h.set_index("key").loc[base.index]
            change = (h.correct.astype(float) - base.astype(float)).to_numpy()
            low, high = stats.bootstrap_ci(change)
            row = {"task": task, "condition": condition, "n": len(h), "accuracy": float(h.correct.mean()),
                   "change": float(change.mean()), "change_low": low, "change_high": high,
                   "names_other_object": float(h.other_object.mean())}
            if condition.startswith("asked"):  # against the control at the same layers, paired
                c = g[g.condition == condition.replace("asked", "control", 1)].set_index("key").loc[base.index]
                versus = (h.correct.astype(float) - c.correct.astype(float)).to_numpy()
                row["vs_control"] = float(versus.mean())
                row["vs_control_low"], row["vs_control_high"] = stats.bootstrap_ci(versus)
            rows.append(row)
    return pd.DataFrame(rows)


def summary_lines(table: pd.DataFrame) -> list[str]:
    lines = []
    for task, t in table.groupby("task", sort=False):
        base = t[t.condition == "none"].iloc[0]
        parts = [f"{task}: accuracy {base.accuracy:.2f} without knockout (n {int(base.n)})"]
        for r in t[t.condition != "none"].itertuples():
            parts.append(f"{r.condition} {r.accuracy:.2f} (change {r.change:+.2f} [{r.change_low:+.2f}, "
                         f"{r.change_high:+.2f}], another object's value named {r.names_other_object:.2f}"
                         + (f"; against the control {r.vs_control:+.2f} [{r.vs_control_low:+.2f}, {r.vs_control_high:+.2f}]"
                            if r.condition.startswith("asked") else "") + ")")
        lines.append("; ".join(parts))
    return lines


def main(argv=None) -> None:
    import torch

    from sinkscope.eval.accuracy import generate_answers
    from sinkscope.eval.tasks import load_samples
    from sinkscope.interventions.knockout import knockout
    from sinkscope.models.embedded import smolvlm
    from sinkscope.models.registry import adapter_for_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--assets", default=str(smolvlm.ASSETS))
    parser.add_argument("--n", type=int, default=200, help="questions per task (before keeping 2-4 object scenes)")
    parser.add_argument("--start", type=int, default=200, help="first test scene (the readout used 0..n-1)")
    parser.add_argument("--layers", default="20-24", help="the readout layers, e.g. 20-24")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    readout_layers = parse_layers(args.layers)
    model, processor = smolvlm.load_demo(args.assets)
    adapter = adapter_for_model(model, processor, "demo")
    adapter.set_text_attention("eager")
    rng = np.random.default_rng(args.seed)
    records = []
    for task in TASKS:
        samples = [s for s in load_samples(f"demo:{task}", args.n, start=args.start)
                   if len(world.scene("test", s.meta["scene"]).objects) > 1]
        for start in range(0, len(samples), args.batch_size):
            chunk = samples[start:start + args.batch_size]
            batch = adapter.prepare([s.question for s in chunk], [s.image() for s in chunk])
            visual = adapter.token_kinds(batch["input_ids"]).visual_mask  # [batch, token]
            masks = {"asked": torch.zeros_like(visual), "control": torch.zeros_like(visual)}
            for i, s in enumerate(chunk):
                scene = world.scene("test", s.meta["scene"])
                asked_mask, control = object_keys(scene.patch_owner.reshape(-1), scene.index_of(s.meta["category"]), rng)
                positions = visual[i].nonzero().squeeze(-1)
                masks["asked"][i, positions] = torch.from_numpy(asked_mask)
                masks["control"][i, positions] = torch.from_numpy(control)
            answer_position = torch.zeros_like(visual)
            answer_position[:, -1] = True  # left padding: the last prompt token
            conditions = {"none": None}
            for which in ("asked", "control"):
                conditions[f"{which}, layers {args.layers}"] = (masks[which], readout_layers)
                conditions[f"{which}, all layers"] = (masks[which], None)
            for condition, spec in conditions.items():
                if spec is None:
                    answers = generate_answers(adapter, chunk, max_new_tokens=4, batch_size=len(chunk))
                else:
                    with knockout(adapter, spec[0], query_mask=answer_position, layers=spec[1]):
                        answers = generate_answers(adapter, chunk, max_new_tokens=4, batch_size=len(chunk))
                for s, answer in zip(chunk, answers):
                    said = normalize_answer(answer)
                    correct = said == normalize_answer(s.answer)
                    named = world.scene("test", s.meta["scene"]).objects_answering(task, said)
                    records.append({"task": task, "condition": condition, "key": s.sample_id, "answer": answer.strip(),
                                    "truth": s.answer, "correct": correct, "other_object": not correct and bool(named)})
        print(f"{task}: {len(samples)} questions", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(records)
    frame.to_csv(out / "answers.csv", index=False)
    table = summarize(frame)
    table.to_csv(out / "summary.csv", index=False)
    lines = summary_lines(table)
    (out / "summary.json").write_text(json.dumps({"assets": str(args.assets), "start": args.start,
                                                  "layers": readout_layers, "lines": lines}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
