"""A seeded synthetic world of simple scenes, with exact ground truth and tasks.

A scene is a 64x64 RGB image with 1-4 objects (shape x colour x size) placed on a 3x3
grid of cells, over a plain, textured or noisy background. Each scene knows its object
list and a per-patch object/background mask on the vision tower's 8x8 patch grid.

Tasks (all answers exact): yes/no object existence with POPE's three negative sampling
strategies (random, popular, adversarial by co-occurrence), attribute (colour of the X),
counting, position, and short captions for CHAIR-style hallucination counting.

Everything is a pure function of (split, index): ``scene(split, i)`` always returns the
same scene, and the splits draw from disjoint seed ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

IMAGE_SIZE = 64  # pixels, square
PATCH_SIZE = 8  # pixels; the vision tower's patch
GRID = 3  # objects sit on a GRID x GRID layout of cells

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
SIZES = ("small", "large")
ROW_WORDS = ("top", "middle", "bottom")
COL_WORDS = ("left", "center", "right")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
BACKGROUNDS = ("plain", "textured", "noisy")

RGB = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}

SPLIT_SEEDS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}

# Themes give the world co-occurrence structure (for POPE's adversarial negatives) and
# unequal category frequencies (for POPE's popular negatives).
THEMES = (
    {"colors": ("red", "yellow"), "shapes": ("circle", "triangle")},
    {"colors": ("blue", "green"), "shapes": ("square", "diamond")},
    {"colors": ("purple", "white"), "shapes": ("cross", "circle")},
    {"colors": ("red", "blue"), "shapes": ("square", "cross")},
)
THEME_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
IN_THEME_PROBABILITY = 0.75


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def category(self) -> str:
        """The POPE 'object': colour and shape, e.g. 'red circle'."""
        return f"{self.color} {self.shape}"

    @property
    def position_words(self) -> str:
        return f"{ROW_WORDS[self.row]} {COL_WORDS[self.col]}"


@dataclass
class Scene:
    split: str
    index: int
    objects: list[SceneObject]
    background: str
    image: np.ndarray  # [height, width, 3] uint8
    patch_object_mask: np.ndarray  # [patches_h, patches_w] bool: True where an object covers
    theme: int = 0
    patch_owner: np.ndarray | None = None  # [patches_h, patches_w] int: index into objects of the object
    # covering most of the patch where it covers >= 10% (as patch_object_mask), else -1
    extra: dict = field(default_factory=dict)

    @property
    def categories(self) -> set[str]:
        return {o.category for o in self.objects}

    @property
    def background_patch_mask(self) -> np.ndarray:
        """[patches_h * patches_w] bool, row-major: the order of image tokens."""
        return ~self.patch_object_mask.reshape(-1)

    def index_of(self, category: str) -> int:
        """Index in `objects` of the object of this category (categories are unique within a scene)."""
        for k, o in enumerate(self.objects):
            if o.category == category:
                return k
        raise ValueError(f"no {category!r} in scene {self.split}/{self.index}: it holds {sorted(self.categories)}")

    def objects_answering(self, task: str, said: str) -> list[int]:
        """Indices of the objects whose colour (task "color") or position words ("position") equal `said`
        (lower case, single spaces: the form `eval.accuracy.normalize_answer` gives)."""
        return [k for k, o in enumerate(self.objects) if (o.color if task == "color" else o.position_words) == said]

    def pil(self):
        from PIL import Image

        return Image.fromarray(self.image)


def all_categories() -> list[str]:
    return [f"{c} {s}" for s in SHAPES for c in COLORS]


def _rng(split: str, index: int, salt: int = 0) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    return np.random.default_rng([SPLIT_SEEDS[split] + index, salt])


def _shape_mask(shape: str, size_px: int) -> np.ndarray:
    """[size_px, size_px] bool mask of a shape centred in its box."""
    y, x = np.mgrid[0:size_px, 0:size_px] + 0.5
    c = size_px / 2
    dy, dx = (y - c) / c, (x - c) / c
    if shape == "circle":
        return dy**2 + dx**2 <= 0.95
    if shape == "square":
        return (np.abs(dy) <= 0.8) & (np.abs(dx) <= 0.8)
    if shape == "triangle":
        return (dy >= -0.85) & (dy <= 0.85) & (np.abs(dx) <= (dy + 0.85) / 1.7 * 0.95)
    if shape == "cross":
        return ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 0.95)) | ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 0.95))
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= 0.95
    raise ValueError(f"unknown shape {shape!r}")


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    base = rng.integers(20, 110, size=3)
    img = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32).copy()
    if kind == "textured":
        period = int(rng.integers(4, 12))
        phase = int(rng.integers(0, period))
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        direction = rng.integers(0, 3)
        coord = (yy, xx, yy + xx)[direction]
        stripes = ((coord + phase) // max(period // 2, 1)) % 2
        img += stripes[..., None] * rng.integers(15, 40)
    elif kind == "noisy":
        img += rng.normal(0, 18, size=img.shape)
    return img


def scene(split: str, index: int) -> Scene:
    """The scene number `index` of `split`; deterministic."""
    return _scene_cached(split, int(index))


def _layout(split: str, index: int) -> tuple[int, list[SceneObject], np.random.Generator]:
    """The scene's theme and objects (what its categories and questions depend on), drawn first from its random
    stream; returned with that stream, which the scene's rendering goes on drawing from."""
    rng = _rng(split, index)
    theme_id = int(rng.choice(len(THEMES), p=THEME_WEIGHTS))
    theme = THEMES[theme_id]
    n_objects = int(rng.integers(1, 5))
    cells = rng.choice(GRID * GRID, size=n_objects, replace=False)
    objects: list[SceneObject] = []
    used: set[str] = set()
    for cell in cells:
        for _ in range(20):
            if rng.random() < IN_THEME_PROBABILITY:
                color = str(rng.choice(theme["colors"]))
                shape = str(rng.choice(theme["shapes"]))
            else:
                color = str(rng.choice(COLORS))
                shape = str(rng.choice(SHAPES))
            if f"{color} {shape}" not in used:
                break
        used.add(f"{color} {shape}")
        size = str(rng.choice(SIZES))
        objects.append(SceneObject(shape, color, size, int(cell) // GRID, int(cell) % GRID))
    return theme_id, objects, rng


@lru_cache(maxsize=4096)
def _scene_cached(split: str, index: int) -> Scene:
    theme_id, objects, rng = _layout(split, index)
    background = str(rng.choice(BACKGROUNDS))
    img = _background(background, rng)
    covered = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    visible = np.full((IMAGE_SIZE, IMAGE_SIZE), -1)  # which object's paint is on top at each pixel
    cell_px = IMAGE_SIZE / GRID
    for k_obj, obj in enumerate(objects):
        size_px = 18 if obj.size == "large" else 11
        jitter = rng.integers(-2, 3, size=2)
        cy = int(cell_px * (obj.row + 0.5) - size_px / 2) + int(jitter[0])
        cx = int(cell_px * (obj.col + 0.5) - size_px / 2) + int(jitter[1])
        cy = int(np.clip(cy, 0, IMAGE_SIZE - size_px))
        cx = int(np.clip(cx, 0, IMAGE_SIZE - size_px))
        mask = _shape_mask(obj.shape, size_px)
        region = img[cy : cy + size_px, cx : cx + size_px]
        region[mask] = RGB[obj.color]
        covered[cy : cy + size_px, cx : cx + size_px] |= mask
        visible[cy : cy + size_px, cx : cx + size_px][mask] = k_obj
    image = np.clip(img, 0, 255).astype(np.uint8)
    n_patch = IMAGE_SIZE // PATCH_SIZE
    coverage = covered.reshape(n_patch, PATCH_SIZE, n_patch, PATCH_SIZE).mean(axis=(1, 3))
    patch_object_mask = coverage >= 0.1
    per_object = np.stack([(visible == k).reshape(n_patch, PATCH_SIZE, n_patch, PATCH_SIZE).mean(axis=(1, 3))
                           for k in range(len(objects))])  # [objects, patches_h, patches_w]
    patch_owner = np.where(patch_object_mask & (per_object.max(0) > 0), per_object.argmax(0), -1)
    return Scene(split, index, objects, background, image, patch_object_mask, theme_id, patch_owner=patch_owner)


# ----------------------------------------------------------------------------- statistics


@lru_cache(maxsize=1)
def category_statistics(n_scenes: int = 4000) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Category frequencies and co-occurrence counts over the first training scenes (their layouts: no image is
    drawn)."""
    freq = {c: 0 for c in all_categories()}
    cooc = {c: {d: 0 for d in all_categories()} for c in all_categories()}
    for i in range(n_scenes):
        cats = sorted({o.category for o in _layout("train", i)[1]})
        for c in cats:
            freq[c] += 1
            for d in cats:
                if d != c:
                    cooc[c][d] += 1
    return freq, cooc


def conjunction_categories(s: Scene) -> list[str]:
    """Absent categories whose colour and shape both occur in the scene, on different objects (sorted).

    E.g. a red circle and a blue square make "red square" and "blue circle": saying "yes" to
    these is a binding error (colour and shape seen, not seen together).
    """
    colours = {o.color for o in s.objects}
    shapes = {o.shape for o in s.objects}
    return sorted(f"{c} {h}" for c in colours for h in shapes if f"{c} {h}" not in s.categories)


def negative_category(s: Scene, strategy: str, rng: np.random.Generator) -> str:
    """A category absent from the scene, drawn by POPE's `strategy`.

    random: uniform over absent categories; popular: among the most frequent categories in
    the world; adversarial: among those that co-occur most with the scene's objects.
    """
    absent = [c for c in all_categories() if c not in s.categories]
    if strategy == "random":
        return str(rng.choice(absent))
    freq, cooc = category_statistics()
    if strategy == "popular":
        ranked = sorted(absent, key=lambda c: (-freq[c], c))
    elif strategy == "adversarial":
        score = {c: sum(cooc[p][c] for p in s.categories) for c in absent}
        ranked = sorted(absent, key=lambda c: (-score[c], c))
    else:
        raise ValueError(f"unknown POPE strategy {strategy!r}; use random, popular or adversarial")
    return str(rng.choice(ranked[:3]))


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Question:
    """One question about one scene; `answer` is the exact expected text."""

    split: str
    scene_index: int
    task: str  # existence | color | count | position | caption
    question: str
    answer: str
    strategy: str = ""  # POPE strategy for existence questions
    label: str = ""  # yes | no for existence, else ""
    category: str = ""  # the object the question is about


def caption(s: Scene) -> str:
    """Objects listed in reading order, e.g. 'a large red circle at top left and a ...'."""
    ordered = sorted(s.objects, key=lambda o: (o.row, o.col))
    parts = [f"a {o.size} {o.category} at {o.position_words}" for o in ordered]
    return " and ".join(parts) + " ."


def scene_text(s: Scene) -> str:
    """The scene described in words (text-only pretraining puts this in context)."""
    ordered = sorted(s.objects, key=lambda o: (o.row, o.col))
    return " ; ".join(f"{o.size} {o.category} {o.position_words}" for o in ordered) + " ."


def existence_question(s: Scene, strategy: str, positive: bool, rng: np.random.Generator) -> Question:
    if positive:
        cat = str(rng.choice(sorted(s.categories)))
    else:
        cat = negative_category(s, strategy, rng)
    return Question(
        s.split, s.index, "existence", f"is there a {cat} in the image ?",
        "yes" if positive else "no", strategy, "yes" if positive else "no", cat,
    )


def questions_for(s: Scene, rng: np.random.Generator) -> list[Question]:
    """All question kinds that have an unambiguous answer for this scene (unshuffled)."""
    out: list[Question] = []
    for positive in (True, False):
        out.append(existence_question(s, str(rng.choice(["random", "popular", "adversarial"])), positive, rng))
    shapes = [o.shape for o in s.objects]
    unique_shape = [o for o in s.objects if shapes.count(o.shape) == 1]
    if unique_shape:
        o = unique_shape[int(rng.integers(len(unique_shape)))]
        out.append(Question(s.split, s.index, "color", f"what color is the {o.shape} ?", o.color, category=o.category))
    o = s.objects[int(rng.integers(len(s.objects)))]
    out.append(Question(s.split, s.index, "position", f"where is the {o.category} ?", o.position_words, category=o.category))
    out.append(Question(s.split, s.index, "count", "how many objects are there ?", COUNT_WORDS[len(s.objects)]))
    return out


def training_dialogue(split: str, index: int, caption_probability: float = 0.3) -> list[Question]:
    """A shuffled multi-turn dialogue about one scene, used for training."""
    s = scene(split, index)
    rng = _rng(split, index, salt=1)
    qs = questions_for(s, rng)
    rng.shuffle(qs)
    if rng.random() < caption_probability:
        qs = [Question(split, index, "caption", "describe the image .", caption(s))] + qs[:2]
    return qs


def pope_questions(split: str, strategy: str, n_scenes: int, start: int = 0) -> list[Question]:
    """POPE-style balanced yes/no questions: one positive and one negative per scene."""
    out = []
    for i in range(start, start + n_scenes):
        s = scene(split, i)
        rng = _rng(split, i, salt=2 + ["random", "popular", "adversarial"].index(strategy))
        out.append(existence_question(s, strategy, True, rng))
        out.append(existence_question(s, strategy, False, rng))
    return out


def task_questions(split: str, task: str, n_scenes: int, start: int = 0) -> list[Question]:
    """Evaluation questions of one task (color/count/position/caption), one per scene where defined."""
    out = []
    for i in range(start, start + n_scenes):
        s = scene(split, i)
        if task == "caption":
            out.append(Question(split, i, "caption", "describe the image .", caption(s)))
            continue
        rng = _rng(split, i, salt=9)
        for q in questions_for(s, rng):
            if q.task == task:
                out.append(q)
                break
    return out


def vocabulary() -> list[str]:
    """Every word the world can produce (the word-level tokenizer's vocabulary)."""
    words = [
        "USER:", "ASSISTANT:", "scene", ":", ";", ".", "?", "is", "there", "a", "in", "the", "image",
        "yes", "no", "what", "color", "how", "many", "objects", "are", "where", "describe", "at", "and",
    ]
    words += list(SHAPES) + list(COLORS) + list(SIZES) + list(ROW_WORDS) + list(COL_WORDS) + list(COUNT_WORDS)
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def chair_objects(text: str) -> set[str]:
    """Object categories ('colour shape') mentioned in a generated caption."""
    toks = text.split()
    found = set()
    for a, b in zip(toks, toks[1:]):
        if a in COLORS and b in SHAPES:
            found.add(f"{a} {b}")
    return found
