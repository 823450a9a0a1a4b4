"""The XPerT message contract between the server (``strategies/``) and devices (``clients/``).

One round, per device (message type -> records in its ``RecordDict``)::

    server -> device  query.register   (once per run) config "register"
    device -> server                   config "user": opaque user id (+ evaluation label)
    server -> device  query.select     XPerT: arrays "basis" (k x d sub-vectors, d human offset), arrays
                                       "coords" (n x k), config "select": pLLM ids, words, summarizer,
                                       human weight, delta, probe settings
                                       a baseline (run-config ``selection``): config "offer": method, ids,
                                       seed, budget; + "offer-<i>" adapters (exhaustive, bo, hyperband),
                                       or arrays "embeddings" (text-encoder), or labels (oracle)
    device -> server                   config "choice": Choice.to_json() without per-candidate distances,
                                       config "cost": what choosing cost the device (SelectionCost)
    server -> device  train            arrays "adapter-<i>" + config "adapter-<i>" for each chosen pLLM,
                                       config "train": choice, fine-tuning budget, seed
    device -> server                   arrays "adapter" + config "adapter" (the new pLLM),
                                       metrics "finetune" (costs), config "report" (status)

Nothing here depends on a model: records <-> plain objects (Basis, Choice, Adapter), and the byte
count of a message as it crosses the network (:func:`message_bytes`). Flower moves a message as a
tree of content-addressed objects (the message, its RecordDict, each record, each array, each array
chunk), each sent as its deflated bytes, once per distinct object; the count is the sum of those.

Two figures of a selection's bytes, both kept: the server counts the ``query.select`` message as it
crossed the network (kind ``basis+coords`` for XPerT, ``offer`` for a baseline: every offered adapter,
as the paper's Table 7 charges BO and HyperBand the download of every pLLM); the device reports the
method's own cost in its reply (:class:`SelectionCost`: only the adapters it evaluated, so ``bo`` with
a trial budget pays less). The ``train`` message then carries the chosen adapter again even where the
device evaluated it during selection (``adapter-down``): what this contract sends, counted as sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from xpert_fl.basis import Basis
from xpert_fl.select import Choice, check_distance

if TYPE_CHECKING:  # torch/peft take seconds to import: only the train messages need them
    from xpert_fl.adapters import Adapter

# --- message types (Flower routes "<category>.<action>"; categories: train / evaluate / query) ---
REGISTER = "query.register"
SELECT = "query.select"
TRAIN = "train"

# --- byte-accounting kinds ---------------------------------------------------------------------
REGISTER_DOWN, REGISTER_UP = "register-down", "register-up"
BASIS_COORDS, OFFER, CHOICE = "basis+coords", "offer", "choice"  # query.select: XPerT's, a baseline's
ADAPTER_DOWN, ADAPTER_UP = "adapter-down", "adapter-up"
KINDS = (REGISTER_DOWN, REGISTER_UP, BASIS_COORDS, OFFER, CHOICE, ADAPTER_DOWN, ADAPTER_UP)
DOWN_KINDS = (REGISTER_DOWN, BASIS_COORDS, OFFER, ADAPTER_DOWN)  # received by the device
UP_KINDS = (REGISTER_UP, CHOICE, ADAPTER_UP)  # sent by the device


class ProtocolError(ValueError):
    """A message does not follow the contract (missing record, wrong type or shape, bad JSON)."""


def message_bytes(message: Message) -> int:
    """Bytes of a message on the wire: the deflated size of every distinct object in its tree.

    This is exactly what a SuperNode pulls (server -> device) or pushes (device -> server) through
    the Fleet API as object contents; request framing (a few hundred bytes) is not included.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's content alone, counted like :func:`message_bytes` but without the message
    object itself (metadata, a few hundred bytes): what a payload costs whichever message carries it.
    The selection baselines (``xpert_fl.baselines``) count every method's downloads with it."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def adapter_bytes(adapter: Adapter) -> int:
    """Bytes one adapter adds to a message that carries it: its records' objects (tensors, PEFT config),
    whatever name the message files them under. What a device pays per pLLM it downloads. (Objects two
    adapters of one message share, e.g. an equal config, cross the wire once: such a message is a few
    bytes smaller than the sum.)"""
    objects: dict = {}
    for record in adapter_records(adapter, "adapter").values():
        objects.update(get_all_nested_objects(record))
    return sum(len(obj.deflate()) for obj in objects.values())


