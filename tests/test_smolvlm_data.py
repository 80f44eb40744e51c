"""Packed training sequences for the demo: answers true to the scene, and each packed question computed
exactly as the inference prompt the processor builds."""

from __future__ import annotations

import hashlib
import importlib.util
import math

import pytest
import torch

from sinkscope.models.embedded import smollm
from sinkscope import world
from scripts.smolvlm_data import IGNORE, Packer, collate, scene_questions
from scripts.train_smolvlm import RecipeConfig
from sinkscope.errors import SinkscopeError


def test_scene_questions_are_true_balanced_and_deterministic():
    for i in range(40):
        s = world.scene("train", i)
        qs = scene_questions("train", i)
        assert [q.question for q in qs] == [q.question for q in scene_questions("train", i)]
        existence = [q for q in qs if q.task == "existence"]
        assert sum(q.answer == "yes" for q in existence) == sum(q.answer == "no" for q in existence)
        for q in existence:
            assert (q.category in s.categories) == (q.answer == "yes")
        for q in qs:
            if q.task == "count":
                assert q.answer == world.COUNT_WORDS[len(s.objects)]
            if q.task == "position":
                assert any(o.category == q.category and o.position_words == q.answer for o in s.objects)
            if q.task == "color":
                assert [o.color for o in s.objects if o.shape == q.question.split()[-2]] == [q.answer]


def test_without_binding_negatives_the_questions_are_those_of_the_shipped_recipe():
    # sha256 of the questions of train scenes 0-199, computed with scene_questions as it was before
    # conjunction_share existed (commit 94185a9): the shipped recipe's data must not move.
    digest = hashlib.sha256()
    for i in range(200):
        for q in scene_questions("train", i, conjunction_share=0.0):
            digest.update(repr((q.task, q.question, q.answer, q.label, q.category)).encode())
    assert digest.hexdigest() == "504d8004add0bd352c9557f6915047eb6100f730d3247bbb8ecbac7029f03ab0"


def test_binding_negatives_are_absent_pairings_of_present_colours_and_shapes():
    n_binding_scenes = 0
    for i in range(120):
        s = world.scene("train", i)
        colours, shapes = {o.color for o in s.objects}, {o.shape for o in s.objects}
        available = set(world.conjunction_categories(s))
        assert available == {f"{c} {h}" for c in colours for h in shapes} - s.categories
        qs = scene_questions("train", i, conjunction_share=0.5)
        existence = [q for q in qs if q.task == "existence"]
        negatives = [q.category for q in existence if q.answer == "no"]
        assert len(negatives) == len(set(negatives)) == sum(q.answer == "yes" for q in existence)
        assert not set(negatives) & s.categories
        wanted = min(math.ceil(0.5 * len(s.categories)), len(available))
        assert len(set(negatives) & available) >= wanted  # POPE's strategies may add more by chance
        n_binding_scenes += wanted > 0
    assert n_binding_scenes > 30  # the check above was not vacuous


def test_a_share_out_of_range_is_refused_with_the_fix():
    with pytest.raises(SinkscopeError, match="between 0 and 1"):
        RecipeConfig(conjunction_share=1.5)


def test_owner_shapes_label_each_object_patch_with_its_owners_shape():
    """The vision stage's 'objects' shape labels, against a literal loop over the patches of the scene."""
    from scripts.train_smolvlm import owner_shapes

    n_background = n_object = 0
    for i in range(30):
        s = world.scene("train", i)
        labels = owner_shapes(s)
        for patch, owner in enumerate(s.patch_owner.reshape(-1)):
            expected = 0 if owner < 0 else world.SHAPES.index(s.objects[owner].shape) + 1
            assert labels[patch] == expected
            n_background += owner < 0
            n_object += owner >= 0
    assert n_background and n_object


def test_the_objects_shape_loss_ignores_background_patches():
    """shape_loss "objects": cross-entropy over object patches only (a loop oracle), untouched by any logit on a
    background patch; "all" stays the cross-entropy over every patch against the cell-centre labels."""
    from scripts.train_smolvlm import VisionHeads, vision_batch

    torch.manual_seed(0)
    batch = vision_batch("train", [0, 1, 2, 3])
    shape_logits = torch.randn(4, 64, 1 + len(world.SHAPES))
    objects = VisionHeads(8, "objects")
    loss = objects._shape_term(shape_logits, batch)
    terms = [torch.nn.functional.cross_entropy(shape_logits[b, p][None], batch["owner_shape"][b, p][None])
             for b in range(4) for p in range(64) if batch["owner_shape"][b, p] > 0]
    assert terms and torch.allclose(loss, torch.stack(terms).mean())
    moved = shape_logits.clone()
    moved[batch["owner_shape"] == 0] = torch.randn_like(moved[batch["owner_shape"] == 0]) * 10
    assert torch.equal(objects._shape_term(moved, batch), loss)
    everything = VisionHeads(8, "all")._shape_term(shape_logits, batch)
    assert torch.allclose(everything, torch.nn.functional.cross_entropy(shape_logits.flatten(0, 1),
                                                                        batch["shape"].flatten()))


def test_an_unknown_shape_loss_is_refused_with_the_choices():
    with pytest.raises(SinkscopeError, match="all, objects"):
        RecipeConfig(shape_loss="edges")


