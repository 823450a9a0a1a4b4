"""Training engines: the operations :func:`~xpert_fl.finetune.loop.train_loop` needs from a backend.

:class:`TrainSession` is the interface; :class:`TorchSession` is the PyTorch engine (AdamW with
gradient-norm clipping on a :func:`~xpert_fl.finetune.model.prepare_model` PeftModel). ONNX Runtime's
engine lives in ``xpert_fl.device``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from xpert_fl.adapters import Adapter
from xpert_fl.finetune.batches import pad_token_id
from xpert_fl.finetune.config import FinetuneConfig
from xpert_fl.finetune.loss import encoded_loss, summed_nll
from xpert_fl.finetune.model import prepare_model
from xpert_fl.models import LoadedModel


class TrainSession(Protocol):
    """A model under LoRA training, as :func:`train_loop` drives it.

    Why an interface: the PyTorch engine (:class:`TorchSession`) and on-device engines such as ONNX
    Runtime (``xpert_fl.device``) share data, batches, stop rules and cost accounting through
    :func:`train_loop`, so their numbers compare; only these operations differ.
    """

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """One optimizer step on a collated batch; returns the summed NLL and the labelled-token count."""
        ...

    def eval_loss(self, encoded: list[dict]) -> float:
        """Token-weighted mean NLL over :func:`eval_batches` of ``encoded`` (no update)."""
        ...

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the current LoRA tensors, by PEFT state-dict name."""
        ...

    def adapter(self, state: dict[str, torch.Tensor]) -> Adapter:
        """The PEFT adapter holding ``state`` (a :meth:`snapshot`)."""
        ...


class TorchSession:
    """PyTorch engine: a PEFT model (:func:`prepare_model`) and AdamW with gradient-norm clipping."""

    def __init__(self, loaded: LoadedModel, start: Adapter | None, config: FinetuneConfig):
        self.model = prepare_model(loaded, start, config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.pad_id = pad_token_id(loaded.tokenizer)
        self.fingerprint = loaded.fingerprint
        self.config = config

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        self.model.train()
        nll, n = summed_nll(self.model, batch)
        (nll / max(n, 1)).backward()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(nll.detach()), n

    def eval_loss(self, encoded: list[dict]) -> float:
        return encoded_loss(self.model, encoded, self.pad_id, self.config.eval_batch_size)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def adapter(self, state: dict[str, torch.Tensor]) -> Adapter:
        set_peft_model_state_dict(self.model, state)
        return Adapter.from_peft(self.model, self.fingerprint)