def _config(content: RecordDict, name: str) -> ConfigRecord:
    record = content.get(name)
    if not isinstance(record, ConfigRecord):
        raise ProtocolError(f"message has no config record {name!r}")
    return record


def _arrays(content: RecordDict, name: str) -> ArrayRecord:
    record = content.get(name)
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"message has no array record {name!r}")
    return record


def _json(record: ConfigRecord, key: str) -> object:
    value = record.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"config field {key!r} must be a JSON string, got {type(value).__name__}")
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise ProtocolError(f"config field {key!r} is not valid JSON ({err.msg})") from err


# --- register ----------------------------------------------------------------------------------
def register_request() -> RecordDict:
    return RecordDict({"register": ConfigRecord({"version": 1})})


def register_reply(user: str, label: str | None) -> RecordDict:
    """The device's opaque id and, for evaluation only (simulation ground truth), its style label."""
    fields: dict = {"user": user}
    if label is not None:
        fields["label"] = label
    return RecordDict({"register": ConfigRecord(fields)})


def parse_register(content: RecordDict) -> tuple[str, str | None]:
    record = _config(content, "register")
    user, label = record.get("user"), record.get("label")
    if not isinstance(user, str) or not user:
        raise ProtocolError("register reply needs a non-empty string 'user'")
    if label is not None and not isinstance(label, str):
        raise ProtocolError("register reply 'label' must be a string")
    return user, label


# --- select -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectRequest:
    """What a device needs to choose: the basis, every cached pLLM's coordinates, the rules."""

    method: ClassVar[str] = "xpert"
    basis: Basis
    ids: tuple[str, ...]
    coords: np.ndarray  # (n, k) float32, row i = coordinates of ids[i]
    delta: float
    max_parents: int
    probe: dict  # ProbeConfig fields for the device's own drift
    distance: str = "drift"  # selection distance (xpert_fl.select.DISTANCES)

    def coords_by_id(self) -> dict[str, np.ndarray]:
        return {i: self.coords[row].astype(np.float64) for row, i in enumerate(self.ids)}


def select_request(req: SelectRequest) -> RecordDict:
    b = req.basis
    coords = np.ascontiguousarray(req.coords, dtype=np.float32).reshape(len(req.ids), b.size)
    meta = {
        "ids": list(req.ids),
        "words": list(b.words),
        "dim": b.dim,
        "tau_orth": b.tau_orth,
        "tau_res": b.tau_res,
        "summarizer": b.summarizer,
        "orthogonalize": b.orthogonalize,
        "complete": b.complete,
        "residual_words": sorted(b.residual_words),
        "human_weight": b.human_weight,
        "delta": req.delta,  # may be Infinity (no merging): JSON with allow_nan
        "max_parents": req.max_parents,
        "probe": req.probe,
        "distance": req.distance,
    }
    return RecordDict(
        {
            "basis": ArrayRecord({"vectors": Array(np.ascontiguousarray(b.vectors, dtype=np.float32)),
                                  **({} if b.human_offset is None else {"human_offset": Array(b.human_offset)})}),
            "coords": ArrayRecord({"coords": Array(coords)}),
            "select": ConfigRecord({"meta": json.dumps(meta)}),
        }
    )


def parse_select_request(content: RecordDict) -> SelectRequest:
    meta = _json(_config(content, "select"), "meta")
    if not isinstance(meta, dict):
        raise ProtocolError("select meta must be a JSON object")
    try:
        arrays = _arrays(content, "basis")
        vectors = arrays["vectors"].numpy()
        offset = arrays["human_offset"].numpy() if "human_offset" in arrays else None
        coords = _arrays(content, "coords")["coords"].numpy()
        basis = Basis(
            dim=int(meta["dim"]),
            words=list(meta["words"]),
            vectors=vectors,
            tau_orth=meta["tau_orth"],
            tau_res=meta["tau_res"],
            summarizer=meta["summarizer"],
            orthogonalize=bool(meta["orthogonalize"]),
            complete=bool(meta.get("complete", False)),
            residual_words=set(meta.get("residual_words", [])),
            human_offset=offset,
            human_weight=float(meta.get("human_weight", 0.0)),
        )
        ids = tuple(str(i) for i in meta["ids"])
        if coords.shape != (len(ids), basis.size):
            raise ProtocolError(f"coords shape {coords.shape} != ({len(ids)}, {basis.size})")
        return SelectRequest(
            basis, ids, coords, float(meta["delta"]), int(meta["max_parents"]), dict(meta.get("probe", {})),
            check_distance(str(meta.get("distance", "l1"))),  # a server that names none means Eq. 1
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ProtocolError):
            raise
        raise ProtocolError(f"malformed select request: {err!r}") from err