@pytest.mark.skipif(importlib.util.find_spec(smollm.PACKAGE) is None, reason=f"{smollm.PACKAGE_SPEC} is not installed")
def test_a_packed_question_equals_its_inference_prompt():
    from sinkscope.models.embedded import smolvlm
    from scripts.train_smolvlm import pixel_values

    llm = smollm.ensure_cached(log=lambda m: None)
    config = smolvlm.build_config(llm)
    model = smolvlm.assemble(config, llm)  # untrained vision tower and projector: any weights will do
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "eager"})
    processor = smolvlm.build_processor(llm)
    packer = Packer(processor.tokenizer, config.image_token_id)
    qs = scene_questions("train", 3)[:3]
    packed = packer.pack(qs)
    batch = collate([packed, packer.pack(qs[:1])], processor.tokenizer.pad_token_id)  # padding in row 1
    image = world.scene("train", 3)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"],
                             pixel_values=torch.stack([pixel_values(image.image)] * 2)).last_hidden_state
        for b, q in enumerate(qs):
            text = processor.apply_chat_template([{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": q.question}]}], add_generation_prompt=True)
            inputs = processor(images=[image.pil()], text=[text], return_tensors="pt")
            reference = model.model(**inputs).last_hidden_state[0, -1]
            prompt = inputs.input_ids[0].tolist()
            n_prefix = packed.branch.count(-1)
            where = [t for t, br in enumerate(packed.branch) if br == b][len(prompt) - n_prefix - 1]
            assert [packed.ids[t] for t in range(n_prefix)] + [packed.ids[t] for t, br in enumerate(packed.branch)
                                                               if br == b][:len(prompt) - n_prefix] == prompt
            assert torch.allclose(hidden[0, where], reference, atol=1e-3, rtol=1e-4)
            target = batch["labels"][0, where]
            assert target != IGNORE and processor.tokenizer.decode([int(target)]).strip() == q.answer.split()[0]


def test_owner_cells_label_each_object_patch_with_its_owners_grid_cell():
    """The vision stage's position labels, against a literal loop over the patches of the scene."""
    from scripts.train_smolvlm import owner_cells

    seen_cells = set()
    for i in range(30):
        s = world.scene("train", i)
        labels = owner_cells(s)
        for patch, owner in enumerate(s.patch_owner.reshape(-1)):
            expected = 0 if owner < 0 else s.objects[owner].row * world.GRID + s.objects[owner].col + 1
            assert labels[patch] == expected
            seen_cells.add(int(labels[patch]))
    assert seen_cells == set(range(world.GRID * world.GRID + 1))  # every cell and the background occur


def test_the_position_loss_is_a_cross_entropy_over_object_patches_and_none_makes_no_head():
    """position_loss "objects" (the default recipe's): the cell head's loss equals a loop oracle over object patches,
    ignores every logit on a background patch and adds to the other terms; "none" makes no head and no parameters."""
    from scripts.train_smolvlm import VisionHeads, vision_batch

    torch.manual_seed(0)
    batch = vision_batch("train", [0, 1, 2, 3])
    cell_logits = torch.randn(4, 64, world.GRID * world.GRID)
    loss = VisionHeads._cell_term(cell_logits, batch)
    terms = [torch.nn.functional.cross_entropy(cell_logits[b, p][None], batch["owner_cell"][b, p][None] - 1)
             for b in range(4) for p in range(64) if batch["owner_cell"][b, p] > 0]
    assert terms and torch.allclose(loss, torch.stack(terms).mean())
    moved = cell_logits.clone()
    background = batch["owner_cell"] == 0
    moved[background] = torch.randn_like(moved[background]) * 10
    assert torch.equal(VisionHeads._cell_term(moved, batch), loss)

    plain, with_cells = VisionHeads(8, "objects"), VisionHeads(8, "objects", "objects")
    assert plain.cell is None and "cell.weight" not in dict(plain.named_parameters())
    with_cells.load_state_dict({**plain.state_dict(), **{k: v for k, v in with_cells.state_dict().items()
                                                         if k.startswith("cell.")}})
    patches = torch.randn(4, 64, 8)
    base, _ = plain(patches, batch)
    total, acc = with_cells(patches, batch)
    assert torch.allclose(total, base + VisionHeads._cell_term(with_cells.cell(patches), batch))
    assert 0.0 <= acc["cell_acc_objects"] <= 1.0


def test_an_unknown_position_loss_is_refused_with_the_choices():
    with pytest.raises(SinkscopeError, match="none, objects"):
        RecipeConfig(position_loss="pixels")


def test_the_command_line_defaults_are_the_recipe_the_shipped_demo_was_trained_with(monkeypatch):
    """`python -m scripts.train_smolvlm --out DIR --threads 2` (the card's command) builds exactly the recipe recorded
    beside the shipped weights (llm.json), so the card's command reproduces the shipped demo."""
    import json

    import scripts.train_smolvlm as train_smolvlm
    from sinkscope.models.embedded import smolvlm

    recorded = json.loads((smolvlm.ASSETS / "llm.json").read_text())["recipe"]
    seen = {}
    monkeypatch.setattr(train_smolvlm, "train", lambda out, config, **kw: seen.update(config=config))
    train_smolvlm.main(["--out", "unused", "--threads", "2"])
    assert seen["config"].to_dict() == recorded
