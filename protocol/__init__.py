"""The XPerT message contract between the server (``strategies/``) and devices (``clients/``).

A layer of its own, below both and above the method (``xpert_fl``, which knows no transport): the
server and the devices share it without importing each other (``[tool.importlinter]``, pyproject.toml).

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

Each side parses its peer's messages without trusting them: every ``parse_*`` returns valid values or
raises ProtocolError naming the field, never another exception. Fields are type-checked, not coerced
(JSON null is not the name "None", 1 is not true, 1.5 is not the seed 1), numbers are finite where the
contract wants them, strings and counts are bounded (``MAX_*``), and arrays are real floats whose .npy
header is checked against the bytes present before anything is allocated.
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from io import BytesIO
from tokenize import TokenError
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from numpy.lib import format as npy

from xpert_fl.basis import Basis, BasisError
from xpert_fl.select import DISTANCES, Choice

if TYPE_CHECKING:  # torch/peft take seconds to import: only the train messages need them
    from xpert_fl.adapters import Adapter
    from xpert_fl.baselines.core import Selection

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


# --- bounds on what a message may hold: each side parses its peer's messages without trusting them ----
MAX_NAME_CHARS = 256  # an id, user, label, method, fingerprint, word, metric or tensor name, report value
MAX_JSON_CHARS = 1 << 24  # one JSON config field (a select request lists every cached pLLM and basis word)
MAX_ARRAY_ELEMENTS = 1 << 28  # one array: a float16 adapter tensor of MAX_ADAPTER_BYTES (xpert_fl.adapters)
MAX_BASIS_WORDS = 1 << 12  # an orthogonal basis is checked through its k x k cosines on arrival
MAX_DIM = 1 << 16  # a summarizer's embedding dimension
MAX_PARENTS = 64  # pLLMs one choice may merge (run config max-parents is bounded by it too)
MAX_COUNT = 2**31 - 1  # any other count or size: trials, sequence length, batch size, probe tokens
MAX_INT = 2**63 - 1  # seeds and byte totals: what fits the int64 that numpy and torch take
FLOAT_DTYPES = ("float16", "float32", "float64")  # what arrays hold; complex, string or object arrays are refused
PROBE_FIELDS = ("max_new_tokens", "batch_size", "prefix_fraction")  # xpert_fl.explain.ProbeConfig's
_REQUIRED = object()


def _show(value: object) -> str:
    """``repr(value)`` cut short: an error message must not carry a peer's 10 MB string."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _fail(name: str, rule: str, value: object) -> ProtocolError:
    return ProtocolError(f"{name} must be {rule}, got {_show(value)}")


def _text(value: object, name: str, *, empty: bool = False, max_chars: int = MAX_NAME_CHARS) -> str:
    """A string, as sent (never ``str()`` of something else: JSON null is not the name "None")."""
    if not isinstance(value, str) or len(value) > max_chars or not (empty or value):
        raise _fail(name, f"a {'' if empty else 'non-empty '}string of at most {max_chars} characters", value)
    return value


