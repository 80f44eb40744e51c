"""Reproducible training of the demo LMM, in three stages like real LMMs.

1. ``text``: the language model alone, on text from the world. The scene is written in the
   context ("USER: scene : small red circle top left ; ... . is there ...") and questions
   about it follow, so a head is needed at answer positions (look the scene up) and idle
   at template positions. Loss on every token.
2. ``align``: the scene is now an image; captions only; the language model is frozen, the
   vision tower and projector learn. Loss on answers.
3. ``finetune``: multi-turn dialogues about the image, every weight trains. Loss on answers.

Nothing targets activations or attention: the loss is next-token cross-entropy only, and no
weight is edited. Whatever sinks the model has, it grew.

    python -m scripts.train_tiny --out runs/demo-train            # full recipe
    python -m scripts.train_tiny --out runs/demo-train --resume   # continue after a stop

Checkpoints (safetensors weights, optimizer state, JSON progress) are written atomically
every ``--checkpoint-every`` steps; sink metrics are logged to ``train_log.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sinkscope.models.embedded import processor as demo_processor
from sinkscope.models.embedded.tiny_data import (  # noqa: F401  (the data, re-exported for the tests)
    BOS_ID, EOS_ID, IGNORE, IMAGE_ID, PAD_ID, VOCAB, collate, encode, image_example, make_batch, pixel_values,
    text_example)
from sinkscope import world
from sinkscope.models.embedded.modeling import DemoArchitecture, build_model
from sinkscope.measures import emergence
from scripts.training import atomic_write_text, optimizer_step, start_run, warmup_cosine_lr


@dataclass
class StageConfig:
    name: str  # text | align | finetune
    steps: int
    lr: float
    batch_size: int = 32
    warmup: int = 100


@dataclass
class TrainConfig:
    seed: int = 0
    stages: list[StageConfig] = field(default_factory=lambda: [
        StageConfig("text", 2500, 2e-3, 32),
        StageConfig("align", 400, 1e-3, 32),
        StageConfig("finetune", 2500, 5e-4, 32),
    ])
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    metrics_every: int = 250
    checkpoint_every: int = 250
    threads: int = 0  # 0: leave torch's default
    train_attn: str = "sdpa"  # attention used for training steps (eager for metrics)
    architecture: DemoArchitecture = field(default_factory=DemoArchitecture)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- metrics


@torch.no_grad()
def sink_metrics(model, batch) -> dict[str, float]:
    """Per-layer emergence statistics on one batch (eager attention), flat dict for the log."""
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    values: dict[int, torch.Tensor] = {}
    lm = model.model.language_model
    hooks = [
        layer.self_attn.v_proj.register_forward_hook(lambda mod, inp, out, i=i: values.__setitem__(i, out))
        for i, layer in enumerate(lm.layers)
    ]
    was_training = model.training
    model.eval()
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
        model.set_attn_implementation({"text_config": previous, "vision_config": "eager"})
        model.train(was_training)
    mask = batch["attention_mask"].bool()
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    row: dict[str, float] = {}
    bos_attention = []
    for layer, attn in enumerate(out.attentions):
        per_head = emergence.mean_attention_to_position(attn, 0, 1, mask)
        bos_attention.append(per_head)
        hidden = out.hidden_states[layer]
        v = values[layer]
        v = v.view(v.shape[0], v.shape[1], -1, head_dim).transpose(1, 2)
        row[f"bos_attention_L{layer}"] = float(per_head.mean())
        row[f"bos_attention_max_head_L{layer}"] = float(per_head.max())
        row[f"bos_residual_ratio_L{layer}"] = emergence.norm_ratio_to_median(hidden, 0, mask)
        row[f"bos_value_ratio_L{layer}"] = emergence.norm_ratio_to_median(v, 0, mask)
        ratio, dims = emergence.top_activation_ratio(hidden, mask)
        row[f"top_activation_ratio_L{layer}"] = ratio
        row[f"top_activation_dim_L{layer}"] = dims[0]
    for layer, per_head in enumerate(bos_attention):
        row[f"sink_0.3_L{layer}"] = emergence.sink_share(per_head, 0.3)
    row["sink_0.3"] = emergence.sink_share(torch.stack(bos_attention), 0.3)
    # teacher-forced answer accuracy (first answer token), a cheap progress signal
    logits = out.logits[:, :-1].argmax(-1)
    labels = batch["labels"][:, 1:]
    is_answer_start = (labels != IGNORE) & (batch["labels"][:, :-1] == IGNORE)
    row["answer_token_accuracy"] = float((logits[is_answer_start] == labels[is_answer_start]).float().mean())
    return row


# ----------------------------------------------------------------------------- loop


def _save_checkpoint(out: Path, model, optimizer, progress: dict) -> None:
    from safetensors.torch import save_file

    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(ckpt / "model.safetensors.tmp"))
    os.replace(ckpt / "model.safetensors.tmp", ckpt / "model.safetensors")
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt.tmp")
    os.replace(ckpt / "optimizer.pt.tmp", ckpt / "optimizer.pt")
    atomic_write_text(ckpt / "progress.json", json.dumps(progress, indent=1))


def _lr(stage: StageConfig, step_in_stage: int) -> float:
    return warmup_cosine_lr(stage.lr, stage.warmup, stage.steps, step_in_stage, floor=0.1)


def _set_trainable(model, stage: str) -> None:
    lm_trainable = stage != "align"
    for name, p in model.named_parameters():
        is_lm = name.startswith("model.language_model") or name.startswith("lm_head")
        p.requires_grad_(lm_trainable or not is_lm)


def train(out: str | Path, config: TrainConfig | None = None, resume: bool = True, log=print) -> Path:
    """Run (or resume) the recipe; returns the directory of the final model."""
    config = config or TrainConfig()
    out = start_run(out, config.seed, config.threads)
    model = build_model(config.architecture, seed=config.seed)
    model.set_attn_implementation({"text_config": config.train_attn, "vision_config": "eager"})
    progress = {"stage_index": 0, "step_in_stage": 0, "global_step": 0, "next_sample": 0}
    ckpt = out / "checkpoint"
    optimizer_state = None
    if resume and (ckpt / "progress.json").exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        optimizer_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        progress = json.loads((ckpt / "progress.json").read_text())
        log(f"resuming from global step {progress['global_step']}")
    atomic_write_text(out / "train_config.json", json.dumps(config.to_dict(), indent=1))
    log_path = out / "train_log.csv"
    metric_batches = {
        "text": make_batch("text", "validation", list(range(32))),
        "image": make_batch("finetune", "validation", list(range(32))),
    }
    header_written = log_path.exists() and progress["global_step"] > 0
    if not header_written and log_path.exists():
        log_path.unlink()
    columns: list[str] | None = None
    if header_written:
        lines = log_path.read_text().splitlines()
        columns = lines[0].split(",")
        # rows logged after the last checkpoint belong to steps that are about to be redone
        at = columns.index("global_step")
        kept = [line for line in lines[1:] if line and int(line.split(",")[at]) <= progress["global_step"]]
        if len(kept) < len(lines) - 1:
            atomic_write_text(log_path, "\n".join([lines[0]] + kept) + "\n")

    while progress["stage_index"] < len(config.stages):
        stage = config.stages[progress["stage_index"]]
        _set_trainable(model, stage.name)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=config.betas, weight_decay=config.weight_decay)
        if optimizer_state is not None and progress["step_in_stage"] > 0:  # mid-stage resume
            optimizer.load_state_dict(optimizer_state)
            optimizer_state = None
        model.train()
        t0 = time.time()
        while progress["step_in_stage"] < stage.steps:
            step = progress["step_in_stage"]
            start = progress["next_sample"]
            indices = list(range(start, start + stage.batch_size))
            progress["next_sample"] = start + stage.batch_size
            batch = make_batch(stage.name, "train", indices)
            for group in optimizer.param_groups:
                group["lr"] = _lr(stage, step)
            loss = model(**batch).loss
            optimizer_step(optimizer, loss, params, config.grad_clip, progress)
            done = progress["step_in_stage"] == stage.steps
            if progress["global_step"] % config.metrics_every == 0 or done:
                which = "text" if stage.name == "text" else "image"
                row = {"global_step": progress["global_step"], "stage": stage.name, "loss": float(loss.detach()),
                       "lr": _lr(stage, step), "seconds": round(time.time() - t0, 1)}
                row.update(sink_metrics(model, metric_batches[which]))
                if columns is None:
                    columns = list(row)
                    log_path.write_text(",".join(columns) + "\n")
                with open(log_path, "a") as f:
                    f.write(",".join(str(row.get(c, "")) for c in columns) + "\n")
                bos = [row[f"bos_attention_L{i}"] for i in range(config.architecture.text_layers)]
                log(f"[{stage.name}] step {progress['global_step']} loss {float(loss.detach()):.3f} "
                    f"acc {row['answer_token_accuracy']:.2f} bos_attn {' '.join(f'{b:.2f}' for b in bos)} "
                    f"sink0.3 {row['sink_0.3']:.2f} {time.time() - t0:.0f}s")
            if done:
                break
            if progress["global_step"] % config.checkpoint_every == 0:
                _save_checkpoint(out, model, optimizer, progress)
        progress["stage_index"] += 1
        progress["step_in_stage"] = 0
        _save_checkpoint(out, model, optimizer, progress)

    final = out / "model"
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    model.save_pretrained(final, safe_serialization=True)
    demo_processor.build_processor().save_pretrained(final)
    try:
        from sinkscope import plots

        plots.training_curves(log_path, out / "training_curves.png")
    except Exception as err:  # a figure must never lose a trained model
        log(f"could not draw training curves: {err}")
    return final


def _parse_stages(text: str) -> list[StageConfig]:
    """'text:6000:1e-3,align:800:1e-3,finetune:5000:5e-4' -> stages."""
    stages = []
    for part in text.split(","):
        name, steps, lr, *rest = part.split(":")
        if name not in ("text", "align", "finetune"):
            raise SystemExit(f"unknown stage {name!r}: use text, align or finetune")
        stages.append(StageConfig(name, int(steps), float(lr), int(rest[0]) if rest else 32))
    return stages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default=None, help="name:steps:lr[:batch],... (default: the shipped recipe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--metrics-every", type=int, default=250)
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)
    config = TrainConfig(seed=args.seed, threads=args.threads, metrics_every=args.metrics_every)
    if args.stages:
        config.stages = _parse_stages(args.stages)
    if args.layers:
        config.architecture.text_layers = args.layers
    if args.heads:
        config.architecture.text_heads = config.architecture.text_kv_heads = args.heads
    if args.hidden:
        config.architecture.text_hidden = args.hidden
        config.architecture.text_intermediate = 4 * args.hidden
    if args.weight_decay is not None:
        config.weight_decay = args.weight_decay
    final = train(args.out, config, resume=not args.no_resume, log=lambda m: print(m, flush=True))
    print(f"model written to {final}")


if __name__ == "__main__":
    main()
