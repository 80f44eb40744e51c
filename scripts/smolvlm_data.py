"""Training sequences for the demo: one scene, many questions, image tokens paid once.

A *packed* sequence holds one shared prefix (system prompt, user header, then the image tokens or
the scene in words) followed by several question branches. Each branch is exactly the first user
turn of an inference prompt plus its answer, and sees only the prefix and itself: a 4-D attention
mask blocks the other branches, and its position ids restart where the prefix ends. So every
question is trained in the very context it is asked in at inference (first turn, nothing leaked
from other answers), while the prefix (64 image tokens + 23 system tokens) is computed once for
all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sinkscope.models.embedded import smolvlm
from sinkscope import world

IGNORE = -100
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def scene_questions(split: str, index: int, caption_probability: float = 0.25, salt: int = 5,
                    conjunction_share: float = 0.0) -> list[world.Question]:
    """Every kind of question about one scene, balanced yes/no, shuffled (a pure function of split, index).

    Existence: as many negatives as positives (each present category once). Of the negatives,
    ceil(`conjunction_share` x positives) are binding negatives (`world.conjunction_categories`:
    an absent colour-shape pair whose colour and shape are both in the scene) where the scene has
    that many; the rest follow POPE's three strategies in turn. `conjunction_share` = 0 draws
    exactly the questions of the recipes before it existed. Then: colour of each object whose shape
    is unique; position of every object; the count; a caption with probability `caption_probability`.
    """
    s = world.scene(split, index)
    rng = np.random.default_rng([world.SPLIT_SEEDS[split] + index, salt])
    cats = sorted(s.categories)
    qs: list[world.Question] = [
        world.Question(split, index, "existence", f"is there a {c} in the image ?", "yes", "", "yes", c) for c in cats]
    negatives: list[str] = []
    if conjunction_share > 0:
        binding = world.conjunction_categories(s)
        n_binding = min(int(np.ceil(conjunction_share * len(cats))), len(binding))
        negatives += [str(c) for c in rng.choice(binding, size=n_binding, replace=False)] if n_binding else []
    strategies = ["random", "popular", "adversarial"]
    for k in range(3 * len(cats)):
        if len(negatives) == len(cats):
            break
        neg = world.negative_category(s, strategies[k % 3], rng)
        if neg not in negatives:
            negatives.append(neg)
    qs += [world.Question(split, index, "existence", f"is there a {c} in the image ?", "no", "", "no", c) for c in negatives]
    shapes = [o.shape for o in s.objects]
    for o in s.objects:
        if shapes.count(o.shape) == 1:
            qs.append(world.Question(split, index, "color", f"what color is the {o.shape} ?", o.color, category=o.category))
        qs.append(world.Question(split, index, "position", f"where is the {o.category} ?", o.position_words,
                                 category=o.category))
    qs.append(world.Question(split, index, "count", "how many objects are there ?", world.COUNT_WORDS[len(s.objects)]))
    if rng.random() < caption_probability:
        qs.append(world.Question(split, index, "caption", "describe the image .", world.caption(s)))
    order = rng.permutation(len(qs))
    return [qs[i] for i in order]


@dataclass
class Packed:
    """One packed sequence: ids, labels (IGNORE outside answers), position ids, branch id per token (-1: prefix)."""

    ids: list[int]
    labels: list[int]
    positions: list[int]
    branch: list[int]


class Packer:
    """Token ids of packed sequences in the demo's chat template (SmolLM2's ChatML)."""

    def __init__(self, tokenizer, image_token_id: int, n_image_tokens: int = smolvlm.N_IMAGE_TOKENS):
        self.tok = tokenizer
        self.image_token_id = image_token_id
        self.n_image_tokens = n_image_tokens
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False).input_ids
        return self._cache[text]

    def prefix(self, words: str | None) -> list[int]:
        """System prompt + user header + the image tokens (words None) or the scene in words."""
        body = [self.image_token_id] * self.n_image_tokens if words is None else self.ids(words)
        return self.ids(SYSTEM) + self.ids("<|im_start|>user\n") + body + self.ids("\n")

    def pack(self, questions: list[world.Question], words: str | None = None) -> Packed:
        ids = self.prefix(words)
        n_prefix = len(ids)
        labels = [IGNORE] * n_prefix
        positions = list(range(n_prefix))
        branch = [-1] * n_prefix
        for b, q in enumerate(questions):
            user = self.ids(q.question + "<|im_end|>\n<|im_start|>assistant\n")
            answer = self.ids(q.answer + "<|im_end|>")
            ids += user + answer
            labels += [IGNORE] * (len(user) - 1) + answer + [IGNORE]  # label at t = token t+1
            positions += list(range(n_prefix, n_prefix + len(user) + len(answer)))
            branch += [b] * (len(user) + len(answer))
        return Packed(ids, labels, positions, branch)


def collate(packed: list[Packed], pad_id: int) -> dict:
    """Right-padded batch: input_ids, labels (next-token targets aligned to each input position),
    position_ids, and a boolean 4-D mask [batch, 1, token, token] (True: may attend)."""
    length = max(len(p.ids) for p in packed)
    n = len(packed)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    branch = torch.full((n, length), -2, dtype=torch.long)  # -2: padding
    for row, p in enumerate(packed):
        k = len(p.ids)
        input_ids[row, :k] = torch.tensor(p.ids)
        labels[row, :k] = torch.tensor(p.labels)
        position_ids[row, :k] = torch.tensor(p.positions)
        branch[row, :k] = torch.tensor(p.branch)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    q_branch, k_branch = branch[:, :, None], branch[:, None, :]
    allowed = ((k_branch == -1) | (k_branch == q_branch)) & (q_branch != -2) & causal
    allowed |= torch.eye(length, dtype=torch.bool)  # padding rows see themselves (no empty softmax rows)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": allowed[:, None]}
