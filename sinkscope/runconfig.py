"""One run's settings and their checks, made before any model loads (the base layer).

    run = RunConfig(model="demo", data="demo", limit=32, layers=parse_ints("2,3", "--layers"))
    run.validate()          # SinkscopeError naming the problem and the fix, one per problem
    check_out("runs/scan")  # the folder can be written; nothing is left behind by the check

Every CLI command builds a RunConfig from its options and validates it before `load_model`, so
a typo costs a second, not a model load, and leaves no folder. Only the standard library and
`sinkscope.errors` at import time; --device and --dtype are checked by `sinkscope.devices`
(torch) inside `validate()`.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from sinkscope.errors import SinkscopeError

SINK_SCORES = ("auto", "rms", "layer")
WIDE_ENOUGH_FOR_PHI = 40.0  # sqrt(hidden size) at which the paper's tau = 20 sits at half phi's ceiling
DATA_HELP = "'demo[:task]', a POPE-style .jsonl, a folder of images, or prompts (.txt / .jsonl)"
DATA_SUFFIXES = (".jsonl", ".txt")


# Where an analysis needs other data or sizes than RunConfig's defaults, said once here: its config class and its
# command's --help both read this table (the CLI imports no torch, so not the analysis modules).
ANALYSIS_DEFAULTS: dict[str, dict] = {
    "ablate": {"data": "demo:pope-adversarial"},  # yes/no questions: the answer's logit difference
    "patching": {"data": "demo:pope-adversarial", "batch_size": 8},
    "inject": {"data": "demo:pope-adversarial", "limit": 8},  # a dose-response grid per sample
    "remove": {"data": "demo:mixed", "limit": 16},
    "var_eval": {"limit": 100, "batch_size": 16},  # limit: test questions per task; batch: questions per generate
}


# The options every command that loops over samples takes, one per RunConfig field named here, in this order, with
# its --help: sinkscope.cli generates them from this table, each with the default analysis_default(the command's
# analysis, field), so a field added here is an option of every such command. (layers and image_root mean something
# per command: the commands that take them declare them.)
CLI_FIELDS: dict[str, str] = {
    "model": "'demo' (SmolLM2-135M LLaVA), 'tiny', 'organism' (planted), a local model directory (LMM or causal LM), "
             "or a hub id",
    "data": DATA_HELP,
    "limit": "number of samples (the data's first N)",
    "batch_size": "samples per forward pass",
    "calibration": "samples used to discover sink dims and choose tau",
    "tau": "sink threshold (default: chosen per sink score: 20 or the gap rule for phi, 100 for the layer-relative "
           "score)",
    "sink_dims": "pin sink dims, e.g. 1415,2533 (default: discover them)",
    "sink_score": "auto: the paper's phi = |x_d / RMS(x)| when sqrt(hidden) >= 40, else the layer-relative score (the "
                  "same rule in every command); rms: phi, at most sqrt(hidden); layer: |x_d| / the layer's median "
                  "token RMS",
    "device": "cpu, cuda, cuda:N or mps (default: cpu, where the model loads)",
    "dtype": "float32, bfloat16 or float16 (default: the checkpoint's)",
    "device_map": "spread the model's layers over devices (accelerate): auto, balanced, balanced_low_0, sequential, "
                  "or a JSON file {module name: device}; instead of --device",
    "max_memory": "per-device caps for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB",
    "seed": "seed set before the run (torch, bootstrap, random controls)",
}
# The example a list field's messages show (its option takes comma-separated integers).
INDEX_EXAMPLES = {"sink_dims": "1415,2533", "layers": "2,3,4"}


def analysis_default(analysis: str, name: str):
    """The default of RunConfig field `name` for `analysis` (ANALYSIS_DEFAULTS, else RunConfig's own)."""
    return ANALYSIS_DEFAULTS.get(analysis, {}).get(name, RunConfig.__dataclass_fields__[name].default)


@dataclass
class RunConfig:
    """The settings every command that loops over samples shares."""

    model: str = "demo"
    data: str = "demo"
    limit: int | None = 32  # the data's first N samples; None: all
    batch_size: int = 4
    calibration: int = 16  # samples that discover sink dims and choose tau
    device: str | None = None  # None: where the model loads (the CPU)
    dtype: str | None = None  # None: the checkpoint's
    device_map: str | None = None  # accelerate: auto | balanced | balanced_low_0 | sequential | a JSON file
    max_memory: str | None = None  # caps for device_map, e.g. "0=20GiB,cpu=64GiB"
    seed: int = 0
    sink_score: str = "auto"  # auto | rms (the paper's phi) | layer (layer-relative, for narrow models)
    tau: float | None = None  # None: chosen per sink score
    sink_dims: list[int] | None = None  # None: discovered
    layers: list[int] | None = None  # None: all
    image_root: str | None = None
    # a config that runs several analyses (the report) may leave batch_size None: each analysis' own default
    BATCH_SIZE_OPTIONAL: ClassVar[bool] = False

    def validate(self) -> None:
        """Raise SinkscopeError on the first bad setting; the message names the option and the fix."""
        if not isinstance(self.model, str) or not self.model.strip():
            raise SinkscopeError("--model is empty; give 'demo', 'tiny', 'organism', a local model folder or a hub id")
        _check_count("--limit", self.limit, "samples", allow_none=True)
        _check_count("--batch-size", self.batch_size, "samples per forward pass", allow_none=self.BATCH_SIZE_OPTIONAL)
        _check_count("--calibration", self.calibration, "calibration samples")
        if self.sink_score not in SINK_SCORES:
            raise SinkscopeError(f"--sink-score must be one of {', '.join(SINK_SCORES)}; got {self.sink_score!r}")
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau > 0):
            raise SinkscopeError(f"--tau must be a number > 0 (the paper uses 20 on LLaMA-2-7B); got {self.tau}; "
                                 "leave it out to let sinkscope choose it")
        _check_indices("--sink-dims", self.sink_dims, "hidden dimensions", INDEX_EXAMPLES["sink_dims"])
        self.check_layers()
        check_data(self.data, self.image_root)
        self.device_and_dtype()
        if self.device_map or self.max_memory:
            from sinkscope import devices  # torch: only when a device map is asked for

            devices.check_device_map(devices.parse_device_map(self.device_map),
                                     devices.parse_max_memory(self.max_memory), devices.resolve_device(self.device))

    def check_layers(self) -> None:
        """--layers: layer indices (a config whose --layers means something else overrides this)."""
        _check_indices("--layers", self.layers, "layer indices", INDEX_EXAMPLES["layers"])

    def device_and_dtype(self):
        """(device, torch dtype) as `sinkscope.devices` resolves them; raises when this machine cannot run them."""
        if self.device in (None, "", "auto") and self.dtype in (None, "", "auto"):
            return None, None  # where the model loads, in its own dtype: nothing to check (and no torch import)
        from sinkscope import devices  # torch: imported only when a device or dtype is asked for

        device = devices.resolve_device(self.device)
        return device, devices.resolve_dtype(self.dtype, device)


