"""The message parsers of ``protocol/__init__.py`` under hostile input: every parse of a mutated message
either returns valid values or raises ProtocolError, nothing else.

Valid messages are built with the module's own encoders, then one thing is changed: a JSON field (wrong
type, null, NaN or Infinity, huge or negative numbers, over-long strings, a field deleted), a raw config
value (not JSON, deeply nested, an integer of 5000 digits), an array (complex, string, integer or bool
dtype, NaN, wrong rank, big-endian, truncated or forged .npy bytes, a header claiming 2^40 floats) or a
whole record. The concrete cases an audit found (``test_audit_case``) are pinned one by one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import typing
from io import BytesIO

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol as P
from xpert_fl.adapters import Adapter
from xpert_fl.basis import Basis
from xpert_fl.explain import ProbeConfig
from xpert_fl.finetune import FinetuneConfig
from xpert_fl.select import DISTANCES, Choice

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MODULE = "model.layers.0.self_attn.q_proj"


# --- valid messages, built with the module's encoders --------------------------------------------------
def adapter(seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "peft_type": "LORA", "use_rslora": False},
        {f"base_model.model.{MODULE}.lora_A.weight": torch.randn(2, 4, generator=g),
         f"base_model.model.{MODULE}.lora_B.weight": torch.randn(6, 2, generator=g)},
        "fp0",
    )


A = adapter()


def select_message() -> RecordDict:
    basis = Basis(dim=4, words=["calm", "terse"], vectors=np.eye(2, 4, dtype=np.float32), summarizer="s",
                  orthogonalize=True, complete=True, residual_words={"terse"})
    basis.set_human_offset(np.linspace(-1, 1, 4, dtype=np.float32), 0.3)
    req = P.SelectRequest(basis, ("x", "y"), np.array([[0.5, -1.0], [2.0, 0.25]]), math.inf, 2,
                          {"max_new_tokens": 8, "batch_size": 2, "prefix_fraction": 0.3})
    return P.select_request(req)


MESSAGES = {
    "register": lambda: P.register_reply("user-1", "style0"),
    "select": select_message,
    "offer-adapters": lambda: P.offer_request(P.OfferRequest("bo", (A.content_hash,), seed=3, trials=2, adapters=(A,))),
    "offer-embeddings": lambda: P.text_embeddings_offer(("x", "y"), np.ones((2, 3)), "encoder-fp"),
    "offer-labels": lambda: P.offer_request(P.OfferRequest("oracle", ("x", "y"), labels=("s0", None), user_label="s0")),
    "choice": lambda: P.choice_reply(Choice("merge", ("x", "y"), (0.6, 0.4), 0.3),
                                     P.SelectionCost("xpert", {"payload": 10}, 2, 100, 0.5, 1)),
    "train": lambda: P.train_request(
        Choice("single", (A.content_hash,), (1.0,), 0.5), [A],
        {"max_steps": 4, "lr": 1e-3, "rank": 2, "alpha": 4.0, "target_loss": None, "seed": 0,
         "target_modules": ["q_proj"]}, True),
    "upload": lambda: P.upload_reply(A, {"steps": 4, "seconds": 1.5}, {"start": "single", "summarizer": "s"},
                                     np.ones(4, np.float32)),
}


# --- what a successful parse must give ---------------------------------------------------------------
def is_int(x: object, lo: int, hi: int = P.MAX_INT) -> bool:
    return type(x) is int and lo <= x <= hi


def is_number(x: object, lo: float = -math.inf, infinite: bool = False) -> bool:
    return type(x) in (int, float) and not math.isnan(x) and (infinite or math.isfinite(x)) and x >= lo


def assert_clean(x: object) -> None:
    """No NaN, no over-long string, only finite real float arrays, anywhere inside ``x``."""
    if isinstance(x, str):
        assert len(x) <= P.MAX_NAME_CHARS
    elif isinstance(x, float):
        assert not math.isnan(x)
    elif isinstance(x, np.ndarray):
        assert x.dtype.name in P.FLOAT_DTYPES and np.isfinite(x).all() and x.dtype.isnative
    elif isinstance(x, torch.Tensor):
        assert x.is_floating_point() and torch.isfinite(x).all()
    elif isinstance(x, dict):
        for k, v in x.items():
            assert_clean(k)
            assert_clean(v)
    elif isinstance(x, list | tuple | set):
        for v in x:
            assert_clean(v)
    elif dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            assert_clean(getattr(x, f.name))


def check_adapter(a: Adapter) -> None:
    assert is_int(a.config["r"], 1) and is_number(a.config["lora_alpha"]) and isinstance(a.base_fingerprint, str)
    assert a.config.get("use_rslora") in (None, True, False) and a.tensors
    assert all(t.ndim == 2 for t in a.tensors.values())
    assert isinstance(a.content_hash, str)


def check_choice(c: Choice) -> None:
    assert len(c.ids) <= P.MAX_PARENTS and all(is_number(w, 0.0) for w in c.weights) and is_number(c.distance, 0.0)


def check_select(req: P.SelectRequest | P.OfferRequest) -> None:
    if isinstance(req, P.OfferRequest):
        assert isinstance(req.method, str) and req.method and is_int(req.seed, 0)
        assert req.trials is None or is_int(req.trials, 1)
        assert is_int(req.max_seq_len, 8) and is_int(req.eval_batch_size, 1)
        assert all(isinstance(i, str) and i for i in req.ids) and len(set(req.ids)) == len(req.ids)
        assert all(x is None or isinstance(x, str) for x in (*req.labels, req.encoder, req.user_label))
        assert req.embeddings is None or (req.embeddings.ndim == 2 and len(req.embeddings) == len(req.ids))
        for a in req.adapters:
            check_adapter(a)
        return
    b = req.basis
    assert is_number(req.delta, 0.0, infinite=True) and is_int(req.max_parents, 1, P.MAX_PARENTS)
    assert req.distance in DISTANCES and type(b.orthogonalize) is bool and type(b.complete) is bool
    assert is_int(b.dim, 1, P.MAX_DIM) and is_number(b.human_weight, 0.0) and 0 <= b.tau_orth <= 1
    assert req.coords.shape == (len(req.ids), b.size) and len(set(req.ids)) == len(req.ids)
    assert set(req.probe) <= set(P.PROBE_FIELDS)
    assert all(is_int(req.probe[k], 1) for k in ("max_new_tokens", "batch_size") if k in req.probe)
    assert 0 <= req.probe.get("prefix_fraction", 0) <= 1
    ProbeConfig(**req.probe)


def check_choice_reply(content: RecordDict) -> None:
    check_choice(P.parse_choice(content))
    cost = P.parse_selection_cost(content)
    if cost is not None:
        assert all(is_int(n, 0) for n in (cost.evaluations, cost.tokens, cost.downloaded, *cost.bytes.values()))
        assert is_number(cost.seconds, 0.0) and isinstance(cost.method, str) and cost.method
        assert_clean(cost)


def check_train(req: P.TrainRequest) -> None:
    check_choice(req.choice)
    assert type(req.compare_scratch) is bool and len(req.adapters) == len(req.choice.ids)
    for a, i in zip(req.adapters, req.choice.ids, strict=True):
        check_adapter(a)
        assert a.content_hash == i
    hints = typing.get_type_hints(FinetuneConfig)
    assert all(v is None or not isinstance(v, bool) or hints[k] is bool for k, v in req.finetune.items())
    FinetuneConfig(**req.finetune)


def check_upload(up: P.Upload) -> None:
    check_adapter(up.adapter)
    assert all(is_number(v) for v in up.metrics.values()) and all(isinstance(v, str) for v in up.report.values())
    assert up.self_report is None or (up.self_report.ndim == 1 and isinstance(up.report["summarizer"], str))


def parse_register(content: RecordDict) -> None:
    user, label = P.parse_register(content)
    assert isinstance(user, str) and user and (label is None or isinstance(label, str))
    assert_clean((user, label))


def parsed(check, parse):
    def run(content: RecordDict) -> None:
        value = parse(content)
        check(value)
        assert_clean(value)
    return run


PARSE = {
    "register": parse_register,
    "select": parsed(check_select, P.parse_select),
    "offer-adapters": parsed(check_select, P.parse_select),
    "offer-embeddings": parsed(check_select, P.parse_select),
    "offer-labels": parsed(check_select, P.parse_select),
    "choice": check_choice_reply,
    "train": parsed(check_train, P.parse_train_request),
    "upload": parsed(check_upload, P.parse_upload),
}


def parse_or_protocol_error(kind: str, content: RecordDict) -> None:
    """The property: a valid result, or ProtocolError. Any other exception fails the test."""
    try:
        PARSE[kind](content)
    except P.ProtocolError:
        pass


# --- hostile values ----------------------------------------------------------------------------------
LONG = "x" * (P.MAX_NAME_CHARS + 1)
HOSTILE_JSON = st.one_of(
    st.none(), st.booleans(), st.integers(),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**300, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 0.5, 2.5]),
    st.text(max_size=6), st.sampled_from(["", "None", "null", "Infinity", "1", "l1", LONG]),
    st.lists(st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=3), st.just(LONG)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.text(max_size=3)), max_size=2),
)
HOSTILE_CONFIG = st.one_of(  # a raw ConfigRecord value, where a JSON string or a plain string belongs
    st.text(max_size=12), st.binary(max_size=8), st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans(),
    st.lists(st.integers(0, 5), max_size=3),
    st.sampled_from(["[" * 100_000, "1" * 5000, "{}", "[]", "null", "NaN", '{"a": }', "\ud800", LONG]),
)


def npy(array: np.ndarray) -> bytes:
    buf = BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def forged(header: str, payload: bytes, version: int = 1) -> Array:
    """.npy bytes with any header text (what numpy would never write)."""
    raw = header.encode("latin1", "replace")
    length = struct.pack("<H" if version == 1 else "<I", len(raw))
    data = b"\x93NUMPY" + bytes([version, 0]) + length + raw + payload
    return Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=data)


def header(descr: str, fortran: bool, shape: tuple) -> str:
    return f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {shape!r}, }}\n"


ODD_ARRAYS = [np.array([[1 + 2j, 3j]]), np.array([["ab", "c"]]), np.array([[1, 2]]), np.array([[True]]),
              np.ones((2, 2), np.longdouble), np.full((2, 2), np.nan, np.float32), np.full((2, 2), np.inf),
              np.ones(3, np.float32), np.ones((1, 1, 1), np.float32), np.ones((2, 2), ">f4"),
              np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)), np.ones((0, 2), np.float16),
              np.array([[1e300]], np.float64)]
HOSTILE_ARRAY = st.one_of(
    st.sampled_from(ODD_ARRAYS).map(Array),
    st.builds(
        lambda descr, fortran, shape, payload, version: forged(header(descr, fortran, shape), payload, version),
        st.sampled_from(["<f4", "<f8", "<f2", ">f8", "<c8", "|O", "<U3", "|b1", "<i8", "|V8", "(2,)<f4", "<f16"]),
        st.booleans(),
        st.lists(st.sampled_from([0, 1, 2, 3, -1, 2**20, 2**40, 2**63, True]), max_size=3).map(tuple),
        st.binary(max_size=64), st.sampled_from([1, 2]),
    ),
    st.builds(forged, st.text(max_size=40), st.binary(max_size=16), st.sampled_from([1, 2, 3])),
    st.builds(lambda n: Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray",
                              data=npy(np.ones((2, 3), np.float32))[:n]), st.integers(0, 150)),
    st.builds(lambda b: Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b), st.binary(max_size=100)),
    st.just(Array(dtype="float32", shape=(2, 3), stype="torch.Tensor", data=npy(np.ones((2, 3), np.float32)))),
)


def mutate_json(value: object, data: st.DataObject) -> object:
    """A copy of a decoded JSON value with one hostile change somewhere inside it (JSON inside a JSON
    string, as the choice in a train request, included)."""
    if isinstance(value, str) and value.startswith("{"):
        return json.dumps(mutate_json(json.loads(value), data))
    if isinstance(value, dict) and value and data.draw(st.integers(0, 4)):
        out, key = dict(value), data.draw(st.sampled_from(sorted(value)))
        op = data.draw(st.sampled_from(["set", "delete", "inside"]))
        if op == "delete":
            del out[key]
        else:
            out[key] = data.draw(HOSTILE_JSON) if op == "set" else mutate_json(value[key], data)
        return out
    if isinstance(value, list) and value and data.draw(st.integers(0, 2)):
        out, i = list(value), data.draw(st.integers(0, len(value) - 1))
        out[i] = mutate_json(value[i], data)
        return out
    return data.draw(HOSTILE_JSON)


def mutate(content: RecordDict, data: st.DataObject) -> RecordDict:
    """``content`` with one hostile change: a config value, a JSON field, an array, or a record removed."""
    name = data.draw(st.sampled_from(sorted(content.keys())))
    record = content[name]
    op = data.draw(st.sampled_from(["change", "change", "change", "drop-record"]))
    if op == "drop-record":
        del content[name]
    elif isinstance(record, ConfigRecord):
        key = data.draw(st.sampled_from(sorted(record.keys())))
        value = record[key]
        how = data.draw(st.sampled_from(["json", "json", "json", "raw", "delete"]))
        if how == "delete":
            del record[key]
        elif how == "raw" or not isinstance(value, str):
            record[key] = data.draw(HOSTILE_CONFIG)
        else:
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:  # a plain string field (user, label, base fingerprint)
                decoded = value
            mutated = mutate_json(decoded, data)
            record[key] = mutated if isinstance(decoded, str) and isinstance(mutated, str) else json.dumps(mutated)
    elif isinstance(record, ArrayRecord):
        key = data.draw(st.sampled_from(sorted(record.keys())))
        if data.draw(st.integers(0, 5)):
            record[key] = data.draw(HOSTILE_ARRAY)
        else:
            del record[key]
    else:  # the upload's metrics
        assert isinstance(record, MetricRecord)
        record[data.draw(st.sampled_from(sorted(record.keys())))] = data.draw(
            st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**63), 2**63 - 1),
                      st.lists(st.floats(allow_nan=False), max_size=2)))
    return content


# --- the properties ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_valid_messages_parse(kind):
    PARSE[kind](MESSAGES[kind]())


@pytest.mark.parametrize("kind", sorted(MESSAGES))
@FUZZ
@given(data=st.data())
def test_a_mutated_message_parses_to_valid_values_or_raises_protocol_error(kind, data):
    parse_or_protocol_error(kind, mutate(MESSAGES[kind](), data))


@FUZZ
@given(array=HOSTILE_ARRAY, where=st.sampled_from(["select", "upload", "train", "offer-embeddings"]))
def test_any_array_in_any_array_record(array, where):
    content = MESSAGES[where]()
    for name in content.keys():
        if isinstance(content[name], ArrayRecord):
            for key in content[name].keys():
                content[name][key] = array
    parse_or_protocol_error(where, content)


def test_probe_fields_are_probe_configs():
    assert set(P.PROBE_FIELDS) == {f.name for f in dataclasses.fields(ProbeConfig)}


def test_a_json_field_over_the_size_limit_is_refused_unread():
    content = P.register_reply("user-1", None)
    content["register"]["user"] = "u" * (P.MAX_JSON_CHARS + 1)
    with pytest.raises(P.ProtocolError, match="'user'.*at most 256"):
        P.parse_register(content)
    content = select_message()
    content["select"]["meta"] = " " * (P.MAX_JSON_CHARS + 1)
    with pytest.raises(P.ProtocolError, match="'meta'.*at most"):
        P.parse_select(content)


# --- what the audit found, one by one ----------------------------------------------------------------
def set_json(kind: str, record: str, key: str, path: tuple, value: object) -> RecordDict:
    """Message ``kind`` with the JSON field at ``path`` of config ``record[key]`` set to ``value`` (a path
    through "choice" descends into the JSON string it holds)."""
    content = MESSAGES[kind]()
    meta = json.loads(content[record][key])
    target = meta
    for step in path[:-1]:
        if isinstance(target[step], str):
            inner = json.loads(target[step])
            target[step] = inner
        target = target[step]
    target[path[-1]] = value
    if kind == "train" and path[0] == "choice":
        meta["choice"] = json.dumps(meta["choice"])
    content[record][key] = json.dumps(meta)
    return content


def set_array(kind: str, record: str, key: str, array: Array) -> RecordDict:
    content = MESSAGES[kind]()
    content[record][key] = array
    return content


TENSOR = f"base_model.model.{MODULE}.lora_A.weight"


def forged_tensor(shape: tuple, payload: bytes, descr: str = "<f4") -> Array:
    return forged(header(descr, False, shape), payload)


AUDIT = {  # case: (message kind, the mutated message, what the ProtocolError names)
    # OverflowError from int(Infinity) or float(10**400)
    "dim Infinity": ("select", lambda: set_json("select", "select", "meta", ("dim",), math.inf), "'dim'"),
    "seed Infinity": ("offer-labels", lambda: set_json("offer-labels", "offer", "meta", ("seed",), math.inf), "'seed'"),
    "weight 10^400": ("train", lambda: set_json("train", "train", "meta", ("choice", "weights", 0), 10**400),
                      "choice weight"),
    # MemoryError: a 64-byte .npy claiming 2^40 floats
    "2^40 floats": ("upload", lambda: set_array("upload", "upload.arrays", TENSOR,
                                                forged_tensor((2**20, 2**20), b"\0" * 64)), "over the limit"),
    "2^20 floats in 64 bytes": ("upload", lambda: set_array("upload", "upload.arrays", TENSOR,
                                                            forged_tensor((2**10, 2**10), b"\0" * 64)), "bytes follow"),
    "unparsable header": ("upload", lambda: set_array("upload", "upload.arrays", TENSOR, forged("(", b"")),
                          "not a readable .npy"),
    # TypeError from unicode or complex arrays; complex silently made real
    "unicode vectors": ("select", lambda: set_array("select", "basis", "vectors", Array(np.array([["a"] * 4] * 2))),
                        "'vectors' must hold real floats"),
    "complex coords": ("select", lambda: set_array("select", "coords", "coords", Array(np.ones((2, 2), np.complex64))),
                       "'coords' must hold real floats"),
    "complex tensor": ("upload", lambda: set_array("upload", "upload.arrays", TENSOR,
                                                   Array(np.ones((2, 4), np.complex128))), "must hold real floats"),
    "object array": ("upload", lambda: set_array("upload", "self_report", "drift",
                                                 forged(header("|O", False, (4,)), b"\0" * 32)), "'drift' must hold"),
    # bool() and str() coercions
    "method null": ("offer-labels", lambda: set_json("offer-labels", "offer", "meta", ("method",), None), "'method'"),
    "distance null": ("select", lambda: set_json("select", "select", "meta", ("distance",), None), "'distance'"),
    "orthogonalize 1": ("select", lambda: set_json("select", "select", "meta", ("orthogonalize",), 1),
                        "'orthogonalize'"),
    "compare_scratch 'no'": ("train", lambda: set_json("train", "train", "meta", ("compare_scratch",), "no"),
                             "'compare_scratch'"),
    "seed 1.5": ("offer-labels", lambda: set_json("offer-labels", "offer", "meta", ("seed",), 1.5), "'seed'"),
    "max_seq_len true": ("offer-labels", lambda: set_json("offer-labels", "offer", "meta", ("max_seq_len",), True),
                         "'max_seq_len'"),
    "cost seconds true": ("choice", lambda: set_json("choice", "cost", "meta", ("seconds",), True), "'seconds'"),
    "report value 5": ("upload", lambda: set_json("upload", "report", "meta", ("trainer",), 5), "'trainer'"),
    # NaN or negative delta, max_parents <= 0 or huge, settings out of range
    "delta NaN": ("select", lambda: set_json("select", "select", "meta", ("delta",), math.nan), "'delta'"),
    "delta -1": ("select", lambda: set_json("select", "select", "meta", ("delta",), -1.0), "'delta'"),
    "delta -Infinity": ("select", lambda: set_json("select", "select", "meta", ("delta",), -math.inf), "'delta'"),
    "max_parents 0": ("select", lambda: set_json("select", "select", "meta", ("max_parents",), 0), "'max_parents'"),
    "max_parents 10^6": ("select", lambda: set_json("select", "select", "meta", ("max_parents",), 10**6),
                         "'max_parents'"),
    "probe tokens -5": ("select", lambda: set_json("select", "select", "meta", ("probe", "max_new_tokens"), -5),
                        "'max_new_tokens'"),
    "finetune lr NaN": ("train", lambda: set_json("train", "train", "meta", ("finetune", "lr"), math.nan), "'lr'"),
    # an adapter config only PEFT would read (found by the hypothesis test above)
    "peft_type NaN": ("upload", lambda: set_json("upload", "upload.config", "config", ("peft_type",), math.nan),
                      "peft_type must be 'LORA'"),
    "use_dora true": ("upload", lambda: set_json("upload", "upload.config", "config", ("use_dora",), True),
                      "use_dora"),
    # long strings
    "10 MB id": ("offer-labels", lambda: set_json("offer-labels", "offer", "meta", ("ids", 0), "i" * 10_000_000),
                 r"'ids'\[0\]"),
    "long word": ("select", lambda: set_json("select", "select", "meta", ("words", 0), "w" * 10_000), r"'words'\[0\]"),
}


@pytest.mark.parametrize("case", sorted(AUDIT))
def test_audit_case(case):
    kind, build, match = AUDIT[case]
    with pytest.raises(P.ProtocolError, match=match):
        PARSE[kind](build())