# --- select: the baselines (xpert_fl.baselines) ------------------------------------------------
@dataclass(frozen=True)
class OfferRequest:
    """A baseline method's ``query.select``: which method the device runs, on which pLLMs, with what.

    Every method gets the offered ``ids`` (cache order), this user-round's ``seed``, the ``trials``
    budget (bo, hyperband; None: the method's default) and the loss-evaluation sizes. Besides, exactly
    what the method reads: ``adapters`` (one per id: exhaustive, bo, hyperband), ``embeddings`` (n x d,
    one per id, with the ``encoder`` fingerprint that made them: text-encoder), ``labels`` (one per
    id) and the ``user_label`` the device reported at registration (oracle). Inconsistent parts raise
    ProtocolError, on the server building it and on the device parsing it.
    """

    method: str
    ids: tuple[str, ...]
    seed: int = 0
    trials: int | None = None
    max_seq_len: int = 128
    eval_batch_size: int = 4
    adapters: tuple[Adapter, ...] = ()
    embeddings: np.ndarray | None = None
    encoder: str | None = None
    labels: tuple[str | None, ...] = ()
    user_label: str | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not self.method or self.method == "xpert":
            raise ProtocolError(f"an offer names a baseline method, got {self.method!r} (XPerT: select_request)")
        if len(set(self.ids)) != n or not all(isinstance(i, str) and i for i in self.ids):
            raise ProtocolError(f"offered ids must be distinct non-empty strings, got {self.ids!r}")
        if (self.trials is not None and self.trials < 1) or self.max_seq_len < 8 or self.eval_batch_size < 1:
            raise ProtocolError("offer needs trials >= 1 (or none), max_seq_len >= 8, eval_batch_size >= 1")
        if any(x is not None and not isinstance(x, str) for x in (*self.labels, self.user_label, self.encoder)):
            raise ProtocolError("offer labels, user_label and encoder must be strings or null")
        if self.adapters and len(self.adapters) != n:
            raise ProtocolError(f"{n} offered ids but {len(self.adapters)} adapters")
        for i, a in zip(self.ids, self.adapters, strict=False):
            if a.content_hash != i:
                raise ProtocolError(f"offered adapter has content hash {a.content_hash}, not its id {i}")
        if self.embeddings is not None and (self.embeddings.ndim != 2 or len(self.embeddings) != n):
            raise ProtocolError(f"embeddings must be {n} x d, got shape {self.embeddings.shape}")
        if self.embeddings is not None and not self.encoder:
            raise ProtocolError("embeddings need the fingerprint of the encoder that made them")
        if self.labels and len(self.labels) != n:
            raise ProtocolError(f"{n} offered ids but {len(self.labels)} labels")


def offer_request(req: OfferRequest) -> RecordDict:
    meta = {
        "method": req.method, "ids": list(req.ids), "seed": req.seed, "trials": req.trials,
        "max_seq_len": req.max_seq_len, "eval_batch_size": req.eval_batch_size, "adapters": len(req.adapters),
        "encoder": req.encoder, "labels": list(req.labels), "user_label": req.user_label,
    }
    records: dict = {"offer": ConfigRecord({"meta": json.dumps(meta)})}
    for i, adapter in enumerate(req.adapters):
        records.update(adapter_records(adapter, f"offer-{i}"))
    if req.embeddings is not None:
        records["embeddings"] = ArrayRecord({"vectors": Array(np.ascontiguousarray(req.embeddings, np.float32))})
    return RecordDict(records)


def parse_offer_request(content: RecordDict) -> OfferRequest:
    meta = _json(_config(content, "offer"), "meta")
    if not isinstance(meta, dict):
        raise ProtocolError("offer meta must be a JSON object")
    try:
        if not isinstance(meta["ids"], list) or not isinstance(meta["labels"], list):
            raise ProtocolError("offer 'ids' and 'labels' must be lists")
        ids = tuple(meta["ids"])
        n_adapters = int(meta["adapters"])
        if n_adapters not in (0, len(ids)):
            raise ProtocolError(f"offer of {len(ids)} pLLMs announces {n_adapters} adapters")
        adapters = tuple(parse_adapter(content, f"offer-{i}") for i in range(n_adapters))
        embeddings = _arrays(content, "embeddings")["vectors"].numpy() if "embeddings" in content else None
        trials = meta["trials"]
        return OfferRequest(
            method=str(meta["method"]), ids=ids, seed=int(meta["seed"]),
            trials=None if trials is None else int(trials), max_seq_len=int(meta["max_seq_len"]),
            eval_batch_size=int(meta["eval_batch_size"]), adapters=adapters, embeddings=embeddings,
            encoder=meta["encoder"], labels=tuple(meta["labels"]), user_label=meta["user_label"],
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ProtocolError):
            raise
        raise ProtocolError(f"malformed offer: {err!r}") from err


