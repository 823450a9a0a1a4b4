"""LoRA fine-tuning on ONNX Runtime training (what a phone runs), with the contract of ``finetune()``.

:class:`OrtTrainer` is a drop-in for :func:`xpert_fl.finetune.finetune`: same config, same data
encoding and batches, same stop rules and cost accounting (both run
:func:`xpert_fl.finetune.train_loop`), same :class:`~xpert_fl.finetune.FinetuneResult`, and a PEFT
adapter the server validates like any other. Only the engine differs: :class:`OrtSession` trains the
LoRA parameters of an artifact set (:mod:`xpert_fl.device.artifacts`) with AdamW (PyTorch semantics)
and gradient-norm clipping built into the optimizer graph.

The start point is prepared exactly as the PyTorch engine prepares it (``prepare_model`` under the
seeded RNG: a fresh PEFT initialization, or the continued adapter), then written into ORT's
parameters; so from the same seed both engines start from identical weights. Limits: LoRA dropout
must be 0 (ORT's dropout draws other random numbers; the server never sets it); the artifact
export (minutes, once per base model and LoRA shape) is not part of the run's costs, like loading
the model is not for the PyTorch engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxruntime.training.api import CheckpointState, Module, Optimizer

from xpert_fl.adapters import Adapter, base_linear_shapes, validate_adapter
from xpert_fl.data.corpus import Sample
from xpert_fl.device.artifacts import (
    EVAL_MODEL,
    NOMINAL_CHECKPOINT,
    TRAINING_MODEL,
    ArtifactMismatch,
    Artifacts,
    LoraShape,
    artifacts_for,
)
from xpert_fl.finetune import (
    IGNORE_INDEX,
    FinetuneConfig,
    FinetuneResult,
    eval_batches,
    pad_token_id,
    prepare_model,
    train_loop,
)
from xpert_fl.models import LoadedModel


def _feeds(batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(batch[k].numpy().astype(np.int64, copy=False) for k in ("input_ids", "attention_mask", "labels"))


def _copy_to_parameters(module: Module, values: np.ndarray, trainable_only: bool) -> None:
    # The C-level OrtValue borrows the array's memory: keep both alive until the copy is done.
    array = np.ascontiguousarray(values, dtype=np.float32)
    value = onnxruntime.OrtValue.ortvalue_from_numpy(array)
    module.copy_buffer_to_parameters(value._ortvalue, trainable_only)


def _labelled(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class OrtSession:
    """The :class:`~xpert_fl.finetune.TrainSession` of ONNX Runtime: one artifact set, one start point."""

    def __init__(self, loaded: LoadedModel, start: Adapter | None, config: FinetuneConfig, artifacts: Artifacts):
        if config.dropout:
            raise ValueError(f"the ORT trainer supports LoRA dropout 0 only, got {config.dropout}")
        prepared = Adapter.from_peft(prepare_model(loaded, start, config), loaded.fingerprint)
        trainable = artifacts.lora_buffer(prepared)  # raises ArtifactMismatch for another base or LoRA shape
        self.artifacts = artifacts
        self.config = config
        self.peft_config = prepared.config
        self.fingerprint = loaded.fingerprint
        self.pad_id = pad_token_id(loaded.tokenizer)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = config.threads or 0  # 0: ORT's default, all cores
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        state = CheckpointState.load_checkpoint(str(artifacts.path(NOMINAL_CHECKPOINT)))
        self.module = Module(
            str(artifacts.path(TRAINING_MODEL)), state, str(artifacts.path(EVAL_MODEL)), session_options=options
        )
        _copy_to_parameters(self.module, artifacts.base_weights(), trainable_only=False)
        _copy_to_parameters(self.module, trainable, trainable_only=True)
        optimizer = artifacts.optimizer_model(config.weight_decay, config.max_grad_norm)
        self.optimizer = Optimizer(str(optimizer), self.module)
        self.optimizer.set_learning_rate(config.lr)

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        self.module.train()
        loss = float(self.module(*_feeds(batch)))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        n = _labelled(batch)
        return loss * n, n

    def eval_loss(self, encoded: list[dict]) -> float:
        self.module.eval()
        total, count = 0.0, 0
        for batch in eval_batches(encoded, self.pad_id, self.config.eval_batch_size):
            n = _labelled(batch)
            total, count = total + float(self.module(*_feeds(batch))) * n, count + n
        if count == 0:
            raise ValueError("no completion tokens to evaluate")
        return total / count

    def snapshot(self) -> dict[str, torch.Tensor]:
        return self.artifacts.lora_tensors(self.module.get_contiguous_parameters(trainable_only=True).numpy())

    def adapter(self, state: dict[str, torch.Tensor]) -> Adapter:
        return Adapter(config=dict(self.peft_config), tensors=dict(state), base_fingerprint=self.fingerprint)


class OrtTrainer:
    """``finetune()`` on ONNX Runtime. ``artifacts``: a fixed set (as on a phone: an adapter that does
    not fit it is an error); None: the cached set for the start's LoRA shape, built on first use."""

    def __init__(self, artifacts: Artifacts | None = None, cache_dir: str | Path | None = None):
        self.artifacts = artifacts
        self.cache_dir = cache_dir

    def artifacts_for(self, loaded: LoadedModel, start: Adapter | None, config: FinetuneConfig) -> Artifacts:
        """The artifact set a run of ``start`` under ``config`` trains (validating ``start`` first)."""
        if start is not None:
            validate_adapter(start, loaded.fingerprint, base_linear_shapes(loaded.model))
            lora = LoraShape.of(start)
        else:
            lora = LoraShape(config.rank, float(config.alpha), tuple(sorted(config.target_modules)))
        if self.artifacts is None:
            return artifacts_for(loaded, lora, self.cache_dir)
        if self.artifacts.base_fingerprint != loaded.fingerprint:
            raise ArtifactMismatch(
                f"the ORT artifacts in {self.artifacts.directory} are for base model "
                f"{self.artifacts.base_fingerprint}, not {loaded.fingerprint}"
            )
        if self.artifacts.lora != lora:
            raise ArtifactMismatch(f"start LoRA {lora} does not match the ORT artifacts' {self.artifacts.lora}")
        return self.artifacts

    def __call__(
        self,
        loaded: LoadedModel,
        train: Sequence[Sample],
        test: Sequence[Sample],
        config: FinetuneConfig | None = None,
        start: Adapter | None = None,
        progress: bool = True,
    ) -> FinetuneResult:
        config = config or FinetuneConfig()
        artifacts = self.artifacts_for(loaded, start, config)
        return train_loop(lambda: OrtSession(loaded, start, config, artifacts), loaded, train, test, config, start,
                          progress)
