"""`sinkscope` command line: a thin front over sinkscope.analyses.

Every command that runs a model follows one order: parse and validate every input
(`sinkscope.runconfig.RunConfig`, the --out folder, the data's rows), then load the model, then
run. A bad input is one line naming the fix, costs no model load and leaves no folder; Ctrl-C
prints what is saved and the command that resumes. Heavy modules (torch, transformers) are
imported inside the commands, so `sinkscope --help` answers at once.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import shlex
import sys
import typing
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional

import typer

from sinkscope.errors import SinkscopeError
from sinkscope.launcher import parse_shard, shard_folder
from sinkscope.runconfig import (CLI_FIELDS, INDEX_EXAMPLES, RunConfig, analysis_default, check_data, check_out,
                                 parse_floats, parse_ints, resolve_sink_score)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Visual attention sinks in large multimodal models: scan, ablate, redistribute.")

INTERRUPTED = 130  # the shell's exit status for Ctrl-C


@app.callback()
def _root() -> None:
    """sinkscope: visual attention sinks in LMMs (see `sinkscope COMMAND --help`)."""


# ----------------------------------------------------------------------------- options every command shares

@dataclass
class RunOptions:
    """What a command that loops over samples takes besides its RunConfig: the run folder and how it is filled."""

    out: str  # default per command: runs/<analysis>
    n_boot: int = 1000
    resume: bool = True
    shard: Optional[str] = None


# --help of RunOptions' options; RunConfig's come from runconfig.CLI_FIELDS
RUN_OPTIONS_HELP = {
    "out": "run folder to write (resumed if it exists); {shard} in it becomes the shard, i-of-n",
    "n_boot": "bootstrap resamples for CIs",
    "resume": "resume an interrupted run in --out",
    "shard": "i/n: only the samples whose index modulo n is i (default: from SLURM_ARRAY_TASK_ID/COUNT, "
             "torchrun's RANK/WORLD_SIZE, or both, when set); merge with `sinkscope merge`",
}
_REMOTE = typer.Option(None, help="run every trace remotely, reductions inside the trace (only they come back): "
                       "local (nnsight's serialised dry run of NDIF, here), ndif (the NDIF service: --model is "
                       "the hub id of a model it runs; key from NDIF_API_KEY) or an NDIF server's URL")
_PER_REQUEST = typer.Option(1, help="with --remote: batches sent as one request (an nnsight session: one job in "
                            "NDIF's queue; the batches' results are written when it returns)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_list(hint) -> bool:
    return any(typing.get_origin(a) is list for a in (hint, *typing.get_args(hint)))


def _option_type(hint):
    """The option's type for a field typed `hint`: the same, Optional when it may be None; a list is given as text
    (comma-separated, parsed by `_run_config`)."""
    if _is_list(hint):
        return Optional[str]
    args = typing.get_args(hint)
    if type(None) in args:
        return Optional[next(a for a in args if a is not type(None))]
    return hint


def field_option(name: str, analysis: str = "", help: Optional[str] = None):
    """The option of RunConfig field `name`: default analysis_default(analysis, name), --help from CLI_FIELDS."""
    return typer.Option(analysis_default(analysis, name), help=help or CLI_FIELDS[name])


def _shared_parameters(analysis: str, out: str, help: dict[str, str]) -> list[inspect.Parameter]:
    """RunConfig's CLI options (runconfig.CLI_FIELDS, in its order), then RunOptions' (--out defaulting to `out`)."""
    run_types, opt_types = typing.get_type_hints(RunConfig), typing.get_type_hints(RunOptions)
    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=_option_type(run_types[name]),
                                default=field_option(name, analysis, help.get(name))) for name in CLI_FIELDS]
    for f in fields(RunOptions):
        default = out if f.name == "out" else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=opt_types[f.name],
                                        default=typer.Option(default, help=help.get(f.name, RUN_OPTIONS_HELP[f.name]))))
    return params


def run_options(analysis: str, out: str, **help: str) -> Callable:
    """The options every command that loops over samples shares, declared once: the decorated command's signature
    (what typer reads) is ctx, RunConfig's CLI options with `analysis`'s defaults (runconfig.ANALYSIS_DEFAULTS),
    --out (default `out`), --n-boot, --resume and --shard, then the command's own options; the body is called as
    body(ctx, run: RunConfig, opts: RunOptions, **own). help: --help for this command where it differs."""

    def decorate(body: Callable) -> Callable:
        hints = typing.get_type_hints(body)
        own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(body).parameters.values() if p.name not in ("ctx", "run", "opts")]
        shared = _shared_parameters(analysis, out, help)
        clash = {p.name for p in own} & {p.name for p in shared}
        if clash:
            raise TypeError(f"{body.__name__} declares shared options {sorted(clash)} itself")
        names = [f.name for f in fields(RunOptions)]

        @functools.wraps(body)
        def command(ctx: typer.Context, **values):
            opts = RunOptions(**{name: values.pop(name) for name in names})
            run = _run_config(**{name: values.pop(name) for name in CLI_FIELDS})
            return body(ctx, run, opts, **values)

        ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        command.__signature__ = inspect.Signature([ctx, *shared, *own])
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        command.analysis, command.own_options = analysis, tuple(p.name for p in own)
        return command

    return decorate


# ----------------------------------------------------------------------------- one order for every command


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(" ".join(message.split()), fg=typer.colors.RED, err=True)  # one line, even for wrapped messages
    raise typer.Exit(code=code)


def _inside(filename, folder) -> bool:
    if not filename or folder is None:
        return False
    try:
        return Path(filename).resolve().is_relative_to(Path(folder).resolve())
    except (OSError, ValueError):
        return False


@contextmanager
def _one_line_errors(ctx: typer.Context | None, out: str | Path | None, shard: str | None = None) -> Iterator[None]:
    """The user's mistakes, a failing disk and Ctrl-C end in one line (SINKSCOPE_DEBUG=1: the traceback). shard: the
    run's shard (i/n), spelled out in the resume command when it came from a launcher's environment."""
    try:
        yield
    except SinkscopeError as err:
        if os.environ.get("SINKSCOPE_DEBUG"):
            raise
        _fail(f"error: {err}")
    except OSError as err:
        if os.environ.get("SINKSCOPE_DEBUG"):
            raise
        where = f" ({err.filename})" if err.filename else ""
        fix = f"; check that --out {out} is a folder you can write, with free space" if _inside(err.filename, out) else ""
        _fail(f"error: {err.strerror or err}{where}{fix} (SINKSCOPE_DEBUG=1 shows the traceback)")
    except KeyboardInterrupt:
        typer.secho(f"interrupted: {_saved(out)}; resume with: {_resume_command(ctx, out, shard)}", fg=typer.colors.YELLOW,
                    err=True)
        raise typer.Exit(code=INTERRUPTED) from None


def _saved(out: str | Path | None) -> str:
    """What an interrupted run left in `out`, in words."""
    path = Path(out) if out is not None else None
    if path is None or not (path / "run.json").exists() and not (path / "report.json").exists():
        return "nothing was saved yet"
    if (path / "report.json").exists():
        steps = sorted(p.parent.name for p in path.glob("*/run.json") if '"finished"' in _read(p))
        kept = f"finished steps ({', '.join(steps)})" if steps else "no finished step yet"
        return f"{kept} and the interrupted step's finished samples are saved in {path}"
    done = [line for line in _read(path / "samples_done.txt").splitlines() if line.strip()]
    if not done:
        return f"no sample had finished; the run's set-up is saved in {path}"
    return f"{len(done)} finished samples are saved in {path}"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _resume_command(ctx: typer.Context | None, out: str | Path | None, shard: str | None = None) -> str:
    """The command line that was run, rebuilt from its parsed options, with --out (and a shard the launcher gave:
    --shard i/n) spelled out, so that one worker's line resumes it outside the launcher too."""
    if ctx is None:
        return "the same command"
    parts = ["sinkscope", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            parts.append(str(value))
        elif param.name == "out" and out is not None:
            parts += [param.opts[0], str(out)]
        elif param.name == "shard" and shard is not None:
            parts += [param.opts[0], shard]
        elif value is None or value == param.default:
            continue
        elif getattr(param, "is_flag", False):
            if value and param.opts:
                parts.append(param.opts[0])
            elif not value and param.secondary_opts:
                parts.append(param.secondary_opts[0])
        else:
            parts += [param.opts[0], str(value)]
    return shlex.join(parts)


def _check_samples(run: RunConfig, question: str = "describe the image .") -> None:
    """Read the data's rows (no model needed), so a malformed file fails before the model loads."""
    from sinkscope.eval.data import load_data

    load_data(run.data, run.limit, question, run.image_root)


def _load(settings):
    """The model as a run's settings place it (RunConfig, or an analysis config with --remote)."""
    from sinkscope.models import load_placed

    return load_placed(settings)


def _config(cls, run: RunConfig, opts: RunOptions, sink_score: str, **own):
    """An analysis config (an AnalysisConfig: a RunConfig and more) from the run's settings, --n-boot, --shard and
    the command's own options."""
    settings = {f.name: getattr(run, f.name) for f in fields(RunConfig)}
    return cls(**{**settings, "n_boot": opts.n_boot, "shard": _shard(opts.shard), **own, "sink_score": sink_score})


def _run_analysis(ctx: typer.Context, run: RunConfig, opts: RunOptions, build: Callable[[str], object],
                  runner: str, question: str = "describe the image .") -> None:
    """Validate (options, --out, data), then load the model, resolve the sink score, run `runner`."""
    shard = _shard(opts.shard)  # --shard, or the launcher's
    out = shard_folder(opts.out, shard)  # --out runs/scan/{shard}: each worker its own folder
    with _one_line_errors(ctx, out, shard):
        run.validate()
        check_out(out)
        cfg = build(run.sink_score)
        for name in ("device_map", "max_memory"):  # where the model is placed: the config (and run.json) record it
            if hasattr(cfg, name) and getattr(run, name) is not None:
                setattr(cfg, name, getattr(run, name))
        cfg.validate()  # the analysis' own options
        _check_samples(run, question)
        from sinkscope.runfolder import check_not_in_use

        check_not_in_use(out)  # a folder another process is writing fails before the model loads
        adapter = _load(cfg)  # the analysis config: its placement, and --remote (a model NDIF serves loads as such)
        cfg.sink_score = resolve_sink_score(run.sink_score, adapter.hidden_size)
        module, function = runner.split(":")
        folder = getattr(importlib.import_module(module), function)(out, cfg, adapter=adapter, resume=opts.resume,
                                                                     log=typer.echo)
    typer.echo(f"wrote {folder.path}/index.md")


def _indices(name: str, text: Optional[str]) -> Optional[list[int]]:
    """A list field's option ('2,3' -> [2, 3]), a bad one in one line naming its option."""
    with _one_line_errors(None, None):
        return parse_ints(text, _flag(name), INDEX_EXAMPLES.get(name, "2,3,4"))


def _run_config(**values) -> RunConfig:
    """A RunConfig from CLI values: its list fields (--sink-dims) parsed, each with its own message."""
    hints = typing.get_type_hints(RunConfig)
    return RunConfig(**{name: _indices(name, v) if _is_list(hints[name]) else v for name, v in values.items()})


# the commands that take --shard: `sinkscope merge` merges their shards
SHARDED = "scan, heads, contributions, location, vit-sinks, ablate, patch, var-eval, remove, inject"


def _shard(text: Optional[str]) -> Optional[str]:
    """--shard as given, else the shard the launcher's environment names (SLURM array, torchrun), as 'i/n'."""
    with _one_line_errors(None, None):
        shard = parse_shard(text)
    return None if shard is None else f"{shard[0]}/{shard[1]}"


@app.command()
def merge(folders: list[str] = typer.Argument(..., help="the shards' run folders (each of 0/n..n-1/n once)"),
          out: str = typer.Option(..., help="the merged run folder to write"),
          figures: bool = typer.Option(True, help="draw the figures")):
    """Merge the run folders of a sharded run (--shard i/n of scan, heads, contributions, location, vit-sinks, ablate,
    patch, var-eval, remove or inject) into one, recomputing summaries and figures."""
    with _one_line_errors(None, out):
        from sinkscope.analyses.merge import merge_runs

        folder = merge_runs(folders, out, figures=figures, log=typer.echo)
    typer.echo(f"wrote {folder.path}/index.md")


def default_report_out(model: str) -> str:
    """runs/report-<model name>: never the committed reports/ folders."""
    name = Path(model.rstrip("/")).name or "model"
    return f"runs/report-{name}"


# ----------------------------------------------------------------------------- scan and report


@app.command()
@run_options("scan", out="runs/scan")
def scan(
    ctx: typer.Context, run: RunConfig, opts: RunOptions,
    rho: float = typer.Option(0.5, help="image-centric head threshold on the visual non-sink ratio"),
    summ: float = typer.Option(0.2, help="minimum image attention for a head to be considered"),
    question: str = typer.Option("describe the image .", help="question for a folder of images"),
    image_root: Optional[str] = typer.Option(None, help="root for relative image paths in a .jsonl file"),
    token_stats: str = typer.Option("auto", help="per-token table: all, sinks (BOS, sinks, top image tokens), "
                                    "or auto (all while under ~2M rows)"),
    remote: Optional[str] = _REMOTE,
    batches_per_request: int = _PER_REQUEST,
):
    """Massive activations, sink dimensions, sink tokens and head ratios -> a run folder."""
    run.image_root = image_root

    def build(score: str):
        from sinkscope.analyses.scan import ScanConfig

        return _config(ScanConfig, run, opts, score, rho=rho, summ=summ, question=question, token_stats=token_stats,
                       remote=remote, batches_per_request=batches_per_request)

    _run_analysis(ctx, run, opts, build, "sinkscope.analyses.scan:run_scan", question)


@app.command()
def report(
    ctx: typer.Context,
    model: str = field_option("model"),
    out: Optional[str] = typer.Option(None, help="report folder (default: runs/report-MODEL); every finished step "
                                      "in it is kept, an interrupted one resumes"),
    data: str = field_option("data"),
    limit: int = typer.Option(32, help="samples per step"),
    batch_size: Optional[int] = typer.Option(None, help="samples per forward pass in every step (default: each step's "
                                             "own: 4; patching 8; the VAR evaluation 16)"),
    calibration: int = field_option("calibration", help="samples the report's one calibration (sink dims, tau) uses; "
                                    "every step gets its result"),
    device: Optional[str] = field_option("device"),
    dtype: Optional[str] = field_option("dtype"),
    device_map: Optional[str] = field_option("device_map"),
    max_memory: Optional[str] = field_option("max_memory"),
    seed: int = typer.Option(0, help="seed for random controls and bootstrap"),
    steps: Optional[str] = typer.Option(None, help="comma-separated subset of the report's steps, e.g. scan,heads "
                                        "(default: all; an unknown name lists them)"),
    sink_score: str = field_option("sink_score"),
    tau: Optional[float] = field_option("tau"),
    sink_dims: Optional[str] = field_option("sink_dims"),
    var_questions: Optional[int] = typer.Option(None, help="test questions per POPE split (random, popular, "
                                                "adversarial) in the VAR evaluation (default: limit // 2, at least 8); "
                                                "300 makes a 3-point change visible to McNemar's test"),
    force: bool = typer.Option(False, "--force", help="replace a report made with other settings in --out (its "
                               "step folders, index.md, findings.csv, viewer.html and report.json are deleted first); "
                               "a report with the same settings resumes either way"),
):
    """Every analysis on one model -> one index.md that leads with the findings, plus viewer.html."""
    out = out or default_report_out(model)
    with _one_line_errors(ctx, out):
        run = _run_config(model=model, data=data, limit=limit, calibration=calibration, device=device, dtype=dtype,
                          device_map=device_map, max_memory=max_memory, seed=seed, sink_score=sink_score, tau=tau,
                          sink_dims=sink_dims, **({} if batch_size is None else {"batch_size": batch_size}))
        run.validate()  # before torch is imported: a typo costs a second
        check_out(out)
        from sinkscope.analyses.report import STEPS, ReportConfig, check_report_folder, run_report

        chosen = tuple(s.strip() for s in steps.split(",") if s.strip()) if steps else STEPS
        cfg = ReportConfig(**{**asdict(run), "batch_size": batch_size}, steps=chosen, var_questions=var_questions)
        cfg.validate()  # the steps, --var-questions
        if not force:  # refuse another report's folder at once; with --force, run_report replaces it after every check
            check_report_folder(Path(out), cfg)
        _check_samples(run)
        folder = run_report(out, cfg, log=typer.echo, force=force)  # checks the folder's settings, then loads
    typer.echo(f"wrote {folder}/index.md")


# ----------------------------------------------------------------------------- analyses of section 3


@app.command()
@run_options("heads", out="runs/heads")
def heads(ctx: typer.Context, run: RunConfig, opts: RunOptions,
          rho: float = typer.Option(0.5, help="image-centric head threshold on the visual non-sink ratio"),
          summ: float = typer.Option(0.2, help="minimum image attention for a head to be considered"),
          n_maps: int = typer.Option(2, help="samples whose attention maps are drawn"),
          remote: Optional[str] = _REMOTE, batches_per_request: int = _PER_REQUEST):
    """Heads ranked by attention to visual sinks, attention maps, attention received vs phi (Spearman + CI)."""

    def build(score: str):
        from sinkscope.analyses.heads import HeadsConfig

        return _config(HeadsConfig, run, opts, score, rho=rho, summ=summ, n_maps=n_maps, remote=remote,
                       batches_per_request=batches_per_request)

    _run_analysis(ctx, run, opts, build, "sinkscope.analyses.heads:run_heads")


@app.command()
@run_options("contributions", out="runs/contributions")
def contributions(ctx: typer.Context, run: RunConfig, opts: RunOptions, remote: Optional[str] = _REMOTE,
                  batches_per_request: int = _PER_REQUEST):
    """OV contribution a_ij ||W_O v_j|| of visual sinks against non-sinks, with the ratio's CI."""

    def build(score: str):
        from sinkscope.analyses.contributions import ContributionsConfig

        return _config(ContributionsConfig, run, opts, score, remote=remote, batches_per_request=batches_per_request)

    _run_analysis(ctx, run, opts, build, "sinkscope.analyses.contributions:run_contributions")


@app.command()
@run_options("location", out="runs/location")
def location(ctx: typer.Context, run: RunConfig, opts: RunOptions,
             masks: Optional[str] = typer.Option(None, help="folder with one PNG mask per image (same stem, image "
                                                 "size, 0 = background); default: the demo world's ground truth"),
             remote: Optional[str] = _REMOTE, batches_per_request: int = _PER_REQUEST):
    """Share of visual sinks on background against the base rate: the enrichment and its CI."""

    def build(score: str):
        from sinkscope.analyses.location import LocationConfig

        if masks is not None and not Path(masks).is_dir():
            raise SinkscopeError(f"--masks {masks} is not a folder; give a folder with one PNG mask per image")
        return _config(LocationConfig, run, opts, score, masks=masks, remote=remote,
                       batches_per_request=batches_per_request)

    _run_analysis(ctx, run, opts, build, "sinkscope.analyses.location:run_location")


@app.command("vit-sinks")
@run_options("vit_sinks", out="runs/vit_sinks")
def vit_sinks(ctx: typer.Context, run: RunConfig, opts: RunOptions,
              norm_ratio: float = typer.Option(3.0, help="high-norm: norm >= this x the image's median token norm"),
              remote: Optional[str] = _REMOTE, batches_per_request: int = _PER_REQUEST):
    """High-norm image tokens from the vision tower, and whether D_sink-based detection finds them."""

    def build(score: str):
        from sinkscope.analyses.vit_sinks import VitSinksConfig

        return _config(VitSinksConfig, run, opts, score, norm_ratio=norm_ratio, remote=remote,
                       batches_per_request=batches_per_request)

    _run_analysis(ctx, run, opts, build, "sinkscope.analyses.vit_sinks:run_vit_sinks")


@app.command()
@run_options("ablate", out="runs/ablate", data="yes/no questions with answers")
def ablate(ctx: typer.Context, run: RunConfig, opts: RunOptions,
           taus: Optional[str] = typer.Option(None, help="tau sweep, e.g. 10,20,40 (default: calibrated tau x 0.75, "
                                              "1, 1.5)"),
           layers: Optional[str] = typer.Option(None, help="knockout layers, e.g. 2,3,4 (default all)"),
           n_random: int = typer.Option(5, help="seeds of the random image-token control"),
           renormalize: bool = typer.Option(True, help="renormalise knocked-out rows to sum to 1 (the paper's "
                                            "knockout); --no-renormalize only zeroes the blocked entries, removing "
                                            "what those keys write and nothing else")):
    """Knock out attention to visual sinks vs matched random / top non-sink image tokens / BOS; sweep tau."""
    run.layers = _indices("layers", layers)

    def build(score: str):
        from sinkscope.analyses.ablate import AblateConfig

        return _config(AblateConfig, run, opts, score, taus=parse_floats(taus, "--taus", "10,20,40"),
                       n_random=n_random, renormalize=renormalize)

    _run_analysis(ctx, run, opts, build, "sinkscope.analyses.ablate:run_ablate")


# ----------------------------------------------------------------------------- causal patching


@app.command()
@run_options("patching", out="runs/patching", data="yes/no questions with labels", limit="number of questions",
             batch_size="questions per forward pass")
def patch(ctx: typer.Context, run: RunConfig, opts: RunOptions,
          layers: Optional[str] = typer.Option(None, help="layers patched one at a time, e.g. 2,3 (default all); "
                                              "every-layer rows are always written"),
          rho: float = typer.Option(0.5, help="image-centric head threshold on the visual non-sink ratio"),
          summ: float = typer.Option(0.2, help="minimum image attention of an image-centric head"),
          p: float = typer.Option(0.6, help="VAR's p for the VAR-through-heads sites"),
          var: bool = typer.Option(True, help="also patch VAR-edited head outputs into the baseline run")):
    """Patch visual sinks / object tokens / image-centric heads from an image with the other answer, and
    VAR-edited heads into the baseline; effect on the answer's logit difference with CIs."""
    run.layers = _indices("layers", layers)

    def build(score: str):
        from sinkscope.analyses.patching import PatchConfig

        return _config(PatchConfig, run, opts, score, rho=rho, summ=summ, p=p, var=var)

    _run_analysis(ctx, run, opts, build, "sinkscope.analyses.patching:run_patching")


@app.command("var-eval")
@run_options("var_eval", out="runs/var_eval", data="'demo' (the world's POPE splits) or a POPE question .jsonl (test)",
             limit="test questions per task", batch_size="questions per generate call")
def var_eval(ctx: typer.Context, run: RunConfig, opts: RunOptions,
             validation: Optional[str] = typer.Option(None, help="POPE .jsonl of validation questions for choosing p and "
                                                      "rho (demo: the world's validation split); without it nothing is tuned"),
             image_root: Optional[str] = typer.Option(None, help="image folder of the POPE files (default: their folder)"),
             tasks: str = typer.Option("pope-random,pope-popular,pope-adversarial", help="demo tasks"),
             val_limit: int = typer.Option(60, help="validation questions per task"),
             captions: int = typer.Option(0, help="test captions per condition for CHAIR (demo; 0 = none)"),
             conditions: str = typer.Option(",".join(("baseline", "var", "var_random_heads", "var_all_heads",
                                                      "var_text_budget")), help="conditions to evaluate"),
             p_grid: str = typer.Option("0.3,0.6,0.9", help="p values tried on validation"),
             rho_grid: str = typer.Option("0.3,0.5,0.8", help="rho values tried on validation"),
             p: Optional[float] = typer.Option(None, help="fix p (no tuning of p)"),
             rho: Optional[float] = typer.Option(None, help="fix rho (no tuning of rho)"),
             select_metric: str = typer.Option("f1", help="validation metric that picks p and rho: f1 or accuracy"),
             fused: bool = typer.Option(False, "--compile", help="fuse VAR's edit of each layer with torch.compile "
                                        "(fewer kernel launches per decode step on a GPU; the first generate "
                                        "compiles; var_random_heads runs unfused)")):
    """POPE (and CHAIR) with baseline, VAR and its controls; p and rho chosen on validation, reported on test."""
    run.image_root = image_root

    def build(score: str):
        from sinkscope.analyses.var_eval import VarEvalConfig

        if validation is not None:
            check_data(validation, image_root, option="--validation")
        return _config(VarEvalConfig, run, opts, score, validation=validation,
                       tasks=[t.strip() for t in tasks.split(",") if t.strip()], val_limit=val_limit,
                       captions=captions, conditions=[c.strip() for c in conditions.split(",") if c.strip()],
                       p_grid=parse_floats(p_grid, "--p-grid", "0.3,0.6"),
                       rho_grid=parse_floats(rho_grid, "--rho-grid", "0.5,0.8"), p=p, rho=rho,
                       select_metric=select_metric, compile=fused)

    _run_analysis(ctx, run, opts, build, "sinkscope.analyses.var_eval:run_var_eval")


# ----------------------------------------------------------------------------- sink viewer


@app.command()
def view(
    ctx: typer.Context,
    run_dir: str = typer.Argument(..., help="a scan run folder (the --out of `sinkscope scan`, or REPORT/scan)"),
    out: Optional[str] = typer.Option(None, help="HTML file to write (default: RUN_DIR/viewer.html)"),
    limit: int = typer.Option(4, help="samples in the viewer: the run's first N finished samples, re-traced"),
    model: Optional[str] = typer.Option(None, help="model to re-trace with (default: the run's, from run.json)"),
    data: Optional[str] = typer.Option(None, help="data spec (default: the run's, from run.json)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N, mps (default: the run's, else cpu)"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16, float16 (default: the run's, else the "
                                        "checkpoint's)"),
    seed: int = typer.Option(0, help="unused: the viewer draws no random numbers (kept for a uniform interface)"),
    max_mb: float = typer.Option(64.0, help="megabytes of attention maps the page may hold (every sample's, per "
                                 "text query); where they would not fit, maps of evenly spaced queries (the last "
                                 "included) are kept, and the mean view is still over every query"),
):
    """A self-contained HTML page: pick a sample, layer, head and text token; see its attention over the image,
    the sinks outlined, phi per image token and the head's visual non-sink ratio."""
    with _one_line_errors(ctx, out):
        RunConfig(model=model or "demo", data=data or "demo", limit=limit, device=device, dtype=dtype).validate()
        if out is not None:
            check_out(Path(out).parent)
        from sinkscope import viewer

        path = viewer.write_viewer(run_dir, out, n_samples=limit, model=model, data=data, device=device, dtype=dtype,
                                   log=lambda m: typer.echo(m), max_mb=max_mb)
    typer.echo(f"wrote {path}")


# ----------------------------------------------------------------------------- causal tests of the sink mechanism


def _scales(text: Optional[str]) -> Optional[list[float]]:
    return parse_floats(text, "--scales", "0,0.01,0.1,1") if text else None


def _names(text: Optional[str], option: str, allowed: tuple[str, ...]) -> Optional[list[str]]:
    if not text:
        return None
    names = [x for x in text.replace(" ", "").split(",") if x]
    bad = [x for x in names if x not in allowed]
    if bad:
        with _one_line_errors(None, None):
            raise SinkscopeError(f"{option} takes a comma-separated subset of {', '.join(allowed)}; got {text!r}")
    return names


@app.command()
@run_options("inject", out="runs/inject", data="yes/no questions with answers (for the logit difference and VAR's "
             "accuracy)", limit="number of samples")
def inject(ctx: typer.Context, run: RunConfig, opts: RunOptions,
           scales: Optional[str] = typer.Option(None, help="injection scales in [0, 1] (x the first token's sink-dim "
                                                "values), default 0,0.01,0.03,0.1,0.3,1"),
           groups: Optional[str] = typer.Option(None, help="token groups: background,object,text (default all)"),
           treatments: Optional[str] = typer.Option(None, help="inject and its controls: inject,random_dim,rescale "
                                                    "(default all)"),
           n_tokens: int = typer.Option(2, help="injected tokens per sample and group (matched counts)"),
           n_seeds: int = typer.Option(2, help="draws of tokens and of the control's random dim"),
           layer: Optional[int] = typer.Option(None, help="injection layer (default: the first layer, from the "
                                               "discovery's onset on, where the first token is a sink by the scan's "
                                               "rule)"),
           var: bool = typer.Option(True, help="also run VAR on background tokens injected at --var-scale"),
           var_scale: float = typer.Option(1.0, help="injection scale of the VAR comparison")):
    """Write the sink signature into background / object / text tokens: dose-response with controls, VAR on it."""
    from sinkscope.analyses.inject import GROUPS, TREATMENTS

    def build(score: str):
        from sinkscope.analyses.inject import InjectConfig

        cfg = _config(InjectConfig, run, opts, score, n_tokens=n_tokens, n_seeds=n_seeds, layer=layer, var=var,
                      var_scale=var_scale)
        for name, value in (("scales", _scales(scales)), ("groups", _names(groups, "--groups", GROUPS)),
                            ("treatments", _names(treatments, "--treatments", TREATMENTS))):
            if value is not None:
                setattr(cfg, name, value)
        return cfg

    _run_analysis(ctx, run, opts, build, "sinkscope.analyses.inject:run_inject")


@app.command()
@run_options("remove", out="runs/remove",
             model="as for every command, or 'smollm2' (the demo's language model on its own, for perplexity)",
             data="as for every command, or 'plain-text' (a small public-domain text set shipped with sinkscope, "
             "for perplexity of text-only models)", limit="number of samples",
             calibration="samples for sink dims, tau and the targets' own mean")
def remove(ctx: typer.Context, run: RunConfig, opts: RunOptions,
           targets: Optional[str] = typer.Option(None, help="first,sinks,visual_sinks (default all)"),
           to: Optional[str] = typer.Option(None, help="zero,mean,chosen_mean (default all): zero, the mean over "
                                            "ordinary tokens, or the targets' own mean (Sun et al.)"),
           layers: str = typer.Option("onset", help="onset: edit entering the onset layer only; all: every layer "
                                      "from it on"),
           layer: Optional[int] = typer.Option(None, help="the onset layer (default: from the scan's discovery)")):
    """Take the sink signature away (first token / every sink / visual sinks, to zero or a mean): attention
    redistribution, answer accuracy, text perplexity."""
    from sinkscope.analyses.remove import named_specs
    from sinkscope.interventions.sink_signature import REMOVE_TO, TARGETS

    with _one_line_errors(ctx, opts.out):
        run.model, run.data = named_specs(run.model, run.data)

    def build(score: str):
        from sinkscope.analyses.remove import RemoveConfig

        cfg = _config(RemoveConfig, run, opts, score, layers=layers, layer=layer)
        for name, value in (("targets", _names(targets, "--targets", TARGETS)), ("to", _names(to, "--to", REMOVE_TO))):
            if value is not None:
                setattr(cfg, name, value)
        return cfg

    _run_analysis(ctx, run, opts, build, "sinkscope.analyses.remove:run_remove")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
