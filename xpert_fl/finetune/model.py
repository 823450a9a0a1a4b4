"""The model a run trains: a LoRA PeftModel over a weight-sharing copy of the loaded base.

The caller's base model is never modified: the model that gets trained is a copy of its module tree
that *shares* the frozen base weight tensors (no extra memory for them) with new, frozen ``Parameter``
objects, so neither values nor ``requires_grad`` flags of ``loaded.model`` change and a process can
fine-tune any number of times from one loaded base.
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from xpert_fl.adapters import Adapter, base_linear_shapes, validate_adapter
from xpert_fl.finetune.config import FinetuneConfig
from xpert_fl.models import LoadedModel


def shared_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of the module tree that shares the weight tensors (new frozen Parameter objects).

    PEFT replaces modules of the model it wraps; doing that on this copy leaves ``model`` untouched
    (values, requires_grad flags and module tree), at the cost of buffers only. Tied weights stay tied.
    """
    memo: dict[int, object] = {id(p): torch.nn.Parameter(p.data, requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def prepare_model(loaded: LoadedModel, start: Adapter | None = None, config: FinetuneConfig | None = None) -> PeftModel:
    """A trainable PeftModel over a weight-sharing copy of ``loaded.model`` (which stays clean).

    ``start=None``: a fresh LoRA adapter (config rank/alpha/targets; PEFT init, B = 0, so the start
    point *is* the base model). Otherwise ``start`` is validated against the base model and continued:
    its rank/alpha/targets win, all its LoRA tensors are trainable, dropout comes from ``config``.
    Initialization draws from the global torch RNG; :func:`finetune` seeds it inside ``fork_rng``.
    """
    config = config or FinetuneConfig()
    base = shared_copy(loaded.model)
    if start is None:
        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora)
    else:
        validate_adapter(start, loaded.fingerprint, base_linear_shapes(loaded.model))
        cont = Adapter(
            config={**start.config, "lora_dropout": config.dropout, "inference_mode": False},
            tensors=start.tensors,
            base_fingerprint=start.base_fingerprint,
            meta=dict(start.meta),
        )
        model = cont.to_peft(base, trainable=True)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model
