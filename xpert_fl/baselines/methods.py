"""Selection methods: XPerT behind the common interface, and the baselines of the paper's §7 / Table 7.

* ``scratch``: always the base model. ``random``: a seeded uniform pick. ``oracle``: the first pLLM
  whose training style label is the user's (reference lines only: real devices have no such label).
  These three need nothing on the device: 0 bytes, 0 seconds.
* ``exhaustive`` (Peng et al., 2023): download every pLLM, evaluate its loss on the user's samples,
  keep the lowest.
* ``bo``: Bayesian optimization over the pLLMs with optuna's ``GPSampler``; one trial = download a
  pLLM and evaluate its full loss; ``trials`` bounds the evaluations. The pLLM is a categorical
  parameter: optuna's GP puts a Hamming kernel on categorical dimensions, i.e. the one-hot encoding
  of the paper ("the indices of pLLMs are randomly one-hot encoded"). GP over TPE because GP works on
  a categorical index (optuna >= 4.2) and is what the paper names; with a Hamming kernel every
  unseen pLLM looks alike to the GP, which is exactly why BO barely beats exhaustive search.
  ``deterministic_objective`` (a loss on fixed data is noise-free) keeps it from re-proposing an
  evaluated pLLM; a repeat would be answered from memory, at no cost, but would use a trial.
* ``hyperband``: optuna's ``HyperbandPruner``; one trial = one pLLM (all of them, or ``trials`` of
  them, distinct, in a seeded random order), its intermediate values the running mean loss over
  successive evaluation batches (seeded random batches, the same for every pLLM), so poor pLLMs stop
  early. The choice is the best *completed* trial. Every tried pLLM is downloaded in full (an
  adapter cannot be half-downloaded), so HyperBand saves computation, not bytes, as in Table 7.
* ``xpert``: the user's coordinates on the cached basis, then Eq. 1 (or a merge): the device receives
  the basis and every explained pLLM's coordinates, not one adapter.

Deviation from the paper's Table 7: there BO and HyperBand are charged the download of every pLLM;
here a method pays for the pLLMs it actually evaluates, so ``bo`` with ``trials < n`` downloads less.
(In the Flower round loop the offer message does carry every adapter and the server counts it so,
as in Table 7; the device's reply reports this per-method figure beside it.)

``receives`` on each class names what its device needs from the server (the Flower offer's payload).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import optuna

from xpert_fl.baselines.core import (
    ADAPTERS,
    BASIS_COORDS,
    IDS,
    LABELS,
    DeviceMeter,
    Selection,
    SelectionTask,
    UserLoss,
    single,
)
from xpert_fl.basis import Basis
from xpert_fl.cache import PLLMCache
from xpert_fl.explain import BASIS_FILE, Explanation, ProbeConfig, offered_coordinates, user_coordinates
from xpert_fl.select import check_distance, select
from xpert_fl.summarizer import Summarizer


class ScratchSelector:
    """Always the base model: the cost reference every saving is measured against."""

    name = "scratch"
    receives = IDS

    def select(self, task: SelectionTask) -> Selection:
        return DeviceMeter(self.name).selection(single(None))


class RandomSelector:
    """A uniformly random pLLM, seeded by the task (the server can draw it: nothing to download)."""

    name = "random"
    receives = IDS

    def select(self, task: SelectionTask) -> Selection:
        ids = [e.id for e in task.entries()]
        return DeviceMeter(self.name).selection(single(random.Random(task.seed).choice(ids) if ids else None))


class OracleSelector:
    """The first pLLM trained on the user's own style label, else the base model. Reference only."""

    name = "oracle"
    receives = LABELS

    def select(self, task: SelectionTask) -> Selection:
        if task.label is None:
            raise ValueError("the oracle needs the user's style label (SelectionTask.label)")
        match = next((e.id for e in task.entries() if e.label == task.label), None)
        return DeviceMeter(self.name).selection(single(match), style_available=match is not None)