def parse_select(content: RecordDict) -> SelectRequest | OfferRequest:
    """Whichever ``query.select`` this is: XPerT's (basis + coordinates) or a baseline's offer."""
    return parse_offer_request(content) if "offer" in content else parse_select_request(content)


def text_embeddings_offer(ids: Sequence[str], vectors: np.ndarray, encoder: str) -> RecordDict:
    """The text-encoder baseline's offer: one sentence embedding per pLLM (n x d float32), their ids and
    the encoder's fingerprint (what the device receives, its seed and settings aside)."""
    return offer_request(OfferRequest("text-encoder", tuple(ids), embeddings=np.asarray(vectors), encoder=encoder))


# --- the choice --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectionCost:
    """What choosing cost the device, as its method counts it (``xpert_fl.baselines.core``): bytes by
    payload kind, loss evaluations, tokens forwarded, device seconds, adapters downloaded. No
    per-candidate score: those are functions of the user's data and stay on the device."""

    method: str
    bytes: dict[str, int] = field(default_factory=dict)
    evaluations: int = 0
    tokens: int = 0
    seconds: float = 0.0
    downloaded: int = 0

    def __post_init__(self) -> None:
        counts = (self.evaluations, self.tokens, self.downloaded, *self.bytes.values())
        if not isinstance(self.method, str) or not self.method:
            raise ProtocolError("selection cost needs a method name")
        if not all(isinstance(k, str) for k in self.bytes) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
        ):
            raise ProtocolError(f"selection cost counts must be non-negative integers, got {self}")
        if not (isinstance(self.seconds, int | float) and 0 <= self.seconds < float("inf")):
            raise ProtocolError(f"selection seconds must be finite and >= 0, got {self.seconds!r}")

    @property
    def bytes_down(self) -> int:
        return sum(self.bytes.values())

    def to_json(self) -> dict:
        return {**asdict(self), "bytes_down": self.bytes_down}


def choice_reply(choice: Choice, cost: SelectionCost | None = None) -> RecordDict:
    """The device's answer: kind, ids, weights and the chosen distance, and what choosing cost it. The
    per-candidate distances are dropped: they are a function of the user's coordinate, which never
    leaves the device."""
    sent = Choice(choice.kind, choice.ids, choice.weights, choice.distance)
    records = {"choice": ConfigRecord({"choice": sent.to_json()})}
    if cost is not None:
        records["cost"] = ConfigRecord({"meta": json.dumps(asdict(cost))})
    return RecordDict(records)


def parse_choice(content: RecordDict) -> Choice:
    value = _config(content, "choice").get("choice")
    if not isinstance(value, str):
        raise ProtocolError("choice reply needs a JSON string 'choice'")
    try:
        return Choice.from_json(value)
    except ValueError as err:
        raise ProtocolError(f"invalid choice: {err}") from err


def parse_selection_cost(content: RecordDict) -> SelectionCost | None:
    """The cost a choice reply reports; None when the device reports none (e.g. a client predating it)."""
    if "cost" not in content:
        return None
    meta = _json(_config(content, "cost"), "meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("bytes", {}), dict):
        raise ProtocolError("selection cost must be a JSON object with a 'bytes' object")
    try:
        return SelectionCost(**meta)
    except TypeError as err:
        raise ProtocolError(f"malformed selection cost: {err}") from err


# --- adapters ---------------------------------------------------------------------------------
def adapter_records(adapter: Adapter, name: str) -> dict[str, ArrayRecord | ConfigRecord]:
    """An adapter as two records named ``name``: its tensors and its PEFT config + base fingerprint."""
    arrays = ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in sorted(adapter.tensors.items())})
    config = ConfigRecord({"config": json.dumps(adapter.config, sort_keys=True), "base": adapter.base_fingerprint})
    return {f"{name}.arrays": arrays, f"{name}.config": config}


