"""Models that NDIF serves: described here without their weights, run on the server.

    adapter = sinkscope.models.load_hosted("meta-llama/Llama-3.1-8B")  # config, tokenizer from the hub; no weights
    run_scan("runs/scan-ndif", ScanConfig(model=..., remote="ndif"), adapter=adapter)

The model is nnsight's `TransformersModel` built on the meta device (`dispatch=False`): its module tree gives the
adapter every path and size it needs, and its hub key (repo id, revision, task) names the checkpoint the server
loads. The adapter's `hosted` attribute holds that wrapper; `sinkscope.trace.Tracer` sends its traces through it
(`remote="ndif"` or a server URL). Nothing here can run the model: only the analyses whose reductions run inside
the trace (scan, heads, contributions, location) work with it. `models.load_hosted` (the registry: it picks the
family) builds the adapter from `hosted_model`; this module holds what is NDIF's: the wrapper and the checks.
"""

from __future__ import annotations

from pathlib import Path

from sinkscope.errors import SinkscopeError
from sinkscope.models.base import ModelAdapter


def hosted_model(repo_id: str, family: type[ModelAdapter], revision: str | None = None,
                 trust_remote_code: bool = False):
    """(nnsight wrapper, processor) of hub model `repo_id` as NDIF serves it: nnsight's `TransformersModel` on the meta
    device (no weight read or held here), its task the family's (text-generation for a causal LM,
    image-text-to-text for an LMM), eager attention in every part of it (the one implementation a request sends
    for the whole model), and the processor (a causal LM's: its tokenizer) from the hub. `family` is the adapter
    class the registry picked for the configuration (`models.load_hosted` wraps the module in it)."""
    from transformers import AutoProcessor, AutoTokenizer

    text_only = family.family == "causal_lm"
    try:
        processor = (AutoTokenizer if text_only else AutoProcessor).from_pretrained(
            repo_id, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - turned into a message the user can act on
        raise SinkscopeError(f"could not read the {'tokenizer' if text_only else 'processor'} of {repo_id!r} from the "
                             f"hub: {err.__class__.__name__}: {err}. --remote ndif needs the hub id of a model NDIF "
                             "runs and a connection to the hub (for gated models, `huggingface-cli login`)") from err
    from nnsight import TransformersModel

    tokenizer = getattr(processor, "tokenizer", processor)
    extra = {} if text_only else {"processor": processor}
    hosted = TransformersModel(repo_id, task="text-generation" if text_only else "image-text-to-text",
                               revision=revision, dispatch=False, attn_implementation="eager", tokenizer=tokenizer,
                               **extra, **({"trust_remote_code": True} if trust_remote_code else {}))
    sent = hosted._remoteable_get_env()  # what travels with each request for the server to apply to its model
    if sent.get("attn_implementation") != "eager":
        import nnsight

        raise SinkscopeError(f"nnsight {nnsight.__version__} does not send the attention implementation with a "
                             "request, so NDIF would run its default (SDPA), which never forms the attention "
                             "probabilities sinkscope reads: upgrade nnsight (0.8.1 sends it: pip install "
                             "'nnsight>=0.8.1,<0.9')")
    return hosted, processor


def check_hostable(spec: str, embedded: tuple[str, ...]) -> None:
    """A clear error when `spec` cannot name a model on NDIF: an embedded model or a local directory (the server
    loads checkpoints by hub id only)."""
    if spec in embedded:
        raise SinkscopeError(f"--model {spec} is built on this machine, so NDIF cannot serve it: run it here (drop "
                             "--remote) or use --remote local, the serialised dry run of NDIF")
    if Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        raise SinkscopeError(f"--model {spec} is a local directory; NDIF loads checkpoints by hub id: pass the hub id "
                             "of a model NDIF serves, or drop --remote (or use --remote local) to run this one here")


def check_key(remote: str) -> None:
    """Before anything loads for `--remote ndif`: an API key is configured (a server of one's own is not asked)."""
    if remote != "ndif":
        return
    from nnsight.schema.config import CONFIG

    if not CONFIG.API.APIKEY:
        raise SinkscopeError("--remote ndif needs an NDIF API key: run `nnsight login` or set NDIF_API_KEY (a key "
                             "comes with an NDIF account, ndif.us)")


def check_running(adapter: ModelAdapter, remote: str) -> None:
    """Before any trace for `--remote ndif`: NDIF runs the hosted model under its task now (nnsight's
    `is_model_running`, which also says False when the service cannot be reached)."""
    if remote != "ndif":
        return
    import nnsight

    task = adapter.hosted.task
    if not nnsight.is_model_running(adapter.name, task=task):
        raise SinkscopeError(f"NDIF is not running {adapter.name} (task {task}) now, or cannot be reached: "
                             "`python -c 'import nnsight; print(nnsight.status())'` lists the models it runs; pick "
                             "one of those, or run this one here (drop --remote)")
