"""A pLLM as data: a LoRA adapter (PEFT config + tensors), its content hash, validation and PEFT I/O.

On disk an adapter is exactly PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``);
the base-model fingerprint travels in the safetensors metadata, so any PEFT tool still loads it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from xpert_fl.files import atomic_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FINGERPRINT_KEY = "xpert_base_fingerprint"
MAX_ADAPTER_BYTES = 512 * 2**20  # a LoRA adapter of a phone-sized model is a few MB
# Bounds on what an upload may carry. Real values are far inside them; past them an adapter is broken or
# hostile (e.g. a scaling of 1e5 that turns any merge into noise) and every reader would pay for it.
MAX_RANK = 1024  # trained ranks are 2..64; a merge concatenates its parents' ranks
MAX_ALPHA = 1e4  # so |scaling| = |lora_alpha| / r (or / sqrt(r)) <= 1e4
MAX_WEIGHT_ABS = 1e4  # trained LoRA weights are O(1)
MAX_CONFIG_BYTES = 64 * 2**10  # adapter_config.json as PEFT writes it is ~1.5 KB
MAX_META_BYTES = 64 * 2**10  # safetensors metadata (string to string): the fingerprint, a merge record
TASK_TYPES = (None, "CAUSAL_LM")  # other task types add heads (modules_to_save) the cache does not hold


class AdapterError(ValueError):
    """An adapter is malformed, for another base model, or does not fit the base model's shapes."""


