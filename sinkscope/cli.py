"""`sinkscope` command line: a thin front over sinkscope.analyses."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from sinkscope.models.base import SinkscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Visual attention sinks in large multimodal models: scan, ablate, redistribute.")


@app.callback()
def _root() -> None:
    """sinkscope: visual attention sinks in LMMs (see `sinkscope COMMAND --help`)."""


def _dims(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as err:
        raise SinkscopeError(f"--sink-dims must be comma-separated integers like 1415,2533; got {text!r}") from err


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def scan(
    model: str = typer.Option("demo", help="'demo', 'organism', a local model directory, or a hub id"),
    out: str = typer.Option("runs/scan", help="run folder to write (resumed if it exists)"),
    data: str = typer.Option("demo", help="'demo[:task]', a POPE-style .jsonl file, or a folder of images"),
    limit: Optional[int] = typer.Option(32, help="number of samples (the data's first N)"),
    batch_size: int = typer.Option(4, help="samples per forward pass"),
    tau: Optional[float] = typer.Option(None, help="sink threshold on phi (default: 20 for wide models, else gap rule)"),
    sink_dims: Optional[str] = typer.Option(None, help="pin sink dims, e.g. 1415,2533 (default: discover)"),
    calibration: int = typer.Option(16, help="samples used to discover sink dims and choose tau"),
    rho: float = typer.Option(0.5, help="image-centric head threshold on the visual non-sink ratio"),
    summ: float = typer.Option(0.2, help="minimum image attention for a head to be considered"),
    question: str = typer.Option("describe the image .", help="question for a folder of images"),
    image_root: Optional[str] = typer.Option(None, help="root for relative image paths in a .jsonl file"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N or mps (default: cpu, where the model loads)"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: the checkpoint's)"),
    seed: int = typer.Option(0, help="torch seed set before the run"),
    token_stats: str = typer.Option("auto", help="per-token table: all, sinks (BOS, sinks, top image tokens), "
                                    "or auto (all while under ~2M rows)"),
    resume: bool = typer.Option(True, help="resume an interrupted run in --out"),
    sink_score: str = typer.Option("rms", help="rms: the paper's phi = |x_d / RMS(x)| (at most sqrt(hidden)); "
                                   "layer: |x_d| / the layer's median token RMS, for narrow models where phi "
                                   "saturates (default tau 100)"),
):
    """Massive activations, sink dimensions, sink tokens and head ratios -> a run folder."""
    from sinkscope.analyses.scan import ScanConfig, run_scan

    try:
        cfg = ScanConfig(model=model, data=data, limit=limit, batch_size=batch_size, tau=tau,
                         sink_dims=_dims(sink_dims), calibration=calibration, rho=rho, summ=summ,
                         question=question, image_root=image_root, device=device, dtype=dtype, seed=seed,
                         token_stats=token_stats, sink_score=sink_score)
        folder = run_scan(out, cfg, resume=resume, log=lambda m: typer.echo(m))
    except SinkscopeError as err:
        _fail(err)
    typer.echo(f"wrote {folder.path}/index.md")


@app.command()
def report(
    model: str = typer.Option("demo", help="'demo' (SmolLM2-135M LLaVA), 'tiny', 'organism' (planted), a local model "
                              "directory, or a hub id"),
    out: str = typer.Option("reports/demo", help="report folder; every finished step in it is kept, an interrupted "
                            "one resumes"),
    data: str = typer.Option("demo", help="'demo[:task]', a POPE-style .jsonl file, or a folder of images"),
    limit: int = typer.Option(32, help="samples per step"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: where the model loads)"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16, float16 (default: the checkpoint's)"),
    seed: int = typer.Option(0, help="seed for random controls and bootstrap"),
    steps: Optional[str] = typer.Option(None, help="comma-separated subset of: scan, heads, ablate, contributions, "
                                        "location, vit_sinks, var_eval, patching (default: all)"),
    sink_score: str = typer.Option("auto", help="auto (the paper's phi when sqrt(hidden) >= 40, else layer-relative), "
                                   "rms, or layer"),
    tau: Optional[float] = typer.Option(None, help="sink threshold (default: chosen per sink score)"),
):
    """Every analysis on one model -> one index.md that leads with the findings, plus viewer.html."""
    from sinkscope.analyses.report import STEPS, ReportConfig, run_report

    try:
        cfg = ReportConfig(model=model, data=data, limit=limit, device=device, dtype=dtype, seed=seed,
                           steps=tuple(s.strip() for s in steps.split(",")) if steps else STEPS,
                           sink_score=sink_score, tau=tau)
        folder = run_report(out, cfg, log=lambda m: typer.echo(m))
    except SinkscopeError as err:
        _fail(err)
    typer.echo(f"wrote {folder}/index.md")


# ----------------------------------------------------------------------------- analyses of section 3 (issue 7)

_MODEL = typer.Option("demo", help="'demo', 'organism', 'tiny', a local model directory (LMM or causal LM), or a hub id")
_DATA = typer.Option("demo", help="'demo[:task]', a POPE-style .jsonl, a folder of images, or prompts (.txt / .jsonl)")
_LIMIT = typer.Option(16, help="number of samples (the data's first N)")
_DEVICE = typer.Option(None, help="cpu, cuda, cuda:N or mps (default: cpu, where the model loads)")
_DTYPE = typer.Option(None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
_SEED = typer.Option(0, help="seed (bootstrap, random controls)")
_TAU = typer.Option(None, help="sink threshold on phi (default: 20 for wide models, else the gap rule, as in "
                    "`sinkscope scan`)")
_BATCH = typer.Option(4, help="samples per forward pass")
_DIMS = typer.Option(None, help="pin sink dims, e.g. 1415,2533 (default: discover them)")
_SCORE = typer.Option("rms", help="rms: the paper's phi; layer: layer-relative score for narrow models")
_RESUME = typer.Option(True, help="resume an interrupted run in --out")


_NBOOT = typer.Option(1000, help="bootstrap resamples for CIs")


def _out(default: str):
    return typer.Option(default, help="run folder to write (resumed if it exists)")


def _run_analysis(runner, cfg, out: str, resume: bool) -> None:
    try:
        folder = runner(out, cfg, resume=resume, log=lambda m: typer.echo(m))
    except SinkscopeError as err:
        _fail(err)
    typer.echo(f"wrote {folder.path}/index.md")


@app.command()
def heads(model: str = _MODEL, data: str = _DATA, out: str = _out("runs/heads"), limit: Optional[int] = _LIMIT,
          batch_size: int = _BATCH, tau: Optional[float] = _TAU, sink_dims: Optional[str] = _DIMS,
          rho: float = typer.Option(0.5, help="image-centric head threshold on the visual non-sink ratio"),
          summ: float = typer.Option(0.2, help="minimum image attention for a head to be considered"),
          n_maps: int = typer.Option(2, help="samples whose attention maps are drawn"),
          device: Optional[str] = _DEVICE, dtype: Optional[str] = _DTYPE, seed: int = _SEED, n_boot: int = _NBOOT,
          sink_score: str = _SCORE, resume: bool = _RESUME):
    """Heads ranked by attention to visual sinks, attention maps, attention received vs phi (Spearman + CI)."""
    from sinkscope.analyses.heads import HeadsConfig, run_heads

    try:
        cfg = HeadsConfig(model=model, data=data, limit=limit, batch_size=batch_size, tau=tau, sink_dims=_dims(sink_dims),
                          rho=rho, summ=summ, n_maps=n_maps, device=device, dtype=dtype, seed=seed, n_boot=n_boot, sink_score=sink_score)
    except SinkscopeError as err:
        _fail(err)
    _run_analysis(run_heads, cfg, out, resume)


@app.command()
def contributions(model: str = _MODEL, data: str = _DATA, out: str = _out("runs/contributions"),
                  limit: Optional[int] = _LIMIT, batch_size: int = _BATCH, tau: Optional[float] = _TAU,
                  sink_dims: Optional[str] = _DIMS, device: Optional[str] = _DEVICE, dtype: Optional[str] = _DTYPE, seed: int = _SEED,
                  n_boot: int = _NBOOT, sink_score: str = _SCORE, resume: bool = _RESUME):
    """OV contribution a_ij ||W_O v_j|| of visual sinks against non-sinks, with the ratio's CI."""
    from sinkscope.analyses.contributions import ContributionsConfig, run_contributions

    try:
        cfg = ContributionsConfig(model=model, data=data, limit=limit, batch_size=batch_size, tau=tau,
                                  sink_dims=_dims(sink_dims), device=device, dtype=dtype, seed=seed, n_boot=n_boot, sink_score=sink_score)
    except SinkscopeError as err:
        _fail(err)
    _run_analysis(run_contributions, cfg, out, resume)


