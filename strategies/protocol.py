"""The XPerT message contract between the server (``strategies/``) and devices (``clients/``).

One round, per device (message type -> records in its ``RecordDict``)::

    server -> device  query.register   (once per run) config "register"
    device -> server                   config "user": opaque user id (+ evaluation label)
    server -> device  query.select     arrays "basis" (k x d sub-vectors), arrays "coords" (n x k),
                                       config "select": pLLM ids, words, summarizer, delta, probe settings
    device -> server                   config "choice": Choice.to_json() without per-candidate distances
    server -> device  train            arrays "adapter-<i>" + config "adapter-<i>" for each chosen pLLM,
                                       config "train": choice, fine-tuning budget, seed
    device -> server                   arrays "adapter" + config "adapter" (the new pLLM),
                                       metrics "finetune" (costs), config "report" (status)

Nothing here depends on a model: records <-> plain objects (Basis, Choice, Adapter), and the byte
count of a message as it crosses the network (:func:`message_bytes`). Flower moves a message as a
tree of content-addressed objects (the message, its RecordDict, each record, each array, each array
chunk), each sent as its deflated bytes, once per distinct object; the count is the sum of those.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from xpert_fl.basis import Basis
from xpert_fl.select import Choice

if TYPE_CHECKING:  # torch/peft take seconds to import: only the train messages need them
    from xpert_fl.adapters import Adapter

# --- message types (Flower routes "<category>.<action>"; categories: train / evaluate / query) ---
REGISTER = "query.register"
SELECT = "query.select"
TRAIN = "train"

# --- byte-accounting kinds ---------------------------------------------------------------------
REGISTER_DOWN, REGISTER_UP = "register-down", "register-up"
BASIS_COORDS, CHOICE = "basis+coords", "choice"
ADAPTER_DOWN, ADAPTER_UP = "adapter-down", "adapter-up"
KINDS = (REGISTER_DOWN, REGISTER_UP, BASIS_COORDS, CHOICE, ADAPTER_DOWN, ADAPTER_UP)
DOWN_KINDS = (REGISTER_DOWN, BASIS_COORDS, ADAPTER_DOWN)  # received by the device
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

    basis: Basis
    ids: tuple[str, ...]
    coords: np.ndarray  # (n, k) float32, row i = coordinates of ids[i]
    delta: float
    max_parents: int
    probe: dict  # ProbeConfig fields for the device's own drift

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
        "delta": req.delta,  # may be Infinity (no merging): JSON with allow_nan
        "max_parents": req.max_parents,
        "probe": req.probe,
    }
    return RecordDict(
        {
            "basis": ArrayRecord({"vectors": Array(np.ascontiguousarray(b.vectors, dtype=np.float32))}),
            "coords": ArrayRecord({"coords": Array(coords)}),
            "select": ConfigRecord({"meta": json.dumps(meta)}),
        }
    )


def parse_select_request(content: RecordDict) -> SelectRequest:
    meta = _json(_config(content, "select"), "meta")
    if not isinstance(meta, dict):
        raise ProtocolError("select meta must be a JSON object")
    try:
        vectors = _arrays(content, "basis")["vectors"].numpy()
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
        )
        ids = tuple(str(i) for i in meta["ids"])
        if coords.shape != (len(ids), basis.size):
            raise ProtocolError(f"coords shape {coords.shape} != ({len(ids)}, {basis.size})")
        return SelectRequest(
            basis, ids, coords, float(meta["delta"]), int(meta["max_parents"]), dict(meta.get("probe", {}))
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ProtocolError):
            raise
        raise ProtocolError(f"malformed select request: {err!r}") from err


def choice_reply(choice: Choice) -> RecordDict:
    """The device's answer: kind, ids, weights and the chosen distance. The per-candidate distances
    are dropped: they are a function of the user's coordinate, which never leaves the device."""
    sent = Choice(choice.kind, choice.ids, choice.weights, choice.distance)
    return RecordDict({"choice": ConfigRecord({"choice": sent.to_json()})})


def parse_choice(content: RecordDict) -> Choice:
    value = _config(content, "choice").get("choice")
    if not isinstance(value, str):
        raise ProtocolError("choice reply needs a JSON string 'choice'")
    try:
        return Choice.from_json(value)
    except ValueError as err:
        raise ProtocolError(f"invalid choice: {err}") from err


def text_embeddings_offer(ids: Sequence[str], vectors: np.ndarray) -> RecordDict:
    """The text-encoder baseline's offer: one sentence embedding per pLLM (n x d float32) and their ids."""
    matrix = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), -1)
    return RecordDict(
        {
            "embeddings": ArrayRecord({"vectors": Array(matrix)}),
            "select": ConfigRecord({"meta": json.dumps({"ids": list(ids)})}),
        }
    )


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


def upload_reply(adapter: Adapter, metrics: Mapping[str, float | int], report: Mapping[str, str]) -> RecordDict:
    records: dict = adapter_records(adapter, "upload")
    records["finetune"] = MetricRecord({k: v for k, v in metrics.items() if v is not None})
    records["report"] = ConfigRecord({"meta": json.dumps(dict(report))})
    return RecordDict(records)


@dataclass(frozen=True)
class Upload:
    adapter: Adapter
    metrics: dict[str, float]
    report: dict


def parse_upload(content: RecordDict) -> Upload:
    adapter = parse_adapter(content, "upload")
    metrics = content.get("finetune")
    if not isinstance(metrics, MetricRecord):
        raise ProtocolError("upload has no metric record 'finetune'")
    report = _json(_config(content, "report"), "meta")
    if not isinstance(report, dict):
        raise ProtocolError("upload report must be a JSON object")
    return Upload(adapter, dict(metrics.items()), report)