@dataclass
class Adapter:
    """LoRA adapter: the PEFT config (as a JSON dict), its tensors, and the base model it belongs to."""

    config: dict
    tensors: dict[str, torch.Tensor]
    base_fingerprint: str
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """Identity of the adapter's content: LoRA hyper-parameters, tensor names, shapes and values."""
        h = hashlib.sha256()
        keys = ("r", "lora_alpha", "target_modules", "use_rslora", "base_fingerprint")
        ident = {k: self.config.get(k) for k in keys[:-1]}
        ident["target_modules"] = sorted(ident["target_modules"] or [])
        ident["base_fingerprint"] = self.base_fingerprint
        h.update(json.dumps(ident, sort_keys=True).encode())
        for name in sorted(self.tensors):
            t = self.tensors[name].detach().to(torch.float32).contiguous()
            h.update(f"{name}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:20]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def scaling(self) -> float:
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def modules(self) -> list[str]:
        """Module paths (as in the base model) that the adapter modifies."""
        return sorted({_module_of(name) for name in self.tensors})

    def delta(self, module: str) -> torch.Tensor:
        """The exact weight update of one module, scaling * B @ A (what merging sums)."""
        a = self.tensors[f"base_model.model.{module}.lora_A.weight"].float()
        b = self.tensors[f"base_model.model.{module}.lora_B.weight"].float()
        return self.scaling * (b @ a)

    # --- disk ---------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write PEFT format atomically: to a temp sibling directory, then rename into place."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(directory) as tmp:
            (tmp / CONFIG_FILE).write_text(_config_text(self.config))
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
            save_file(tensors, tmp / WEIGHTS_FILE, metadata={**self.meta, FINGERPRINT_KEY: self.base_fingerprint})
        return directory

    @classmethod
    def load(cls, directory: str | Path, max_bytes: int = MAX_ADAPTER_BYTES) -> Adapter:
        """Read a PEFT adapter directory; its config is checked (``check_config``), its tensors are not."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise AdapterError(f"adapter {directory}: missing {path.name}")
        for path, limit in ((config_path, MAX_CONFIG_BYTES), (weights_path, max_bytes)):
            if path.stat().st_size > limit:
                raise AdapterError(
                    f"adapter {directory}: {path.name} is {path.stat().st_size} bytes, over the {limit}-byte limit"
                )
        try:
            config = json.loads(config_path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise AdapterError(f"adapter {directory}: {CONFIG_FILE} is not UTF-8 ({err.reason})") from err
        except json.JSONDecodeError as err:
            raise AdapterError(f"adapter {directory}: {CONFIG_FILE} is not valid JSON ({err.msg})") from err
        try:
            check_config(config)  # content_hash and everything after it rely on a well-formed config
        except AdapterError as err:
            raise AdapterError(f"adapter {directory}: {err}") from None
        try:
            tensors = load_file(weights_path)
            with safe_open(weights_path, "pt") as f:
                meta = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterError(f"adapter {directory}: {WEIGHTS_FILE} is unreadable or truncated ({err})") from err
        fingerprint = meta.pop(FINGERPRINT_KEY, "")
        meta.pop("format", None)
        return cls(config=config, tensors=tensors, base_fingerprint=fingerprint, meta=meta)

    # --- PEFT ---------------------------------------------------------------------------------
    @classmethod
    def from_peft(cls, model: PeftModel, base_fingerprint: str, adapter_name: str = "default") -> Adapter:
        config = model.peft_config[adapter_name].to_dict()
        config = json.loads(json.dumps(config, default=_jsonable))
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        tensors = {k: v.detach().clone().cpu() for k, v in state.items()}
        return cls(config=config, tensors=tensors, base_fingerprint=base_fingerprint)

    def lora_config(self) -> LoraConfig:
        keys = LoraConfig.__dataclass_fields__
        return LoraConfig(**{k: v for k, v in self.config.items() if k in keys and k != "peft_type"})

    def to_peft(self, base: PreTrainedModel, trainable: bool = False) -> PeftModel:
        """Wrap ``base`` with this adapter (PEFT). ``base`` is modified in place, as PEFT does."""
        model = get_peft_model(base, self.lora_config())
        result = set_peft_model_state_dict(model, self.tensors)
        if result.unexpected_keys:
            raise AdapterError(f"adapter tensors not in the model: {result.unexpected_keys[:3]}")
        if not trainable:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        return model


def _jsonable(value: object) -> object:
    if isinstance(value, set):
        return sorted(value)
    return str(value)


def _module_of(tensor_name: str) -> str:
    # base_model.model.<module>.lora_A.weight -> <module>
    name = tensor_name.removeprefix("base_model.model.")
    return name.rsplit(".lora_", 1)[0]


def base_linear_shapes(model: PreTrainedModel) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every nn.Linear in the base model, by module path."""
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _is_module_names(v: object) -> bool:
    # PEFT matches a list entry against a module path's last components; a dotted entry or a string
    # (a regex to PEFT) would select modules other than those validate_adapter checks.
    return isinstance(v, list) and bool(v) and all(isinstance(t, str) and t and "." not in t for t in v)


# The options checked by value: (accepted?, what is accepted). Every other option must keep the default.
_CHECKED_OPTIONS = {
    "peft_type": (lambda v: isinstance(v, str) and v.upper().split(".")[-1] == "LORA", "'LORA'"),
    "r": (lambda v: _is_int(v) and 1 <= v <= MAX_RANK, f"an integer in 1..{MAX_RANK}"),
    "lora_alpha": (lambda v: _is_number(v) and abs(v) <= MAX_ALPHA, f"a finite number, |lora_alpha| <= {MAX_ALPHA:g}"),
    "target_modules": (_is_module_names, "a non-empty list of module names (no dots, no regex)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "task_type": (lambda v: v in TASK_TYPES, f"one of {list(TASK_TYPES)}"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    # PEFT's other initialisations (pissa, olora, loftq, ...) rewrite the base model's weights
    "init_lora_weights": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "revision": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "peft_version": (lambda v: v is None or isinstance(v, str), "a string or null"),
}
_REQUIRED_OPTIONS = ("r", "lora_alpha", "target_modules")


def _config_text(config: dict) -> str:
    """adapter_config.json as ``Adapter.save`` writes it."""
    return json.dumps(config, indent=2, sort_keys=True)


@functools.cache
def _lora_defaults() -> dict:
    """Every option of the installed PEFT's LoraConfig with its default, as JSON (as saved)."""
    return json.loads(json.dumps(LoraConfig().to_dict(), default=_jsonable))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_config(config: object) -> None:
    """Accept exactly the LoRA configs the project loads and merges exactly; ``AdapterError`` names the rest.

    Validation checks one A (r x in) and one B (out x r) per targeted linear layer, and loading, merging
    and ``Adapter.delta`` scale by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). Any option that
    changes what PEFT loads or how it scales (``rank_pattern``, ``alpha_pattern``, ``use_dora``,
    ``layers_to_transform``, ``modules_to_save``, ...) would break those assumptions silently, so it must
    keep PEFT's default; an option the installed PEFT does not know would be dropped on load, so it is
    refused too. Rank, alpha and dropout are bounded so that one upload cannot scale a merge into noise,
    and the file as saved to ``MAX_CONFIG_BYTES``, which ``Adapter.load`` enforces.
    """
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must be a JSON object, got {type(config).__name__}")
    missing = [k for k in _REQUIRED_OPTIONS if k not in config]
    if missing:
        raise AdapterError(f"{CONFIG_FILE}: missing {', '.join(missing)}")
    defaults = _lora_defaults()
    for key, value in config.items():
        if key in _CHECKED_OPTIONS:
            accepted, what = _CHECKED_OPTIONS[key]
            if not accepted(value):
                raise AdapterError(f"{CONFIG_FILE}: {key} must be {what}, got {_short(value)}")
        elif key not in defaults:
            raise AdapterError(f"{CONFIG_FILE}: {_short(key)} is not a LoRA option of PEFT {peft.__version__}")
        elif value != defaults[key]:
            raise AdapterError(
                f"{CONFIG_FILE}: {key}={_short(value)} is not supported (plain LoRA only: {key} must be "
                f"{defaults[key]!r})"
            )
    size = len(_config_text(config).encode())
    if size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is {size} bytes, over the {MAX_CONFIG_BYTES}-byte limit")


def validate_adapter(
    adapter: Adapter, base_fingerprint: str, shapes: dict[str, tuple[int, int]], max_bytes: int = MAX_ADAPTER_BYTES
) -> None:
    """Reject an adapter that does not belong to this base model or is not a well-formed, bounded LoRA.

    Checks: the config (``check_config``); base fingerprint; metadata strings of bounded size; every
    target name adapts a linear layer of the base model, each with exactly one lora_A (r, in) and
    lora_B (out, r) tensor, nothing else; floating point values, finite and at most ``MAX_WEIGHT_ABS``
    in magnitude; total size.
    """
    check_config(adapter.config)
    cfg = adapter.config
    if adapter.base_fingerprint != base_fingerprint:
        raise AdapterError(
            f"adapter is for base model {adapter.base_fingerprint or '(unknown)'}, not {base_fingerprint}"
        )
    bad_meta = [k for k, v in adapter.meta.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad_meta:
        raise AdapterError(f"adapter metadata must map strings to strings; offending keys {bad_meta[:3]}")
    meta_bytes = len(json.dumps(adapter.meta).encode())
    if meta_bytes > MAX_META_BYTES:
        raise AdapterError(f"adapter metadata is {meta_bytes} bytes, over the {MAX_META_BYTES}-byte limit")
    if adapter.num_bytes > max_bytes:
        raise AdapterError(f"adapter holds {adapter.num_bytes} bytes, over the {max_bytes}-byte limit")
    r, targets = cfg["r"], cfg["target_modules"]
    adapted = {m.rsplit(".", 1)[-1] for m in shapes}
    unmatched = sorted(set(targets) - adapted)
    if unmatched:
        raise AdapterError(f"target_modules {unmatched} match no linear layer of the base model")
    modules = [m for m in shapes if m.rsplit(".", 1)[-1] in targets]
    expected = {}
    for m in modules:
        out_f, in_f = shapes[m]
        expected[f"base_model.model.{m}.lora_A.weight"] = (r, in_f)
        expected[f"base_model.model.{m}.lora_B.weight"] = (out_f, r)
    missing = sorted(set(expected) - set(adapter.tensors))
    extra = sorted(set(adapter.tensors) - set(expected))
    if missing:
        raise AdapterError(f"adapter is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if extra:
        raise AdapterError(f"adapter has {len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    for name, shape in expected.items():
        t = adapter.tensors[name]
        if tuple(t.shape) != shape:
            raise AdapterError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point():
            raise AdapterError(f"tensor {name} has dtype {t.dtype}; LoRA tensors must be floating point")
        if not torch.isfinite(t).all():
            raise AdapterError(f"tensor {name} holds NaN or Inf values")
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > MAX_WEIGHT_ABS:
            raise AdapterError(f"tensor {name} holds values up to {peak:.3g}, over the bound {MAX_WEIGHT_ABS:g}")
