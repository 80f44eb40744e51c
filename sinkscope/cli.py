"""`sinkscope` command line: a thin front over sinkscope.analyses.

Every command that runs a model follows one order: parse and validate every input
(`sinkscope.runconfig.RunConfig`, the --out folder, the data's rows), then load the model, then
run. A bad input is one line naming the fix, costs no model load and leaves no folder; Ctrl-C
prints what is saved and the command that resumes. Heavy modules (torch, transformers) are
imported inside the commands, so `sinkscope --help` answers at once.
"""

from __future__ import annotations

import importlib
import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional

import typer

from sinkscope.errors import SinkscopeError
from sinkscope.runconfig import (RunConfig, analysis_default, check_data, check_out, parse_floats, parse_ints, parse_shard,
                                 resolve_sink_score)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Visual attention sinks in large multimodal models: scan, ablate, redistribute.")

INTERRUPTED = 130  # the shell's exit status for Ctrl-C


@app.callback()
def _root() -> None:
    """sinkscope: visual attention sinks in LMMs (see `sinkscope COMMAND --help`)."""


# ----------------------------------------------------------------------------- options every command shares

_MODEL = typer.Option("demo", help="'demo' (SmolLM2-135M LLaVA), 'tiny', 'organism' (planted), a local model "
                      "directory (LMM or causal LM), or a hub id")
