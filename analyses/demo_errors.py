"""What are the demo's errors? Binding errors (features right, their pairing wrong) against the rest.

    python analyses/demo_errors.py --out runs/errors [--assets DIR] [--n 200] [--n-pope 300]

On the card's test questions (`load_samples("demo:...")`, generation as in `eval.accuracy`):
- colour ("what color is the circle ?") and position ("where is the red circle ?"): accuracy by the number of
  objects in the scene, and the share of wrong answers that name the colour / position of *another* object
  in the scene (a binding error) rather than one no object has;
- existence (POPE popular and adversarial) on absent categories: the rate of "yes" when the asked colour and
  the asked shape are both in the scene on other objects (an illusory conjunction, e.g. "red square" asked of
  a red circle beside a blue square) against the rate when they are not;
- captions: the hallucinated objects (named, absent) whose colour and shape are both in the scene, against the
  share of absent categories that are such conjunctions (what hallucinating at random would give).

Writes answers.csv (one row per question), summary.json (rows for the model card) and prints the summary.
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
from sinkscope.eval.pope import parse_yes_no


def is_conjunction(scene: world.Scene, category: str) -> bool:
    """True when `category` ("colour shape") is absent but its colour and its shape are both in the scene."""
    return category in world.conjunction_categories(scene)


def classify_answer(scene: world.Scene, task: str, truth: str, answer: str) -> str:
    """'correct', 'other object' (the colour / position of another object in the scene) or 'absent' (no
    object's) for a colour or position answer."""
    said = normalize_answer(answer)
    if said == normalize_answer(truth):
        return "correct"
    return "other object" if scene.objects_answering(task, said) else "absent"


def caption_hallucinations(scene: world.Scene, caption: str) -> list[dict]:
    """One row per object the caption names that the scene lacks: the category and whether it is a conjunction."""
    return [{"category": c, "conjunction": is_conjunction(scene, c)}
            for c in sorted(world.chair_objects(caption) - scene.categories)]


def conjunction_chance(scene: world.Scene) -> float:
    """The share of the world's absent categories that are conjunctions of the scene's colours and shapes."""
    absent = [c for c in world.all_categories() if c not in scene.categories]
    return float(np.mean([is_conjunction(scene, c) for c in absent]))


def _small_beside_large(scene: world.Scene, category: str) -> bool:
    """True when the asked object (by category) is small and another object in the scene is large."""
    asked = scene.objects[scene.index_of(category)]
    return asked.size == "small" and any(o.size == "large" for o in scene.objects if o is not asked)


def _rate(values) -> dict:
    values = np.asarray(values, dtype=float)
    if not len(values):
        return {"n": 0, "rate": float("nan"), "ci": [float("nan"), float("nan")]}
    lo, hi = stats.bootstrap_ci(values)
    return {"n": int(len(values)), "rate": float(values.mean()), "ci": [float(lo), float(hi)]}


def summarize(answers: pd.DataFrame) -> list[dict]:
    """Rows for the card from answers.csv's frame (columns: task, scene, category, truth, answer, n_objects)."""
    rows = []
    for task in ("color", "position"):
        frame = answers[answers.task == task]
        if not len(frame):
            continue
        kind = [classify_answer(world.scene("test", int(r.scene)), task, r.truth, r.answer) for r in frame.itertuples()]
        kind = np.array(kind)
        many = frame.n_objects.to_numpy() > 1
        wrong = kind != "correct"
        small_beside_large = np.array([_small_beside_large(world.scene("test", int(r.scene)), r.category)
                                       for r in frame.itertuples()])
        rows.append({"task": task, "accuracy": _rate(kind == "correct"),
                     "accuracy, 1 object": _rate(kind[~many] == "correct"),
                     "accuracy, 2-4 objects": _rate(kind[many] == "correct"),
                     "accuracy, 4 objects": _rate(kind[frame.n_objects.to_numpy() == 4] == "correct"),
                     "accuracy, asked object small beside a large one": _rate(kind[small_beside_large] == "correct"),
                     "accuracy, other 2-4 object scenes": _rate(kind[many & ~small_beside_large] == "correct"),
                     "wrong answers naming another object's": _rate(kind[wrong] == "other object")})
    for task in ("pope-popular", "pope-adversarial"):
        frame = answers[(answers.task == task) & (answers.truth.map(normalize_answer) == "no")]
        if not len(frame):
            continue
        conj = np.array([is_conjunction(world.scene("test", int(r.scene)), r.category) for r in frame.itertuples()])
        said_yes = np.array([parse_yes_no(a) == "yes" for a in frame.answer])
        rows.append({"task": task, "absent asked, conjunction": _rate(conj),
                     "said yes, conjunction": _rate(said_yes[conj]), "said yes, not a conjunction": _rate(said_yes[~conj]),
                     "false yes that are conjunctions": _rate(conj[said_yes])})
    frame = answers[answers.task == "caption"]
    if len(frame):
        named = [h for r in frame.itertuples() for h in caption_hallucinations(world.scene("test", int(r.scene)), r.answer)]
        chance = [conjunction_chance(world.scene("test", int(s))) for s in frame.scene]
        rows.append({"task": "caption", "hallucinated objects": len(named),
                     "hallucinations that are conjunctions": _rate([h["conjunction"] for h in named]),
                     "absent categories that are conjunctions (chance)": {"rate": float(np.mean(chance))}})
    return rows


def summary_lines(rows: list[dict]) -> list[str]:
    """The summary in words, one line a task (rates with their 95% bootstrap CIs and n)."""
    def fmt(v: dict) -> str:
        if "ci" not in v:
            return f"{v['rate']:.2f}"
        return f"{v['rate']:.2f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}] (n {v['n']})"
    return [row["task"] + ": " + "; ".join(f"{k} {fmt(v) if isinstance(v, dict) else v}"
                                           for k, v in row.items() if k != "task") for row in rows]


def main(argv=None) -> None:
    from sinkscope.eval.accuracy import generate_answers
    from sinkscope.eval.tasks import load_samples
    from sinkscope.models.embedded import smolvlm
    from sinkscope.models.registry import adapter_for_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--assets", default=str(smolvlm.ASSETS))
    parser.add_argument("--n", type=int, default=200, help="questions per task (colour, position, caption)")
    parser.add_argument("--n-pope", type=int, default=300, help="questions per POPE split")
    args = parser.parse_args(argv)
    model, processor = smolvlm.load_demo(args.assets)
    adapter = adapter_for_model(model, processor, "demo")
    records = []
    for task in ("color", "position", "pope-popular", "pope-adversarial", "caption"):
        samples = load_samples(f"demo:{task}", args.n_pope if task.startswith("pope") else args.n)
        answers = generate_answers(adapter, samples, max_new_tokens=40 if task == "caption" else 4, batch_size=50)
        for s, a in zip(samples, answers):
            records.append({"task": task, "scene": s.meta["scene"], "category": s.meta.get("category", ""),
                            "question": s.question, "truth": s.answer, "answer": a,
                            "n_objects": len(world.scene("test", s.meta["scene"]).objects)})
        print(f"{task}: {len(samples)} answered", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(records)
    frame.to_csv(out / "answers.csv", index=False)
    rows = summarize(frame)
    (out / "summary.json").write_text(json.dumps({"assets": str(args.assets), "rows": rows,
                                                        "lines": summary_lines(rows)}, indent=1))
    print("\n".join(summary_lines(rows)))


if __name__ == "__main__":
    main()
