"""The demo world and the demo processor: determinism, exact ground truth, tasks, inputs.

(a) scenes are a pure function of (split, index); splits differ;
(b) the per-patch object mask agrees with the rendered pixels, exactly;
(c) every question's answer agrees with the scene (existence, colour, count, position, caption);
(d) POPE negatives are absent for all three strategies, and popular / adversarial negatives are
    what their names say, statistically (more frequent / more co-occurring than random ones);
(e) the processor: saved and reloaded offline by AutoProcessor, BOS at 0, 64 image tokens, chat
    template; the training batches are exactly the processor's encoding of the same dialogue;
    images of other sizes and modes are converted; unreadable image files give SinkscopeError.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from sinkscope.models.embedded import processor as demo_processor
from scripts import train_tiny as train
from sinkscope import world
from sinkscope.eval.tasks import load_image
from sinkscope.models import SinkscopeError

N_SCENES = 300
N_PATCH = world.IMAGE_SIZE // world.PATCH_SIZE


def _fresh_scene(split: str, index: int) -> world.Scene:
    """Render a scene again, bypassing the cache, so determinism is really tested."""
    world._scene_cached.cache_clear()
    return world.scene(split, index)


# -- (a) determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("split", sorted(world.SPLIT_SEEDS))
def test_scene_is_a_pure_function_of_split_and_index(split):
    for index in (0, 1, 17, 999):
        a = _fresh_scene(split, index)
        b = _fresh_scene(split, index)
        assert a is not b
        assert a.image.tobytes() == b.image.tobytes()
        assert a.image.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and a.image.dtype == np.uint8
        assert a.objects == b.objects and a.background == b.background and a.theme == b.theme
        assert np.array_equal(a.patch_object_mask, b.patch_object_mask)
        assert world.training_dialogue(split, index) == world.training_dialogue(split, index)


def test_category_statistics_count_the_rendered_scenes_categories():
    """The statistics read scene layouts without drawing images; they equal a count over the drawn scenes."""
    n = 300
    freq = {c: 0 for c in world.all_categories()}
    cooc = {c: {d: 0 for d in world.all_categories()} for c in world.all_categories()}
    for i in range(n):
        cats = world.scene("train", i).categories
        for c in cats:
            freq[c] += 1
            for d in cats - {c}:
                cooc[c][d] += 1
    assert world.category_statistics.__wrapped__(n) == (freq, cooc)
    assert sum(freq.values()) > n  # scenes hold one to four objects


def test_splits_differ():
    for index in (0, 1, 2, 3):
        images = [world.scene(split, index).image.tobytes() for split in sorted(world.SPLIT_SEEDS)]
        assert len(set(images)) == len(images)
    # not merely a shift: the first scenes of one split are not the first scenes of another
    train_images = {world.scene("train", i).image.tobytes() for i in range(50)}
    for split in ("validation", "test"):
        assert not train_images & {world.scene(split, i).image.tobytes() for i in range(50)}
    with pytest.raises(ValueError, match="unknown split"):
        world.scene("dev", 0)


# -- (b) the patch mask agrees with the pixels ---------------------------------------------------


def _object_pixels(image: np.ndarray) -> np.ndarray:
    """[h, w] bool: pixels painted exactly in one of the world's object colours.

    Backgrounds never reach these colours: plain and textured ones stay below 150 in every
    channel (each object colour has a channel >= 190), and Gaussian noise hitting all three
    channels of a colour exactly is out of reach.
    """
    hit = np.zeros(image.shape[:2], dtype=bool)
    for rgb in world.RGB.values():
        hit |= (image == np.array(rgb, dtype=np.uint8)).all(axis=-1)
    return hit


def test_patch_object_mask_matches_rendered_pixels():
    backgrounds = set()
    for split in ("train", "test"):
        for i in range(N_SCENES):
            s = world.scene(split, i)
            backgrounds.add(s.background)
            pixels = _object_pixels(s.image)
            coverage = pixels.reshape(N_PATCH, world.PATCH_SIZE, N_PATCH, world.PATCH_SIZE).mean(axis=(1, 3))
            assert s.patch_object_mask.shape == (N_PATCH, N_PATCH)
            assert np.array_equal(s.patch_object_mask, coverage >= 0.1), (split, i)
            # patches marked background hold little or no object
            assert (coverage[~s.patch_object_mask] < 0.1).all()
            # the row-major background mask is the order of image tokens
            assert np.array_equal(s.background_patch_mask, ~s.patch_object_mask.reshape(-1))
            # every object is visible in its own colour, inside its grid cell
            cell = world.IMAGE_SIZE / world.GRID
            colors = [o.color for o in s.objects]
            for o in s.objects:
                if colors.count(o.color) > 1:  # two objects share the colour: pixels not attributable
                    continue
                ys, xs = np.nonzero((s.image == np.array(world.RGB[o.color], dtype=np.uint8)).all(-1))
                assert len(ys), (split, i, o)
                cy, cx = ys.mean(), xs.mean()
                assert int(cy // cell) == o.row and int(cx // cell) == o.col, (split, i, o, cy, cx)
    assert backgrounds == set(world.BACKGROUNDS)


# -- (c) answers agree with the ground truth ----------------------------------------------------


_CAPTION_PART = re.compile(r"^a (small|large) (\w+) (\w+) at (\w+) (\w+)$")


def _parse_caption(text: str) -> list[tuple[str, str, str, int, int]]:
    assert text.endswith(" .")
    out = []
    for part in text[:-2].split(" and "):
        m = _CAPTION_PART.match(part)
        assert m, part
        size, color, shape, row, col = m.groups()
        out.append((shape, color, size, world.ROW_WORDS.index(row), world.COL_WORDS.index(col)))
    return out


def _check_question(s: world.Scene, q: world.Question) -> None:
    assert (q.split, q.scene_index) == (s.split, s.index)
    if q.task == "existence":
        m = re.fullmatch(r"is there a (\w+ \w+) in the image \?", q.question)
        assert m and m.group(1) == q.category
        assert q.answer == q.label == ("yes" if q.category in s.categories else "no")
        assert q.strategy in ("random", "popular", "adversarial")
    elif q.task == "color":
        shape = re.fullmatch(r"what color is the (\w+) \?", q.question).group(1)
        matching = [o for o in s.objects if o.shape == shape]
        assert len(matching) == 1, "colour questions are asked about unique shapes only"
        assert q.answer == matching[0].color and q.category == matching[0].category
    elif q.task == "count":
        assert q.question == "how many objects are there ?"
        assert q.answer == world.COUNT_WORDS[len(s.objects)]
    elif q.task == "position":
        cat = re.fullmatch(r"where is the (\w+ \w+) \?", q.question).group(1)
        matching = [o for o in s.objects if o.category == cat]
        assert len(matching) == 1
        o = matching[0]
        assert q.answer == f"{world.ROW_WORDS[o.row]} {world.COL_WORDS[o.col]}" == o.position_words
    elif q.task == "caption":
        assert q.answer == world.caption(s)
    else:
        raise AssertionError(f"unknown task {q.task}")


def test_answers_agree_with_ground_truth():
    seen = set()
    for split in ("train", "test"):
        for i in range(N_SCENES):
            s = world.scene(split, i)
            assert 1 <= len(s.objects) <= 4
            assert len(s.categories) == len(s.objects)  # categories are unique within a scene
            assert len({(o.row, o.col) for o in s.objects}) == len(s.objects)
            qs = world.questions_for(s, world._rng(split, i, salt=5)) + world.training_dialogue(split, i, 1.0)
            for task in ("color", "count", "position", "caption"):
                qs += world.task_questions(split, task, 1, start=i)
            for q in qs:
                _check_question(s, q)
                seen.add(q.task)
            # the caption lists exactly the scene's objects, in reading order
            parsed = _parse_caption(world.caption(s))
            assert sorted(parsed) == sorted((o.shape, o.color, o.size, o.row, o.col) for o in s.objects)
            assert [(r, c) for *_, r, c in parsed] == sorted((o.row, o.col) for o in s.objects)
            assert world.chair_objects(world.caption(s)) == s.categories
            # every word the world says is in the tokenizer's vocabulary
            vocab = set(world.vocabulary())
            for q in qs:
                assert set(q.question.split()) <= vocab and set(q.answer.split()) <= vocab
    assert seen == {"existence", "color", "count", "position", "caption"}


# -- (d) POPE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["random", "popular", "adversarial"])
def test_pope_negatives_are_absent(strategy):
    qs = world.pope_questions("test", strategy, N_SCENES)
    assert len(qs) == 2 * N_SCENES
    assert [q.label for q in qs] == ["yes", "no"] * N_SCENES  # balanced, one pair per scene
    for q in qs:
        s = world.scene("test", q.scene_index)
        _check_question(s, q)
        assert q.strategy == strategy
        assert (q.category in s.categories) == (q.label == "yes")
    assert world.pope_questions("test", strategy, 20) == qs[:40]  # deterministic


def test_pope_negative_strategies_are_statistically_what_they_claim():
    freq, cooc = world.category_statistics()
    n = 200
    negatives = {st: [q for q in world.pope_questions("test", st, n) if q.label == "no"]
                 for st in ("random", "popular", "adversarial")}

    def mean_freq(qs):
        return np.mean([freq[q.category] for q in qs])

    def mean_cooc(qs):
        return np.mean([sum(cooc[c][q.category] for c in world.scene("test", q.scene_index).categories) for q in qs])

    assert mean_freq(negatives["popular"]) > 1.5 * mean_freq(negatives["random"])
    assert mean_cooc(negatives["adversarial"]) > 1.5 * mean_cooc(negatives["random"])
    assert mean_cooc(negatives["adversarial"]) > mean_cooc(negatives["popular"])  # not just popularity
    # popular negatives are among the most frequent categories overall
    top = sorted(freq, key=lambda c: -freq[c])[: len(freq) // 3]
    assert np.mean([q.category in top for q in negatives["popular"]]) > 0.9
    # random negatives spread over many categories
    assert len({q.category for q in negatives["random"]}) > len(freq) // 2


# -- (e) the processor --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    from transformers import AutoProcessor, LlavaProcessor

    d = tmp_path_factory.mktemp("demo_processor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        demo_processor.build_processor().save_pretrained(d)
        loaded = AutoProcessor.from_pretrained(str(d), local_files_only=True)
    assert isinstance(loaded, LlavaProcessor)
    return loaded


def _dialogue_messages(split: str, index: int, image=None) -> list[dict]:
    messages = []
    for k, q in enumerate(world.training_dialogue(split, index)):
        content = []
        if k == 0:
            content.append({"type": "image", "image": image} if image is not None else {"type": "image"})
        content.append({"type": "text", "text": q.question})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": q.answer}]})
    return messages


def test_processor_loads_offline_bos_and_image_tokens(proc):
    tok = proc.tokenizer
    vocab = demo_processor.vocabulary()
    assert tok.bos_token == demo_processor.BOS and tok.bos_token_id == vocab.index(demo_processor.BOS)
    assert tok.convert_tokens_to_ids(demo_processor.IMAGE) == vocab.index(demo_processor.IMAGE)
    assert tok("how many objects are there ?")["input_ids"] == [tok.bos_token_id] + train.encode(
        "how many objects are there ?")
    prompt = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many objects are there ?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>USER: <image> how many objects are there ? ASSISTANT:"
    s = world.scene("test", 3)
    # the prompt already holds BOS: encode it without adding another (as the adapters do)
    enc = proc(text=prompt, images=s.pil(), return_tensors="pt", add_special_tokens=False)
    ids = enc["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    image_id = tok.convert_tokens_to_ids(demo_processor.IMAGE)
    assert ids.count(image_id) == demo_processor.N_IMAGE_TOKENS == 64
    first = ids.index(image_id)
    assert ids[first: first + 64] == [image_id] * 64  # contiguous, row-major patches
    assert tuple(enc["pixel_values"].shape) == (1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    # padding is on the left, so BOS stays first among each row's real tokens
    batch = proc(text=[prompt, "<s>USER: <image> describe the image . ASSISTANT:"], images=[s.pil(), s.pil()],
                 return_tensors="pt", padding=True, add_special_tokens=False)
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        assert row[mask.bool()][0] == tok.bos_token_id
        assert int((row == image_id).sum()) == 64


def test_training_batches_equal_the_processor_encoding(proc):
    """make_batch's hand-built ids and pixels are what the saved processor produces."""
    batch = train.make_batch("finetune", "train", [0, 1])
    for row, index in enumerate([0, 1]):
        s = world.scene("train", index)
        enc = proc.apply_chat_template(_dialogue_messages("train", index, s.pil()), tokenize=True,
                                       return_dict=True, return_tensors="pt")
        n = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :n]
        assert ids[0] == train.BOS_ID and int((ids == train.IMAGE_ID).sum()) == 64
        assert ids.tolist() == enc["input_ids"][0].tolist()
        torch.testing.assert_close(batch["pixel_values"][row], enc["pixel_values"][0], atol=1e-5, rtol=0)
        # labels: the answers (and their </s>) only
        labels = batch["labels"][row, :n]
        answers = labels[labels != train.IGNORE].tolist()
        want = []
        for q in world.training_dialogue("train", index):
            want += train.encode(q.answer) + [train.EOS_ID]
        assert answers == want


