"""Training throughput of the demo's dialogue stages: float32 vs bfloat16, old recipe's step vs new.

    python benchmarks/train_throughput.py [--repeats 3] [--threads 2]

Four training steps (forward + backward + AdamW) on the pretrained SmolLM2-135M LLaVA, each timed
as the median of `--repeats` after one warm-up, all in one run:

- old: the previously shipped instruct step (8 dialogues of up to 4 turns, one turn after another;
  LoRA rank 16 on all seven projections of 30 layers; float32; the image paid once per dialogue);
- new fp32 / new bf16: the new step (8 packed scenes, up to 16 question branches sharing one image
  prefix; LoRA rank 16 on attention only), without and with `torch.autocast("cpu", bfloat16)`;
- new bf16, all seven projections: isolates what the LoRA placement costs.

Prints tokens per second (non-padding tokens through the LLM) and answered questions per second
(supervised question turns), and their ratios. Other processes on the machine slow every row alike
only if they run steadily: read the ratios, and run it on a quiet machine for absolute numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _build(lora_targets: str, rank: int = 16):
    from sinkscope.models.embedded import smollm, smolvlm

    llm_dir = smollm.ensure_cached()
    config = smolvlm.build_config(llm_dir)
    targets = smolvlm.LORA_ATTENTION_TARGETS if lora_targets == "attention" else smolvlm.LORA_TARGETS
    config.sinkscope_lora = smolvlm.lora_settings(rank, targets)
    model = smolvlm.assemble(config, llm_dir)
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith("model.multi_modal_projector."))
    model.train()
    return model, smolvlm.build_processor(llm_dir)


def _time_step(model, make_batch, loss_fn, autocast: bool, repeats: int) -> tuple[float, dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, counts = [], {}
    for k in range(repeats + 1):
        batch, counts = make_batch(k)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if k:  # the first is a warm-up
            times.append(time.perf_counter() - t)
    return statistics.median(times), counts


def main() -> None:
    from scripts import train_smolvlm as T
    from scripts.smolvlm_data import Packer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def old_batch(encoder):
        def make(k):
            b = T.dialogue_batch(encoder, "instruct", "train", list(range(8 * k, 8 * k + 8)), 4)
            return b, {"tokens": int(b["attention_mask"].sum()), "answers": _turns(b["labels"])}
        return make

    def new_batch(packer):
        def make(k):
            b = T.packed_batch(packer, "train", list(range(8 * k, 8 * k + 8)), 16, False, 0.25)
            return b, {"tokens": int(b["input_ids"].ne(packer.tok.pad_token_id).sum()), "answers": _turns(b["labels"])}
        return make

    rows = []
    for targets in ("all", "attention"):
        model, processor = _build(targets)
        encoder = T.Encoder(processor.tokenizer, model.config.image_token_id)
        packer = Packer(processor.tokenizer, model.config.image_token_id)
        if targets == "all":
            rows.append(("old (float32, LoRA all 7, turns in sequence)", *_time_step(
                model, old_batch(encoder), T.answer_loss, False, args.repeats)))
            rows.append(("new step, bf16, LoRA all 7", *_time_step(
                model, new_batch(packer), T.packed_loss, True, args.repeats)))
        else:
            rows.append(("new (float32)", *_time_step(model, new_batch(packer), T.packed_loss, False, args.repeats)))
            rows.append(("new (bf16)", *_time_step(model, new_batch(packer), T.packed_loss, True, args.repeats)))
        del model
    print(f"{'step':48s} {'s/step':>7s} {'tokens':>7s} {'answers':>7s} {'tokens/s':>9s} {'answers/s':>9s}")
    rate = {}
    for name, seconds, counts in rows:
        rate[name] = (counts["tokens"] / seconds, counts["answers"] / seconds)
        print(f"{name:48s} {seconds:7.2f} {counts['tokens']:7d} {counts['answers']:7d} "
              f"{rate[name][0]:9.0f} {rate[name][1]:9.1f}")
    old, f32, bf16 = rate[rows[0][0]], rate["new (float32)"], rate["new (bf16)"]
    print(f"bfloat16 / float32 (new step): tokens/s x{bf16[0] / f32[0]:.2f}")
    print(f"LoRA attention / all 7 (new step, bf16): tokens/s x{bf16[0] / rate[rows[1][0]][0]:.2f}")
    print(f"new (bf16) / old: tokens/s x{bf16[0] / old[0]:.2f}, answered questions/s x{bf16[1] / old[1]:.2f}")
    _recipe_time(rows)


def _recipe_time(rows) -> None:
    """The shipped recipe's instruct stage at this run's bf16 step time, beside its measured wall time (card)."""
    import json

    from scripts.train_smolvlm import RecipeConfig
    from sinkscope.models.embedded import smolvlm

    stages = {s.name: s.steps for s in RecipeConfig().stages}
    step = dict((name, seconds) for name, seconds, _ in rows)["new (bf16)"]
    print(f"shipped recipe {stages}: instruct at this run's bf16 step = {stages.get('instruct', 0) * step / 60:.1f} min")
    card = smolvlm.ASSETS / "card.json"
    training = json.loads(card.read_text()).get("training", {}) if card.exists() else {}
    if training.get("minutes"):
        scope = training.get("scope", "of training")
        print(f"measured (card.json): {training['minutes']:.1f} min {scope} on {training.get('machine', '?')}")


def _turns(labels: torch.Tensor) -> int:
    """Supervised answers in a batch: runs of consecutive labelled positions."""
    labelled = labels != -100
    starts = labelled & ~torch.nn.functional.pad(labelled, (1, 0))[:, :-1]
    return int(starts.sum())


if __name__ == "__main__":
    main()
