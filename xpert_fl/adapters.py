"""A pLLM as data: a LoRA adapter (PEFT config + tensors), its content hash, validation and PEFT I/O.

On disk an adapter is exactly PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``);
the base-model fingerprint travels in the safetensors metadata, so any PEFT tool still loads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FINGERPRINT_KEY = "xpert_base_fingerprint"
MAX_ADAPTER_BYTES = 512 * 2**20  # a LoRA adapter of a phone-sized model is a few MB


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
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True))
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
            save_file(tensors, tmp / WEIGHTS_FILE, metadata={**self.meta, FINGERPRINT_KEY: self.base_fingerprint})
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | Path, max_bytes: int = MAX_ADAPTER_BYTES) -> Adapter:
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise AdapterError(f"adapter {directory}: missing {path.name}")
        if weights_path.stat().st_size > max_bytes:
            raise AdapterError(
                f"adapter {directory}: {weights_path.name} is {weights_path.stat().st_size} bytes, "
                f"over the {max_bytes}-byte limit"
            )
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise AdapterError(f"adapter {directory}: {CONFIG_FILE} is not valid JSON ({err.msg})") from err
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


def validate_adapter(
    adapter: Adapter, base_fingerprint: str, shapes: dict[str, tuple[int, int]], max_bytes: int = MAX_ADAPTER_BYTES
) -> None:
    """Reject an adapter that does not belong to this base model or is not a well-formed LoRA.

    Checks: base fingerprint; a LoRA config with positive rank; for every targeted module of the base
    model exactly one lora_A (r, in) and lora_B (out, r) tensor, nothing else; finite values; size.
    """
    cfg = adapter.config
    if adapter.base_fingerprint != base_fingerprint:
        raise AdapterError(
            f"adapter is for base model {adapter.base_fingerprint or '(unknown)'}, not {base_fingerprint}"
        )
    if str(cfg.get("peft_type", "LORA")).upper().split(".")[-1] != "LORA":
        raise AdapterError(f"adapter is {cfg.get('peft_type')!r}, only LoRA adapters are accepted")
    r = cfg.get("r")
    if not isinstance(r, int) or r <= 0 or not cfg.get("target_modules"):
        raise AdapterError(f"adapter config needs a positive integer 'r' and 'target_modules', got r={r!r}")
    if adapter.num_bytes > max_bytes:
        raise AdapterError(f"adapter holds {adapter.num_bytes} bytes, over the {max_bytes}-byte limit")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    modules = [m for m in shapes if m.rsplit(".", 1)[-1] in targets]
    if not modules:
        raise AdapterError(f"target_modules {targets} match no linear layer of the base model")
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
        if not torch.isfinite(t).all():
            raise AdapterError(f"tensor {name} holds NaN or Inf values")
