"""One device (user) of XPerT, framework-free: its models, its choice, its fine-tuning.

The Flower ClientApp (``clients/client_app.py``) only converts messages to and from these calls, so
everything here runs (and is tested) without Flower. Users and their data: ``clients/users.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import lru_cache

import numpy as np
import torch

from clients.users import UserData
from protocol import MessageSizes, OfferRequest, ProtocolError, SelectRequest
from xpert_fl.adapters import Adapter, base_linear_shapes, validate_adapter
from xpert_fl.baselines import (
    OfferedPLLM,
    ReceivedOffer,
    Selection,
    SelectionTask,
    Selector,
    XPerTSelector,
    make_selector,
    needs_base,
)
from xpert_fl.baselines.core import ADAPTERS, EMBEDDINGS, LABELS
from xpert_fl.device import DeviceTrainer
from xpert_fl.explain import ProbeConfig, user_drift
from xpert_fl.finetune import FinetuneConfig, FinetuneResult, finetune, target_from_scratch, with_target
from xpert_fl.merge import merge_adapters
from xpert_fl.models import LoadedModel, load_model
from xpert_fl.select import Choice
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
def choose(data: UserData, req: SelectRequest | OfferRequest, models: Callable[[], DeviceModels]) -> Selection:
    """Run the requested selection method on what the device received: the same ``xpert_fl.baselines``
    selector the offline experiments run, over a :class:`ReceivedOffer` instead of the server's cache.

    XPerT: the user's coordinates on the received basis (computed here, kept here) -> Eq. 1 (or a
    merge). ``models`` is called only for methods that run the base model or the summarizer.
    """
    if isinstance(req, SelectRequest):
        selector = XPerTSelector(models().summarizer, req.basis, ProbeConfig(**req.probe), req.delta, req.max_parents,
                                 req.distance)
        offer = ReceivedOffer(tuple(OfferedPLLM(i, coords=c.tolist()) for i, c in req.coords_by_id().items()))
        return selector.select(SelectionTask(models().base, offer, data.train, sizes=MessageSizes()))
    selector = _baseline(req)
    base = models().base if needs_base(selector) else None
    config = FinetuneConfig(max_seq_len=req.max_seq_len, eval_batch_size=req.eval_batch_size)
    offer = _offered(req, selector.receives, base)
    task = SelectionTask(base, offer, data.train, label=req.user_label, seed=req.seed, config=config,
                         sizes=MessageSizes())
    return selector.select(task)


def _baseline(req: OfferRequest) -> Selector:
    """The offer's method, with its trial budget; the text encoder gets the server's embeddings, which
    must come from the same encoder as the device's (else cosines compare unrelated spaces)."""
    try:
        selector = make_selector(req.method, **({} if req.trials is None else {"trials": req.trials}))
    except TypeError as err:
        raise ProtocolError(f"selection {req.method!r} takes no trial budget ({err})") from err
    if selector.receives == EMBEDDINGS and req.ids:
        if req.embeddings is None or req.encoder != selector.encoder.fingerprint:
            mine = selector.encoder.fingerprint
            raise ProtocolError(f"text-encoder offer: embeddings by encoder {req.encoder}, this device's is {mine}")
        selector.vectors.update(zip(req.ids, req.embeddings, strict=True))
    return selector


def _offered(req: OfferRequest, receives: str, base: LoadedModel | None) -> ReceivedOffer:
    """The offer as a read-only pLLM source, holding what its method ``receives``; adapters must fit the
    base model."""
    needed = {ADAPTERS: req.adapters, LABELS: req.labels}.get(receives)
    if needed is not None and len(needed) != len(req.ids):
        raise ProtocolError(f"the offer for {req.method!r} lacks its {receives}")
    if base is not None:
        shapes = base_linear_shapes(base.model)
        for a in req.adapters:
            validate_adapter(a, base.fingerprint, shapes)
    labels = req.labels or (None,) * len(req.ids)
    entries = tuple(OfferedPLLM(i, label) for i, label in zip(req.ids, labels, strict=True))
    return ReceivedOffer(entries, dict(zip(req.ids, req.adapters, strict=False)))


@dataclass
class Training:
    """What one fine-tuning produced: the upload, its costs, and the from-scratch baseline if run."""

    result: FinetuneResult
    scratch: FinetuneResult | None
    target: float | None
    start_kind: str


def self_report(models: DeviceModels, data: UserData, probe: ProbeConfig) -> np.ndarray:
    """The drift embedding of the data the device trained on (the vector its selection coordinates come
    from, never text): uploaded beside the adapter so the server may explain the pLLM by it."""
    return user_drift(models.base, models.summarizer, data.train, probe).vector


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