def _integer(value: object, name: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
    """An integer in [lo, hi]; a bool, a float or a string is not one (``int()`` would truncate or coerce)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(name, f"an integer in [{lo}, {hi}]", value)
    return value


def _number(
    value: object, name: str, lo: float = -math.inf, hi: float = math.inf, *, infinite: bool = False
) -> float:
    """A JSON number in [lo, hi] as a float: finite, or also +Infinity where ``infinite`` (delta: never merge)."""
    bounds = "" if (lo, hi) == (-math.inf, math.inf) else f" in [{lo}, {hi}]"
    rule = f"a {'non-NaN' if infinite else 'finite'} number{bounds}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(name, rule, value)
    try:
        x = float(value)
    except OverflowError as err:  # an integer beyond float range
        raise _fail(name, rule, value) from err
    if math.isnan(x) or (math.isinf(x) and not (infinite and x > 0)) or not lo <= x <= hi:
        raise _fail(name, rule, value)
    return x


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "true or false", value)
    return value


def _one_of(value: object, name: str, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise _fail(name, f"one of {options}", value)
    return value


def _texts(value: object, name: str, *, nullable: bool = False, distinct: bool = False) -> list:
    """A list of strings (or nulls where ``nullable``), each bounded like a name."""
    if not isinstance(value, list):
        raise _fail(name, "a list of strings", value)
    items = [None if nullable and v is None else _text(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if distinct and len(set(items)) != len(items):
        raise ProtocolError(f"{name} must be distinct strings")
    return items


def _maybe(check: Callable) -> Callable:
    """``check`` that also lets JSON null through, for the fields the contract allows to be empty."""

    def checked(value: object, name: str, *args, **kwargs):
        return None if value is None else check(value, name, *args, **kwargs)

    return checked


class _Object:
    """A decoded JSON object whose fields are read through checks that name the field on failure."""

    def __init__(self, value: object, what: str):
        if not isinstance(value, dict):
            raise _fail(what, "a JSON object", value)
        self.value, self.what = value, what

    def __call__(self, key: str, check: Callable, *args, default: object = _REQUIRED, **kwargs):
        if key not in self.value:
            if default is _REQUIRED:
                raise ProtocolError(f"{self.what} has no field {key!r}")
            return default
        return check(self.value[key], f"{self.what} {key!r}", *args, **kwargs)

    def only(self, known: Iterable[str]) -> None:
        """Refuse fields the receiver would not know what to do with (a config built from them would fail)."""
        unknown = sorted(set(self.value) - set(known))
        if unknown:
            raise ProtocolError(f"{self.what} has unknown fields {_show(unknown)}")


def _float_array(record: ArrayRecord, key: str, what: str, ndim: int) -> np.ndarray:
    """Array ``key`` of a record as a finite, native-order float ndarray of ``ndim`` dimensions.

    Read from its .npy bytes without trusting them (not ``Array.numpy()``): only real float dtypes (a
    complex array is refused, not silently made real; a string or object array is refused), and the
    header's element count must be bounded and match the bytes present before anything is allocated (a
    64-byte array claiming 2^40 floats would otherwise allocate terabytes)."""
    name = f"{what} array {key!r}"
    if key not in record:
        raise ProtocolError(f"{what} has no array {key!r}")
    array = record[key]
    if array.stype != SType.NUMPY:
        raise ProtocolError(f"{name} is serialized as {_show(array.stype)}, not {SType.NUMPY!r}")
    buffer = BytesIO(array.data)
    try:
        version = npy.read_magic(buffer)
        if version not in ((1, 0), (2, 0)):  # what np.save writes for a float array
            raise ValueError(f"unsupported .npy version {version}")
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran_order, dtype = read_header(buffer)
    except (ValueError, TypeError, SyntaxError, RecursionError, TokenError) as err:  # numpy on a forged header
        raise ProtocolError(f"{name} is not a readable .npy array ({_show(str(err))})") from err
    if dtype.name not in FLOAT_DTYPES:
        raise ProtocolError(f"{name} must hold real floats {FLOAT_DTYPES}, got dtype {_show(str(dtype))}")
    if len(shape) != ndim or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"{name} must have {ndim} dimension(s), got shape {_show(shape)}")
    count, offset = math.prod(shape), buffer.tell()
    if count > MAX_ARRAY_ELEMENTS:
        raise ProtocolError(f"{name} has {count} elements, over the limit of {MAX_ARRAY_ELEMENTS}")
    if len(array.data) - offset != count * dtype.itemsize:
        raise ProtocolError(
            f"{name}: its header announces {shape} {dtype} ({count * dtype.itemsize} bytes) but "
            f"{len(array.data) - offset} bytes follow"
        )
    values = np.frombuffer(array.data, dtype, count, offset).reshape(shape, order="F" if fortran_order else "C")
    values = values.astype(dtype.newbyteorder("="))  # a writable copy in native order (torch takes no other)
    if not np.isfinite(values).all():
        raise ProtocolError(f"{name} must be finite, holds NaN or Inf")
    return values


def message_bytes(message: Message) -> int:
    """Bytes of a message on the wire: the deflated size of every distinct object in its tree.

    This is exactly what a SuperNode pulls (server -> device) or pushes (device -> server) through
    the Fleet API as object contents; request framing (a few hundred bytes) is not included.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's content alone, counted like :func:`message_bytes` but without the message
    object itself (metadata, a few hundred bytes): what a payload costs whichever message carries it.
    The selection baselines (``xpert_fl.baselines``) count every method's downloads with it
    (:class:`MessageSizes`)."""
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
    """Config field ``key`` decoded from JSON (NaN and Infinity decode too: each field's check decides)."""
    value = _text(record.get(key), f"config field {key!r}", empty=True, max_chars=MAX_JSON_CHARS)
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as err:  # bad JSON, an integer of > 4300 digits, deep nesting
        raise ProtocolError(f"config field {key!r} is not valid JSON ({_show(str(err))})") from err


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
    user = _text(record.get("user"), "register reply 'user'")
    return user, _maybe(_text)(record.get("label"), "register reply 'label'")


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
    f = _Object(_json(_config(content, "select"), "meta"), "select meta")
    dim = f("dim", _integer, 1, MAX_DIM)
    words = f("words", _texts)
    if len(words) > MAX_BASIS_WORDS:
        raise ProtocolError(f"select meta 'words': {len(words)} basis words, over the limit of {MAX_BASIS_WORDS}")
    arrays = _arrays(content, "basis")
    vectors = _float_array(arrays, "vectors", "basis", 2)
    offset = _float_array(arrays, "human_offset", "basis", 1) if "human_offset" in arrays else None
    coords = _float_array(_arrays(content, "coords"), "coords", "coords", 2)
    try:
        basis = Basis(
            dim=dim,
            words=words,
            vectors=vectors,
            tau_orth=f("tau_orth", _number, 0.0, 1.0),
            tau_res=f("tau_res", _number, 0.0),
            summarizer=f("summarizer", _text, empty=True),
            orthogonalize=f("orthogonalize", _flag),
            complete=f("complete", _flag, default=False),
            residual_words=set(f("residual_words", _texts, default=[])),
            human_offset=offset,
            human_weight=f("human_weight", _number, 0.0, default=0.0),
        )
    except BasisError as err:
        raise ProtocolError(f"select request: invalid basis ({err})") from err
    ids = tuple(f("ids", _texts, distinct=True))
    if coords.shape != (len(ids), basis.size):
        raise ProtocolError(f"coords shape {coords.shape} != ({len(ids)}, {basis.size})")
    return SelectRequest(
        basis, ids, coords, f("delta", _number, 0.0, infinite=True), f("max_parents", _integer, 1, MAX_PARENTS),
        f("probe", _probe, default={}),
        f("distance", _one_of, DISTANCES, default="l1"),  # a server that names none means Eq. 1
    )


def _probe(value: object, name: str) -> dict:
    """The probe settings a device builds its ProbeConfig from: known fields, in range."""
    f = _Object(value, name)
    f.only(PROBE_FIELDS)
    out = {k: f(k, _integer, 1) for k in ("max_new_tokens", "batch_size") if k in value}
    if "prefix_fraction" in value:
        out["prefix_fraction"] = f("prefix_fraction", _number, 0.0, 1.0)
    return out


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
    f = _Object(_json(_config(content, "offer"), "meta"), "offer meta")
    ids = tuple(f("ids", _texts))
    n_adapters = f("adapters", _integer, 0, len(ids))
    if n_adapters not in (0, len(ids)):
        raise ProtocolError(f"offer of {len(ids)} pLLMs announces {n_adapters} adapters")
    fields = {
        "method": f("method", _text), "seed": f("seed", _integer, 0, MAX_INT),
        "trials": f("trials", _maybe(_integer), 1), "max_seq_len": f("max_seq_len", _integer, 8),
        "eval_batch_size": f("eval_batch_size", _integer, 1), "encoder": f("encoder", _maybe(_text)),
        "labels": tuple(f("labels", _texts, nullable=True)), "user_label": f("user_label", _maybe(_text)),
    }
    embeddings = None
    if "embeddings" in content:
        embeddings = _float_array(_arrays(content, "embeddings"), "vectors", "embeddings", 2)
    adapters = tuple(parse_adapter(content, f"offer-{i}") for i in range(n_adapters))
    return OfferRequest(ids=ids, adapters=adapters, embeddings=embeddings, **fields)


def parse_select(content: RecordDict) -> SelectRequest | OfferRequest:
    """Whichever ``query.select`` this is: XPerT's (basis + coordinates) or a baseline's offer."""
    return parse_offer_request(content) if "offer" in content else parse_select_request(content)


def text_embeddings_offer(ids: Sequence[str], vectors: np.ndarray, encoder: str) -> RecordDict:
    """The text-encoder baseline's offer: one sentence embedding per pLLM (n x d float32), their ids and
    the encoder's fingerprint (what the device receives, its seed and settings aside)."""
    return offer_request(OfferRequest("text-encoder", tuple(ids), embeddings=np.asarray(vectors), encoder=encoder))


class MessageSizes:
    """The payload sizes of ``xpert_fl.baselines`` (``SelectionTask.sizes``) measured over this contract's
    records (:func:`payload_bytes`), so offline experiments and devices count every method's bytes as the
    Flower messages carry them."""

    def adapter(self, adapter: Adapter) -> int:
        return adapter_bytes(adapter)

    def basis_coords(
        self, basis: Basis, ids: Sequence[str], coords: np.ndarray, delta: float, max_parents: int, probe: dict,
        distance: str,
    ) -> int:
        """XPerT's ``query.select`` payload: the basis and every offered pLLM's coordinates, with the rules."""
        req = SelectRequest(basis, tuple(ids), coords, delta, max_parents, probe, distance)
        return payload_bytes(select_request(req))

    def embeddings(self, ids: Sequence[str], vectors: np.ndarray, encoder: str) -> int:
        return payload_bytes(text_embeddings_offer(ids, vectors, encoder))


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

    @classmethod
    def of(cls, selection: Selection) -> SelectionCost:
        """What a device reports with its choice: the costs, not the scores or details (they are functions
        of the user's data)."""
        return cls(selection.method, dict(selection.bytes), selection.evaluations, selection.tokens,
                   selection.seconds, len(selection.downloaded))

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
    return _choice(_config(content, "choice").get("choice"), "choice reply 'choice'")


def _choice(value: object, name: str) -> Choice:
    """A Choice from its JSON, with at most MAX_PARENTS ids, each bounded like a name."""
    text = _text(value, name, max_chars=MAX_JSON_CHARS)
    try:
        choice = Choice.from_json(text)
    except ValueError as err:
        raise ProtocolError(f"{name}: invalid choice ({_show(str(err))})") from err
    if len(choice.ids) > MAX_PARENTS:
        raise ProtocolError(f"{name}: {len(choice.ids)} ids, over the limit of {MAX_PARENTS}")
    for i, id_ in enumerate(choice.ids):
        _text(id_, f"{name} id {i}")
    return choice


def parse_selection_cost(content: RecordDict) -> SelectionCost | None:
    """The cost a choice reply reports; None when the device reports none (e.g. a client predating it)."""
    if "cost" not in content:
        return None
    f = _Object(_json(_config(content, "cost"), "meta"), "selection cost")
    f.only(SelectionCost.__dataclass_fields__)
    counts = {k: f(k, _integer, 0, MAX_INT, default=0) for k in ("evaluations", "tokens", "downloaded")}
    return SelectionCost(
        f("method", _text), f("bytes", _byte_counts, default={}), seconds=f("seconds", _number, 0.0, default=0.0),
        **counts,
    )


def _byte_counts(value: object, name: str) -> dict[str, int]:
    f = _Object(value, name)
    return {_text(k, f"{name} key"): f(k, _integer, 0, MAX_INT) for k in value}


# --- adapters ---------------------------------------------------------------------------------
def adapter_records(adapter: Adapter, name: str) -> dict[str, ArrayRecord | ConfigRecord]:
    """An adapter as two records named ``name``: its tensors and its PEFT config + base fingerprint."""
    arrays = ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in sorted(adapter.tensors.items())})
    config = ConfigRecord({"config": json.dumps(adapter.config, sort_keys=True), "base": adapter.base_fingerprint})
    return {f"{name}.arrays": arrays, f"{name}.config": config}


