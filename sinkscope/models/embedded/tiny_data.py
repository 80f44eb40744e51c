"""The tiny model's training data: token ids, examples and batches drawn from the synthetic world.

Shared by the tiny model's training program (`python -m scripts.train_tiny`) and the organism,
which calibrates its planted mechanism on the same batches.
"""

from __future__ import annotations

import numpy as np
import torch

import sinkscope.world as world
from sinkscope.models.embedded import processor as demo_processor

VOCAB = {w: i for i, w in enumerate(demo_processor.vocabulary())}
PAD_ID, BOS_ID, EOS_ID = VOCAB[demo_processor.PAD], VOCAB[demo_processor.BOS], VOCAB[demo_processor.EOS]
IMAGE_ID = VOCAB[demo_processor.IMAGE]
IGNORE = -100


def encode(words: str) -> list[int]:
    return [VOCAB[w] for w in words.split()]


def pixel_values(image: np.ndarray) -> torch.Tensor:
    """[height, width, 3] uint8 -> [3, height, width] float, normalised as the processor does."""
    x = torch.from_numpy(image).float().div(255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


def _dialogue_tokens(questions: list[world.Question], prefix: list[int], loss_on_prompt: bool):
    ids, labels = [BOS_ID], [IGNORE]
    first = True
    for q in questions:
        user = encode("USER:") + (prefix if first else []) + encode(q.question) + encode("ASSISTANT:")
        first = False
        answer = encode(q.answer) + [EOS_ID]
        ids += user
        labels += (user if loss_on_prompt else [IGNORE] * len(user))
        ids += answer
        labels += answer
    if loss_on_prompt:  # shift-free labels: the model predicts labels[t] at t (HF shifts)
        labels = [IGNORE if i == IMAGE_ID else lab for i, lab in zip(ids, labels)]
    return ids, labels


def text_example(split: str, index: int):
    """Stage 1: the scene in words, then a dialogue about it; loss on every token."""
    s = world.scene(split, index)
    prefix = encode("scene :") + encode(world.scene_text(s))
    return _dialogue_tokens(world.training_dialogue(split, index), prefix, loss_on_prompt=True)


def image_example(split: str, index: int, captions_only: bool):
    """Stages 2-3: the image in place of the scene text; loss on answers only."""
    if captions_only:
        s = world.scene(split, index)
        qs = [world.Question(split, index, "caption", "describe the image .", world.caption(s))]
    else:
        qs = world.training_dialogue(split, index)
    prefix = [IMAGE_ID] * demo_processor.N_IMAGE_TOKENS
    return _dialogue_tokens(qs, prefix, loss_on_prompt=False)


def collate(examples: list[tuple[list[int], list[int]]]):
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), PAD_ID, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def make_batch(stage: str, split: str, indices: list[int]):
    if stage == "text":
        return collate([text_example(split, i) for i in indices])
    batch = collate([image_example(split, i, captions_only=(stage == "align")) for i in indices])
    batch["pixel_values"] = torch.stack([pixel_values(world.scene(split, i).image) for i in indices])
    return batch
