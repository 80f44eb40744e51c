"""Train the embedded demo: vision tower, projector and LoRA adapters for the pretrained SmolLM2-135M.

The LLaVA recipe on the synthetic world, in stages (each optional; the default runs vision, words, instruct):

1. ``vision``: the CLIP ViT alone, from scratch, supervised on the world's ground truth (which
   categories are in the image, how many objects, each patch's colour and shape). LLaVA starts
   from a pretrained CLIP; this stage stands in for that pretraining.
2. ``words`` (optional): the LoRA adapters learn the world's questions with the scene given in words
   (``world.scene_text``) instead of the image; no image, projector untouched.
3. ``align`` (optional): the projector alone, on the world's questions about the image (LLM and its
   adapters frozen).
4. ``instruct``: projector and LoRA adapters together on the world's questions about the image.

Stages 2-4 train on *packed* sequences (``smolvlm_data``): one prefix (system prompt + 64 image
tokens, or the scene in words) shared by up to ``max_turns`` question branches, each branch masked
from the others and positioned as the first turn of an inference prompt; the loss and the logits
are computed at answer tokens only. Training runs under ``torch.autocast("cpu", bfloat16)`` by
default (``--dtype float32`` to switch it off); the trained parts are stored in float32.

Nothing targets activations or attention, and no weight is edited: whatever the scan finds in the
image tokens, the training grew it. The pretrained language model is never updated (LoRA adapters
sit beside it, unmerged).

Every ``--metrics-every`` steps of stages 3-4 the emergence metrics of image tokens are logged
(``emergence.csv``): the LLM's sink dims found from the first token, per layer the image tokens
whose sink score passes tau, their share of text-query attention, attention to the first token,
and POPE accuracy on validation scenes. ``timing.json`` holds the wall time of every stage.

    python -m scripts.train_smolvlm --out runs/smolvlm           # resumes if stopped
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scripts import smolvlm_data
from scripts.training import atomic_write_json, optimizer_step, start_run, warmup_cosine_lr
from sinkscope.models.embedded import smollm, smolvlm
from sinkscope import world

IGNORE = -100
PALETTE = np.array([world.RGB[c] for c in world.COLORS], dtype=np.int16)  # [6, 3]
STAGE_NAMES = ("vision", "words", "align", "instruct")
SAMPLE_OFFSETS = {"vision": 0, "words": 1_000_000, "align": 2_000_000, "instruct": 4_000_000}


@dataclass
class Stage:
    name: str  # vision | words | align | instruct
    steps: int
    lr: float  # vision tower / projector; LoRA adapters get lr * RecipeConfig.lora_lr_scale
    batch_size: int  # images (vision) or packed sequences, one scene each
    warmup: int = 20


SHAPE_LOSSES = ("all", "objects")  # see VisionHeads
POSITION_LOSSES = ("none", "objects")  # see VisionHeads


@dataclass
class RecipeConfig:
    seed: int = 0
    stages: list[Stage] = field(default_factory=lambda: [
        Stage("vision", 1500, 1e-3, 64, 20),
        Stage("words", 30, 2e-3, 8, 20),
        Stage("instruct", 300, 2e-3, 8, 20),
    ])
    weight_decay: float = 0.05  # vision stage; the projector and adapters train without it
    grad_clip: float = 1.0
    metrics_every: int = 50
    checkpoint_every: int = 25
    threads: int = 0
    max_turns: int = 16  # question branches per packed sequence
    lora_rank: int = 16  # > 0: LoRA adapters on the LLM, trained in the words and instruct stages
    lora_targets: str = "attention"  # attention (q, k, v, o) | all (attention + MLP)
    lora_lr_scale: float = 0.5
    dtype: str = "bfloat16"  # autocast dtype while training: bfloat16 | float32 (no autocast)
    caption_probability: float = 0.25  # share of scenes whose questions include a caption
    conjunction_share: float = 0.0  # share of existence negatives that are binding negatives (smolvlm_data)
    shape_loss: str = "objects"  # vision stage: "objects": object patches only, owner's shape | "all" patches, cell-centre labels
    position_loss: str = "objects"  # vision stage: "objects": each object patch classifies its owner's grid cell | "none"
    metric_scenes: int = 12  # validation scenes for the POPE metric (emergence uses at most 8)
    vision_from: str | None = None  # a trained model folder whose vision tower starts the run (skip "vision")
    vision: smolvlm.VisionArchitecture = field(default_factory=smolvlm.VisionArchitecture)

    def __post_init__(self):
        from sinkscope.errors import SinkscopeError

        for name in ("caption_probability", "conjunction_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SinkscopeError(f"{name} = {getattr(self, name)} is out of range: give a share between 0 and 1")
        if self.shape_loss not in SHAPE_LOSSES:
            raise SinkscopeError(f"shape_loss = {self.shape_loss!r} is unknown: give one of {', '.join(SHAPE_LOSSES)}")
        if self.position_loss not in POSITION_LOSSES:
            raise SinkscopeError(f"position_loss = {self.position_loss!r} is unknown: "
                                 f"give one of {', '.join(POSITION_LOSSES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def lora_target_regex(self) -> str:
        return smolvlm.LORA_ATTENTION_TARGETS if self.lora_targets == "attention" else smolvlm.LORA_TARGETS

    def autocast(self):
        """The training autocast context (a no-op for float32)."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=getattr(torch, self.dtype))