def parse_adapter(content: RecordDict, name: str) -> Adapter:
    """The adapter stored under ``name``; ProtocolError if a record is missing or malformed, or the config
    is not one the project loads and merges (``adapters.check_config``; whether it fits the base model is
    checked by the receiver with validate_adapter)."""
    import torch

    from xpert_fl.adapters import Adapter, AdapterError, check_config

    what = f"adapter {name!r}"
    arrays = _arrays(content, f"{name}.arrays")
    record = _config(content, f"{name}.config")
    f = _Object(_json(record, "config"), f"{what} config")
    f("r", _integer, 1)
    f("lora_alpha", _number)
    f("target_modules", _modules)
    f("use_rslora", _maybe(_flag), default=None)
    try:
        check_config(f.value)
    except AdapterError as err:
        raise ProtocolError(f"{what}: {err}") from err
    base = _text(record.get("base"), f"{what} 'base'", empty=True)
    tensors = {_text(k, f"{what} tensor name"): torch.from_numpy(_float_array(arrays, k, what, 2)) for k in arrays}
    if not tensors:
        raise ProtocolError(f"{what} holds no tensors")
    return Adapter(config=f.value, tensors=tensors, base_fingerprint=base)


def _modules(value: object, name: str) -> str | list:
    """PEFT's target_modules: one module name (or pattern) or a list of them."""
    return _text(value, name) if isinstance(value, str) else _texts(value, name)


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
    f = _Object(_json(_config(content, "train"), "meta"), "train meta")
    choice = f("choice", _choice)
    finetune, compare_scratch = f("finetune", _finetune), f("compare_scratch", _flag, default=False)
    adapters = []
    for i, expected in enumerate(choice.ids):
        adapter = parse_adapter(content, f"start-{i}")
        if adapter.content_hash != expected:
            raise ProtocolError(f"received adapter {i} has content hash {adapter.content_hash}, not {expected}")
        adapters.append(adapter)
    return TrainRequest(choice, tuple(adapters), finetune, compare_scratch)


