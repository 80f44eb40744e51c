"""--device and --dtype: parsed and checked in one place, with errors that name the fix.

    resolve_device("cuda")            -> "cuda", or SinkscopeError when this machine has no CUDA
                                         ("cuda:LOCAL_RANK" in a worker torchrun started on a node of several GPUs)
    resolve_dtype("bf16", "cuda")     -> torch.bfloat16, or SinkscopeError when the device cannot run it

`models.registry.load` calls both, so the CLI, the Python API and the notebooks fail the same way.
"""

from __future__ import annotations

import os
import re

import torch

from sinkscope.errors import SinkscopeError
from sinkscope.launcher import launched_worker

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
DEVICE_HELP = "cpu, cuda, cuda:N or mps"
DTYPE_HELP = "float32, bfloat16 or float16 (or auto: the checkpoint's)"

_CUDA_FIX = ("use --device cpu, or install a CUDA build of torch into .venv (`make setup TORCH_SPEC=torch`) on a "
             "machine with an NVIDIA GPU")


def resolve_device(device, environ: dict | None = None) -> str | None:
    """A checked device string ("cpu", "cuda:0", ...), or None (leave the model where it loads: the CPU).

    "cuda" without an index, in one of several workers torchrun or accelerate started (LOCAL_RANK; environ:
    os.environ unless given) on a machine with several GPUs, is the worker's own GPU, cuda:LOCAL_RANK: one command
    line then places each worker on its GPU instead of all of them on cuda:0."""
    if device is None or device == "" or device == "auto":
        return None
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise SinkscopeError(f"--device must be a string like {DEVICE_HELP}; got {device!r}")
    spec = device.strip().lower()
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", spec)
    if not m:
        raise SinkscopeError(f"unknown device {device!r}; use {DEVICE_HELP}")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            built = "with" if torch.version.cuda else "without"
            raise SinkscopeError(f"--device {device}: CUDA is not available here (torch {torch.__version__} was built "
                                 f"{built} CUDA); {_CUDA_FIX}")
        n = torch.cuda.device_count()
        if index is not None and int(index) >= n:
            raise SinkscopeError(f"--device {device}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1}); "
                                 "pick one of those")
        if index is None:
            return worker_gpu(n, environ) or spec
        return spec
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        raise SinkscopeError(f"--device {device}: Apple's MPS backend is not available on this machine; use --device cpu")
    return spec


def worker_gpu(n_gpus: int, environ: dict | None = None) -> str | None:
    """cuda:LOCAL_RANK for one of several workers torchrun or accelerate started, where the machine shows it more
    than one GPU (one GPU shown: the workers share it, or the launcher gave each its own), else None."""
    worker = launched_worker(environ)
    if worker is None or worker[2] is None or n_gpus <= 1:
        return None
    local = worker[2]
    if local >= n_gpus:
        raise SinkscopeError(f"--device cuda: this worker's LOCAL_RANK is {local}, but the machine has {n_gpus} CUDA "
                             f"devices; start at most {n_gpus} workers per machine (torchrun --nproc-per-node "
                             f"{n_gpus}), or give each its device (--device cuda:N)")
    return f"cuda:{local}"


def resolve_dtype(dtype, device: str | None = None) -> torch.dtype | None:
    """A torch dtype the device can run, or None (the checkpoint's own dtype)."""
    if dtype is None or dtype == "" or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        dt = dtype
    elif isinstance(dtype, str):
        dt = DTYPES.get(dtype.strip().lower().removeprefix("torch."))
        if dt is None:
            raise SinkscopeError(f"unknown dtype {dtype!r}; use {DTYPE_HELP}")
    else:
        raise SinkscopeError(f"--dtype must be one of {DTYPE_HELP}; got {dtype!r}")
    _check_runs(dt, device or "cpu")
    return dt


def _check_runs(dt: torch.dtype, device: str) -> None:
    """Raise when a matmul in `dt` fails on `device` (e.g. bfloat16 on a GPU older than Ampere)."""
    name = str(dt).removeprefix("torch.")
    if device.startswith("cuda") and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise SinkscopeError(f"--dtype bfloat16: this GPU cannot run bfloat16; use --dtype float16 or float32")
    try:
        x = torch.ones(2, 2, dtype=dt, device=device)
        _ = (x @ x).sum().item()
        _ = torch.softmax(x, dim=-1)
    except (RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SinkscopeError(f"--dtype {name} cannot run on {device} here ({first}); use --dtype float32"
                             + (" or bfloat16" if device == "cpu" and dt != torch.bfloat16 else "")) from err


# ----------------------------------------------------------------------------- models across devices

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_MAP_HELP = ("auto, balanced, balanced_low_0 or sequential (accelerate places the layers across this machine's "
                   "GPUs, then the CPU), or a JSON file {module name: device}")
MAX_MEMORY_HELP = "per-device caps for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB"
_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B)?", re.IGNORECASE)