# ----------------------------------------------------------------------------- vision stage


def pixel_values(image: np.ndarray) -> torch.Tensor:
    """[height, width, 3] uint8 -> [3, height, width], normalised as the processor does (mean = std = 0.5)."""
    x = torch.from_numpy(image).float().div(255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


def patch_labels(s: world.Scene) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (row-major, 64): colour class (0 none, 1..6) and shape class (0 none, 1..5).

    Colour: the palette colour painted on most of the patch's pixels (objects are painted with
    exact palette values). Shape: the object of the grid cell holding the patch centre.
    """
    n = world.IMAGE_SIZE // world.PATCH_SIZE
    img = s.image.astype(np.int16)
    match = (np.abs(img[:, :, None, :] - PALETTE[None, None]).sum(-1) == 0)  # [H, W, 6]
    counts = match.reshape(n, world.PATCH_SIZE, n, world.PATCH_SIZE, len(PALETTE)).sum(axis=(1, 3)).reshape(-1, len(PALETTE))
    colour = np.where(counts.max(1) >= 6, counts.argmax(1) + 1, 0)
    shape = np.zeros(n * n, dtype=np.int64)
    cell = world.IMAGE_SIZE / world.GRID
    by_cell = {(o.row, o.col): o for o in s.objects}
    covered = s.patch_object_mask.reshape(-1)
    for p in range(n * n):
        if not covered[p]:
            continue
        cy, cx = (p // n + 0.5) * world.PATCH_SIZE, (p % n + 0.5) * world.PATCH_SIZE
        obj = by_cell.get((int(cy // cell), int(cx // cell)))
        if obj is not None:
            shape[p] = world.SHAPES.index(obj.shape) + 1
    return colour.astype(np.int64), shape


def _owner_labels(s: world.Scene, per_object: list[int]) -> np.ndarray:
    """[patches] int64, row-major: per_object[k] on the patches object k owns (`world.Scene.patch_owner`, exact),
    0 on background patches."""
    return np.array(per_object + [0], dtype=np.int64)[s.patch_owner.reshape(-1)]  # owner -1 picks the trailing 0


def owner_shapes(s: world.Scene) -> np.ndarray:
    """[patches]: 1 + the shape index of the patch's owner, 0 on background."""
    return _owner_labels(s, [world.SHAPES.index(o.shape) + 1 for o in s.objects])


def owner_cells(s: world.Scene) -> np.ndarray:
    """[patches]: 1 + the grid cell (row * GRID + col) of the patch's owner, 0 on background."""
    return _owner_labels(s, [o.row * world.GRID + o.col + 1 for o in s.objects])


CATEGORIES = world.all_categories()


def vision_batch(split: str, indices: list[int]) -> dict:
    scenes = [world.scene(split, i) for i in indices]
    labels = [patch_labels(s) for s in scenes]
    present = torch.zeros(len(scenes), len(CATEGORIES))
    for row, s in enumerate(scenes):
        for c in s.categories:
            present[row, CATEGORIES.index(c)] = 1
    return {
        "pixel_values": torch.stack([pixel_values(s.image) for s in scenes]),
        "colour": torch.from_numpy(np.stack([c for c, _ in labels])),
        "shape": torch.from_numpy(np.stack([sh for _, sh in labels])),
        "owner_shape": torch.from_numpy(np.stack([owner_shapes(s) for s in scenes])),
        "owner_cell": torch.from_numpy(np.stack([owner_cells(s) for s in scenes])),
        "present": present,
        "count": torch.tensor([len(s.objects) for s in scenes]),
    }