@app.command()
def location(model: str = _MODEL, data: str = _DATA, out: str = _out("runs/location"),
             limit: Optional[int] = _LIMIT, masks: Optional[str] = typer.Option(
                 None, help="folder with one PNG mask per image (same stem, image size, 0 = background); "
                 "default: the demo world's ground truth"),
             batch_size: int = _BATCH, tau: Optional[float] = _TAU, sink_dims: Optional[str] = _DIMS,
             device: Optional[str] = _DEVICE, dtype: Optional[str] = _DTYPE, seed: int = _SEED, n_boot: int = _NBOOT,
             sink_score: str = _SCORE, resume: bool = _RESUME):
    """Share of visual sinks on background against the base rate: the enrichment and its CI."""
    from sinkscope.analyses.location import LocationConfig, run_location

    try:
        cfg = LocationConfig(model=model, data=data, limit=limit, masks=masks, batch_size=batch_size, tau=tau,
                             sink_dims=_dims(sink_dims), device=device, dtype=dtype, seed=seed, n_boot=n_boot, sink_score=sink_score)
    except SinkscopeError as err:
        _fail(err)
    _run_analysis(run_location, cfg, out, resume)


@app.command("vit-sinks")
def vit_sinks(model: str = _MODEL, data: str = _DATA, out: str = _out("runs/vit_sinks"),
              limit: Optional[int] = _LIMIT, norm_ratio: float = typer.Option(3.0, help="high-norm: norm >= this x the "
                                                                              "image's median token norm"),
              batch_size: int = _BATCH, tau: Optional[float] = _TAU, sink_dims: Optional[str] = _DIMS,
              device: Optional[str] = _DEVICE, dtype: Optional[str] = _DTYPE, seed: int = _SEED, n_boot: int = _NBOOT,
              sink_score: str = _SCORE, resume: bool = _RESUME):
    """High-norm image tokens from the vision tower, and whether D_sink-based detection finds them."""
    from sinkscope.analyses.vit_sinks import VitSinksConfig, run_vit_sinks

    try:
        cfg = VitSinksConfig(model=model, data=data, limit=limit, norm_ratio=norm_ratio, batch_size=batch_size, tau=tau,
                             sink_dims=_dims(sink_dims), device=device, dtype=dtype, seed=seed, n_boot=n_boot, sink_score=sink_score)
    except SinkscopeError as err:
        _fail(err)
    _run_analysis(run_vit_sinks, cfg, out, resume)