def _finetune(value: object, name: str) -> dict:
    """The fine-tuning budget: FinetuneConfig fields, each of its annotated type, accepted by its own checks."""
    from xpert_fl.finetune import FinetuneConfig

    f = _Object(value, name)
    hints = typing.get_type_hints(FinetuneConfig)
    f.only(hints)
    fields_ = {k: f(k, _typed, hints[k]) for k in value}
    try:
        FinetuneConfig(**fields_)
    except ValueError as err:
        raise ProtocolError(f"{name}: {err}") from err
    return fields_


def _typed(value: object, name: str, hint: object) -> object:
    """``value`` checked against a config field's annotation: bool, int, float, str, tuple[str, ...], X | None."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        (hint,) = (a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return _texts(value, name)
    checks = {bool: _flag, str: _text, float: _number, int: lambda v, n: _integer(v, n, -MAX_INT, MAX_INT)}
    return checks[hint](value, name)


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
    for key, value in metrics.items():
        _number(value, f"upload metric {_text(key, 'upload metric name')!r}")
    report = _Object(_json(_config(content, "report"), "meta"), "upload report")
    for key in report.value:
        report(key, _text)
    drift = None
    if "self_report" in content:
        drift = _float_array(_arrays(content, "self_report"), "drift", "self_report", 1)
        if "summarizer" not in report.value:
            raise ProtocolError("a self-reported drift must name its summarizer (upload report 'summarizer')")
    return Upload(adapter, dict(metrics.items()), report.value, drift)