class VisionHeads(torch.nn.Module):
    """Supervised heads on the vision tower's patch features (discarded after stage 1).

    shape_loss "all": every patch's shape class by the cell-centre rule (`patch_labels`), background 0;
    "objects": only the object patches, each labelled with its owner's shape (`owner_shapes`), so that the
    background (about three quarters of the patches) no longer dilutes the shape signal. Logged accuracies:
    `shape_acc` over every patch against the cell-centre labels (meaningful for "all" only: an "objects" head
    never learns the background class), `shape_acc_objects` over object patches against the owner's shape.
    position_loss "objects" adds a head that classifies each object patch's owner's grid cell (`owner_cells`, one
    of GRID x GRID; background patches take no part), logged as `cell_acc_objects`; "none" makes no such head,
    so the default recipe's parameters and random draws stay as they were.
    """

    def __init__(self, hidden: int, shape_loss: str = "all", position_loss: str = "none"):
        super().__init__()
        self.shape_loss = shape_loss
        self.colour = torch.nn.Linear(hidden, 1 + len(world.COLORS))
        self.shape = torch.nn.Linear(hidden, 1 + len(world.SHAPES))
        self.present = torch.nn.Linear(hidden, len(CATEGORIES))
        self.count = torch.nn.Linear(hidden, len(world.COUNT_WORDS))
        self.cell = torch.nn.Linear(hidden, world.GRID * world.GRID) if position_loss == "objects" else None

    def forward(self, patches: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        pooled = patches.mean(1)
        colour = self.colour(patches)
        shape = self.shape(patches)
        present = self.present(pooled)
        count = self.count(pooled)
        loss = (F.cross_entropy(colour.flatten(0, 1), batch["colour"].flatten())
                + self._shape_term(shape, batch)
                + F.binary_cross_entropy_with_logits(present, batch["present"])
                + F.cross_entropy(count, batch["count"]))
        acc = {
            "colour_acc": float((colour.argmax(-1) == batch["colour"]).float().mean()),
            "shape_acc": float((shape.argmax(-1) == batch["shape"]).float().mean()),
            "present_acc": float(((present > 0).float() == batch["present"]).all(1).float().mean()),
            "count_acc": float((count.argmax(-1) == batch["count"]).float().mean()),
        }
        on_objects = batch["owner_shape"] > 0
        acc["shape_acc_objects"] = float((shape.argmax(-1) == batch["owner_shape"])[on_objects].float().mean())
        if self.cell is not None:
            cell = self.cell(patches)
            loss = loss + self._cell_term(cell, batch)
            acc["cell_acc_objects"] = float((cell.argmax(-1) + 1 == batch["owner_cell"])[on_objects].float().mean())
        return loss, acc

    @staticmethod
    def _cell_term(cell: torch.Tensor, batch: dict) -> torch.Tensor:
        """Cross-entropy of [batch, patches, GRID * GRID] cell logits against the owner's cell, object patches only."""
        target = batch["owner_cell"].flatten() - 1  # background -> -1, ignored
        return F.cross_entropy(cell.flatten(0, 1), target, ignore_index=-1)

    def _shape_term(self, shape: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.shape_loss == "objects":  # background patches (target 0) take no part
            return F.cross_entropy(shape.flatten(0, 1), batch["owner_shape"].flatten(), ignore_index=0)
        return F.cross_entropy(shape.flatten(0, 1), batch["shape"].flatten())


def vision_features(model, pixel: torch.Tensor) -> torch.Tensor:
    """[batch, 64, vision_hidden]: the patch features the projector reads (CLS dropped)."""
    out = model.model.vision_tower(pixel, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


# ----------------------------------------------------------------------------- dialogue stages


class Encoder:
    """Token ids and answer-only labels for dialogues in the demo's chat template."""

    def __init__(self, tokenizer, image_token_id: int):
        self.tok = tokenizer
        self.image_token_id = image_token_id
        self.system = self._ids("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def dialogue(self, questions: list[world.Question]) -> tuple[list[int], list[int]]:
        ids = list(self.system)
        labels = [IGNORE] * len(ids)
        for turn, q in enumerate(questions):
            user = self._ids("<|im_start|>user\n")
            if turn == 0:
                user += [self.image_token_id] * smolvlm.N_IMAGE_TOKENS + self._ids("\n")
            user += self._ids(q.question + "<|im_end|>\n<|im_start|>assistant\n")
            answer = self._ids(q.answer + "<|im_end|>")
            ids += user + answer + self._ids("\n")
            labels += [IGNORE] * len(user) + answer + [IGNORE]
        return ids, labels

    def prompt(self, question: str) -> list[int]:
        ids, _ = self.dialogue([world.Question("", 0, "", question, "")])
        end = len(ids) - len(self._ids("<|im_end|>")) - len(self._ids("\n"))
        return ids[:end]


def dialogue_batch(encoder: Encoder, stage: str, split: str, indices: list[int], max_turns: int) -> dict:
    examples = []
    for i in indices:
        s = world.scene(split, i)
        if stage == "align":
            qs = [world.Question(split, i, "caption", "describe the image .", world.caption(s))]
        else:
            qs = world.training_dialogue(split, i)[:max_turns]
        examples.append(encoder.dialogue(qs))
    length = max(len(ids) for ids, _ in examples)
    pad = encoder.tok.pad_token_id
    input_ids = torch.full((len(examples), length), pad, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):  # right padding for training
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    pixel = torch.stack([pixel_values(world.scene(split, i).image) for i in indices])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel}


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy on answer tokens; the unembedding runs only where there is a label."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    where = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][where])
    return F.cross_entropy(logits, targets[where])


def packed_batch(packer: smolvlm_data.Packer, split: str, indices: list[int], max_turns: int,
                 words: bool, caption_probability: float, conjunction_share: float = 0.0) -> dict:
    """One packed sequence per scene (see `smolvlm_data`); `pixel_values` only when the prefix is the image."""
    seqs = []
    for i in indices:
        qs = smolvlm_data.scene_questions(split, i, caption_probability,
                                          conjunction_share=conjunction_share)[:max_turns]
        seqs.append(packer.pack(qs, world.scene_text(world.scene(split, i)) if words else None))
    batch = smolvlm_data.collate(seqs, packer.tok.pad_token_id)
    batch["pixel_values"] = None if words else torch.stack([pixel_values(world.scene(split, i).image) for i in indices])
    return batch


def packed_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy at answer tokens of a packed batch; the unembedding runs only there."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], pixel_values=batch["pixel_values"]).last_hidden_state
    where = batch["labels"] != IGNORE
    logits = model.lm_head(hidden[where])
    return F.cross_entropy(logits.float(), batch["labels"][where])


# ----------------------------------------------------------------------------- metrics


@torch.no_grad()
def pope_accuracy(model, encoder: Encoder, split: str = "validation", n_scenes: int = 24, start: int = 0) -> dict:
    """Yes/no accuracy from the answer's first-token logits (yes vs no), POPE random and adversarial."""
    yes, no = encoder._ids("yes")[0], encoder._ids("no")[0]
    out = {}
    for strategy in ("random", "adversarial"):
        qs = world.pope_questions(split, strategy, n_scenes, start)
        correct = 0
        for b in range(0, len(qs), 8):
            chunk = qs[b:b + 8]
            ids, mask = left_padded([encoder.prompt(q.question) for q in chunk], encoder.tok.pad_token_id)
            pixel = torch.stack([pixel_values(world.scene(split, q.scene_index).image) for q in chunk])
            hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixel).last_hidden_state[:, -1]
            logits = model.lm_head(hidden)
            said_yes = logits[:, yes] > logits[:, no]
            correct += sum(int(bool(sy) == (q.label == "yes")) for sy, q in zip(said_yes, chunk))
        out[f"pope_{strategy}"] = correct / len(qs)
    return out


TAU_START_LAYER = 2  # layers before it take no part in the tau rule (as in `sinkscope.calibration`)
TAU_RULE = "sinks.sink_threshold(rms)"  # the emergence log's "tau_rule": the one tau rule of sinkscope


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch, length] ids, [batch, length] attention mask) of token-id prompts, padded on the left so that
    every row's last position is its prompt's last token (where the answer's logits are read)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):] = torch.tensor(p)
        mask[row, length - len(p):] = 1
    return ids, mask


def emergence_prompts(encoder: "Encoder", n_scenes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed validation prompts the emergence metrics read (one POPE question on each of the first
    n_scenes validation scenes), left-padded: (ids, mask) [n_scenes, length]."""
    prompts = [encoder.prompt(world.pope_questions("validation", "random", 1, i)[0].question) for i in range(n_scenes)]
    return left_padded(prompts, encoder.tok.pad_token_id)


@torch.no_grad()
def emergence_metrics(model, encoder: Encoder, n_scenes: int = 8, tau: float | None = None) -> dict:
    """Sink statistics of image tokens on fixed validation prompts (eager attention).

    Per layer l (residual entering l): the LLM's sink dims (discovered from the first token),
    image tokens with phi >= tau per image, the largest image phi, the share of text-query
    attention (queries after the image) that goes to visual sinks, and to the first token.
    tau on phi: given, else the one tau rule (`sinks.sink_threshold` with the "rms" score, as a scan
    calibrates it) on these prompts' phi, layers >= 2; the row logs it as "tau", with "tau_rule" and
    "tau_method" (logs before 2026-12-04 used the paper's 20 scaled by sqrt(hidden)/64 and lack both).
    """
    from sinkscope.kinds import token_kinds_from_ids
    from sinkscope.measures import massive, sinks

    hidden_size = model.config.text_config.hidden_size
    ids, mask = emergence_prompts(encoder, n_scenes)
    pixel = torch.stack([pixel_values(world.scene("validation", i).image) for i in range(n_scenes)])
    previous = {"text_config": model.config.text_config._attn_implementation,
                "vision_config": model.config.vision_config._attn_implementation}
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    try:
        out = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixel,
                          output_hidden_states=True, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)  # as training had it (a resumed run replays the same kernels)
    n_layers = len(out.attentions)
    states = torch.stack(out.hidden_states[:n_layers], 1)  # [B, L, T, D]
    first = mask.float().argmax(1)
    rows = torch.arange(n_scenes)
    first_states = states[rows, :, first]  # [B, L, D]
    dims = massive.discover_sink_dims(first_states)
    token_kinds = token_kinds_from_ids(ids, {encoder.image_token_id}, mask)  # BOS = first real token, as scans see it
    is_image = token_kinds.visual_mask
    text_query = token_kinds.queries_after_image()  # [B, T] the text queries after the image
    phi = sinks.phi(states, dims.dims) if dims.dims else torch.zeros(states.shape[:3])  # [B, L, T]
    kinds = token_kinds.kind
    tau_phi = phi[:, TAU_START_LAYER:] if n_layers > TAU_START_LAYER else phi
    threshold = sinks.sink_threshold("rms", hidden_size, tau_phi, tau, token_kinds=kinds, has_dims=bool(dims.dims))
    tau = threshold.value
    row = {"sink_dims": " ".join(map(str, dims.dims)), "tau": tau, "tau_rule": TAU_RULE,
           "tau_method": threshold.method, "tau_layer": sinks.LAYER_SCORE_TAU}
    score = sinks.phi_layer_relative(states, dims.dims, mask.bool())  # [B, L, T], no ceiling
    for layer in range(n_layers):
        layer_sink = is_image & (score[:, layer] >= sinks.LAYER_SCORE_TAU)
        row[f"visual_sinks_layer_score_L{layer}"] = float(layer_sink.sum(1).float().mean())
        row[f"max_image_layer_score_L{layer}"] = float(score[:, layer][is_image].max())
        att = out.attentions[layer].mean(1)[text_query]
        row[f"visual_sink_attention_layer_score_L{layer}"] = float(
            (att * layer_sink[text_query.nonzero()[:, 0]]).sum(-1).mean())
    for layer in range(n_layers):
        att = out.attentions[layer].mean(1)  # [B, Q, K] head mean
        q_att = att[text_query]  # [n_queries, K] rows of text queries after the image
        query_rows = text_query.nonzero()[:, 0]
        vis_sink = is_image & (phi[:, layer] >= tau)  # [B, T]
        to_vis_sink = (q_att * vis_sink[query_rows]).sum(-1)
        to_first = q_att[torch.arange(len(query_rows)), first[query_rows]]
        to_image = (q_att * is_image[query_rows]).sum(-1)
        row[f"visual_sinks_per_image_L{layer}"] = float(vis_sink.sum(1).float().mean())
        row[f"max_image_phi_L{layer}"] = float(phi[:, layer][is_image].max()) if dims.dims else 0.0
        row[f"visual_sink_attention_L{layer}"] = float(to_vis_sink.mean())
        row[f"image_attention_L{layer}"] = float(to_image.mean())
        row[f"first_token_attention_L{layer}"] = float(to_first.mean())
    return row




# ----------------------------------------------------------------------------- loop


def _lr(stage: Stage, step: int) -> float:
    return warmup_cosine_lr(stage.lr, stage.warmup, stage.steps, step, floor=0.05)


def _append_csv(path: Path, row: dict) -> None:
    """Append one row; a row with new columns rewrites the (small) file atomically with their union."""
    import pandas as pd

    frame = pd.DataFrame([row])
    if path.exists():
        header = path.open().readline().strip().split(",")
        if header != list(frame.columns):
            merged = pd.concat([pd.read_csv(path), frame], ignore_index=True)
            tmp = path.with_suffix(".tmp")
            merged.to_csv(tmp, index=False)
            os.replace(tmp, path)
            return
    frame.to_csv(path, mode="a", header=not path.exists(), index=False)


def _stage_params(model, heads, stage: Stage, config: RecipeConfig) -> list[dict]:
    """Optimizer parameter groups of a stage (everything else stays frozen)."""
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    projector = list(model.model.multi_modal_projector.parameters())
    if stage.name == "vision":
        return [{"params": list(model.model.vision_tower.parameters()) + list(heads.parameters()),
                 "lr": stage.lr, "weight_decay": config.weight_decay}]
    groups = []
    if stage.name in ("align", "instruct"):
        groups.append({"params": projector, "lr": stage.lr, "weight_decay": 0.0})
    if stage.name in ("words", "instruct") and lora:
        groups.append({"params": lora, "lr": stage.lr * config.lora_lr_scale, "weight_decay": 0.0})
    return groups


@dataclass
class _Run:
    """What one training run's steps share: the model and its data makers, where it writes, how far it got."""

    out: Path
    config: RecipeConfig
    model: torch.nn.Module
    processor: object
    encoder: Encoder
    packer: smolvlm_data.Packer
    heads: VisionHeads
    log: Callable[[str], None]
    progress: dict = field(default_factory=lambda: {"stage_index": 0, "step_in_stage": 0, "global_step": 0})
    timing: dict = field(default_factory=lambda: {"stages": {}})

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoint"


def _build_run(out: Path, config: RecipeConfig, log) -> _Run:
    """The model (SmolLM2 with a fresh vision tower, projector and LoRA adapters, all frozen), its processor,
    the batch makers and the vision stage's heads."""
    llm_dir = smollm.ensure_cached(log=log)
    model_config = smolvlm.build_config(llm_dir, config.vision)
    if config.lora_rank:
        model_config.sinkscope_lora = smolvlm.lora_settings(config.lora_rank, config.lora_target_regex())
    model = smolvlm.assemble(model_config, llm_dir)
    processor = smolvlm.build_processor(llm_dir)
    encoder = Encoder(processor.tokenizer, model.config.image_token_id)
    packer = smolvlm_data.Packer(processor.tokenizer, model.config.image_token_id)
    heads = VisionHeads(config.vision.hidden, config.shape_loss, config.position_loss)
    for p in model.parameters():
        p.requires_grad_(False)
    return _Run(out, config, model, processor, encoder, packer, heads, log)


def _load_vision_tower(run: _Run, directory: str) -> None:
    """Start from the vision tower of a trained model folder (`save_trained`), so that runs can share one
    vision stage; the projector and adapters keep their initialisation. The architectures must match."""
    from sinkscope.errors import SinkscopeError

    prefix = "model.vision_tower."
    tower = {k: v for k, v in smolvlm.trained_state_from_dir(Path(directory)).items() if k.startswith(prefix)}
    own = {k: v for k, v in run.model.state_dict().items() if k.startswith(prefix)}
    mismatched = sorted(k for k in own if k not in tower or tower[k].shape != own[k].shape)
    if mismatched or len(tower) != len(own):
        raise SinkscopeError(f"the vision tower in {directory} does not match this recipe's vision architecture "
                             f"({len(mismatched)} tensors differ, e.g. {mismatched[:2]}): pass the same --vision "
                             "settings it was trained with, or train the vision stage")
    run.model.load_state_dict(tower, strict=False)
    run.log(f"vision tower from {directory}")


def _resume(run: _Run) -> dict | None:
    """Load the last checkpoint (weights, progress, timing) if there is one, drop the log rows of the steps
    about to be redone; returns the optimizer state to restore (None: nothing to resume)."""
    from safetensors.torch import load_file

    ckpt, out = run.ckpt, run.out
    if not (ckpt / "progress.json").exists():
        return None
    state = load_file(str(ckpt / "trained.safetensors"))
    run.model.load_state_dict(state, strict=False)
    run.heads.load_state_dict(load_file(str(ckpt / "heads.safetensors")))
    optimizer_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    run.progress = json.loads((ckpt / "progress.json").read_text())
    if (out / "timing.json").exists():
        run.timing = json.loads((out / "timing.json").read_text())
    run.log(f"resuming at global step {run.progress['global_step']}")
    for name in ("train_log.csv", "emergence.csv"):  # drop rows of steps about to be redone
        path = out / name
        if path.exists():
            import pandas as pd

            frame = pd.read_csv(path)
            frame[frame.global_step <= run.progress["global_step"]].to_csv(path, index=False)
    return optimizer_state


def _save_checkpoint(run: _Run, optimizer) -> None:
    """Trained parts, vision heads, optimizer state, progress and timing, each written atomically."""
    from safetensors.torch import save_file

    ckpt = run.ckpt
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file(smolvlm.trained_state(run.model), str(ckpt / "trained.safetensors.tmp"))
    os.replace(ckpt / "trained.safetensors.tmp", ckpt / "trained.safetensors")
    save_file({k: v.contiguous() for k, v in run.heads.state_dict().items()}, str(ckpt / "heads.safetensors.tmp"))
    os.replace(ckpt / "heads.safetensors.tmp", ckpt / "heads.safetensors")
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt.tmp")
    os.replace(ckpt / "optimizer.pt.tmp", ckpt / "optimizer.pt")
    atomic_write_json(ckpt / "progress.json", run.progress)
    atomic_write_json(run.out / "timing.json", run.timing)


def _log_metrics(run: _Run, stage: Stage, loss: float, seconds: float) -> None:
    """One emergence.csv row (POPE, emergence metrics), a projector snapshot and a log line."""
    from safetensors.torch import save_file

    model, progress, config = run.model, run.progress, run.config
    model.eval()
    row = {"global_step": progress["global_step"], "stage": stage.name,
           "samples_seen": progress["step_in_stage"] * stage.batch_size}
    row.update(pope_accuracy(model, run.encoder, n_scenes=config.metric_scenes))
    row.update(emergence_metrics(model, run.encoder, n_scenes=min(8, config.metric_scenes)))
    model.train()
    _append_csv(run.out / "emergence.csv", row)
    snapshots = run.out / "snapshots"  # the projector at every logged step, to re-measure the curve later
    snapshots.mkdir(exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
               if k.startswith("model.multi_modal_projector.")},
              str(snapshots / f"projector_step{progress['global_step']}.safetensors"))
    n_l = model.config.text_config.num_hidden_layers
    vs = [row[f"visual_sinks_layer_score_L{i}"] for i in range(2, n_l)]
    run.log(f"[{stage.name}] step {progress['global_step']} loss {loss:.3f} "
            f"pope r/a {row['pope_random']:.2f}/{row['pope_adversarial']:.2f} "
            f"visual sinks/image (layer score, max over layers >= 2) {max(vs):.1f} {seconds:.0f}s")


def _stage_optimizer(run: _Run, stage: Stage, optimizer_state: dict | None):
    """Unfreeze the stage's parameters (only those) and make its optimizer, restoring `optimizer_state` when
    resuming mid-stage; returns (optimizer, trained parameters, base learning rates of its groups)."""
    if stage.name not in STAGE_NAMES:
        raise SystemExit(f"unknown stage {stage.name!r}: use one of {', '.join(STAGE_NAMES)}")
    groups = _stage_params(run.model, run.heads, stage, run.config)
    params = [p for g in groups for p in g["params"]]
    for p in run.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98))
    base_lrs = [g["lr"] for g in groups]
    if optimizer_state is not None and run.progress["step_in_stage"] > 0:
        optimizer.load_state_dict(optimizer_state)
    return optimizer, params, base_lrs