def _floats(text: Optional[str]) -> Optional[list[float]]:
    if not text:
        return None
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as err:
        raise SinkscopeError(f"expected comma-separated numbers like 5,10,20; got {text!r}") from err


@app.command()
def ablate(model: str = _MODEL, data: str = typer.Option("demo:pope-adversarial", help="yes/no questions with answers"),
           out: str = _out("runs/ablate"), limit: Optional[int] = _LIMIT, batch_size: int = typer.Option(8, help="samples per forward pass"),
           taus: Optional[str] = typer.Option(None, help="tau sweep, e.g. 10,20,40 (default: calibrated tau x 0.75, 1, 1.5)"),
           layers: Optional[str] = typer.Option(None, help="knockout layers, e.g. 2,3,4 (default all)"),
           n_random: int = typer.Option(5, help="seeds of the random image-token control"),
           sink_dims: Optional[str] = _DIMS, device: Optional[str] = _DEVICE, dtype: Optional[str] = _DTYPE, seed: int = _SEED,
           n_boot: int = _NBOOT, sink_score: str = _SCORE, resume: bool = _RESUME,
           renormalize: bool = typer.Option(True, help="renormalise knocked-out rows to sum to 1 (the paper's "
                                            "knockout); --no-renormalize only zeroes the blocked entries, removing "
                                            "what those keys write and nothing else")):
    """Knock out attention to visual sinks vs matched random / top non-sink image tokens / BOS; sweep tau."""
    from sinkscope.analyses.ablate import AblateConfig, run_ablate

    try:
        cfg = AblateConfig(model=model, data=data, limit=limit, batch_size=batch_size, taus=_floats(taus),
                           layers=_dims(layers), n_random=n_random, sink_dims=_dims(sink_dims), device=device, dtype=dtype, seed=seed,
                           n_boot=n_boot, sink_score=sink_score, renormalize=renormalize)
    except SinkscopeError as err:
        _fail(err)
    _run_analysis(run_ablate, cfg, out, resume)


# ----------------------------------------------------------------------------- causal patching (issue 8)


