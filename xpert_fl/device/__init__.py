"""On-device fine-tuning engines behind one interface: PyTorch (``finetune``) and ONNX Runtime training.

Why an interface: ``onnxruntime-training`` is frozen at 1.19.2 (its Android AAR is the last
release), so the engine a phone runs may have to change (e.g. to ExecuTorch). Anything that trains
a LoRA adapter to a target with :func:`xpert_fl.finetune.finetune`'s contract is a
:class:`DeviceTrainer`; the ClientApp picks one by name (run-config key ``trainer``).
Modules: :mod:`.artifacts` (ONNX export, ORT training artifacts, base/LoRA split, on-disk cache),
:mod:`.ort_trainer` (the ORT engine). ONNX Runtime is imported only when the ORT engine is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from xpert_fl.adapters import Adapter
from xpert_fl.data.corpus import Sample
from xpert_fl.finetune import FinetuneConfig, FinetuneResult, finetune
from xpert_fl.models import LoadedModel

TRAINERS = ("torch", "ort")


class DeviceTrainer(Protocol):
    """Fine-tune ``start`` (None: the base model) on ``train`` to the config's target, evaluating on ``test``."""

    def __call__(
        self,
        loaded: LoadedModel,
        train: Sequence[Sample],
        test: Sequence[Sample],
        config: FinetuneConfig | None = None,
        start: Adapter | None = None,
        progress: bool = True,
    ) -> FinetuneResult: ...


def get_trainer(name: str) -> DeviceTrainer:
    """The engine called ``name``: "torch" (PyTorch + PEFT) or "ort" (ONNX Runtime training)."""
    if name == "torch":
        return finetune
    if name == "ort":
        from xpert_fl.device.ort_trainer import OrtTrainer

        return OrtTrainer()
    raise ValueError(f"unknown trainer {name!r}; choose one of {', '.join(TRAINERS)}")
