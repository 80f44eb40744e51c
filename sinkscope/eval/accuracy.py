"""Answer questions with greedy generation and score them (exact match; POPE metrics and CHAIR from eval.pope / eval.chair).

Works with any adapter; `generate` keyword arguments pass through, so an intervention
registered as an attention function (VAR) is evaluated on the very same path.
"""

from __future__ import annotations

import pandas as pd
import torch

from sinkscope.eval.chair import chair_scores
from sinkscope.eval.pope import parse_yes_no, pope_metrics
from sinkscope.eval.tasks import Sample, batches
from sinkscope.models.base import ModelAdapter


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().replace("</s>", " ").split()).strip(" .")


@torch.no_grad()
def generate_answers(adapter: ModelAdapter, samples: list[Sample], max_new_tokens: int = 4,
                     batch_size: int = 32, **generate_kwargs) -> list[str]:
    """Greedy answers (decoded text after the prompt), in sample order."""
    tok = adapter.processor.tokenizer
    out: list[str] = []
    for chunk in batches(samples, batch_size):
        images = [s.image() for s in chunk]
        batch = adapter.prepare([s.question for s in chunk], images if images[0] is not None else None)
        inputs = adapter.device_inputs(batch)
        ids = adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, **generate_kwargs)
        new = ids[:, inputs["input_ids"].shape[1]:]
        out += [tok.decode(row, skip_special_tokens=True) for row in new]
    return out


@torch.no_grad()
def answer_batch(adapter: ModelAdapter, inputs: dict, max_new_tokens: int) -> tuple[list[str], torch.Tensor]:
    """Greedy answers of one prepared batch (`adapter.device_inputs`): the decoded text after each prompt, and the
    logits of generate's first step, [batch, vocab] float32 on the CPU: those the answer's first token was chosen
    from (the prompt's last position, before any logits processor), so no second pass over the prompt."""
    tok = getattr(adapter.processor, "tokenizer", adapter.processor)
    out = adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=getattr(tok, "pad_token_id", None), return_dict_in_generate=True,
                                 output_logits=True)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    return [tok.decode(row, skip_special_tokens=True) for row in new], out.logits[0].float().cpu()


def score_samples(samples: list[Sample], answers: list[str]) -> pd.DataFrame:
    """One row per sample: task, answer, reference, correct (exact match after normalising)."""
    rows = []
    for s, a in zip(samples, answers):
        if s.task.startswith("existence"):
            pred = parse_yes_no(a)
            correct = pred == s.answer
        else:
            pred = normalize_answer(a)
            correct = pred == normalize_answer(s.answer or "")
        rows.append({"sample": s.sample_id, "task": s.task, "prediction": a.strip(), "reference": s.answer,
                     "correct": bool(correct)})
    return pd.DataFrame(rows)


def demo_accuracy(adapter: ModelAdapter, n_per_task: int = 100, batch_size: int = 50, n_pope: int | None = None,
                  **generate_kwargs) -> pd.DataFrame:
    """Accuracy per demo task on the held-out test split (POPE splits get F1 too; n_pope: their n if given)."""
    import sinkscope.world as world
    from sinkscope.eval.tasks import load_samples

    rows = []
    for task in ("pope-random", "pope-popular", "pope-adversarial", "color", "count", "position", "caption"):
        samples = load_samples(f"demo:{task}", n_pope if n_pope and task.startswith("pope") else n_per_task)
        answers = generate_answers(adapter, samples, max_new_tokens=40 if task == "caption" else 4,
                                   batch_size=batch_size, **generate_kwargs)
        scored = score_samples(samples, answers)
        row = {"task": task, "n": len(samples), "accuracy": float(scored["correct"].mean())}
        if task.startswith("pope"):
            m = pope_metrics([parse_yes_no(a) for a in answers], [s.answer for s in samples])
            row.update(precision=m.precision, recall=m.recall, f1=m.f1, yes_ratio=m.yes_ratio)
        if task == "caption":
            truth = [world.scene("test", s.meta["scene"]).categories for s in samples]
            scores = chair_scores(answers, truth)
            row.update(chair_i=scores.chair_i, chair_s=scores.chair_s, recall=scores.recall)
        rows.append(row)
    return pd.DataFrame(rows)
