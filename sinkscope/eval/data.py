"""Data specs of the analyses: everything `eval.tasks.load_samples` takes, plus text prompts.

Text prompts (for plain causal language models, or an LMM without images):
  - a ``.txt`` file, one prompt per line (blank lines skipped);
  - a ``.jsonl`` file whose rows have ``prompt`` or ``text`` (or ``question``) and no ``image``.
Any other spec goes to `sinkscope.eval.tasks.load_samples` (demo world, POPE jsonl, image folders).
"""

from __future__ import annotations

from pathlib import Path

from sinkscope.errors import SinkscopeError
from sinkscope.eval.tasks import Sample, jsonl_rows, load_samples


def _text_rows(path: Path) -> list[dict] | None:
    """Rows of a prompt file, or None when it is an image data file (a jsonl row with 'image')."""
    if path.suffix.lower() == ".txt":
        return [{"prompt": line} for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for n, row in jsonl_rows(path, "a JSON object with 'prompt' (or 'text')"):
        if "image" in row:
            return None
        text = row.get("prompt", row.get("text", row.get("question")))
        if not isinstance(text, str) or not text.strip():
            raise SinkscopeError(f"{path}:{n} needs a non-empty 'prompt' (or 'text') field; got fields {sorted(row)}")
        rows.append({**row, "prompt": text})
    return rows


def load_data(spec: str = "demo", limit: int | None = None, question: str = "describe the image .",
              image_root: str | None = None) -> list[Sample]:
    """Samples for a data spec (module docstring); text prompts get image_path None and task 'text'."""
    path = Path(str(spec)).expanduser()
    if path.is_file() and path.suffix.lower() in (".txt", ".jsonl"):
        rows = _text_rows(path)
        if rows is not None:
            if limit is not None and limit <= 0:
                raise SinkscopeError(f"--limit must be positive, got {limit}")
            if not rows:
                raise SinkscopeError(f"{path} holds no prompts; write one prompt per line (.txt) or "
                                     "{\"prompt\": ...} per line (.jsonl)")
            samples = [Sample(str(r.get("id", i)), r["prompt"], None, r.get("answer", r.get("label")), task="text")
                       for i, r in enumerate(rows)]
            return samples[:limit] if limit is not None else samples
    return load_samples(spec, limit, question, image_root)
