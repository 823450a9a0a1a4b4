"""One device (user) of XPerT, framework-free: its models, its choice, its fine-tuning.

The Flower ClientApp (``clients/client_app.py``) only converts messages to and from these calls, so
everything here runs (and is tested) without Flower. Users and their data: ``clients/users.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import lru_cache

import numpy as np
import torch

from clients.users import UserData
from xpert_fl.adapters import Adapter, base_linear_shapes, validate_adapter
from xpert_fl.basis import Basis
from xpert_fl.device import DeviceTrainer
from xpert_fl.explain import Explanation, ProbeConfig, user_coordinates
from xpert_fl.finetune import FinetuneConfig, FinetuneResult, finetune, target_from_scratch, with_target
from xpert_fl.merge import merge_adapters
from xpert_fl.models import LoadedModel, load_model
from xpert_fl.select import Choice, select
from xpert_fl.summarizer import Summarizer


# --- models: loaded once per process --------------------------------------------------------------
@dataclass
class DeviceModels:
    base: LoadedModel
    summarizer: Summarizer


@lru_cache(maxsize=1)
def device_models(spec: str, summarizer_spec: str) -> DeviceModels:
    """The device's base model and summarizer, loaded once per process and reused by every message.

    Why a cached factory and not ``Context.state``: ``Context.state`` holds only records (arrays,
    metrics, configs) that Flower serializes between messages; a loaded torch model is a process
    resource. In the simulation one Ray actor process serves many virtual devices in turn, so the
    process is the right scope: ``maxsize=1`` keeps exactly one (base, summarizer) pair, and a new
    spec replaces it. Under the Deployment Engine (subprocess isolation) each message runs in a
    fresh ClientApp process, which loads the models once for that message.
    """
    base = load_model(spec)
    summ = base if summarizer_spec == spec else load_model(summarizer_spec)
    return DeviceModels(base, Summarizer(summ))


# --- the two device steps -------------------------------------------------------------------------
def choose(
    models: DeviceModels,
    data: UserData,
    basis: Basis,
    coords: Mapping[str, np.ndarray],
    delta: float,
    max_parents: int,
    probe: ProbeConfig,
) -> tuple[Choice, Explanation | None]:
    """The user's coordinates on the received basis (computed here, kept here) -> the choice (Eq. 1).

    With nothing cached there is nothing to compare: start from the base model, no coordinates needed.
    """
    if not coords:
        return Choice("base"), None
    mine = user_coordinates(models.base, models.summarizer, basis, data.train, probe)
    return select(mine.coords, coords, delta, max_parents, size=basis.size), mine


@dataclass
class Training:
    """What one fine-tuning produced: the upload, its costs, and the from-scratch baseline if run."""

    result: FinetuneResult
    scratch: FinetuneResult | None
    target: float | None
    start_kind: str


def start_adapter(base: LoadedModel, choice: Choice, adapters: Sequence[Adapter]) -> Adapter | None:
    """The starting point the device asked for: a cached pLLM, a merge of several, or the base (None)."""
    shapes = base_linear_shapes(base.model)
    for a in adapters:
        validate_adapter(a, base.fingerprint, shapes)
    if choice.kind == "base":
        return None
    if choice.kind == "single":
        return adapters[0]
    return merge_adapters(adapters, choice.weights)


def train(
    models: DeviceModels,
    data: UserData,
    choice: Choice,
    adapters: Sequence[Adapter],
    config: FinetuneConfig,
    compare_scratch: bool,
    trainer: DeviceTrainer = finetune,
) -> Training:
    """Fine-tune from the chosen start on the user's data with ``trainer`` (PyTorch or ORT engine).

    ``compare_scratch`` (a measurement, simulation only): first fine-tune from the base model to its
    plateau; target = its best held-out loss x 1.01 (``target_from_scratch``); then fine-tune the
    chosen start until it reaches that target. Both runs share data, config, seed and engine.
    """
    base = models.base
    start = start_adapter(base, choice, adapters)
    if not compare_scratch:
        return Training(trainer(base, data.train, data.test, config, start=start, progress=False), None, None,
                        choice.kind)
    scratch = trainer(base, data.train, data.test, replace(config, target_loss=None), progress=False)
    target = target_from_scratch(scratch)
    scratch = with_target(scratch, target)
    if start is None:
        return Training(scratch, scratch, target, choice.kind)
    warm = trainer(base, data.train, data.test, replace(config, target_loss=target), start=start, progress=False)
    return Training(warm, scratch, target, choice.kind)


COST_FIELDS = (
    "steps", "seconds", "train_seconds", "samples_consumed", "tokens_trained", "energy_joules", "start_loss",
    "best_test_loss", "final_test_loss", "steps_to_target", "seconds_to_target", "energy_joules_to_target",
    "peak_memory_mb", "n_train", "n_test",
)


def training_metrics(t: Training) -> dict[str, float]:
    """Numbers for the upload's MetricRecord: the run's costs, and the baseline's as ``scratch_*``."""
    out: dict[str, float] = {}

    def put(prefix: str, r: FinetuneResult) -> None:
        for name in COST_FIELDS:
            value = getattr(r, name)
            if value is not None:
                out[prefix + name] = float(value)
        out[prefix + "reached_target"] = float(r.reached_target)

    put("", t.result)
    if t.scratch is not None:
        put("scratch_", t.scratch)
    if t.target is not None:
        out["target_loss"] = float(t.target)
    return out


def finetune_config(fields_: Mapping, threads: int | None) -> FinetuneConfig:
    """A FinetuneConfig from the server's budget (unknown keys refused), with the device's thread count."""
    known = {f.name for f in fields(FinetuneConfig)}
    unknown = set(fields_) - known
    if unknown:
        raise ValueError(f"unknown fine-tuning settings {sorted(unknown)}")
    values = dict(fields_)
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    values["threads"] = threads
    return FinetuneConfig(**values)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))

