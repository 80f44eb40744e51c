"""README.md says what runs: its python snippets run as written (on the tiny model, for speed), every
shell command in it names a real command, option, module, script or make target, the notebooks it
names are the notebooks/ folder, and every file it links to exists."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
FAST_MODEL = ('load_model("demo")', 'load_model("tiny")')  # the same code path, a 1.8M-parameter model


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def _shell_commands() -> list[list[str]]:
    """Every command line of the README's bash blocks (continuations joined, comments and VAR=value dropped)."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def test_the_readme_has_snippets_to_check():
    assert len(_blocks("python")) >= 1 and len(_shell_commands()) >= 8


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_snippet_runs_as_written(index, tmp_path):
    code = _blocks("python")[index]
    assert FAST_MODEL[0] in code or "load_model" not in code
    code = code.replace(*FAST_MODEL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"README python snippet {index} failed:\n{done.stderr[-3000:]}"


def _check_sinkscope(args: list[str]) -> None:
    import typer.main

    from sinkscope.cli import app

    group = typer.main.get_command(app)
    name, rest = args[0], args[1:]
    assert name in group.commands, f"`sinkscope {name}` is not a command ({', '.join(sorted(group.commands))})"
    group.commands[name].make_context(name, rest)  # raises on an unknown option or a value of the wrong type


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M))


@pytest.mark.parametrize("words", _shell_commands(), ids=lambda w: " ".join(w)[:60])
def test_shell_command_names_real_things(words):
    program, args = words[0], words[1:]
    if program == "torchrun":  # a launcher: the command it starts in each worker is what is checked
        assert "--no-python" in args and "sinkscope" in args, f"torchrun {args}: start `--no-python sinkscope ...`"
        program, args = "sinkscope", args[args.index("sinkscope") + 1:]
    if program == "sinkscope":
        _check_sinkscope(args)
    elif program == "make":
        assert set(args) <= _make_targets(), f"make {args}: the Makefile has {sorted(_make_targets())}"
    elif program == "python":
        if args[0] == "-m":
            assert importlib.util.find_spec(args[1]) is not None, f"no module {args[1]}"
        else:
            assert (REPO / args[0]).is_file(), f"no script {args[0]}"
    elif program == "cp":
        assert (REPO / args[-1]).is_dir(), f"cp into {args[-1]}: no such folder"
    else:
        pytest.fail(f"the README runs `{program}`, which this test does not know how to check")


def test_the_notebooks_named_are_the_notebooks_folder():
    named = set(re.findall(r"notebooks/(\w+\.ipynb)", README))
    present = {p.name for p in (REPO / "notebooks").glob("*.ipynb")}
    assert named == present, f"README names {sorted(named)}; notebooks/ holds {sorted(present)}"


def test_every_linked_file_exists():
    targets = re.findall(r"\]\(([^)#\s]+)\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "no local links found: the pattern is wrong"
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_the_headline_figure_says_what_the_demo_shows():
    after_figure = README.split("reports/demo/scan/phi_by_role.png)", 1)[1][:1200]
    assert "What the demo does and does not show" in after_figure
    assert "sinkscope/models/embedded/assets/demo/README.md" in after_figure  # accuracy: the model card, not a copied number


def test_the_readme_and_the_demo_card_agree_on_visual_sinks():
    """The README's sentence follows the card: retrain the demo, and this fails until the sentence is updated."""
    card = (REPO / "sinkscope" / "models" / "embedded" / "assets" / "demo" / "README.md").read_text()
    answer = card.split("## Did visual sinks emerge?", 1)[1].strip().split()[0].strip(":.,").lower()
    assert answer in ("yes", "no"), f"the card's answer is {answer!r}"
    says_none = "no visual sink tokens emerged" in README
    assert says_none == (answer == "no"), f"card: {answer}; README says none emerged: {says_none}"