@app.command()
def patch(model: str = _MODEL, data: str = typer.Option("demo:pope-adversarial", help="yes/no questions with labels"),
          out: str = _out("runs/patching"), limit: Optional[int] = typer.Option(32, help="number of questions"),
          batch_size: int = typer.Option(8, help="questions per forward pass"),
          layers: Optional[str] = typer.Option(None, help="layers patched one at a time, e.g. 2,3 (default all); "
                                              "every-layer rows are always written"),
          rho: float = typer.Option(0.5, help="image-centric head threshold on the visual non-sink ratio"),
          summ: float = typer.Option(0.2, help="minimum image attention of an image-centric head"),
          p: float = typer.Option(0.6, help="VAR's p for the VAR-through-heads sites"),
          var: bool = typer.Option(True, help="also patch VAR-edited head outputs into the baseline run"),
          tau: Optional[float] = _TAU, sink_dims: Optional[str] = _DIMS, device: Optional[str] = _DEVICE,
          dtype: Optional[str] = _DTYPE, seed: int = _SEED, n_boot: int = _NBOOT, sink_score: str = _SCORE,
          resume: bool = _RESUME):
    """Patch visual sinks / object tokens / image-centric heads from an image with the other answer, and
    VAR-edited heads into the baseline; effect on the answer's logit difference with CIs."""
    from sinkscope.analyses.patching import PatchConfig, run_patching

    try:
        cfg = PatchConfig(model=model, data=data, limit=limit, batch_size=batch_size, layers=_dims(layers), rho=rho,
                          summ=summ, p=p, var=var, tau=tau, sink_dims=_dims(sink_dims), device=device, dtype=dtype,
                          seed=seed, n_boot=n_boot, sink_score=sink_score)
    except SinkscopeError as err:
        _fail(err)
    _run_analysis(run_patching, cfg, out, resume)


@app.command("var-eval")
def var_eval(model: str = _MODEL,
             data: str = typer.Option("demo", help="'demo' (the world's POPE splits) or a POPE question .jsonl (test)"),
             validation: Optional[str] = typer.Option(None, help="POPE .jsonl of validation questions for choosing p and "
                                                      "rho (demo: the world's validation split); without it nothing is tuned"),
             image_root: Optional[str] = typer.Option(None, help="image folder of the POPE files (default: their folder)"),
             out: str = _out("runs/var_eval"),
             tasks: str = typer.Option("pope-random,pope-popular,pope-adversarial", help="demo tasks"),
             limit: int = typer.Option(100, help="test questions per task"),
             val_limit: int = typer.Option(60, help="validation questions per task"),
             captions: int = typer.Option(0, help="test captions per condition for CHAIR (demo; 0 = none)"),
             conditions: str = typer.Option(",".join(("baseline", "var", "var_random_heads", "var_all_heads",
                                                      "var_text_budget")), help="conditions to evaluate"),
             p_grid: str = typer.Option("0.3,0.6,0.9", help="p values tried on validation"),
             rho_grid: str = typer.Option("0.3,0.5,0.8", help="rho values tried on validation"),
             p: Optional[float] = typer.Option(None, help="fix p (no tuning of p)"),
             rho: Optional[float] = typer.Option(None, help="fix rho (no tuning of rho)"),
             select_metric: str = typer.Option("f1", help="validation metric that picks p and rho: f1 or accuracy"),
             batch_size: int = typer.Option(16, help="questions per generate call"),
             tau: Optional[float] = _TAU, sink_dims: Optional[str] = _DIMS, device: Optional[str] = _DEVICE,
             dtype: Optional[str] = _DTYPE, seed: int = _SEED, n_boot: int = _NBOOT, sink_score: str = _SCORE,
             resume: bool = _RESUME):
    """POPE (and CHAIR) with baseline, VAR and its controls; p and rho chosen on validation, reported on test."""
    from sinkscope.analyses.var_eval import VarEvalConfig, run_var_eval

    try:
        cfg = VarEvalConfig(model=model, data=data, validation=validation, image_root=image_root,
                            tasks=[t.strip() for t in tasks.split(",") if t.strip()], limit=limit, val_limit=val_limit,
                            captions=captions, conditions=[c.strip() for c in conditions.split(",") if c.strip()],
                            p_grid=_floats(p_grid), rho_grid=_floats(rho_grid), p=p, rho=rho,
                            select_metric=select_metric, batch_size=batch_size, tau=tau, sink_dims=_dims(sink_dims),
                            device=device, dtype=dtype, seed=seed, n_boot=n_boot, sink_score=sink_score)
    except SinkscopeError as err:
        _fail(err)
    _run_analysis(run_var_eval, cfg, out, resume)


# ----------------------------------------------------------------------------- sink viewer (issue 9)


@app.command()
def view(
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
    from sinkscope import viewer

    try:
        path = viewer.write_viewer(run_dir, out, n_samples=limit, model=model, data=data, device=device, dtype=dtype,
                                   log=lambda m: typer.echo(m))
    except SinkscopeError as err:
        _fail(err)
    typer.echo(f"wrote {path}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
