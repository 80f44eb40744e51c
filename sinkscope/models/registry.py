"""Family registry and `load(spec)`: "demo" | "tiny" | "organism" | local directory | hub id."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from sinkscope.errors import SinkscopeError, UnsupportedModelError
from sinkscope.models.base import ModelAdapter

_ADAPTERS: list[type[ModelAdapter]] = []

EMBEDDED = ("demo", "tiny", "organism")


def register(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    if adapter not in _ADAPTERS:
        _ADAPTERS.append(adapter)
    return adapter


def _ensure_registered() -> None:
    if _ADAPTERS:
        return
    from sinkscope.models import causal_lm, gemma3, llava, llava_next, qwen2_vl  # noqa: F401

    for module in (llava, llava_next, qwen2_vl, gemma3, causal_lm):  # LMM families first
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, ModelAdapter) and obj is not ModelAdapter and obj.family:
                register(obj)


def supported() -> dict[str, tuple[str, ...]]:
    """family -> the transformers architectures it covers."""
    _ensure_registered()
    return {a.family: a.architectures for a in _ADAPTERS}


def _supported_message() -> str:
    return "; ".join(f"{fam} ({', '.join(arch)})" for fam, arch in supported().items())


def adapter_for_config(config) -> type[ModelAdapter]:
    _ensure_registered()
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "")
    for adapter in _ADAPTERS:
        if any(a in adapter.architectures for a in archs) or model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"unsupported architecture {archs or model_type!r}. sinkscope supports: {_supported_message()}. "
        "To add a family, write an adapter in sinkscope/models/ (see base.ModelAdapter)."
    )


def adapter_for_model(model, processor=None, name: str = "") -> ModelAdapter:
    """Wrap an already-loaded Hugging Face model (e.g. one you built or quantised yourself)."""
    _ensure_registered()
    cls_name = type(model).__name__
    for adapter in _ADAPTERS:
        if cls_name in adapter.architectures:
            return adapter(model, processor, name)
    return adapter_for_config(model.config)(model, processor, name)


def embedded_path(name: str) -> Path:
    """Directory of an embedded model's shipped files ('demo': trained parts only; 'tiny', 'organism': whole models)."""
    path = Path(__file__).resolve().parent / "embedded" / "assets" / name
    if not (path / "config.json").exists():
        raise SinkscopeError(
            f"the embedded model {name!r} is not in this installation ({path} has no config.json). "
            f"Rebuild it with `python -m { {'demo': 'scripts.train_smolvlm', 'tiny': 'scripts.train_tiny'}.get(name, 'sinkscope.models.embedded.organism')}`."
        )
    return path


def _read_local_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.exists():
        raise SinkscopeError(f"{path} is a directory but has no config.json: is it a saved Hugging Face model?")
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SinkscopeError(f"cannot read {cfg}: {err}. The model directory looks damaged; re-save it.") from err


def _load_demo(device=None, dtype=None) -> ModelAdapter:
    """The embedded default: SmolLM2-135M-Instruct (from the user cache) + the shipped vision tower and projector."""
    from sinkscope.models.embedded import smolvlm

    model, processor = smolvlm.load_demo(dtype=dtype)
    if device is not None:
        model = model.to(device)
    adapter = adapter_for_model(model, processor, "demo")
    adapter.set_text_attention("eager")
    return adapter


def load_placed(settings) -> ModelAdapter:
    """`load` with a run's placement: `settings` has model, device, dtype, device_map, max_memory as a run
    records them (RunConfig or an analysis config; device_map and max_memory as the CLI's strings). With a
    `remote` that names a server (ndif, a URL) the model is the one NDIF serves (`load_hosted`): it is placed
    there, so a placement given here is an error."""
    from sinkscope.devices import parse_device_map, parse_max_memory
    from sinkscope.runconfig import is_server

    remote = getattr(settings, "remote", None)
    if is_server(remote):
        from sinkscope.models.hosted import check_hostable, check_key, check_running

        check_hostable(str(settings.model), EMBEDDED)
        placed = [f"--{name.replace('_', '-')}" for name in ("device", "dtype", "device_map", "max_memory")
                  if getattr(settings, name, None) not in (None, "cpu")]
        if placed:
            raise SinkscopeError(f"{', '.join(placed)} with --remote {remote}: NDIF places the model and picks its "
                                 "dtype on its own GPUs; drop them")
        check_key(remote)
        adapter = load_hosted(str(settings.model))
        check_running(adapter, remote)
        return adapter

    return load(settings.model, device=settings.device, dtype=settings.dtype,
                device_map=parse_device_map(settings.device_map), max_memory=parse_max_memory(settings.max_memory))