_DATA = typer.Option("demo", help="'demo[:task]', a POPE-style .jsonl, a folder of images, or prompts (.txt / .jsonl)")
_RUN = RunConfig()  # the one set of defaults of every command's common options (runconfig.ANALYSIS_DEFAULTS: per analysis)
_LIMIT = typer.Option(_RUN.limit, help="number of samples (the data's first N)")
_CALIBRATION = typer.Option(_RUN.calibration, help="samples used to discover sink dims and choose tau")
_DEVICE = typer.Option(None, help="cpu, cuda, cuda:N or mps (default: cpu, where the model loads)")
_DTYPE = typer.Option(None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
_DEVICE_MAP = typer.Option(None, help="spread the model's layers over devices (accelerate): auto, balanced, "
                           "balanced_low_0, sequential, or a JSON file {module name: device}; instead of --device")
_REMOTE = typer.Option(None, help="local: every trace through nnsight's serialised dry run of NDIF (reductions run "
                       "inside the trace; only they come back)")
_MAX_MEMORY = typer.Option(None, help="per-device caps for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
_SEED = typer.Option(_RUN.seed, help="seed (bootstrap, random controls)")
_TAU = typer.Option(None, help="sink threshold (default: chosen per sink score: 20 or the gap rule for phi, "
                    "100 for the layer-relative score)")
_BATCH = typer.Option(_RUN.batch_size, help="samples per forward pass")
_DIMS = typer.Option(None, help="pin sink dims, e.g. 1415,2533 (default: discover them)")
_SCORE = typer.Option("auto", help="auto: the paper's phi = |x_d / RMS(x)| when sqrt(hidden) >= 40, else the "
                      "layer-relative score (the same rule in every command); rms: phi, at most sqrt(hidden); "
                      "layer: |x_d| / the layer's median token RMS")
_RESUME = typer.Option(True, help="resume an interrupted run in --out")
_NBOOT = typer.Option(1000, help="bootstrap resamples for CIs")


def _out(default: str):
    return typer.Option(default, help="run folder to write (resumed if it exists)")


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
def _one_line_errors(ctx: typer.Context | None, out: str | Path | None) -> Iterator[None]:
    """The user's mistakes, a failing disk and Ctrl-C end in one line (SINKSCOPE_DEBUG=1: the traceback)."""
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
        typer.secho(f"interrupted: {_saved(out)}; resume with: {_resume_command(ctx, out)}", fg=typer.colors.YELLOW,
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


def _resume_command(ctx: typer.Context | None, out: str | Path | None) -> str:
    """The command line that was run, rebuilt from its parsed options, with --out spelled out."""
    if ctx is None:
        return "the same command"
    parts = ["sinkscope", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            parts.append(str(value))
        elif param.name == "out" and out is not None:
            parts += [param.opts[0], str(out)]
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


def _load(run: RunConfig):
    from sinkscope.devices import parse_device_map, parse_max_memory
    from sinkscope.models import load

    return load(run.model, device=run.device, dtype=run.dtype, device_map=parse_device_map(run.device_map),
                max_memory=parse_max_memory(run.max_memory))


# The options every command that loops over samples takes, with one default each (tests/test_cli_defaults.py).
COMMON_SETTINGS = ("calibration", "n_boot", "tau", "seed", "device", "dtype")


def _run_analysis(ctx: typer.Context, run: RunConfig, out: str, resume: bool, build: Callable[[str], object],
                  runner: str, question: str = "describe the image .") -> None:
    """Validate (options, --out, data), then load the model, resolve the sink score, run `runner`."""
    with _one_line_errors(ctx, out):
        run.device_map = run.device_map or ctx.params.get("device_map")  # the command's --device-map, --max-memory
        run.max_memory = run.max_memory or ctx.params.get("max_memory")
        run.calibration = ctx.params.get("calibration", run.calibration)
        run.validate()
        check_out(out)
        cfg = build(run.sink_score)
        for name in COMMON_SETTINGS:  # the options every sample-looping command shares, whatever build() copied
            if name in ctx.params and hasattr(cfg, name) and ctx.params[name] is not None:
                setattr(cfg, name, ctx.params[name])
        cfg.validate()  # the analysis' own options
        _check_samples(run, question)
        adapter = _load(run)
        cfg.sink_score = resolve_sink_score(run.sink_score, adapter.hidden_size)
        module, function = runner.split(":")
        folder = getattr(importlib.import_module(module), function)(out, cfg, adapter=adapter, resume=resume,
                                                                     log=typer.echo)
    typer.echo(f"wrote {folder.path}/index.md")


def _run_config(**fields) -> RunConfig:
    """A RunConfig from CLI strings: --sink-dims and --layers parsed, each with its own message."""
    with _one_line_errors(None, None):
        fields["sink_dims"] = parse_ints(fields.get("sink_dims"), "--sink-dims", "1415,2533")
        fields["layers"] = parse_ints(fields.get("layers"), "--layers", "2,3,4")
        return RunConfig(**fields)


_SHARD = typer.Option(None, help="i/n: only the samples whose index modulo n is i (default: from "
                      "SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE when set); merge with `sinkscope merge`")


# the commands that take --shard: `sinkscope merge` merges their shards
SHARDED = "scan, heads, contributions, location, vit-sinks, ablate, patch, var-eval, remove"
_NO_SHARD = typer.Option(None, hidden=True, help=f"not for this command: only {SHARDED} shard")


def _refuse_shard(command: str, shard: Optional[str]) -> None:
    """--shard on a command whose shards cannot be merged yet (inject: its random draws are made per batch, from one
    generator per run, so a sample's draws depend on its shard): one line naming what does shard."""
    if shard is not None:
        typer.echo(f"Error: {command} does not take --shard yet (its random draws depend on the batch, so its shards "
                   "could not be merged into the unsharded run): run it without "
                   f"--shard; sharded runs: {SHARDED} (merged with `sinkscope merge`)", err=True)
        raise typer.Exit(2)


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
    patch, var-eval or remove) into one, recomputing summaries and figures."""
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
def scan(
    ctx: typer.Context,
    model: str = _MODEL,
    out: str = typer.Option("runs/scan", help="run folder to write (resumed if it exists)"),
    data: str = _DATA,
    limit: Optional[int] = _LIMIT,
    batch_size: int = _BATCH,
    tau: Optional[float] = _TAU,
    sink_dims: Optional[str] = _DIMS,
    calibration: int = _CALIBRATION,
    n_boot: int = _NBOOT,
    rho: float = typer.Option(0.5, help="image-centric head threshold on the visual non-sink ratio"),
    summ: float = typer.Option(0.2, help="minimum image attention for a head to be considered"),
    question: str = typer.Option("describe the image .", help="question for a folder of images"),
    image_root: Optional[str] = typer.Option(None, help="root for relative image paths in a .jsonl file"),
    device: Optional[str] = _DEVICE,
    dtype: Optional[str] = _DTYPE,
    device_map: Optional[str] = _DEVICE_MAP, max_memory: Optional[str] = _MAX_MEMORY,
    seed: int = typer.Option(0, help="torch seed set before the run"),
    token_stats: str = typer.Option("auto", help="per-token table: all, sinks (BOS, sinks, top image tokens), "
                                    "or auto (all while under ~2M rows)"),
    resume: bool = _RESUME,
    sink_score: str = _SCORE,
    remote: Optional[str] = _REMOTE,
    shard: Optional[str] = typer.Option(None, help="i/n: only the samples whose index modulo n is i (default: from "
                                        "SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE when set); merge with "
                                        "`sinkscope merge`"),
):
    """Massive activations, sink dimensions, sink tokens and head ratios -> a run folder."""
    run = _run_config(model=model, data=data, limit=limit, batch_size=batch_size, calibration=calibration,
                      device=device, dtype=dtype, seed=seed, sink_score=sink_score, tau=tau, sink_dims=sink_dims,
                      image_root=image_root)

    def build(score: str):
        from sinkscope.analyses.scan import ScanConfig

        return ScanConfig(model=model, data=data, limit=limit, batch_size=batch_size, tau=tau, sink_dims=run.sink_dims,
                          calibration=calibration, rho=rho, summ=summ, question=question, image_root=image_root,
                          device=device, dtype=dtype, seed=seed, token_stats=token_stats, sink_score=score,
                          remote=remote, shard=_shard(shard))

    _run_analysis(ctx, run, out, resume, build, "sinkscope.analyses.scan:run_scan", question)


@app.command()
def report(
    ctx: typer.Context,
    model: str = _MODEL,
    out: Optional[str] = typer.Option(None, help="report folder (default: runs/report-MODEL); every finished step "
                                      "in it is kept, an interrupted one resumes"),
    data: str = _DATA,
    limit: int = typer.Option(32, help="samples per step"),
    device: Optional[str] = _DEVICE,
    dtype: Optional[str] = _DTYPE,
    seed: int = typer.Option(0, help="seed for random controls and bootstrap"),
    steps: Optional[str] = typer.Option(None, help="comma-separated subset of the report's steps, e.g. scan,heads "
                                        "(default: all; an unknown name lists them)"),
    sink_score: str = _SCORE,
    tau: Optional[float] = _TAU,
    var_questions: Optional[int] = typer.Option(None, help="test questions per POPE split (random, popular, "
                                                "adversarial) in the VAR evaluation (default: limit // 2, at least 8); "
                                                "300 makes a 3-point change visible to McNemar's test"),
    force: bool = typer.Option(False, "--force", help="replace a report made with other settings in --out (its "
                               "step folders, index.md, findings.csv, viewer.html and report.json are deleted first); "
                               "a report with the same settings resumes either way"),
):
    """Every analysis on one model -> one index.md that leads with the findings, plus viewer.html."""
    out = out or default_report_out(model)
    run = _run_config(model=model, data=data, limit=limit, device=device, dtype=dtype, seed=seed,
                      sink_score=sink_score, tau=tau)
    with _one_line_errors(ctx, out):
        run.validate()
        check_out(out)
        from sinkscope.analyses.report import STEPS, ReportConfig, check_report_folder, run_report

        chosen = tuple(s.strip() for s in steps.split(",") if s.strip()) if steps else STEPS
        cfg = ReportConfig(model=model, data=data, limit=limit, device=device, dtype=dtype, seed=seed, steps=chosen,
                           sink_score=sink_score, tau=tau, var_questions=var_questions)
        cfg.validate()  # the steps
        if not force:  # refuse another report's folder at once; with --force, run_report replaces it after every check
            check_report_folder(Path(out), cfg)
        _check_samples(run)
        folder = run_report(out, cfg, log=typer.echo, force=force)  # checks the folder's settings, then loads
    typer.echo(f"wrote {folder}/index.md")


# ----------------------------------------------------------------------------- analyses of section 3


@app.command()
def heads(ctx: typer.Context, model: str = _MODEL, data: str = _DATA, out: str = _out("runs/heads"),
          limit: Optional[int] = _LIMIT,
          batch_size: int = _BATCH, tau: Optional[float] = _TAU, sink_dims: Optional[str] = _DIMS, calibration: int = _CALIBRATION,
          rho: float = typer.Option(0.5, help="image-centric head threshold on the visual non-sink ratio"),
          summ: float = typer.Option(0.2, help="minimum image attention for a head to be considered"),
          n_maps: int = typer.Option(2, help="samples whose attention maps are drawn"),
          device: Optional[str] = _DEVICE, dtype: Optional[str] = _DTYPE, seed: int = _SEED, n_boot: int = _NBOOT,
          device_map: Optional[str] = _DEVICE_MAP, max_memory: Optional[str] = _MAX_MEMORY,
          sink_score: str = _SCORE, resume: bool = _RESUME, remote: Optional[str] = _REMOTE,
          shard: Optional[str] = _SHARD):
    """Heads ranked by attention to visual sinks, attention maps, attention received vs phi (Spearman + CI)."""
    run = _run_config(model=model, data=data, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                      seed=seed, sink_score=sink_score, tau=tau, sink_dims=sink_dims)

    def build(score: str):
        from sinkscope.analyses.heads import HeadsConfig

        return HeadsConfig(model=model, data=data, limit=limit, batch_size=batch_size, tau=tau, sink_dims=run.sink_dims,
                           rho=rho, summ=summ, n_maps=n_maps, device=device, dtype=dtype, seed=seed, n_boot=n_boot,
                           remote=remote, sink_score=score, shard=_shard(shard))

    _run_analysis(ctx, run, out, resume, build, "sinkscope.analyses.heads:run_heads")


@app.command()
def contributions(ctx: typer.Context, model: str = _MODEL, data: str = _DATA, out: str = _out("runs/contributions"),
                  limit: Optional[int] = _LIMIT, batch_size: int = _BATCH, tau: Optional[float] = _TAU,
                  sink_dims: Optional[str] = _DIMS, calibration: int = _CALIBRATION, device: Optional[str] = _DEVICE, dtype: Optional[str] = _DTYPE,
                  device_map: Optional[str] = _DEVICE_MAP, max_memory: Optional[str] = _MAX_MEMORY,
                  seed: int = _SEED, n_boot: int = _NBOOT, sink_score: str = _SCORE, resume: bool = _RESUME,
                  shard: Optional[str] = _SHARD):
    """OV contribution a_ij ||W_O v_j|| of visual sinks against non-sinks, with the ratio's CI."""
    run = _run_config(model=model, data=data, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                      seed=seed, sink_score=sink_score, tau=tau, sink_dims=sink_dims)

    def build(score: str):
        from sinkscope.analyses.contributions import ContributionsConfig

        return ContributionsConfig(model=model, data=data, limit=limit, batch_size=batch_size, tau=tau,
                                   sink_dims=run.sink_dims, device=device, dtype=dtype, seed=seed, n_boot=n_boot,
                                   sink_score=score, shard=_shard(shard))

    _run_analysis(ctx, run, out, resume, build, "sinkscope.analyses.contributions:run_contributions")


@app.command()
def location(ctx: typer.Context, model: str = _MODEL, data: str = _DATA, out: str = _out("runs/location"),
             limit: Optional[int] = _LIMIT, masks: Optional[str] = typer.Option(
                 None, help="folder with one PNG mask per image (same stem, image size, 0 = background); "
                 "default: the demo world's ground truth"),
             batch_size: int = _BATCH, tau: Optional[float] = _TAU, sink_dims: Optional[str] = _DIMS, calibration: int = _CALIBRATION,
             device: Optional[str] = _DEVICE, dtype: Optional[str] = _DTYPE, seed: int = _SEED, n_boot: int = _NBOOT,
             device_map: Optional[str] = _DEVICE_MAP, max_memory: Optional[str] = _MAX_MEMORY,
             sink_score: str = _SCORE, resume: bool = _RESUME, shard: Optional[str] = _SHARD):
    """Share of visual sinks on background against the base rate: the enrichment and its CI."""
    run = _run_config(model=model, data=data, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                      seed=seed, sink_score=sink_score, tau=tau, sink_dims=sink_dims)

    def build(score: str):
        from sinkscope.analyses.location import LocationConfig

        if masks is not None and not Path(masks).is_dir():
            raise SinkscopeError(f"--masks {masks} is not a folder; give a folder with one PNG mask per image")
        return LocationConfig(model=model, data=data, limit=limit, masks=masks, batch_size=batch_size, tau=tau,
                              sink_dims=run.sink_dims, device=device, dtype=dtype, seed=seed, n_boot=n_boot,
                              sink_score=score, shard=_shard(shard))

    _run_analysis(ctx, run, out, resume, build, "sinkscope.analyses.location:run_location")


@app.command("vit-sinks")
def vit_sinks(ctx: typer.Context, model: str = _MODEL, data: str = _DATA, out: str = _out("runs/vit_sinks"),
              limit: Optional[int] = _LIMIT, norm_ratio: float = typer.Option(3.0, help="high-norm: norm >= this x the "
                                                                              "image's median token norm"),
              batch_size: int = _BATCH, tau: Optional[float] = _TAU, sink_dims: Optional[str] = _DIMS, calibration: int = _CALIBRATION,
              device: Optional[str] = _DEVICE, dtype: Optional[str] = _DTYPE, seed: int = _SEED, n_boot: int = _NBOOT,
              device_map: Optional[str] = _DEVICE_MAP, max_memory: Optional[str] = _MAX_MEMORY,
              sink_score: str = _SCORE, resume: bool = _RESUME, shard: Optional[str] = _SHARD):
    """High-norm image tokens from the vision tower, and whether D_sink-based detection finds them."""
    run = _run_config(model=model, data=data, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                      seed=seed, sink_score=sink_score, tau=tau, sink_dims=sink_dims)

    def build(score: str):
        from sinkscope.analyses.vit_sinks import VitSinksConfig

        return VitSinksConfig(model=model, data=data, limit=limit, norm_ratio=norm_ratio, batch_size=batch_size,
                              tau=tau, sink_dims=run.sink_dims, device=device, dtype=dtype, seed=seed, n_boot=n_boot,
                              sink_score=score, shard=_shard(shard))

    _run_analysis(ctx, run, out, resume, build, "sinkscope.analyses.vit_sinks:run_vit_sinks")


@app.command()
def ablate(ctx: typer.Context, model: str = _MODEL,
           data: str = typer.Option(analysis_default("ablate", "data"), help="yes/no questions with answers"),
           out: str = _out("runs/ablate"), limit: Optional[int] = _LIMIT,
           batch_size: int = _BATCH,
           taus: Optional[str] = typer.Option(None, help="tau sweep, e.g. 10,20,40 (default: calibrated tau x 0.75, "
                                              "1, 1.5)"),
           layers: Optional[str] = typer.Option(None, help="knockout layers, e.g. 2,3,4 (default all)"),
           n_random: int = typer.Option(5, help="seeds of the random image-token control"),
           tau: Optional[float] = _TAU, sink_dims: Optional[str] = _DIMS, calibration: int = _CALIBRATION, device: Optional[str] = _DEVICE, dtype: Optional[str] = _DTYPE,
           device_map: Optional[str] = _DEVICE_MAP, max_memory: Optional[str] = _MAX_MEMORY,
           seed: int = _SEED, n_boot: int = _NBOOT, sink_score: str = _SCORE, resume: bool = _RESUME,
           renormalize: bool = typer.Option(True, help="renormalise knocked-out rows to sum to 1 (the paper's "
                                            "knockout); --no-renormalize only zeroes the blocked entries, removing "
                                            "what those keys write and nothing else"),
           shard: Optional[str] = _SHARD):
    """Knock out attention to visual sinks vs matched random / top non-sink image tokens / BOS; sweep tau."""
    run = _run_config(model=model, data=data, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                      seed=seed, sink_score=sink_score, sink_dims=sink_dims, layers=layers)

    def build(score: str):
        from sinkscope.analyses.ablate import AblateConfig

        return AblateConfig(model=model, data=data, limit=limit, batch_size=batch_size,
                            taus=parse_floats(taus, "--taus", "10,20,40"), layers=run.layers, n_random=n_random,
                            sink_dims=run.sink_dims, device=device, dtype=dtype, seed=seed, n_boot=n_boot,
                            sink_score=score, renormalize=renormalize, shard=_shard(shard))

    _run_analysis(ctx, run, out, resume, build, "sinkscope.analyses.ablate:run_ablate")


# ----------------------------------------------------------------------------- causal patching


@app.command()
def patch(ctx: typer.Context, model: str = _MODEL,
          data: str = typer.Option(analysis_default("patching", "data"), help="yes/no questions with labels"),
          out: str = _out("runs/patching"), limit: Optional[int] = typer.Option(_RUN.limit, help="number of questions"),
          batch_size: int = typer.Option(analysis_default("patching", "batch_size"), help="questions per forward pass"),
          layers: Optional[str] = typer.Option(None, help="layers patched one at a time, e.g. 2,3 (default all); "
                                              "every-layer rows are always written"),
          rho: float = typer.Option(0.5, help="image-centric head threshold on the visual non-sink ratio"),
          summ: float = typer.Option(0.2, help="minimum image attention of an image-centric head"),
          p: float = typer.Option(0.6, help="VAR's p for the VAR-through-heads sites"),
          var: bool = typer.Option(True, help="also patch VAR-edited head outputs into the baseline run"),
          tau: Optional[float] = _TAU, sink_dims: Optional[str] = _DIMS, calibration: int = _CALIBRATION, device: Optional[str] = _DEVICE,
          dtype: Optional[str] = _DTYPE, seed: int = _SEED, n_boot: int = _NBOOT, sink_score: str = _SCORE,
          device_map: Optional[str] = _DEVICE_MAP, max_memory: Optional[str] = _MAX_MEMORY,
          resume: bool = _RESUME, shard: Optional[str] = _SHARD):
    """Patch visual sinks / object tokens / image-centric heads from an image with the other answer, and
    VAR-edited heads into the baseline; effect on the answer's logit difference with CIs."""
    run = _run_config(model=model, data=data, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                      seed=seed, sink_score=sink_score, tau=tau, sink_dims=sink_dims, layers=layers)

    def build(score: str):
        from sinkscope.analyses.patching import PatchConfig

        return PatchConfig(model=model, data=data, limit=limit, batch_size=batch_size, layers=run.layers, rho=rho,
                           summ=summ, p=p, var=var, tau=tau, sink_dims=run.sink_dims, device=device, dtype=dtype,
                           seed=seed, n_boot=n_boot, sink_score=score, shard=_shard(shard))

    _run_analysis(ctx, run, out, resume, build, "sinkscope.analyses.patching:run_patching")


@app.command("var-eval")
def var_eval(ctx: typer.Context, model: str = _MODEL,
             data: str = typer.Option("demo", help="'demo' (the world's POPE splits) or a POPE question .jsonl (test)"),
             validation: Optional[str] = typer.Option(None, help="POPE .jsonl of validation questions for choosing p and "
                                                      "rho (demo: the world's validation split); without it nothing is tuned"),
             image_root: Optional[str] = typer.Option(None, help="image folder of the POPE files (default: their folder)"),
             out: str = _out("runs/var_eval"),
             tasks: str = typer.Option("pope-random,pope-popular,pope-adversarial", help="demo tasks"),
             limit: int = typer.Option(analysis_default("var_eval", "limit"), help="test questions per task"),
             val_limit: int = typer.Option(60, help="validation questions per task"),
             captions: int = typer.Option(0, help="test captions per condition for CHAIR (demo; 0 = none)"),
             conditions: str = typer.Option(",".join(("baseline", "var", "var_random_heads", "var_all_heads",
                                                      "var_text_budget")), help="conditions to evaluate"),
             p_grid: str = typer.Option("0.3,0.6,0.9", help="p values tried on validation"),
             rho_grid: str = typer.Option("0.3,0.5,0.8", help="rho values tried on validation"),
             p: Optional[float] = typer.Option(None, help="fix p (no tuning of p)"),
             rho: Optional[float] = typer.Option(None, help="fix rho (no tuning of rho)"),
             select_metric: str = typer.Option("f1", help="validation metric that picks p and rho: f1 or accuracy"),
             batch_size: int = typer.Option(analysis_default("var_eval", "batch_size"), help="questions per generate call"),
             tau: Optional[float] = _TAU, sink_dims: Optional[str] = _DIMS, calibration: int = _CALIBRATION, device: Optional[str] = _DEVICE,
             dtype: Optional[str] = _DTYPE, seed: int = _SEED, n_boot: int = _NBOOT, sink_score: str = _SCORE,
             device_map: Optional[str] = _DEVICE_MAP, max_memory: Optional[str] = _MAX_MEMORY,
             resume: bool = _RESUME, shard: Optional[str] = _SHARD):
    """POPE (and CHAIR) with baseline, VAR and its controls; p and rho chosen on validation, reported on test."""
    run = _run_config(model=model, data=data, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                      seed=seed, sink_score=sink_score, tau=tau, sink_dims=sink_dims, image_root=image_root)

    def build(score: str):
        from sinkscope.analyses.var_eval import VarEvalConfig

        if validation is not None:
            check_data(validation, image_root, option="--validation")
        return VarEvalConfig(model=model, data=data, validation=validation, image_root=image_root,
                             tasks=[t.strip() for t in tasks.split(",") if t.strip()], limit=limit, val_limit=val_limit,
                             captions=captions, conditions=[c.strip() for c in conditions.split(",") if c.strip()],
                             p_grid=parse_floats(p_grid, "--p-grid", "0.3,0.6"),
                             rho_grid=parse_floats(rho_grid, "--rho-grid", "0.5,0.8"), p=p, rho=rho,
                             select_metric=select_metric, batch_size=batch_size, tau=tau, sink_dims=run.sink_dims,
                             device=device, dtype=dtype, seed=seed, n_boot=n_boot, sink_score=score,
                             shard=_shard(shard))

    _run_analysis(ctx, run, out, resume, build, "sinkscope.analyses.var_eval:run_var_eval")


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
):
    """A self-contained HTML page: pick a sample, layer, head and text token; see its attention over the image,
    the sinks outlined, phi per image token and the head's visual non-sink ratio."""
    with _one_line_errors(ctx, out):
        RunConfig(model=model or "demo", data=data or "demo", limit=limit, device=device, dtype=dtype).validate()
        if out is not None:
            check_out(Path(out).parent)
        from sinkscope import viewer

        path = viewer.write_viewer(run_dir, out, n_samples=limit, model=model, data=data, device=device, dtype=dtype,
                                   log=lambda m: typer.echo(m))
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
def inject(ctx: typer.Context, model: str = _MODEL,
           data: str = typer.Option(analysis_default("inject", "data"), help="yes/no questions with answers (for the logit "
                                    "difference and VAR's accuracy)"),
           out: str = _out("runs/inject"), limit: Optional[int] = typer.Option(analysis_default("inject", "limit"),
                                                                               help="number of samples"),
           batch_size: int = _BATCH,
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
           var_scale: float = typer.Option(1.0, help="injection scale of the VAR comparison"),
           sink_dims: Optional[str] = _DIMS, calibration: int = _CALIBRATION, tau: Optional[float] = _TAU, device: Optional[str] = _DEVICE,
           dtype: Optional[str] = _DTYPE, seed: int = _SEED, n_boot: int = _NBOOT, sink_score: str = _SCORE,
           device_map: Optional[str] = _DEVICE_MAP, max_memory: Optional[str] = _MAX_MEMORY,
           resume: bool = _RESUME, shard: Optional[str] = _NO_SHARD):
    """Write the sink signature into background / object / text tokens: dose-response with controls, VAR on it."""
    _refuse_shard("inject", shard)
    from sinkscope.analyses.inject import GROUPS, TREATMENTS

    run = _run_config(model=model, data=data, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                      seed=seed, sink_score=sink_score, sink_dims=sink_dims, tau=tau)

    def build(score: str):
        from sinkscope.analyses.inject import InjectConfig

        cfg = InjectConfig(model=model, data=data, limit=limit, batch_size=batch_size, n_tokens=n_tokens,
                           n_seeds=n_seeds, layer=layer, var=var, var_scale=var_scale, sink_dims=run.sink_dims,
                           tau=tau, device=device, dtype=dtype, seed=seed, n_boot=n_boot, sink_score=score)
        for name, value in (("scales", _scales(scales)), ("groups", _names(groups, "--groups", GROUPS)),
                            ("treatments", _names(treatments, "--treatments", TREATMENTS))):
            if value is not None:
                setattr(cfg, name, value)
        return cfg

    _run_analysis(ctx, run, out, resume, build, "sinkscope.analyses.inject:run_inject")


@app.command()
def remove(ctx: typer.Context,
           model: str = typer.Option("demo", help="as for every command, or 'smollm2' (the demo's language model "
                                     "on its own, for perplexity)"),
           data: str = typer.Option(analysis_default("remove", "data"), help="as for every command, or 'plain-text' (a small public-domain "
                                    "text set shipped with sinkscope, for perplexity of text-only models)"),
           out: str = _out("runs/remove"), limit: Optional[int] = typer.Option(analysis_default("remove", "limit"),
                                                                               help="number of samples"),
           batch_size: int = _BATCH,
           targets: Optional[str] = typer.Option(None, help="first,sinks,visual_sinks (default all)"),
           to: Optional[str] = typer.Option(None, help="zero,mean,chosen_mean (default all): zero, the mean over "
                                            "ordinary tokens, or the targets' own mean (Sun et al.)"),
           layers: str = typer.Option("onset", help="onset: edit entering the onset layer only; all: every layer "
                                      "from it on"),
           layer: Optional[int] = typer.Option(None, help="the onset layer (default: from the scan's discovery)"),
           calibration: int = typer.Option(_RUN.calibration, help="samples for sink dims, tau and the targets' own mean"),
           sink_dims: Optional[str] = _DIMS, tau: Optional[float] = _TAU, device: Optional[str] = _DEVICE,
           dtype: Optional[str] = _DTYPE, seed: int = _SEED, n_boot: int = _NBOOT, sink_score: str = _SCORE,
           device_map: Optional[str] = _DEVICE_MAP, max_memory: Optional[str] = _MAX_MEMORY,
           resume: bool = _RESUME, shard: Optional[str] = _SHARD):
    """Take the sink signature away (first token / every sink / visual sinks, to zero or a mean): attention
    redistribution, answer accuracy, text perplexity."""
    from sinkscope.analyses.remove import named_specs
    from sinkscope.interventions.sink_signature import REMOVE_TO, TARGETS

    with _one_line_errors(ctx, out):
        model, data = named_specs(model, data)
    run = _run_config(model=model, data=data, limit=limit, batch_size=batch_size, calibration=calibration,
                      device=device, dtype=dtype, seed=seed, sink_score=sink_score, sink_dims=sink_dims, tau=tau)

    def build(score: str):
        from sinkscope.analyses.remove import RemoveConfig

        cfg = RemoveConfig(model=model, data=data, limit=limit, batch_size=batch_size, layers=layers, layer=layer,
                           calibration=calibration, sink_dims=run.sink_dims, tau=tau, device=device, dtype=dtype,
                           seed=seed, n_boot=n_boot, sink_score=score, shard=_shard(shard))
        for name, value in (("targets", _names(targets, "--targets", TARGETS)), ("to", _names(to, "--to", REMOVE_TO))):
            if value is not None:
                setattr(cfg, name, value)
        return cfg

    _run_analysis(ctx, run, out, resume, build, "sinkscope.analyses.remove:run_remove")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