def parse_adapter(content: RecordDict, name: str) -> Adapter:
    """The adapter stored under ``name``; ProtocolError if a record is missing or malformed
    (whether it fits the base model is checked by the receiver with validate_adapter)."""
    import torch

    from xpert_fl.adapters import Adapter

    arrays = _arrays(content, f"{name}.arrays")
    record = _config(content, f"{name}.config")
    config = _json(record, "config")
    base = record.get("base")
    if not isinstance(config, dict) or not isinstance(base, str):
        raise ProtocolError(f"adapter {name!r}: config must be a JSON object and 'base' a string")
    try:
        tensors = {k: torch.from_numpy(np.array(a.numpy())) for k, a in arrays.items()}
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"adapter {name!r}: unreadable tensors ({err})") from err
    if not tensors:
        raise ProtocolError(f"adapter {name!r} holds no tensors")
    return Adapter(config=config, tensors=tensors, base_fingerprint=base)


# --- train ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainRequest:
    choice: Choice
    adapters: tuple[Adapter, ...]  # one per choice id, same order
    finetune: dict  # FinetuneConfig fields
    compare_scratch: bool


def train_request(choice: Choice, adapters: Sequence[Adapter], finetune: Mapping, compare_scratch: bool) -> RecordDict:
    if len(adapters) != len(choice.ids):
        raise ProtocolError(f"{len(choice.ids)} chosen ids but {len(adapters)} adapters")
    records: dict = {}
    for i, adapter in enumerate(adapters):
        records.update(adapter_records(adapter, f"start-{i}"))
    meta = {"choice": choice.to_json(), "finetune": dict(finetune), "compare_scratch": bool(compare_scratch)}
    records["train"] = ConfigRecord({"meta": json.dumps(meta)})
    return RecordDict(records)


def parse_train_request(content: RecordDict) -> TrainRequest:
    from xpert_fl.adapters import AdapterError

    meta = _json(_config(content, "train"), "meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("finetune"), dict):
        raise ProtocolError("train meta must be a JSON object with a 'finetune' object")
    try:
        choice = Choice.from_json(meta["choice"])
    except (KeyError, ValueError) as err:
        raise ProtocolError(f"train request: invalid choice ({err})") from err
    adapters = []
    for i, expected in enumerate(choice.ids):
        adapter = parse_adapter(content, f"start-{i}")
        if adapter.content_hash != expected:
            raise AdapterError(f"received adapter {i} has content hash {adapter.content_hash}, not {expected}")
        adapters.append(adapter)
    return TrainRequest(choice, tuple(adapters), meta["finetune"], bool(meta.get("compare_scratch", False)))


def upload_reply(
    adapter: Adapter,
    metrics: Mapping[str, float | int],
    report: Mapping[str, str],
    self_report: np.ndarray | None = None,
) -> RecordDict:
    """The upload; ``self_report``: the drift embedding of the device's own training data (the vector
    its coordinates came from; never text), which the server may use to explain the pLLM once it
    agrees with the server's own probe (``xpert_fl.explain.trusted_drift``)."""
    records: dict = adapter_records(adapter, "upload")
    records["finetune"] = MetricRecord({k: v for k, v in metrics.items() if v is not None})
    records["report"] = ConfigRecord({"meta": json.dumps(dict(report))})
    if self_report is not None:
        records["self_report"] = ArrayRecord({"drift": Array(np.ascontiguousarray(self_report, dtype=np.float32))})
    return RecordDict(records)


@dataclass(frozen=True)
class Upload:
    adapter: Adapter
    metrics: dict[str, float]
    report: dict
    self_report: np.ndarray | None = None  # 1-D float32 drift; its summarizer is report["summarizer"]


def parse_upload(content: RecordDict) -> Upload:
    adapter = parse_adapter(content, "upload")
    metrics = content.get("finetune")
    if not isinstance(metrics, MetricRecord):
        raise ProtocolError("upload has no metric record 'finetune'")
    report = _json(_config(content, "report"), "meta")
    if not isinstance(report, dict):
        raise ProtocolError("upload report must be a JSON object")
    drift = None
    if "self_report" in content:
        record = _arrays(content, "self_report")
        if "drift" not in record:
            raise ProtocolError("self_report record has no array 'drift'")
        drift = record["drift"].numpy()
        if drift.ndim != 1 or not np.isfinite(drift).all():
            raise ProtocolError(f"self-reported drift must be a finite 1-D vector, got shape {drift.shape}")
        if not isinstance(report.get("summarizer"), str):
            raise ProtocolError("a self-reported drift must name its summarizer (report 'summarizer')")
    return Upload(adapter, dict(metrics.items()), report, drift)
