"""Shared fixtures: the real embedded model is loaded once per test session."""

from __future__ import annotations

import pytest
import torch

from xpert_fl.adapters import Adapter
from xpert_fl.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def base() -> LoadedModel:
    return load_model()


@pytest.fixture(scope="session")
def random_pllm(base):
    """``random_pllm(seed)``: a rank-2 LoRA of the embedded model on q_proj with random A and B (a
    'style' the summarizer can see); the base model is left untouched."""
    from peft import LoraConfig, get_peft_model

    from xpert_fl.finetune import shared_copy

    def make(seed: int) -> Adapter:
        torch.manual_seed(seed)
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
        model = get_peft_model(shared_copy(base.model), lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.mul_(0.5)
        return Adapter.from_peft(model, base.fingerprint)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine more threads run several times slower.
    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def flower_task_identity():
    """Flower messages created outside a Flower process need a run/node identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