def parse_max_memory(text: str | None) -> dict | None:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '64GiB'} (accelerate's max_memory)."""
    if text is None or not str(text).strip():
        return None
    out: dict = {}
    for part in str(text).split(","):
        key, sep, size = part.partition("=")
        key, size = key.strip().lower(), size.strip()
        if not sep or not key or not _SIZE.fullmatch(size):
            raise SinkscopeError(f"--max-memory {text!r}: each entry is DEVICE=SIZE (e.g. 0=20GiB or cpu=64GiB); "
                                 f"{part.strip()!r} is not")
        out[int(key) if key.isdigit() else key] = size
    return out


def parse_device_map(text) -> str | dict | None:
    """--device-map: a strategy name, or a JSON file holding {module name: device}."""
    if text is None or isinstance(text, dict) or not str(text).strip():
        return text or None
    text = str(text).strip()
    if text in DEVICE_MAP_STRATEGIES:
        return text
    import json
    from pathlib import Path

    path = Path(text).expanduser()
    if not path.is_file():
        raise SinkscopeError(f"--device-map {text!r}: use {DEVICE_MAP_HELP}")
    try:
        mapping = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SinkscopeError(f"--device-map {text}: cannot read a JSON object from it ({err})") from err
    if not isinstance(mapping, dict) or not mapping:
        raise SinkscopeError(f"--device-map {text}: the file must hold a non-empty JSON object {{module name: device}}")
    return mapping


def _check_placement(device, what: str) -> None:
    """One device of a device map or a max-memory key: one this machine has ('disk' and 'cpu' always)."""
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        index = int(device)
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= n:
            raise SinkscopeError(f"{what}: GPU {index} is not on this machine ({n} CUDA device(s)); use indices "
                                 f"below {n}, 'cpu' or 'disk'" if n else f"{what}: GPU {index} asked for, but this "
                                 f"machine has no CUDA device; use 'cpu' (or 'disk') or --device-map auto")
        return
    if isinstance(device, str) and device.strip().lower() in ("cpu", "disk", "meta"):
        return
    resolve_device(device)  # cuda:N / mps, checked against this machine (raises with the fix)


def check_device_map(device_map, max_memory=None, device: str | None = None, environ: dict | None = None) -> None:
    """Raise SinkscopeError naming the fix for a device map this machine cannot honour, or that several workers of
    one launcher on this machine would each apply to all of its GPUs."""
    if device_map is None:
        if max_memory:
            raise SinkscopeError("--max-memory caps what --device-map places on each device; give --device-map auto too")
        return
    if device is not None:
        raise SinkscopeError(f"--device {device} and --device-map both place the model; give one (--device-map "
                             "spreads the layers, --device puts the whole model on one device)")
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise SinkscopeError(f"--device-map {device_map!r}: use {DEVICE_MAP_HELP}")
        _check_one_spread_per_machine(device_map, environ)
    elif isinstance(device_map, dict):
        for name, dev in device_map.items():
            _check_placement(dev, f"--device-map entry {name!r}")
    else:
        raise SinkscopeError(f"--device-map must be a strategy name or {{module name: device}}; got {device_map!r}")
    for key in (max_memory or {}):
        _check_placement(key, f"--max-memory entry {key!r}")


def _check_one_spread_per_machine(strategy: str, environ: dict | None = None) -> None:
    """Refuse a device-map strategy in one of several workers that torchrun / accelerate started on one machine
    showing them several GPUs: each worker would spread a whole copy of the model over the same GPUs (all starting
    on GPU 0), and the copies would run out of memory together."""
    worker = launched_worker(environ)
    if worker is None or worker[2] is None:
        return
    env = os.environ if environ is None else environ
    local_world = env.get("LOCAL_WORLD_SIZE", "")
    if local_world.strip().isdigit() and int(local_world) <= 1:  # one worker per machine: it may spread
        return
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus <= 1:
        return
    raise SinkscopeError(
        f"--device-map {strategy} in worker {worker[2]} of those torchrun / accelerate started on this machine: "
        f"each worker would spread a whole copy of the model over the same {n_gpus} GPUs. Run one process per "
        "machine with --device-map (several machines: a SLURM array, or --shard i/n on each), or give each worker its "
        "own GPUs without a launcher (CUDA_VISIBLE_DEVICES=0,1 sinkscope ... --device-map auto --shard 0/2 --out "
        "runs/a & CUDA_VISIBLE_DEVICES=2,3 sinkscope ... --shard 1/2 --out runs/b), or, where one GPU holds the "
        "model, --device cuda (each worker takes cuda:LOCAL_RANK)")
