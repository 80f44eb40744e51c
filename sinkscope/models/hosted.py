"""Models that NDIF serves: described here without their weights, run on the server.

    adapter = load_hosted("meta-llama/Llama-3.1-8B")   # config and tokenizer from the hub; weights stay there
    run_scan("runs/scan-ndif", ScanConfig(model=..., remote="ndif"), adapter=adapter)

The model is nnsight's `TransformersModel` built on the meta device (`dispatch=False`): its module tree gives the
adapter every path and size it needs, and its hub key (repo id, revision, task) names the checkpoint the server
loads. The adapter's `hosted` attribute holds that wrapper; `sinkscope.trace.Tracer` sends its traces through it
(`remote="ndif"` or a server URL). Nothing here can run the model: only the analyses whose reductions run inside
the trace (scan, heads, location) work with it. Text-only causal LMs only: those are what NDIF serves.
"""

from __future__ import annotations

from pathlib import Path

from sinkscope.errors import SinkscopeError
from sinkscope.models.base import ModelAdapter


def load_hosted(repo_id: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelAdapter:
    """The adapter of hub model `repo_id` as NDIF serves it: a meta-device module tree (no weights read or held
    here) with eager attention, its tokenizer, and `adapter.hosted` = the nnsight wrapper traces go through.

    repo_id is sent to the server as it is canonicalised on the hub; a local directory has no such key (the CLI
    refuses one). Raises SinkscopeError for a model sinkscope cannot send (an LMM, an unsupported family) or a
    configuration it cannot read."""
    from transformers import AutoConfig, AutoTokenizer

    from sinkscope.models.causal_lm import CausalLMAdapter

    try:
        config = AutoConfig.from_pretrained(repo_id, revision=revision, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - turned into a message the user can act on
        raise SinkscopeError(f"could not read the configuration or tokenizer of {repo_id!r} from the hub: "
                             f"{err.__class__.__name__}: {err}. --remote ndif needs the hub id of a model NDIF "
                             "serves and a connection to the hub (for gated models, `huggingface-cli login`)") from err
    family = CausalLMAdapter
    archs = list(getattr(config, "architectures", None) or [])
    if not (set(archs) & set(family.architectures) or getattr(config, "model_type", "") in family.model_types):
        raise SinkscopeError(f"{repo_id} is a {getattr(config, 'model_type', '?')} model ({', '.join(archs) or '?'}): "
                             "sinkscope sends text-only causal LMs to NDIF (what it serves: "
                             f"{', '.join(family.architectures)}); run this model here (--device, --device-map) or "
                             "through the serialised dry run, --remote local")
    from nnsight import TransformersModel

    hosted = TransformersModel(repo_id, task="text-generation", revision=revision, dispatch=False,
                               attn_implementation="eager", tokenizer=tokenizer,
                               **({"trust_remote_code": True} if trust_remote_code else {}))
    sent = hosted._remoteable_get_env()  # what travels with each request for the server to apply to its model
    if sent.get("attn_implementation") != "eager":
        import nnsight

        raise SinkscopeError(f"nnsight {nnsight.__version__} does not send the attention implementation with a "
                             "request, so NDIF would run its default (SDPA), which never forms the attention "
                             "probabilities sinkscope reads: upgrade nnsight (0.8.1 sends it: pip install "
                             "'nnsight>=0.8.1,<0.9')")
    adapter = family(hosted._module, tokenizer, repo_id)
    adapter.hosted = hosted
    return adapter


def check_hostable(spec: str, embedded: tuple[str, ...]) -> None:
    """A clear error when `spec` cannot name a model on NDIF: an embedded model or a local directory (the server
    loads checkpoints by hub id only)."""
    if spec in embedded or spec == "demo":
        raise SinkscopeError(f"--model {spec} is built on this machine, so NDIF cannot serve it: run it here (drop "
                             "--remote) or use --remote local, the serialised dry run of NDIF")
    if Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        raise SinkscopeError(f"--model {spec} is a local directory; NDIF loads checkpoints by hub id: pass the hub id "
                             "of a model NDIF serves, or drop --remote (or use --remote local) to run this one here")


def check_service(repo_id: str, remote: str) -> None:
    """Before a model loads for `--remote ndif`: an API key is configured and NDIF runs `repo_id` as a text-generation
    model now (nnsight's `is_model_running`, which also says False when the service cannot be reached). A server
    of one's own (a URL) is not asked."""
    if remote != "ndif":
        return
    import nnsight
    from nnsight.schema.config import CONFIG

    if not CONFIG.API.APIKEY:
        raise SinkscopeError("--remote ndif needs an NDIF API key: run `nnsight login` or set NDIF_API_KEY (a key "
                             "comes with an NDIF account, ndif.us)")
    if not nnsight.is_model_running(repo_id, task="text-generation"):
        raise SinkscopeError(f"NDIF is not running {repo_id} as a text-generation model now, or cannot be reached: "
                             "`python -c 'import nnsight; print(nnsight.status())'` lists the models it runs; pick "
                             "one of those, or run this one here (drop --remote)")
