"""ONNX export of base + LoRA and ONNX Runtime training artifacts: what a phone downloads and runs.

One artifact set serves every pLLM of one base model and one LoRA shape (rank, alpha, target
modules, rsLoRA): the LoRA *values* are inputs, not part of the graph. Layout of a set (directory
``<cache>/ort/<key>``, key = hash of base fingerprint + LoRA shape + format/opset/ORT version):

* ``training_model.onnx``, ``eval_model.onnx``: forward + loss (+ gradients); no weights in them.
* ``nominal_checkpoint``: ORT checkpoint with parameter names/shapes only (kilobytes).
* ``base_weights.bin``: every parameter, fp32 little-endian, concatenated in the order ORT's
  ``Module.copy_buffer_to_parameters(trainable_only=False)`` expects (LoRA slots hold random
  initial values, overwritten before training). Downloaded once per base model and LoRA shape.
* ``optimizer_*.onnx``: AdamW (PyTorch semantics) with gradient-norm clipping, one per
  (weight decay, max norm), generated on demand (cheap).
* ``manifest.json``: the LoRA shape, base fingerprint, and per parameter its ONNX name, PEFT name
  (LoRA only), shape, offset in ``base_weights.bin`` and offset in the trainable buffer.

Per pLLM the device receives only its PEFT adapter (LoRA tensors, a few MB), written into the
trainable buffer with :meth:`Artifacts.lora_buffer`.

Export recipe (why each choice): fp32 and eager attention (what ORT's training kernels and the
gradient builder support), no KV cache, a wrapper returning the masked mean next-token NLL (the
loss of :mod:`xpert_fl.finetune`: prompt and pad tokens carry label -100), TorchScript exporter
(``dynamo=False``), opset 17, ``TrainingMode.TRAINING``, no constant folding (which would fold the
frozen weights into constants the gradient builder cannot see), dynamic batch and sequence axes.
ORT 1.19.2 reads IR version <= 10, so ``onnx.IR_VERSION`` is lowered while the artifacts are written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from onnxruntime.training import artifacts as ort_artifacts
from onnxruntime.training import onnxblock
from onnxruntime.training.api import CheckpointState, Module
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from xpert_fl.adapters import Adapter, AdapterError
from xpert_fl.files import atomic_write_bytes
from xpert_fl.finetune import IGNORE_INDEX, shared_copy
from xpert_fl.models import LoadedModel, cache_root

FORMAT_VERSION = 1
OPSET = 17
ORT_MAX_IR_VERSION = 10
WRAPPER_PREFIX = "peft."  # ONNX parameter names are the wrapper's: "peft." + PEFT parameter name
INPUT_NAMES = ("input_ids", "attention_mask", "labels")
MANIFEST = "manifest.json"
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
NOMINAL_CHECKPOINT = "nominal_checkpoint"
BASE_WEIGHTS = "base_weights.bin"


class ArtifactMismatch(AdapterError):
    """An adapter or base model does not fit an artifact set (other base, rank, alpha or targets)."""


@dataclass(frozen=True)
class LoraShape:
    """What an artifact set is specific to besides the base model: the LoRA hyper-parameters."""

    r: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False

    @classmethod
    def of(cls, adapter: Adapter) -> LoraShape:
        cfg = adapter.config
        targets = cfg.get("target_modules") or ()
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        if cfg.get("use_dora") or cfg.get("lora_bias"):
            raise ArtifactMismatch("ORT artifacts support plain LoRA only (no DoRA, no LoRA bias)")
        return cls(int(cfg["r"]), float(cfg["lora_alpha"]), tuple(sorted(targets)), bool(cfg.get("use_rslora")))

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=list(self.target_modules),
            use_rslora=self.use_rslora, bias="none", task_type="CAUSAL_LM",
        )

    def key(self, base_fingerprint: str) -> str:
        ident = {
            "format": FORMAT_VERSION, "opset": OPSET, "onnxruntime": onnxruntime.__version__,
            "base": base_fingerprint, **asdict(self),
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Artifacts:
    """A generated artifact set on disk and its manifest."""

    directory: Path
    manifest: dict

    @classmethod
    def open(cls, directory: str | Path) -> Artifacts:
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FileNotFoundError(f"{directory} is not an ORT artifact set (no readable {MANIFEST})") from err
        files = (TRAINING_MODEL, EVAL_MODEL, NOMINAL_CHECKPOINT, BASE_WEIGHTS)
        missing = [n for n in files if not (directory / n).exists()]
        if missing:
            raise FileNotFoundError(f"ORT artifact set {directory} lacks {missing}")
        size = (directory / BASE_WEIGHTS).stat().st_size
        if size != 4 * manifest["num_parameters"]:
            raise ValueError(f"{directory / BASE_WEIGHTS} has {size} bytes, expected {4 * manifest['num_parameters']}")
        return cls(directory, manifest)

    @property
    def base_fingerprint(self) -> str:
        return self.manifest["base_fingerprint"]

    @property
    def lora(self) -> LoraShape:
        m = self.manifest["lora"]
        return LoraShape(m["r"], m["alpha"], tuple(m["target_modules"]), m["use_rslora"])

    @property
    def trainable(self) -> list[dict]:
        """The LoRA parameters in trainable-buffer order."""
        return [p for p in self.manifest["parameters"] if p["trainable"]]

    def path(self, name: str) -> Path:
        return self.directory / name

    def check(self, adapter: Adapter) -> None:
        """Raise :class:`ArtifactMismatch` unless ``adapter`` is exactly what these artifacts train."""
        if adapter.base_fingerprint != self.base_fingerprint:
            raise ArtifactMismatch(
                f"adapter is for base model {adapter.base_fingerprint or '(unknown)'}, the ORT artifacts in "
                f"{self.directory} for {self.base_fingerprint}"
            )
        mine = LoraShape.of(adapter)
        if mine != self.lora:
            raise ArtifactMismatch(f"adapter LoRA {mine} does not match the ORT artifacts' {self.lora}")
        expected = {p["peft_name"]: tuple(p["shape"]) for p in self.trainable}
        got = {k: tuple(v.shape) for k, v in adapter.tensors.items()}
        if got != expected:
            diff = sorted(set(got.items()) ^ set(expected.items()))
            raise ArtifactMismatch(f"adapter tensors do not match the ORT artifacts' LoRA parameters, e.g. {diff[0]}")

    def lora_buffer(self, adapter: Adapter) -> np.ndarray:
        """The adapter's tensors as ORT's trainable buffer (fp32, manifest order), after :meth:`check`."""
        self.check(adapter)
        parts = [adapter.tensors[p["peft_name"]].detach().to(torch.float32).reshape(-1).numpy() for p in self.trainable]
        return np.ascontiguousarray(np.concatenate(parts))

    def lora_tensors(self, buffer: np.ndarray) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`lora_buffer`: PEFT-named tensors (copies) from a trainable buffer."""
        out, offset = {}, 0
        for p in self.trainable:
            n = int(np.prod(p["shape"]))
            out[p["peft_name"]] = torch.from_numpy(buffer[offset : offset + n].reshape(p["shape"]).copy())
            offset += n
        if offset != buffer.size:
            raise ValueError(f"trainable buffer has {buffer.size} values, the artifacts' LoRA {offset}")
        return out

    def base_weights(self) -> np.ndarray:
        """All parameters as one read-only memory map (the buffer ``copy_buffer_to_parameters`` takes)."""
        return np.memmap(self.path(BASE_WEIGHTS), dtype="<f4", mode="r")

    def optimizer_model(self, weight_decay: float, max_grad_norm: float | None) -> Path:
        """AdamW with PyTorch semantics (``adam_mode=0``) and optional norm clipping, generated once per setting.

        onnxblock's AdamW hard-codes the Hugging Face variant (``adam_mode=1``: weight decay after the
        update, epsilon not bias-corrected); mode 0 is ``torch.optim.AdamW``, what the PyTorch engine runs.
        """
        name = f"optimizer_wd{weight_decay!r}_clip{max_grad_norm!r}.onnx"
        path = self.path(name)
        if path.is_file():
            return path
        clip = onnxblock.optim.ClipGradNorm(max_grad_norm) if max_grad_norm is not None else None
        block = onnxblock.optim.AdamW(eps=1e-8, weight_decay=weight_decay, clip_grad=clip)
        # the block reads only the element type of the trainable parameters
        nominal = onnx.helper.make_tensor("p", onnx.TensorProto.FLOAT, [1], [0.0])
        with _ort_ir_version(), onnxblock.empty_base(opset_version=OPSET):
            block(([nominal], []))
            model = block.to_model_proto()
        for node in model.graph.node:
            if node.op_type == "AdamWOptimizer":
                for attr in node.attribute:
                    if attr.name == "adam_mode":
                        attr.i = 0
        atomic_write_bytes(path, model.SerializeToString())
        return path

    def sizes(self) -> dict[str, int]:
        """Bytes of each file: what a device downloads once per base/LoRA shape."""
        return {p.name: _size(p) for p in sorted(self.directory.iterdir()) if not p.name.startswith(".")}


