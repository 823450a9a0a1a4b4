"""The selection interface every method implements, and the device-side cost accounting they share.

A method is a :class:`Selector`: given a :class:`SelectionTask` (one user's samples, the pLLMs it may
choose from, a seed) it returns a :class:`Selection`: the same :class:`~xpert_fl.select.Choice` that
XPerT's device sends, plus what choosing cost the device. The pLLMs come from any :class:`PLLMSource`:
the server's :class:`~xpert_fl.cache.PLLMCache` (offline experiments) or a :class:`ReceivedOffer`
(what a Flower device received in its ``query.select``), so both run the very same selectors.

Cost accounting (identical for every method, so the numbers compare):

* ``bytes``: what the device receives *for selecting*, by payload kind, each payload measured by the
  task's :class:`PayloadSizes` (``protocol.MessageSizes``: over the very records the Flower message
  contract uses): ``basis+coords`` (XPerT), ``adapters`` (every pLLM the device downloads, once per
  pLLM), ``embeddings`` (text encoder). The message envelope (a few hundred bytes per message, alike
  for every method) is not included. Adapters downloaded for selection stay on the device
  (``downloaded``): the chosen one needs no second download (the Flower contract sends it again in
  ``train``; ``protocol`` counts that separately).
* ``evaluations`` / ``tokens``: forward batches over the user's samples with the base model or a
  pLLM applied (loss evaluations), and the non-pad tokens forwarded in them.
* ``seconds``: wall-clock seconds of the device's computation (applying adapters, forwards, the
  optimizer's own work, encoders); reading adapters from the cache stands for the download and is
  not counted (its cost is ``bytes``). Server-side work (probing, explaining) is never counted.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from xpert_fl.adapters import Adapter
from xpert_fl.basis import Basis
from xpert_fl.data.corpus import Sample
from xpert_fl.finetune import (
    IGNORE_INDEX,
    FinetuneConfig,
    batch_nll,
    bucketed_batches,
    encode,
    length_batches,
    pad_token_id,
    shared_copy,
)
from xpert_fl.models import LoadedModel
from xpert_fl.select import Choice

# Payload kinds: what a method's device receives (``Selector.receives``) and pays for (``Selection.bytes``).
ADAPTERS, BASIS_COORDS, EMBEDDINGS = "adapters", "basis+coords", "embeddings"
LABELS, IDS = "labels", "ids"  # the oracle's offered labels; bare ids (free methods: nothing charged)


class OfferEntry(Protocol):
    """One offered pLLM as a selector reads it (``xpert_fl.cache.CacheEntry`` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def label(self) -> str | None: ...
    @property
    def coords(self) -> list[float] | None: ...


class PayloadSizes(Protocol):
    """Bytes of each payload a device receives for selecting, as the transport carries it. The caller
    gives them (``protocol.MessageSizes``: the Flower message contract's own records), so every method
    is counted exactly like XPerT's rounds while the method itself knows no transport."""

    def adapter(self, adapter: Adapter) -> int: ...
    def basis_coords(
        self, basis: Basis, ids: Sequence[str], coords: np.ndarray, delta: float, max_parents: int, probe: dict,
        distance: str,
    ) -> int: ...
    def embeddings(self, ids: Sequence[str], vectors: np.ndarray, encoder: str) -> int: ...


class PLLMSource(Protocol):
    """Where a selector's pLLMs come from: ``PLLMCache`` or a :class:`ReceivedOffer`."""

    def entries(self) -> Sequence[OfferEntry]: ...
    def load_adapter(self, id: str) -> Adapter: ...


@dataclass(frozen=True)
class OfferedPLLM:
    """An offered pLLM as a device knows it: its id, and what the offer told of it."""

    id: str
    label: str | None = None
    coords: list[float] | None = None


@dataclass(frozen=True)
class ReceivedOffer:
    """The pLLMs a device received in one ``query.select``, read-only: entries in the server's order and
    the adapters the offer carried (none for methods that need none)."""

    offered: tuple[OfferedPLLM, ...]
    adapters: dict[str, Adapter] = field(default_factory=dict)

    def entries(self) -> list[OfferedPLLM]:
        return list(self.offered)

    def load_adapter(self, id: str) -> Adapter:
        try:
            return self.adapters[id]
        except KeyError:
            raise KeyError(f"the offer carried no adapter for pLLM {id!r}") from None


def selection_seed(seed: int, server_round: int, user: str) -> int:
    """One user-round's selection seed: reproducible from the run seed, distinct per user and round (one
    shared seed would give every user of ``random`` the same pick). The Flower round loop and the
    library's evaluations draw it alike."""
    return random.Random(f"{seed}/{server_round}/{user}").randrange(2**31)


@dataclass(frozen=True)
class SelectionTask:
    """One user's selection problem. ``samples`` never leave the device; ``label`` (the user's style)
    is evaluation ground truth that only the oracle reads; ``ids`` restricts the offer (None: every
    entry of ``cache``, a cache or what the device received); ``config`` gives ``max_seq_len`` and
    ``eval_batch_size`` of loss evaluations. ``base`` may be None for methods that run no model
    (:func:`needs_base`), ``sizes`` for methods that receive nothing (scratch, random, oracle)."""

    base: LoadedModel | None
    cache: PLLMSource
    samples: Sequence[Sample]
    label: str | None = None
    seed: int = 0
    ids: tuple[str, ...] | None = None
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    sizes: PayloadSizes | None = None

    def entries(self) -> list[OfferEntry]:
        """The offered entries, in cache (creation) order."""
        entries = self.cache.entries()
        if self.ids is None:
            return entries
        known = {e.id for e in entries}
        missing = [i for i in self.ids if i not in known]
        if missing:
            raise KeyError(f"offered ids not in the cache: {missing}")
        wanted = set(self.ids)
        return [e for e in entries if e.id in wanted]


@dataclass(frozen=True)
class Selection:
    """A method's choice and what it cost the device (see the module docstring for each figure).

    ``scores``: the method's number per candidate it looked at (loss: lower is better; cosine:
    higher; XPerT: L1 distance), partial for early-stopped candidates. ``details``: method-specific,
    JSON-ready (optuna trial states, sampler, ...).
    """

    method: str
    choice: Choice
    bytes: dict[str, int] = field(default_factory=dict)
    downloaded: tuple[str, ...] = ()
    evaluations: int = 0
    tokens: int = 0
    seconds: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    @property
    def bytes_down(self) -> int:
        return sum(self.bytes.values())

    @property
    def chosen(self) -> str | None:
        """The pLLM to start from: the single choice, the heaviest parent of a merge, None for the base."""
        if not self.choice.ids:
            return None
        return max(zip(self.choice.ids, self.choice.weights, strict=True), key=lambda p: p[1])[0]

    def to_json(self) -> dict:
        d = asdict(self)
        d["choice"] = asdict(self.choice)
        d["bytes_down"], d["chosen"] = self.bytes_down, self.chosen
        return d


class Selector(Protocol):
    """A selection method; ``name`` is its key in ``xpert_fl.baselines.SELECTORS``. ``receives``: the
    payload kind its device needs in the offer (what the Flower server sends for it)."""

    name: str
    receives: str

    def select(self, task: SelectionTask) -> Selection: ...


def needs_base(selector: type | Selector) -> bool:
    """Whether a method runs the base model on the device: the user coordinate (XPerT) and loss
    evaluations (adapter methods) do; free methods and the text encoder do not."""
    return selector.receives in (BASIS_COORDS, ADAPTERS)


def single(entry_id: str | None) -> Choice:
    """The choice of one pLLM, or of the base model for None."""
    return Choice("base") if entry_id is None else Choice("single", (entry_id,), (1.0,))


class DeviceMeter:
    """Accumulates one selection's device costs; ``selection`` turns them into the result."""

    def __init__(self, method: str, sizes: PayloadSizes | None = None):
        self.method, self._sizes = method, sizes
        self.bytes: dict[str, int] = {}
        self.adapters: dict[str, Adapter] = {}
        self.evaluations = 0
        self.tokens = 0
        self.seconds = 0.0

    @property
    def sizes(self) -> PayloadSizes:
        """The task's payload sizes: a method that receives a payload cannot count it without them."""
        if self._sizes is None:
            raise ValueError(f"{self.method!r} counts the bytes it receives: SelectionTask.sizes is needed")
        return self._sizes

    def receive(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)

    def download(self, source: PLLMSource, entry_id: str) -> Adapter:
        """The pLLM's adapter as the device receives it, paid for once per pLLM."""
        if entry_id not in self.adapters:
            adapter = source.load_adapter(entry_id)
            self.receive(ADAPTERS, self.sizes.adapter(adapter))
            self.adapters[entry_id] = adapter
        return self.adapters[entry_id]

    @contextlib.contextmanager
    def device(self) -> Iterator[None]:
        """Time a stretch of device computation."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def selection(self, choice: Choice, scores: dict[str, float] | None = None, **details: object) -> Selection:
        return Selection(
            self.method, choice, dict(self.bytes), tuple(self.adapters), self.evaluations, self.tokens,
            self.seconds, dict(scores or {}), dict(details),
        )


class UserLoss:
    """The user's samples, encoded once; the loss of the base model or a pLLM on them, batch by batch.

    Loss = token-weighted mean completion NLL (``xpert_fl.finetune``'s definition, prompt tokens
    masked), so every loss-based method ranks pLLMs by the number fine-tuning starts from.
    """

    def __init__(self, task: SelectionTask, meter: DeviceMeter):
        if not task.samples:
            raise ValueError("selection needs at least one user sample")
        if task.base is None:
            raise ValueError("loss-based selection needs the base model (SelectionTask.base)")
        self.base, self.meter = task.base, meter
        self.encoded = encode(task.base.tokenizer, task.samples, task.config.max_seq_len)
        if all(label == IGNORE_INDEX for e in self.encoded for label in e["labels"]):
            raise ValueError("the user's samples have no completion tokens to evaluate a loss on")
        self.pad_id = pad_token_id(task.base.tokenizer)
        self.batch_size = task.config.eval_batch_size

    def batches(self, seed: int | None = None, batch_size: int | None = None) -> list[list[int]]:
        """All samples in batches: by length (least padding), or in a seeded random order (successive
        batches are then unbiased samples, which early stopping needs)."""
        size = batch_size or self.batch_size
        if seed is None:
            return length_batches(self.encoded, size)
        return bucketed_batches([len(e["input_ids"]) for e in self.encoded], size, random.Random(seed))

    def running(self, adapter: Adapter | None, batches: Sequence[Sequence[int]]) -> Iterator[float]:
        """The mean loss over the batches seen so far, after each batch; stop iterating to stop early."""
        with self.meter.device():
            model = self.base.model if adapter is None else adapter.to_peft(shared_copy(self.base.model))
        nll, count = 0.0, 0
        steps = batch_nll(model, self.encoded, self.pad_id, batches)
        try:
            while True:
                with self.meter.device():
                    try:
                        batch, n, tokens = next(steps)
                    except StopIteration:
                        return
                nll, count = nll + batch, count + n
                self.meter.evaluations += 1
                self.meter.tokens += tokens
                yield nll / max(count, 1)  # a batch of empty completions: 0 until one counts
        finally:
            steps.close()

    def loss(self, adapter: Adapter | None) -> float:
        """The loss on every sample."""
        *_, last = self.running(adapter, self.batches())
        return last