def _stage_loss(run: _Run, stage: Stage, step: int) -> tuple[torch.Tensor, dict]:
    """The loss of one step's batch (and what to log beside it); the batch is a pure function of
    (stage, step), so resuming replays exactly."""
    offset = SAMPLE_OFFSETS[stage.name]
    indices = list(range(offset + step * stage.batch_size, offset + (step + 1) * stage.batch_size))
    config = run.config
    with config.autocast():
        if stage.name == "vision":
            batch = vision_batch("train", indices)
            loss, extra = run.heads(vision_features(run.model, batch["pixel_values"]), batch)
        else:
            batch = packed_batch(run.packer, "train", indices, config.max_turns, stage.name == "words",
                                 config.caption_probability, config.conjunction_share)
            loss = packed_loss(run.model, batch)
            extra = {"tokens": int(batch["input_ids"].ne(run.packer.tok.pad_token_id).sum()),
                     "answers": int((batch["labels"] != IGNORE).sum())}
    return loss, extra


def _log_step(run: _Run, stage: Stage, step: int, loss: torch.Tensor, extra: dict, seconds: float, bar) -> float:
    """After a step: train_log.csv every 10 steps, the emergence metrics (align, instruct) every
    `metrics_every` steps, a log line (vision, words) every 100; returns the seconds the metrics took
    (not training time)."""
    progress, config = run.progress, run.config
    done = progress["step_in_stage"] == stage.steps
    if progress["global_step"] % 10 == 0 or done:
        _append_csv(run.out / "train_log.csv", {"global_step": progress["global_step"], "stage": stage.name,
                                                "loss": float(loss.detach()), "lr": _lr(stage, step),
                                                "seconds": round(seconds, 1), **extra})
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    metrics_seconds = 0.0
    if stage.name in ("align", "instruct") and (progress["step_in_stage"] % config.metrics_every == 0
                                                or done or progress["step_in_stage"] == 1):
        m0 = time.time()
        _log_metrics(run, stage, float(loss.detach()), seconds)
        metrics_seconds = time.time() - m0
        run.timing["metrics_seconds"] = round(run.timing.get("metrics_seconds", 0.0) + time.time() - m0, 1)
    if stage.name != "instruct" and stage.name != "align" and (progress["step_in_stage"] % 100 == 0 or done):
        run.log(f"[{stage.name}] step {progress['global_step']} loss {float(loss.detach()):.3f} "
                + " ".join(f"{k} {v:.2f}" for k, v in extra.items()) + f" {seconds:.0f}s")
    return metrics_seconds