class ExhaustiveSelector:
    """Download every pLLM, evaluate its loss on all of the user's samples, keep the lowest."""

    name = "exhaustive"
    receives = ADAPTERS

    def select(self, task: SelectionTask) -> Selection:
        meter = DeviceMeter(self.name, task.sizes)
        loss = UserLoss(task, meter)
        scores = {e.id: loss.loss(meter.download(task.cache, e.id)) for e in task.entries()}
        best = min(scores, key=scores.__getitem__) if scores else None  # ties: first in cache order
        return meter.selection(single(best), scores)


class BayesOptSelector:
    """GP Bayesian optimization over the pLLMs (optuna ``GPSampler``), ``trials`` loss evaluations.

    ``trials`` defaults to half the offered pLLMs (rounded up); ``startup_trials`` random ones come first.
    ``last_study`` keeps the optuna study of the latest selection for inspection.
    """

    name = "bo"
    receives = ADAPTERS

    def __init__(self, trials: int | None = None, startup_trials: int = 1):
        if trials is not None and trials < 1 or startup_trials < 1:
            raise ValueError("trials and startup_trials must be >= 1")
        self.trials, self.startup_trials = trials, startup_trials
        self.last_study: optuna.Study | None = None

    def select(self, task: SelectionTask) -> Selection:
        meter = DeviceMeter(self.name, task.sizes)
        ids = [e.id for e in task.entries()]
        if not ids:
            return meter.selection(single(None))
        loss = UserLoss(task, meter)
        with warnings.catch_warnings():  # deterministic_objective is flagged experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.GPSampler(
                seed=task.seed, n_startup_trials=self.startup_trials, deterministic_objective=True
            )
        scores: dict[str, float] = {}
        order = []
        with _quiet_optuna():
            study = optuna.create_study(direction="minimize", sampler=sampler, study_name=f"bo-{task.seed}")
            for _ in range(min(len(ids), self.trials or math.ceil(len(ids) / 2))):
                with meter.device():  # fitting the GP and maximizing the acquisition run on the device
                    trial = study.ask()
                    pick = trial.suggest_categorical("pllm", ids)
                if pick not in scores:
                    scores[pick] = loss.loss(meter.download(task.cache, pick))
                order.append(pick)
                study.tell(trial, scores[pick])
        self.last_study = study
        best = study.best_trial.params["pllm"]
        return meter.selection(single(best), scores, sampler="GPSampler", trials=len(study.trials), order=order)


class HyperbandSelector:
    """HyperBand over the pLLMs (optuna ``HyperbandPruner``); a resource unit is one evaluation batch.

    ``trials``: how many distinct pLLMs to try (default: all). ``batch_size``: samples per evaluation
    batch (small batches give the pruner more rungs). ``last_study`` keeps the latest optuna study.
    """

    name = "hyperband"
    receives = ADAPTERS

    def __init__(self, trials: int | None = None, batch_size: int = 2, reduction_factor: int = 3):
        if trials is not None and trials < 1 or batch_size < 1 or reduction_factor < 2:
            raise ValueError("trials >= 1, batch_size >= 1 and reduction_factor >= 2 are required")
        self.trials, self.batch_size, self.reduction_factor = trials, batch_size, reduction_factor
        self.last_study: optuna.Study | None = None

    def select(self, task: SelectionTask) -> Selection:
        meter = DeviceMeter(self.name, task.sizes)
        ids = [e.id for e in task.entries()]
        if not ids:
            return meter.selection(single(None))
        loss = UserLoss(task, meter)
        batches = loss.batches(seed=task.seed, batch_size=self.batch_size)
        pruner = optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=len(batches), reduction_factor=self.reduction_factor
        )
        tried = random.Random(task.seed).sample(ids, min(len(ids), self.trials or len(ids)))
        scores: dict[str, float] = {}
        steps: dict[str, int] = {}
        with _quiet_optuna():
            study = optuna.create_study(
                direction="minimize", sampler=optuna.samplers.RandomSampler(seed=task.seed), pruner=pruner,
                study_name=f"hyperband-{task.seed}",
            )
            for pick in tried:
                study.enqueue_trial({"pllm": pick})
            for _ in tried:
                trial = study.ask()
                pick = trial.suggest_categorical("pllm", ids)
                for step, mean in enumerate(loss.running(meter.download(task.cache, pick), batches), start=1):
                    scores[pick], steps[pick] = mean, step
                    trial.report(mean, step)
                    with meter.device():
                        pruned = trial.should_prune()
                    if pruned:
                        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                        break
                else:
                    study.tell(trial, scores[pick])
        self.last_study = study
        best = study.best_trial.params["pllm"]
        states = {t.params["pllm"]: t.state.name for t in study.trials}
        return meter.selection(
            single(best), scores, sampler="RandomSampler+enqueued", pruner="HyperbandPruner", batches=len(batches),
            steps=steps, states=states,
        )


