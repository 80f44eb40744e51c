"""CHAIR (Rohrbach et al. 2018): object hallucination in captions, on the demo world.

For captions c_1..c_n with ground-truth object sets T_k and mentioned object sets M_k (objects
read from the caption by `demo.world.chair_objects`, e.g. "red circle"):
  CHAIR_i = sum_k |M_k - T_k| / sum_k |M_k|      (hallucinated share of mentioned objects)
  CHAIR_s = mean_k [ |M_k - T_k| > 0 ]            (share of captions with any hallucination)
  recall  = sum_k |M_k & T_k| / sum_k |T_k|       (coverage of the true objects)
Per-caption counts are kept (`caption_counts`) so that CIs can resample captions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from sinkscope.errors import SinkscopeError
from sinkscope.eval.tasks import Sample


@dataclass(frozen=True)
class CaptionCounts:
    """One caption: objects mentioned, of which hallucinated (not in the scene), true objects, and covered."""

    mentioned: int
    hallucinated: int
    truth: int
    covered: int


@dataclass(frozen=True)
class ChairScores:
    chair_s: float
    chair_i: float
    recall: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def _objects(extract: Callable[[str], set[str]] | None):
    if extract is not None:
        return extract
    from sinkscope.world import chair_objects

    return chair_objects


def caption_counts(caption: str, truth: set[str], extract: Callable[[str], set[str]] | None = None) -> CaptionCounts:
    """Counts of one caption against its scene's object set (default extractor: the demo world's)."""
    mentioned = _objects(extract)(caption)
    truth = set(truth)
    return CaptionCounts(len(mentioned), len(mentioned - truth), len(truth), len(mentioned & truth))


def chair_from_counts(counts: Sequence[CaptionCounts]) -> ChairScores:
    """CHAIR_s, CHAIR_i and recall of captions given their counts (CHAIR_i 0 when nothing is mentioned)."""
    n = len(counts)
    if n == 0:
        return ChairScores(math.nan, math.nan, math.nan, 0)
    m = np.array([[c.mentioned, c.hallucinated, c.truth, c.covered] for c in counts], dtype=float)
    return ChairScores(float(np.mean(m[:, 1] > 0)), float(m[:, 1].sum() / m[:, 0].sum()) if m[:, 0].sum() else 0.0,
                       float(m[:, 3].sum() / m[:, 2].sum()) if m[:, 2].sum() else 0.0, n)


def chair_scores(captions: Sequence[str], truths: Sequence[set[str]],
                 extract: Callable[[str], set[str]] | None = None) -> ChairScores:
    """CHAIR of captions [n] against ground-truth object sets [n]."""
    if len(captions) != len(truths):
        raise SinkscopeError(f"{len(captions)} captions for {len(truths)} ground-truth object sets")
    return chair_from_counts([caption_counts(c, t, extract) for c, t in zip(captions, truths)])


def demo_captions(split: str, n: int, start: int = 0) -> list[Sample]:
    """n caption prompts ("describe the image .") of the demo world's split; meta["objects"] = true categories."""
    import sinkscope.world as world

    if n <= 0:
        raise SinkscopeError(f"the number of captions must be positive, got {n}")
    out = []
    for i in range(start, start + n):
        s = world.scene(split, i)
        out.append(Sample(f"{split}-{i}-caption", "describe the image .", None, world.caption(s), task="caption",
                          meta={"scene": i, "split": split, "objects": sorted(s.categories)}, _image=s.pil()))
    return out
