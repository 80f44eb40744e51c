"""POPE (Li et al. 2023): yes/no object-existence questions, the loader and the metrics.

Two sources of questions:
  - `load_pope(path)`: a question file as the POPE repository ships them, one JSON object per line,
    ``{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in
    the image?", "label": "yes"}``, and an image folder (`image_root`, default the file's folder);
  - `demo_pope(split, strategy, n)`: the synthetic splits of the demo world (random / popular /
    adversarial negatives, one positive and one negative question per scene) on any split
    (validation for tuning, test for reporting).

Metrics take parsed answers ("yes" | "no" | None) and labels ("yes" | "no"), with "yes" as the
positive class, as POPE reports them: accuracy, precision, recall, F1, yes-ratio.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sinkscope.errors import SinkscopeError
from sinkscope.eval.tasks import Sample, SampleList, drop_unreadable, jsonl_rows

STRATEGIES = ("random", "popular", "adversarial")
LABELS = ("yes", "no")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_NEGATIONS = {"no", "not", "none", "nope", "isn't", "aren't", "doesn't", "don't", "cannot", "can't", "nothing"}


def parse_yes_no(text: str | None) -> str | None:
    """'yes', 'no' or None (unknown) for a free-text answer.

    POPE's rule made robust to case, punctuation and special tokens: only the first sentence
    counts; a negation word (no, not, isn't, ...) means "no"; otherwise "yes" if the word yes
    appears; otherwise None. 'Yes.', ' yes</s>', 'Yes, there is' -> yes; 'No, there is not',
    'There is no cat', 'not really' -> no; '', 'a red circle' -> None.
    """
    if not text:
        return None
    t = re.sub(r"<[^>]*>", " ", text.lower())  # special tokens such as </s>, <|im_end|>
    first = re.split(r"[.!?\n]", t.strip(), maxsplit=1)[0]
    words = set(_WORD.findall(first))
    if words & _NEGATIONS:
        return "no"
    if "yes" in words:
        return "yes"
    return None


@dataclass(frozen=True)
class PopeMetrics:
    """POPE metrics of n answers. unknown: answers that parsed to neither yes nor no (counted wrong)."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    n: int
    unknown: int

    def to_dict(self) -> dict:
        return asdict(self)


def _check_labels(labels: Sequence[str]) -> list[str]:
    out = [str(y).strip().lower() for y in labels]
    bad = sorted({y for y in out if y not in LABELS})
    if bad:
        raise SinkscopeError(f"POPE labels must be 'yes' or 'no'; got {bad[:5]}")
    return out


def pope_metrics(predictions: Sequence[str | None], labels: Sequence[str]) -> PopeMetrics:
    """POPE metrics. predictions: [n] "yes" | "no" | None; labels: [n] "yes" | "no".

    precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean (0 when undefined),
    yes_ratio = share of answers that are "yes"; an unknown answer is never correct and never "yes".
    """
    labels = _check_labels(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    p = np.array([x if x in LABELS else "?" for x in predictions], dtype=object)
    y = np.array(labels, dtype=object)
    n = len(y)
    if n == 0:
        return PopeMetrics(math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0)
    tp = int(np.sum((p == "yes") & (y == "yes")))
    fp = int(np.sum((p == "yes") & (y == "no")))
    fn = int(np.sum((p != "yes") & (y == "yes")))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PopeMetrics(float(np.mean(p == y)), precision, recall, f1, float(np.mean(p == "yes")), n,
                       int(np.sum(p == "?")))


def f1_score(predictions: Sequence[str | None], labels: Sequence[str]) -> float:
    """F1 with "yes" positive (0 when there is no positive prediction and no positive label)."""
    return pope_metrics(predictions, labels).f1


# ----------------------------------------------------------------------------- loaders


def load_pope(path: str | Path, image_root: str | Path | None = None, limit: int | None = None,
              check_images: bool = True) -> SampleList:
    """Samples from a POPE question file (one JSON object per line) and an image folder.

    Each line needs "image", "text" (or "question") and "label" ("yes"/"no", any case);
    "question_id" is kept as the sample id (the line number when absent). Relative image names
    are resolved against `image_root` (default: the file's folder). task: the file's stem (e.g.
    "coco_pope_adversarial"). limit keeps the first N lines. Rows whose image is missing or
    unreadable are left out and listed in `.skipped` (check_images=False keeps them).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SinkscopeError(f"POPE file {path} not found; give the question .jsonl (e.g. coco_pope_random.jsonl)")
    root = Path(image_root).expanduser() if image_root else path.parent
    if not root.is_dir():
        raise SinkscopeError(f"image folder {root} not found; pass image_root (--image-root) pointing at the images")
    samples, ids = [], set()
    for n, row in jsonl_rows(path):
        if limit is not None and len(samples) >= limit:
            break
        text = row.get("text", row.get("question"))
        missing = [k for k, v in (("image", row.get("image")), ("text", text), ("label", row.get("label"))) if v is None]
        if missing:
            raise SinkscopeError(f"{path}:{n} lacks {missing}; POPE lines need 'image', 'text' and 'label'")
        label = str(row["label"]).strip().lower()
        if label not in LABELS:
            raise SinkscopeError(f"{path}:{n} has label {row['label']!r}; POPE labels are 'yes' or 'no'")
        sid = str(row.get("question_id", n))
        if sid in ids:
            raise SinkscopeError(f"{path}:{n} repeats question_id {sid}; question ids must be unique")
        ids.add(sid)
        image = Path(str(row["image"]))
        image = image if image.is_absolute() else root / image
        samples.append(Sample(sid, str(text), str(image), label, task=path.stem,
                              meta={"label": label, "source": f"{path}:{n}", "image_name": str(row["image"])}))
    if not samples:
        raise SinkscopeError(f"{path} holds no questions")
    return drop_unreadable(samples) if check_images else SampleList(samples)


def demo_pope(split: str, strategy: str, n: int, start: int = 0) -> list[Sample]:
    """n POPE questions of the demo world's `split` (train | validation | test), `strategy` negatives.

    Scenes start, start+1, ... each give one positive and one negative question (balanced). Sample ids
    are "<split>-<scene>-pope-<strategy>-<label>"; meta holds scene, label, category and the scene's
    background patch mask [patches] (row-major, True = background).
    """
    import sinkscope.world as world

    if strategy not in STRATEGIES:
        raise SinkscopeError(f"unknown POPE strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if n <= 0:
        raise SinkscopeError(f"the number of POPE questions must be positive, got {n}")
    out = []
    for q in world.pope_questions(split, strategy, n_scenes=(n + 1) // 2, start=start)[:n]:
        s = world.scene(split, q.scene_index)
        out.append(Sample(
            sample_id=f"{split}-{q.scene_index}-pope-{strategy}-{q.label}", question=q.question, answer=q.answer,
            task=f"pope-{strategy}",
            meta={"scene": q.scene_index, "split": split, "label": q.label, "category": q.category,
                  "background_patches": s.background_patch_mask.tolist()},
            _image=s.pil()))
    return out
