"""One device (user) of XPerT, framework-free: its personal data, its choice, its fine-tuning.

The Flower ClientApp (``clients/client_app.py``) only converts messages to and from these calls, so
everything here runs (and is tested) without Flower.

Users: the run config's ``user-styles`` is a ``;``-separated list of user *specs*, each a style
(``sarcastic``) or a weighted mixture (``sarcastic:0.7,poetic:0.3``). The device with partition id
``p`` is user ``p`` with spec ``specs[p % len(specs)]`` and data index ``p // len(specs)``: users of
the same spec get disjoint samples (``user_samples``' ``user_index``) from the corpus's *user* role.
Its evaluation label (simulation ground truth, never used by selection) is the spec's heaviest style.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import lru_cache

import numpy as np
import torch

from xpert_fl.adapters import Adapter, base_linear_shapes, validate_adapter
from xpert_fl.basis import Basis
from xpert_fl.data import load_corpus, split_roles, train_test_split, user_samples
from xpert_fl.data.corpus import Sample
from xpert_fl.explain import Explanation, ProbeConfig, user_coordinates
from xpert_fl.finetune import FinetuneConfig, FinetuneResult, finetune, target_from_scratch, with_target
from xpert_fl.merge import merge_adapters
from xpert_fl.models import LoadedModel, load_model
from xpert_fl.select import Choice, select
from xpert_fl.summarizer import Summarizer


# --- users and their data -----------------------------------------------------------------------
def parse_user_styles(text: str) -> list[dict[str, float]]:
    """``"sarcastic;poetic:0.7,expert:0.3"`` -> ``[{"sarcastic": 1.0}, {"poetic": 0.7, "expert": 0.3}]``."""
    specs = []
    for part in (p.strip() for p in str(text).split(";")):
        if not part:
            continue
        mix: dict[str, float] = {}
        for item in (i.strip() for i in part.split(",")):
            name, _, weight = item.partition(":")
            try:
                w = float(weight) if weight else 1.0
            except ValueError as err:
                raise ValueError(f"user spec {part!r}: weight of {name!r} is not a number") from err
            if not name.strip() or w < 0:
                raise ValueError(f"user spec {part!r}: need style names with non-negative weights")
            mix[name.strip().lower()] = mix.get(name.strip().lower(), 0.0) + w
        if sum(mix.values()) <= 0:
            raise ValueError(f"user spec {part!r}: weights sum to zero")
        specs.append(mix)
    if not specs:
        raise ValueError(f"user-styles {text!r} names no user")
    return specs


@dataclass(frozen=True)
class UserData:
    """One user's personal data (never sent anywhere) and the identity it may reveal."""

    user: str  # opaque id sent to the server
    label: str  # evaluation label: the heaviest style of its spec
    mixture: dict[str, float]
    train: list[Sample]
    test: list[Sample]


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "builtin"
    user_styles: str = "sarcastic;poetic"
    user_samples: int = 12
    test_fraction: float = 0.25
    seed: int = 0

    @classmethod
    def from_run_config(cls, run_config: Mapping) -> DataConfig:
        return cls(
            corpus=str(run_config.get("corpus", cls.corpus)),
            user_styles=str(run_config.get("user-styles", cls.user_styles)),
            user_samples=int(run_config.get("user-samples", cls.user_samples)),
            test_fraction=float(run_config.get("test-fraction", cls.test_fraction)),
            seed=int(run_config.get("seed", cls.seed)),
        )


@lru_cache(maxsize=4)
def _user_role(corpus: str, seed: int):
    return split_roles(load_corpus(corpus), seed=seed)["user"]


def user_data(partition_id: int, cfg: DataConfig) -> UserData:
    """The personal data of the user with this partition id (deterministic from the seed)."""
    if partition_id < 0:
        raise ValueError(f"partition-id must be >= 0, got {partition_id}")
    specs = parse_user_styles(cfg.user_styles)
    mixture = specs[partition_id % len(specs)]
    index = partition_id // len(specs)
    samples = user_samples(_user_role(cfg.corpus, cfg.seed), mixture, cfg.user_samples, user_index=index, seed=cfg.seed)
    train, test = train_test_split(samples, cfg.test_fraction, seed=cfg.seed + partition_id)
    if not train or not test:
        raise ValueError(f"user {partition_id}: {len(samples)} samples give no train/test split; raise user-samples")
    label = max(mixture, key=lambda s: (mixture[s], s))
    return UserData(f"user-{partition_id}", label, dict(mixture), train, test)


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
) -> Training:
    """Fine-tune from the chosen start on the user's data.

    ``compare_scratch`` (a measurement, simulation only): first fine-tune from the base model to its
    plateau; target = its best held-out loss x 1.01 (``target_from_scratch``); then fine-tune the
    chosen start until it reaches that target. Both runs share data, config and seed.
    """
    base = models.base
    start = start_adapter(base, choice, adapters)
    if not compare_scratch:
        return Training(finetune(base, data.train, data.test, config, start=start, progress=False), None, None,
                        choice.kind)
    scratch = finetune(base, data.train, data.test, replace(config, target_loss=None), progress=False)
    target = target_from_scratch(scratch)
    scratch = with_target(scratch, target)
    if start is None:
        return Training(scratch, scratch, target, choice.kind)
    warm = finetune(base, data.train, data.test, replace(config, target_loss=target), start=start, progress=False)
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