# --- export -------------------------------------------------------------------------------------------
class LossWrapper(torch.nn.Module):
    """(input_ids, attention_mask, labels) -> masked mean next-token NLL, the training loss of finetune().

    Summed NLL over labelled tokens / max(count, 1): a batch without labelled tokens gives 0, not NaN.
    """

    def __init__(self, peft_model: torch.nn.Module):
        super().__init__()
        self.peft = peft_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.peft(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        labels = labels[:, 1:]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll / (labels != IGNORE_INDEX).sum().clamp(min=1).to(nll.dtype)


def export_model(loaded: LoadedModel, lora: LoraShape) -> tuple[torch.nn.Module, dict[str, str]]:
    """Base + a LoRA of this shape wrapped for export, and the map ONNX name -> PEFT name of LoRA tensors.

    The base is a weight-sharing copy (``shared_copy``), switched to eager attention, so ``loaded``
    stays untouched.
    """
    base = shared_copy(loaded.model)
    base.config._attn_implementation = "eager"  # transformers' switch of the attention kernel
    # random A and B (not B = 0): distinct values let _write_base_weights verify ORT's buffer order
    peft_model = get_peft_model(base, replace(lora.lora_config(), init_lora_weights=False))
    peft_model.eval()
    state_names = set(get_peft_model_state_dict(peft_model))
    names = {}
    for name, _ in peft_model.named_parameters():
        if ".lora_" in name:
            peft_name = name.replace(".default.", ".")
            if peft_name not in state_names:
                raise RuntimeError(f"cannot map LoRA parameter {name} to a PEFT state-dict name")
            names[WRAPPER_PREFIX + name] = peft_name
    if set(names.values()) != state_names:
        raise RuntimeError("PEFT state dict and LoRA parameters disagree")
    return LossWrapper(peft_model), names


@contextlib.contextmanager
def _ort_ir_version() -> Iterator[None]:
    saved = onnx.IR_VERSION
    onnx.IR_VERSION = min(saved, ORT_MAX_IR_VERSION)
    try:
        yield
    finally:
        onnx.IR_VERSION = saved


def build_artifacts(loaded: LoadedModel, lora: LoraShape, directory: str | Path) -> Artifacts:
    """Export, generate the ORT training artifacts and the base-weights file into ``directory`` (atomic)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    onnxruntime.set_default_logger_severity(3)  # the gradient builder logs every graph pass at INFO
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        wrapper, lora_names = export_model(loaded, lora)
        example = torch.ones((2, 8), dtype=torch.long)
        forward = tmp / "forward.onnx"
        with torch.no_grad():
            torch.onnx.export(
                wrapper, (example, example, example), str(forward), dynamo=False, opset_version=OPSET,
                training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                input_names=list(INPUT_NAMES), output_names=["loss"],
                dynamic_axes={k: {0: "batch", 1: "sequence"} for k in INPUT_NAMES},
            )
        model = onnx.load(str(forward))
        params = [t.name for t in model.graph.initializer]
        missing = sorted(set(lora_names) - set(params))
        if missing:
            raise RuntimeError(f"the exported graph lacks LoRA parameters, e.g. {missing[0]}")
        with _ort_ir_version():
            ort_artifacts.generate_artifacts(
                model, requires_grad=sorted(lora_names), frozen_params=[n for n in params if n not in lora_names],
                loss=None, artifact_directory=tmp, nominal_checkpoint=True,
            )
        del model
        forward.unlink()
        manifest = _write_base_weights(tmp, lora_names)
        manifest.update(base_fingerprint=loaded.fingerprint, lora=asdict(lora), format=FORMAT_VERSION, opset=OPSET,
                        onnxruntime=onnxruntime.__version__, spec=loaded.spec)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (tmp / "checkpoint").unlink()  # the full checkpoint duplicates base_weights.bin
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the processes of a user
        if directory.exists() and not (directory / MANIFEST).is_file():
            shutil.rmtree(directory)  # a set without manifest is not one: replace it
        try:
            os.replace(tmp, directory)
        except OSError:
            if not (directory / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp)  # a concurrent builder finished first: keep its (identical) set
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifacts.open(directory)


def _write_base_weights(directory: Path, lora_names: Mapping[str, str]) -> dict:
    """base_weights.bin from the full checkpoint, in ORT's buffer order (the training graph's parameter
    inputs), checked value by value against ORT's own buffers."""
    state = CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = Module(str(directory / TRAINING_MODEL), state, str(directory / EVAL_MODEL))
    full = module.get_contiguous_parameters(trainable_only=False).numpy()
    trainable = module.get_contiguous_parameters(trainable_only=True).numpy()
    params = dict(state.parameters)
    graph_inputs = [i.name for i in onnx.load(str(directory / TRAINING_MODEL), load_external_data=False).graph.input]
    entries, offset, t_offset = [], 0, 0
    for name in (n for n in graph_inputs if n in params):
        data = params[name].data.reshape(-1)
        entry = {"name": name, "shape": list(params[name].data.shape), "offset": offset,
                 "trainable": bool(params[name].requires_grad)}
        if entry["trainable"]:
            entry.update(peft_name=lora_names[name], trainable_offset=t_offset)
            if not np.array_equal(trainable[t_offset : t_offset + data.size], data):
                raise RuntimeError(f"ORT's trainable buffer order differs from its graph inputs at {name}")
            t_offset += data.size
        if not np.array_equal(full[offset : offset + data.size], data):
            raise RuntimeError(f"ORT's parameter buffer order differs from its graph inputs at {name}")
        entries.append(entry)
        offset += data.size
    if (offset, t_offset) != (full.size, trainable.size) or len(entries) != len(params) or {
        e["name"] for e in entries if e["trainable"]
    } != set(lora_names):
        raise RuntimeError("ORT's parameter buffers do not match its checkpoint")
    np.asarray(full, dtype="<f4").tofile(directory / BASE_WEIGHTS)  # no copy on little-endian hosts
    return {"num_parameters": int(full.size), "num_trainable": int(trainable.size), "parameters": entries}


def artifacts_for(loaded: LoadedModel, lora: LoraShape, cache_dir: str | Path | None = None) -> Artifacts:
    """The artifact set for this base model and LoRA shape: from the on-disk cache, else built (minutes).

    Cache: ``cache_dir`` (default ``<xpert cache>/ort``) / key; concurrent builders each write a temp
    directory and rename it into place, so a reader never sees a partial set.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "ort"
    directory = root / lora.key(loaded.fingerprint)
    if not (directory / MANIFEST).is_file():
        return build_artifacts(loaded, lora, directory)
    try:
        return Artifacts.open(directory)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{err}; the cached artifact set is damaged: delete {directory} to rebuild it") from err


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
