"""Accuracy of the demo on held-out scenes: test-split scenes from index 1,000,000 on, which no card,
report or test of the project evaluates (they all start at 0).

    python analyses/demo_heldout.py --out runs/heldout [--assets DIR] [--n 200] [--start 1000000]

Same questions, generation and scoring as the card's table (`eval.accuracy`), on fresh scenes;
writes heldout_accuracy.csv (task, n, accuracy, ci_low, ci_high, yes_ratio).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from sinkscope.models.embedded import smolvlm
from sinkscope import world
from sinkscope.eval import stats
from sinkscope.eval.accuracy import generate_answers, score_samples
from sinkscope.eval.pope import parse_yes_no, pope_metrics
from sinkscope.eval.tasks import Sample
from sinkscope.models.registry import adapter_for_model

TASKS = ("pope-random", "pope-adversarial", "color", "count", "position")


def samples_for(task: str, n: int, start: int) -> list[Sample]:
    if task.startswith("pope-"):
        qs = world.pope_questions("test", task[5:], (n + 1) // 2, start)[:n]
    else:
        qs = world.task_questions("test", task, n, start)
    return [Sample(f"heldout-{q.scene_index}-{q.task}-{q.label or k}", q.question, None, q.answer,
                   task=q.task + (f"-{q.strategy}" if q.strategy else ""), _image=world.scene("test", q.scene_index).pil())
            for k, q in enumerate(qs)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--assets", default=str(smolvlm.ASSETS))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--start", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    model, processor = smolvlm.load_demo(args.assets)
    adapter = adapter_for_model(model, processor, "demo")
    rows = []
    for task in TASKS:
        samples = samples_for(task, args.n, args.start)
        answers = generate_answers(adapter, samples, max_new_tokens=4, batch_size=50)
        correct = score_samples(samples, answers)["correct"].astype(float)
        lo, hi = stats.bootstrap_ci(correct)
        row = {"task": task, "n": len(samples), "accuracy": float(correct.mean()), "ci_low": lo, "ci_high": hi}
        if task.startswith("pope"):
            row["yes_ratio"] = pope_metrics([parse_yes_no(a) for a in answers], [s.answer for s in samples]).yes_ratio
        rows.append(row)
        print(row, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "heldout_accuracy.csv", index=False)


if __name__ == "__main__":
    main()