class XPerTSelector:
    """XPerT's own selection behind the common interface (the same calls as the Flower device).

    ``summarizer``: the one the cache's basis was built with (default: a default-configured summarizer
    over the task's base model, created once). ``basis``: default the cache's ``basis.safetensors``.
    Bytes: the ``query.select`` payload, i.e. the basis sub-vectors and every explained pLLM's coordinates.

    The user's coordinate depends only on its samples and the basis, not on the offer: a selector asked
    again for the same samples and basis (an evaluation offering other pLLMs) reuses it and charges the
    device seconds measured when it was computed, as a device that recomputed it would spend.
    """

    name = "xpert"
    receives = BASIS_COORDS

    def __init__(
        self,
        summarizer: Summarizer | None = None,
        basis: Basis | None = None,
        probe: ProbeConfig | None = None,
        delta: float = math.inf,
        max_parents: int = 3,
        distance: str = "drift",
    ):
        self.summarizer, self.basis = summarizer, basis
        self.probe = probe or ProbeConfig()
        self.delta, self.max_parents = delta, max_parents
        self.distance = check_distance(distance)
        self._mine: dict[tuple, tuple[Explanation, float]] = {}

    def select(self, task: SelectionTask) -> Selection:
        if self.summarizer is None:
            self.summarizer = Summarizer(task.base)
        basis = self.basis or self._cache_basis(task)
        ids, coords = offered_coordinates(task.entries(), basis.size)
        meter = DeviceMeter(self.name, task.sizes)
        if not ids:  # nothing explained to compare with: the base model, as the Flower device does
            return meter.selection(single(None))
        meter.receive(BASIS_COORDS, meter.sizes.basis_coords(basis, ids, coords, self.delta, self.max_parents,
                                                              asdict(self.probe), self.distance))
        key = (basis.summarizer, tuple(basis.words), basis.human_weight, tuple(task.samples))
        if key not in self._mine:
            t0 = time.perf_counter()
            mine = user_coordinates(task.base, self.summarizer, basis, task.samples, self.probe)
            self._mine[key] = (mine, time.perf_counter() - t0)
        mine, seconds = self._mine[key]
        meter.seconds += seconds
        with meter.device():
            offered = {i: coords[row].astype(np.float64) for row, i in enumerate(ids)}
            choice = select(mine.coords, offered, self.delta, self.max_parents, size=basis.size,
                            gram=basis.metric(self.distance))
        return meter.selection(choice, choice.distances, basis_size=basis.size, explanation=mine.text)

    def _cache_basis(self, task: SelectionTask) -> Basis:
        """The basis stored beside a cache; a device's offer is no cache: it must come as ``basis``."""
        if not isinstance(task.cache, PLLMCache):
            raise ValueError("XPerTSelector needs a basis when its pLLMs do not come from a cache directory")
        return Basis.load(Path(task.cache.root) / BASIS_FILE, expect_summarizer=self.summarizer.fingerprint)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """optuna logs every trial at INFO; a selection runs many studies."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)