def _train_stage(run: _Run, stage: Stage, optimizer_state: dict | None) -> None:
    """Run the current stage from its current step to its end, checkpointing every `checkpoint_every` steps
    and at its end, then move the progress to the next stage."""
    from tqdm import tqdm

    progress, timing = run.progress, run.timing
    optimizer, params, base_lrs = _stage_optimizer(run, stage, optimizer_state)
    run.model.train()
    bar = tqdm(total=stage.steps, initial=progress["step_in_stage"], desc=stage.name, mininterval=10)
    spent = timing["stages"].get(str(progress["stage_index"]), {}).get("seconds", 0.0)
    t0 = time.time() - spent
    while progress["step_in_stage"] < stage.steps:
        step = progress["step_in_stage"]
        factor = _lr(stage, step) / stage.lr
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        loss, extra = _stage_loss(run, stage, step)
        optimizer_step(optimizer, loss, params, run.config.grad_clip, progress)
        bar.update(1)
        done = progress["step_in_stage"] == stage.steps
        seconds = time.time() - t0
        timing["stages"][str(progress["stage_index"])] = {"name": stage.name, "seconds": round(seconds, 1),
                                                          "steps": progress["step_in_stage"]}
        t0 += _log_step(run, stage, step, loss, extra, seconds, bar)  # metrics are not training time
        if progress["global_step"] % run.config.checkpoint_every == 0 and not done:
            _save_checkpoint(run, optimizer)
    bar.close()
    progress["stage_index"] += 1
    progress["step_in_stage"] = 0
    _save_checkpoint(run, optimizer)