def resolve_sink_score(choice: str, hidden_size: int) -> str:
    """auto -> 'rms' (the paper's phi) when sqrt(hidden) >= 40, so that tau = 20 is reachable, else 'layer'."""
    if choice != "auto":
        return choice
    return "rms" if math.sqrt(hidden_size) >= WIDE_ENOUGH_FOR_PHI else "layer"


def parse_ints(text: str | None, option: str, example: str = "2,3,4") -> list[int] | None:
    """'2, 3,4' -> [2, 3, 4]; None or '' -> None; anything else: an error naming `option`."""
    if text is None or not str(text).strip():
        return None
    try:
        return [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise SinkscopeError(f"{option} must be comma-separated integers like {example}; got {text!r}") from None


def parse_floats(text: str | None, option: str, example: str = "10,20,40") -> list[float] | None:
    """'10, 20' -> [10.0, 20.0]; None or '' -> None; anything else: an error naming `option`."""
    if text is None or not str(text).strip():
        return None
    try:
        values = [float(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise SinkscopeError(f"{option} must be comma-separated numbers like {example}; got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise SinkscopeError(f"{option} must be finite numbers like {example}; got {text!r}")
    return values


def check_data(spec: str, image_root: str | None = None, option: str = "--data") -> None:
    """The data spec names something that exists and that sinkscope reads (its rows are read by the loader)."""
    spec = str(spec)
    if spec == "demo" or spec.startswith("demo:"):
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise SinkscopeError(f"{option} {spec}: no such file or folder; give {DATA_HELP}")
    if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
        raise SinkscopeError(f"{option} {spec} is a {path.suffix or 'suffix-less'} file; give {DATA_HELP} "
                             "(a single image: put it in a folder and pass the folder)")
    if image_root is not None and not Path(image_root).expanduser().is_dir():
        raise SinkscopeError(f"--image-root {image_root} is not a folder; give the folder the image paths of "
                             f"{spec} are relative to")


def check_out(out: str | Path) -> Path:
    """The run folder `out` can be created and written; nothing is created by the check itself."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise SinkscopeError(f"--out {out} is a file; give a folder (it is created if missing)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SinkscopeError(f"--out {out}: {existing} is a file, so no folder can be made under it; "
                             "give another --out")
    try:  # os.access trusts permission bits; /proc and read-only mounts need a real write to tell
        os.rmdir(tempfile.mkdtemp(prefix=".sinkscope-write-check-", dir=existing))
    except OSError as err:
        raise SinkscopeError(f"--out {out} is not writable ({err.strerror or err} in {existing}); give a folder you "
                             "can write, e.g. --out runs/NAME") from None
    return path


def differing_settings(recorded: dict, requested: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """'name: old -> new' for every setting that differs (a setting one side lacks counts when the other
    side's value is not None), ignoring the names in `ignore`."""
    out = []
    for key in sorted(set(recorded) | set(requested)):
        if key in ignore:
            continue
        old, new = _plain(recorded.get(key)), _plain(requested.get(key))
        if old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_count(option: str, value, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = ", or leave it out for all of them" if allow_none else ""
        raise SinkscopeError(f"{option} must be a whole number of {what}, 1 or more{extra}; got {value!r}")


def _check_indices(option: str, values, what: str, example: str) -> None:
    if values is None:
        return
    if not values:
        raise SinkscopeError(f"{option} is empty; give {what} like {example}, or leave it out")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise SinkscopeError(f"{option} must be {what} >= 0 like {example}; got {bad}")
    if len(set(values)) != len(values):
        raise SinkscopeError(f"{option} lists a value twice ({values}); give each of the {what} once")


def sample_seed(seed: int, *keys) -> int:
    """A seed that depends on (seed, keys) only, e.g. (run seed, sample index): random draws made per sample
    with it are the same whichever shard or batch the sample runs in."""
    text = ":".join(str(k) for k in (int(seed), *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2 ** 63 - 1)


REMOTE_MODES = ("local", "ndif")


def check_remote(remote) -> str | None:
    """`remote` as given when sinkscope can run it: None (here), "local" (nnsight's serialised dry run of NDIF),
    "ndif" (the NDIF service nnsight is configured for: NDIF_HOST, NDIF_API_KEY) or an http(s):// URL (an NDIF
    server of one's own); anything else gets an error naming the choices."""
    if remote is None or remote in REMOTE_MODES or (isinstance(remote, str) and remote.startswith(("http://",
                                                                                                   "https://"))):
        return remote
    raise SinkscopeError(f"--remote {remote!r}: choose local (nnsight's serialised dry run of NDIF, run here), ndif "
                         "(the NDIF service; key from NDIF_API_KEY or nnsight's config) or the http(s):// URL of "
                         "an NDIF server")


def is_server(remote) -> bool:
    """True when `remote` sends traces to a server (ndif or a URL), not to the local dry run."""
    return check_remote(remote) not in (None, "local")