def load_hosted(repo_id: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelAdapter:
    """The adapter of hub model `repo_id` as NDIF serves it (`hosted.hosted_model`): its family's adapter over a
    meta-device module tree (no weight read or held here), with `adapter.hosted` = the nnsight wrapper traces go
    through (`remote="ndif"` or a server URL). A causal LM or an LMM of a supported family; repo_id is sent to the
    server as the hub canonicalises it, so a local directory has no key there (the CLI refuses one)."""
    from transformers import AutoConfig

    from sinkscope.models.hosted import hosted_model

    try:
        config = AutoConfig.from_pretrained(repo_id, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - turned into a message the user can act on
        raise SinkscopeError(f"could not read the configuration of {repo_id!r} from the hub: {err.__class__.__name__}: "
                             f"{err}. --remote ndif needs the hub id of a model NDIF runs and a connection to the hub "
                             "(for gated models, `huggingface-cli login`)") from err
    family = adapter_for_config(config)  # an unknown family: the registry's error, with the supported list
    hosted, processor = hosted_model(repo_id, family, revision, trust_remote_code)
    adapter = family(hosted._module, processor, repo_id)
    adapter.hosted = hosted
    return adapter


def load(spec: str, device: str | None = None, dtype=None, trust_remote_code: bool = False,
         device_map=None, load_processor: bool = True, max_memory: dict | None = None,
         offload_folder: str | None = None) -> ModelAdapter:
    """Load an LMM and wrap it in its family's adapter.

    spec: "demo" (SmolLM2-135M LLaVA), "tiny" (the 1.8M-parameter model for tests), "organism"
    (planted), a local directory, or a hub id. device_map: "auto" / "balanced" / "sequential" or
    {module name: device} (accelerate places the layers, e.g. across the GPUs of a node; "cpu" and
    "disk" entries are offloaded, disk ones to `offload_folder`), with `max_memory` ({device: "20GiB"})
    capping each device; exclusive with `device`. Weights are read from
    safetensors only; remote code runs only with trust_remote_code=True. The language model
    gets eager attention (sinkscope needs the probabilities); the vision tower is untouched.
    """
    import torch
    from transformers import AutoConfig

    from sinkscope.devices import check_device_map, resolve_device, resolve_dtype
    from sinkscope.launcher import launched_worker

    device = resolve_device(device)  # a clear error for --device cuda without CUDA, or an unknown device
    if device and device.startswith("cuda:") and launched_worker() is not None:
        torch.cuda.set_device(device)  # a worker's CUDA context and stray allocations on its own GPU, not on cuda:0
    dtype = resolve_dtype(dtype, device)  # ... and for a dtype the device cannot run
    if device_map is not None or max_memory is not None:
        check_device_map(device_map, max_memory, device)
    if not isinstance(spec, (str, Path)) or not str(spec):
        raise SinkscopeError("--model must be 'demo', 'organism', a local directory or a hub id")
    spec = str(spec)
    name = spec
    if spec == "demo":
        if device_map is not None:
            raise SinkscopeError("--device-map: the demo model (135M parameters) is assembled from its cached parts on "
                                 "one device; use --device (cpu, cuda, ...) for it")
        return _load_demo(device=device, dtype=dtype)
    if spec in EMBEDDED:
        path = str(embedded_path(spec))
    elif Path(spec).expanduser().exists():
        p = Path(spec).expanduser()
        if not p.is_dir():
            raise SinkscopeError(f"{spec} is a file; --model needs a model directory (with config.json) or a hub id")
        _read_local_config(p)
        path = str(p)
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SinkscopeError(f"model directory {spec!r} does not exist; check the path")
    else:
        path = spec  # hub id
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - turned into a message the user can act on
        raise SinkscopeError(
            f"could not read the configuration of {spec!r}: {err.__class__.__name__}: {err}. "
            "Give a local directory with config.json, or a hub id reachable from this machine "
            "(offline machines: download the checkpoint elsewhere and pass its directory)."
        ) from err
    adapter_cls = adapter_for_config(config)
    kwargs = {"use_safetensors": True, "trust_remote_code": trust_remote_code,
              "attn_implementation": adapter_cls.attention_kwarg("eager")}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    try:
        model = adapter_cls.model_class().from_pretrained(path, **kwargs)
    except (ValueError, KeyError, RuntimeError) as err:
        if device_map is None:
            raise
        raise SinkscopeError(
            f"could not place {spec!r} with device map {device_map!r}: {err.__class__.__name__}: {err}. Give "
            "'auto' (or 'balanced' / 'sequential'), or a map whose keys are the model's module names (e.g. "
            "'model.language_model.layers.3') and whose values are devices this machine has ('cpu', 'disk', "
            "0, 'cuda:1'); disk entries need offload_folder"
        ) from err
    except OSError as err:
        raise SinkscopeError(
            f"could not load weights of {spec!r}: {err}. sinkscope loads safetensors only (pickled .bin/.pt files can run "
            "code); convert a checkpoint by loading it once in a trusted environment and calling save_pretrained()."
        ) from err
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    processor, processor_error = None, ""
    if load_processor:
        from transformers import AutoProcessor, AutoTokenizer

        auto = AutoTokenizer if adapter_cls.family == "causal_lm" else AutoProcessor  # text-only: the tokenizer
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                processor = auto.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as err:  # noqa: BLE001
            processor_error = f"{err.__class__.__name__}: {err}"
            warnings.warn(f"no processor could be loaded for {spec!r} ({processor_error}); pass token ids yourself")
    adapter = adapter_cls(model, processor, name)
    adapter.processor_error = processor_error
    adapter.planted = Path(path, "ground_truth.json").is_file()  # the organism's planted mechanism, written down
    adapter.set_text_attention("eager")
    return adapter
