"""Evaluation samples from the demo world, POPE-format JSONL files, or image folders.

A data spec is one of
  - ``demo`` or ``demo:<task>`` with task in mixed | pope-random | pope-popular |
    pope-adversarial | color | count | position | caption (held-out test split);
  - a ``.jsonl`` file, one object per line with ``image`` and ``text`` (or ``question``)
    and optionally ``label`` / ``answer`` and ``question_id`` (POPE's format);
  - a directory of images (every image gets the same ``question``).

Bad rows of a file data set do not stop a run: a ``.jsonl`` row whose image is missing and an
image file that cannot be read are left out and listed in ``samples.skipped`` (sample id,
source, reason), which the analyses write to run.json and index.md. `limit` counts rows
(the data's first N), so the kept samples do not depend on which ones were skipped. A
malformed line (not JSON, not an object, no image or question) is an error naming the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sinkscope.errors import SinkscopeError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEMO_TASKS = ("mixed", "pope-random", "pope-popular", "pope-adversarial", "color", "count", "position", "caption")


class SampleList(list):
    """A list of samples that also says which samples of the data were left out, and why."""

    def __init__(self, samples=(), skipped=None):
        super().__init__(samples)
        self.skipped: list[dict] = list(skipped or [])

    def __getitem__(self, item):
        out = super().__getitem__(item)
        return SampleList(out, self.skipped) if isinstance(item, slice) else out


def image_problem(path: str | Path) -> str | None:
    """Why an image file cannot be used (missing, empty, not an image), or None when it opens and verifies."""
    from PIL import Image

    p = Path(path)
    if not p.exists():
        return f"image {p} does not exist"
    if p.stat().st_size == 0:
        return f"image {p} is empty (0 bytes)"
    try:
        with Image.open(p) as im:
            im.verify()  # reads the structure without decoding every pixel
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds; every one means "unreadable"
        return f"image {p} cannot be read ({type(err).__name__}: {err})"
    return None


@dataclass
class Sample:
    """One question about one image. `answer` is the reference (None when unknown)."""

    sample_id: str
    question: str
    image_path: str | None = None
    answer: str | None = None
    task: str = ""
    meta: dict = field(default_factory=dict)
    _image: object = None

    def image(self):
        """The image as RGB PIL, loaded lazily; a clear error if it cannot be read."""
        if self._image is not None:
            return self._image
        if self.image_path is None:
            return None
        return load_image(self.image_path)


def load_image(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise SinkscopeError(f"image {p} does not exist; check the path or --image-root")
    if p.stat().st_size == 0:
        raise SinkscopeError(f"image {p} is empty (0 bytes); re-download or remove it from the data file")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise SinkscopeError(f"image {p} cannot be read as an image ({err}); re-save it as PNG or JPEG") from err


def _demo_samples(task: str, n: int, start: int = 0) -> list[Sample]:
    import sinkscope.world as world

    if task not in DEMO_TASKS:
        raise SinkscopeError(f"unknown demo task {task!r}; choose one of {', '.join(DEMO_TASKS)}")
    if task.startswith("pope-"):
        qs = world.pope_questions("test", task[5:], n_scenes=(n + 1) // 2, start=start)
    elif task == "mixed":
        qs = []
        kinds = ["pope-adversarial", "color", "position", "count"]
        i = start
        while len(qs) < n:
            kind = kinds[len(qs) % len(kinds)]
            if kind.startswith("pope-"):
                qs += world.pope_questions("test", kind[5:], 1, start=i)[: 1 + (i % 2)][-1:]
            else:
                qs += world.task_questions("test", kind, 1, start=i)
            i += 1
    else:
        qs = world.task_questions("test", task, n_scenes=n, start=start)
    out = []
    for k, q in enumerate(qs[:n]):
        s = world.scene("test", q.scene_index)
        out.append(Sample(
            sample_id=f"test-{q.scene_index}-{q.task}-{q.strategy or 'x'}-{q.label or k}",
            question=q.question, answer=q.answer, task=q.task + (f"-{q.strategy}" if q.strategy else ""),
            meta={"scene": q.scene_index, "label": q.label, "category": q.category,
                  "background_patches": s.background_patch_mask.tolist()},
            _image=s.pil(),
        ))
    return out


def jsonl_rows(path: Path, expected: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line; a malformed or non-object line raises naming its number."""
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SinkscopeError(f"{path}:{n} is not valid JSON ({err}); fix or delete line {n}") from err
        if not isinstance(row, dict):
            raise SinkscopeError(f"{path}:{n} must be {expected}, got {type(row).__name__}; fix or delete line {n}")
        yield n, row