def _ship(run: _Run) -> Path:
    """Write the total timing and the shippable parts (out/model)."""
    final = run.out / "model"
    timing = run.timing
    timing["training_seconds"] = round(sum(v["seconds"] for v in timing["stages"].values()), 1)
    atomic_write_json(run.out / "timing.json", timing)
    smolvlm.save_trained(run.model, run.processor, final, {"recipe": run.config.to_dict(), "timing": timing})
    run.log(f"trained parts written to {final} (training {timing['training_seconds']:.0f} s, "
            f"metrics {timing.get('metrics_seconds', 0):.0f} s)")
    return final


def train(out: str | Path, config: RecipeConfig | None = None, resume: bool = True, log=print) -> Path:
    """Run (or resume) the recipe; returns the directory with the shippable parts."""
    config = config or RecipeConfig()
    out = start_run(out, config.seed, config.threads, seed_numpy=True)
    run = _build_run(out, config, log)
    if config.vision_from:
        _load_vision_tower(run, config.vision_from)  # a checkpoint resumed below holds the same tower
    optimizer_state = _resume(run) if resume else None
    atomic_write_json(out / "recipe.json", config.to_dict())
    run.model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    while run.progress["stage_index"] < len(config.stages):
        _train_stage(run, config.stages[run.progress["stage_index"]], optimizer_state)
        optimizer_state = None  # only the stage resumed into restores the optimizer
    return _ship(run)