@pytest.mark.parametrize("mode", ["L", "RGBA", "RGB", "P"])
def test_processor_converts_other_sizes_and_modes(proc, mode):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(80, 100, 3), dtype=np.uint8)).convert(mode)
    assert image.size == (100, 80)
    px = proc.image_processor(image, return_tensors="pt")["pixel_values"]
    assert tuple(px.shape) == (1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert torch.isfinite(px).all() and px.min() >= -1 - 1e-6 and px.max() <= 1 + 1e-6
    enc = proc(text="<s>USER: <image> describe the image . ASSISTANT:", images=image, return_tensors="pt",
               add_special_tokens=False)
    assert tuple(enc["pixel_values"].shape) == (1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)


def test_load_image_errors_name_the_file(tmp_path):
    from PIL import Image

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all \x00\x01\x02" * 10)
    missing = tmp_path / "missing.png"
    for path in (empty, garbage, missing):
        with pytest.raises(SinkscopeError) as err:
            load_image(path)
        assert str(path) in str(err.value)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((30, 40), 128, dtype=np.uint8)).save(grey)
    im = load_image(grey)
    assert im.mode == "RGB" and im.size == (40, 30)


def test_patch_owner_is_the_object_whose_paint_covers_the_patch():
    """Checked against the pixels: where objects have distinct colours, a patch owned by object k holds more of
    k's palette colour than of any other object's, and exactly the covered patches have an owner."""
    checked = 0
    for i in range(N_SCENES):
        s = world.scene("test", i)
        assert s.patch_owner.shape == (N_PATCH, N_PATCH)
        assert np.array_equal(s.patch_owner >= 0, s.patch_object_mask)
        colours = [o.color for o in s.objects]
        if len(set(colours)) < len(colours) or len(s.objects) < 2:
            continue
        paint = np.stack([(s.image == world.RGB[c]).all(-1) for c in colours])  # [objects, H, W]
        per_patch = paint.reshape(len(colours), N_PATCH, world.PATCH_SIZE, N_PATCH, world.PATCH_SIZE).sum(axis=(2, 4))
        owned = s.patch_owner >= 0
        assert np.array_equal(per_patch.argmax(0)[owned], s.patch_owner[owned]), i
        assert set(np.unique(s.patch_owner[owned])) == set(range(len(s.objects)))  # every object owns a patch
        checked += 1
    assert checked > 10


def test_objects_are_found_by_category_and_by_the_value_an_answer_names():
    for i in range(40):
        s = world.scene("test", i)
        for k, o in enumerate(s.objects):
            assert s.index_of(o.category) == k
            assert k in s.objects_answering("color", o.color) and k in s.objects_answering("position", o.position_words)
        assert s.objects_answering("color", "chartreuse") == []
        absent = next(c for c in world.all_categories() if c not in s.categories)
        with pytest.raises(ValueError, match="no '"):
            s.index_of(absent)