def _jsonl_samples(path: Path, image_root: Path | None) -> list[Sample]:
    """One sample per row (images not checked here); rows without an existing image are checked later."""
    out = []
    root = image_root or path.parent
    for n, row in jsonl_rows(path, "a JSON object with 'image' and 'text'"):
        question = row.get("text", row.get("question"))
        if question is None or "image" not in row:
            raise SinkscopeError(f"{path}:{n} needs fields 'image' and 'text' (or 'question'), got {sorted(row)}")
        image = Path(row["image"])
        image = image if image.is_absolute() else root / image
        answer = row.get("label", row.get("answer"))
        out.append(Sample(str(row.get("question_id", n)), question, str(image), answer,
                          task=row.get("category", "pope"), meta={"label": answer, "source": f"{path}:{n}"}))
    if not out:
        raise SinkscopeError(f"{path} holds no samples")
    return out


def load_samples(spec: str = "demo", limit: int | None = None, question: str = "describe the image .",
                 image_root: str | None = None, start: int = 0) -> list[Sample]:
    """Samples for a data spec (see module docstring); `limit` keeps the first N; `start`: the first demo
    scene (demo specs only)."""
    n = limit if limit is not None else 64
    if limit is not None and limit <= 0:
        raise SinkscopeError(f"--limit must be positive, got {limit}")
    if spec == "demo" or spec.startswith("demo:"):
        task = spec.split(":", 1)[1] if ":" in spec else "mixed"
        return _demo_samples(task, n, start)
    if start:
        raise SinkscopeError(f"start = {start} applies to demo data only; for {spec!r} select samples in the file")
    path = Path(spec).expanduser()
    if not path.exists():
        raise SinkscopeError(
            f"data {spec!r} not found: give 'demo[:task]', a POPE-style .jsonl file or a folder of images"
        )
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise SinkscopeError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        samples = [Sample(p.stem, question, str(p), task="images") for p in images]
    else:
        samples = _jsonl_samples(path, Path(image_root) if image_root else None)
    return drop_unreadable(samples[:limit] if limit is not None else samples)


def drop_unreadable(samples: list[Sample]) -> SampleList:
    """The samples whose image opens; the others in `.skipped` with the reason."""
    kept, skipped = [], []
    for s in samples:
        problem = image_problem(s.image_path) if s.image_path is not None and s._image is None else None
        if problem is None:
            kept.append(s)
        else:
            skipped.append(skip_record(s, problem))
    if not kept and skipped:
        raise SinkscopeError(f"none of the {len(skipped)} samples has a readable image (first: {skipped[0]['reason']}); "
                             "check the paths or --image-root")
    return SampleList(kept, skipped)


def skip_record(sample: Sample, reason: str) -> dict:
    return {"sample": sample.sample_id, "source": sample.meta.get("source", sample.image_path), "reason": reason}


def batches(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    for i in range(0, len(samples), size):
        yield samples[i : i + size]


def progress(samples: list[Sample], size: int, desc: str) -> Iterator[list[Sample]]:
    """`batches(samples, size)` with a progress bar counted in samples (shown on a terminal only)."""
    from tqdm import tqdm

    with tqdm(total=len(samples), desc=desc, unit="sample", disable=None, leave=False) as bar:
        for chunk in batches(samples, size):
            yield chunk
            bar.update(len(chunk))


def request_groups(samples: list[Sample], size: int, per_request: int, desc: str) -> Iterator[list[list[Sample]]]:
    """`progress` over groups of `per_request` batches of `size` samples (the batches one remote request sends):
    each group as its list of batches, the same batches `batches(samples, size)` gives."""
    for group in progress(samples, size * per_request, desc):
        yield list(batches(group, size))