def export_checkpoint(out: str | Path, log=print) -> Path:
    """Write the shippable parts (out/model) from the last checkpoint of a run stopped early."""
    from safetensors.torch import load_file

    out = Path(out)
    recipe = json.loads((out / "recipe.json").read_text())
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    llm_dir = smollm.ensure_cached(log=log)
    model_config = smolvlm.build_config(llm_dir, smolvlm.VisionArchitecture(**recipe["vision"]))
    if recipe.get("lora_rank"):
        targets = smolvlm.LORA_ATTENTION_TARGETS if recipe.get("lora_targets") == "attention" else smolvlm.LORA_TARGETS
        model_config.sinkscope_lora = smolvlm.lora_settings(recipe["lora_rank"], targets)
    model = smolvlm.assemble(model_config, llm_dir, load_file(str(out / "checkpoint" / "trained.safetensors")))
    final = out / "model"
    smolvlm.save_trained(model, smolvlm.build_processor(llm_dir), final, {"recipe": recipe, "checkpoint": progress})
    log(f"exported the checkpoint at global step {progress['global_step']} to {final}")
    return final


def _parse_stages(text: str) -> list[Stage]:
    """'vision:150:1e-3:64,instruct:50:2e-3:8' -> stages (warmup 20 steps each)."""
    stages = []
    for part in text.split(","):
        name, steps, lr, batch = part.split(":")
        if name not in STAGE_NAMES:
            raise SystemExit(f"unknown stage {name!r}: use one of {', '.join(STAGE_NAMES)}")
        stages.append(Stage(name, int(steps), float(lr), int(batch)))
    return stages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="training folder (checkpoints, logs, model/)")
    parser.add_argument("--stages", default=None, help="name:steps:lr:batch,... (default: the shipped recipe)")
    parser.add_argument("--seed", type=int, default=RecipeConfig.seed)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--metrics-every", type=int, default=RecipeConfig.metrics_every)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--lora-rank", type=int, default=RecipeConfig.lora_rank, help="LoRA rank on the LLM (0: frozen)")
    parser.add_argument("--lora-targets", default=RecipeConfig.lora_targets, choices=["attention", "all"])
    parser.add_argument("--dtype", default=RecipeConfig.dtype, choices=["bfloat16", "float32"],
                        help="autocast dtype while training (float32: no autocast)")
    parser.add_argument("--max-turns", type=int, default=RecipeConfig.max_turns, help="question branches per packed sequence")
    parser.add_argument("--metric-scenes", type=int, default=RecipeConfig.metric_scenes, help="validation scenes for POPE in emergence.csv")
    parser.add_argument("--vision-from", default=None, metavar="DIR",
                        help="start from the vision tower of a trained model folder (e.g. the shipped demo's assets) "
                        "and leave the vision stage out of --stages: variants then share one vision stage")
    parser.add_argument("--conjunction-share", type=float, default=RecipeConfig.conjunction_share, metavar="P",
                        help="share of the existence negatives drawn as binding negatives: absent colour-shape "
                        "pairs whose colour and shape are both in the scene (0: POPE's strategies only)")
    parser.add_argument("--shape-loss", default=RecipeConfig.shape_loss, choices=list(SHAPE_LOSSES),
                        help="vision stage's shape supervision: every patch by the cell-centre rule (all) or only "
                        "the object patches, each with its owner's shape (objects)")
    parser.add_argument("--position-loss", default=RecipeConfig.position_loss, choices=list(POSITION_LOSSES),
                        help="vision stage: also classify each object patch's owner's grid cell (objects) or not (none)")
    parser.add_argument("--export", action="store_true", help="only write out/model from the last checkpoint "
                        "(for a run stopped before its last step)")
    args = parser.parse_args(argv)
    if args.export:
        export_checkpoint(args.out, log=lambda m: print(m, flush=True))
        return
    config = RecipeConfig(seed=args.seed, threads=args.threads, metrics_every=args.metrics_every,
                          lora_rank=args.lora_rank, lora_targets=args.lora_targets, dtype=args.dtype,
                          max_turns=args.max_turns, metric_scenes=args.metric_scenes, vision_from=args.vision_from,
                          conjunction_share=args.conjunction_share, shape_loss=args.shape_loss,
                          position_loss=args.position_loss)
    if args.stages:
        config.stages = _parse_stages(args.stages)
    train(args.out, config, resume=not args.no_resume, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
