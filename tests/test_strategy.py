"""XPerTStrategy's round logic without Flower running: fake devices, fake replies, failures.

No model is loaded: the cache is over a tiny fake base model (one 6x4 linear layer) and the
explainer maps an adapter to a deterministic random drift, so a full round takes milliseconds.
The baseline selection methods (run-config ``selection``) are checked the same way, message kind by
message kind: what the offer carries, what it costs on the wire, what the reply's cost records.
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest
import torch
from flwr.app import Array, Error, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from run_configs import run_config

import protocol
from protocol.run_config import RunConfigError
from strategies.config import XPerTConfig
from strategies.pllm_server import PLLMServer
from strategies.xpert import XPerTStrategy
from xpert_fl.adapters import Adapter
from xpert_fl.baselines import SELECTORS, TextEncoderSelector
from xpert_fl.baselines.core import selection_seed
from xpert_fl.basis import Basis
from xpert_fl.cache import BaseInfo, PLLMCache
from xpert_fl.explain import DRIFTS_FILE, load_drifts
from xpert_fl.select import Choice
from xpert_fl.summarizer import Drift

pytestmark = pytest.mark.usefixtures("flower_task_identity")

DIM = 16
MODULE = "model.layers.0.self_attn.q_proj"
WORDS = [f"word{i}" for i in range(40)]


def _rng(text: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))


class FakeSummarizer:
    fingerprint, dim = "fake-summarizer", DIM

    def subvector(self, word: str) -> np.ndarray:
        return _rng(word).normal(size=DIM).astype(np.float32)


class FakeExplainer:
    """Drift = a random vector seeded by the adapter's content; candidate words in a seeded order."""

    def __init__(self):
        self.summarizer = FakeSummarizer()
        self.fail_next = False
        self.answered: list[str] = []  # pLLMs whose probe answers were generated (text-encoder baseline)

    def pllm_answers(self, adapter: Adapter) -> list[str]:
        self.answered.append(adapter.content_hash)
        return [f"answer of {adapter.content_hash}"]

    def drift(self, adapter: Adapter) -> Drift:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("probe crashed")
        rng = _rng(adapter.content_hash)
        v = rng.normal(size=DIM).astype(np.float32)
        return Drift(v, list(rng.permutation(WORDS)), styled=v.copy())  # its answers' embedding: a report's check


class FakeEncoder:
    """A sentence encoder stand-in: a unit vector seeded by the texts."""

    fingerprint, dim = "fake-encoder", 8

    def mean(self, texts) -> np.ndarray:
        v = _rng("|".join(texts)).normal(size=self.dim).astype(np.float32)
        return v / np.linalg.norm(v)


def adapter(seed: int, r: int = 2, fingerprint: str = "fp0") -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        config={"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"], "peft_type": "LORA"},
        tensors={
            f"base_model.model.{MODULE}.lora_A.weight": torch.randn(r, 4, generator=g),
            f"base_model.model.{MODULE}.lora_B.weight": torch.randn(6, r, generator=g),
        },
        base_fingerprint=fingerprint,
    )


def make_server(tmp_path, n_initial: int = 0) -> PLLMServer:
    cache = PLLMCache(tmp_path / "cache", BaseInfo("fake", "fp0", {MODULE: (6, 4)}))
    for i in range(n_initial):
        cache.add(adapter(1000 + i), label=f"style{i}")
    basis = Basis(dim=DIM, tau_orth=0.9, tau_res=0.2, summarizer="fake-summarizer", orthogonalize=True)
    server = PLLMServer(cache, basis, FakeExplainer(), TextEncoderSelector(encoder=FakeEncoder()))
    server.explain_pending()
    return server


def wire(msg: Message) -> Message:
    """The message as the receiver gets it: every object deflated, then inflated again."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    out = inflate_object_from_contents(msg.object_id, contents)
    out.metadata.__dict__.update(msg.metadata.__dict__)
    return out


class FakeDevice:
    """A device's behaviour in each phase; ``mode`` injects failures."""

    def __init__(self, node: int, user: str, label: str, seed: int, mode: str = "ok"):
        self.node, self.user, self.label, self.seed, self.mode = node, user, label, seed, mode
        self.received: list[Message] = []

    def handle(self, msg: Message) -> Message | None:
        msg = wire(msg)
        self.received.append(msg)
        kind = msg.metadata.message_type
        if kind == protocol.REGISTER:
            if self.mode == "register-error":
                return Message(Error(code=1, reason="boom"), reply_to=msg)
            return Message(protocol.register_reply(self.user, self.label), reply_to=msg)
        if kind == protocol.SELECT:
            if self.mode == "select-timeout":
                return None
            if self.mode == "select-error":
                return Message(Error(code=2, reason="select crashed"), reply_to=msg)
            req = protocol.parse_select(msg.content)
            cost = protocol.SelectionCost(req.method, {"payload": 10 * len(req.ids)}, len(req.ids), 100, 0.5)
            if self.mode == "select-invalid":
                return Message(protocol.choice_reply(Choice("single", ("not-offered",), (1.0,), 0.1)), reply_to=msg)
            if not req.ids:
                return Message(protocol.choice_reply(Choice("base")), reply_to=msg)
            if self.mode == "merge" and len(req.ids) >= 2:
                return Message(protocol.choice_reply(Choice("merge", req.ids[:2], (0.6, 0.4), 0.3)), reply_to=msg)
            pick = req.ids[self.seed % len(req.ids)]
            choice = Choice("single", (pick,), (1.0,), 0.5, {pick: 0.5})
            return Message(protocol.choice_reply(choice, cost), reply_to=msg)
        assert kind == protocol.TRAIN
        if self.mode == "train-timeout":
            return None
        if self.mode == "train-error":
            return Message(Error(code=3, reason="out of memory"), reply_to=msg)
        req = protocol.parse_train_request(msg.content)
        new = {
            "wrong-base": adapter(self.seed, fingerprint="other-base"),
            "wrong-shape": Adapter(
                {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]},
                {f"base_model.model.{MODULE}.lora_A.weight": torch.ones(2, 5),
                 f"base_model.model.{MODULE}.lora_B.weight": torch.ones(6, 2)}, "fp0"),
            "duplicate": req.adapters[0] if req.adapters else adapter(self.seed),
        }.get(self.mode, adapter(100 * self.seed + len(self.received)))
        metrics = {"steps": 4, "seconds": 1.5, "samples_consumed": 8, "energy_joules": 3.0, "reached_target": 1.0,
                   "steps_to_target": 2, "scratch_steps": 6, "scratch_steps_to_target": 6,
                   "scratch_reached_target": 1.0}
        content = protocol.upload_reply(new, metrics, {"start": req.choice.kind})
        forged = {"forged-npy": lambda: forged_npy((2**20, 2**20)),
                  "complex": lambda: Array(np.ones((2, 4), np.complex64))}.get(self.mode)
        if forged is not None:  # replace the first tensor of the upload
            content["upload.arrays"][sorted(content["upload.arrays"].keys())[0]] = forged()
        return Message(content, reply_to=msg)


def forged_npy(shape: tuple[int, ...]) -> Array:
    """A float32 array whose .npy header announces ``shape`` over 64 bytes of data."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}".ljust(117) + "\n"
    data = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64
    return Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=data)


class FakeGrid:
    """Duck-typed Grid: delivers each message to its device, returns the replies that came back."""

    def __init__(self, devices: list[FakeDevice]):
        self.devices = {d.node: d for d in devices}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.devices)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            reply = self.devices[msg.metadata.dst_node_id].handle(msg)
            if reply is not None:
                replies.append(wire(reply))
        return replies


def cfg(**kw) -> XPerTConfig:
    """The run's config: pyproject's defaults, one node, short timeouts; ``kw``: ``foo_bar`` for key ``foo-bar``."""
    return XPerTConfig.from_run_config(run_config({"min-nodes": 1, "timeout": 5.0}, **kw))


def devices(n: int, modes: dict[int, str] | None = None, first_node: int = 101, seed: int = 0) -> list[FakeDevice]:
    modes = modes or {}
    return [
        FakeDevice(first_node + 7 * i, f"user-{i}", f"style{i % 2}", seed + i, modes.get(i, "ok")) for i in range(n)
    ]


def test_config_from_run_config_types_and_defaults():
    c = cfg(num_server_rounds=3, merge_delta=math.inf, lr=1, orthogonalize=False)
    assert c.rounds.num_server_rounds == 3 and c.select.merge_delta == math.inf
    assert c.budget.lr == 1.0 and isinstance(c.budget.lr, float)  # a float key widens a TOML integer
    assert c.basis.orthogonalize is False and c.select.max_parents == 3
    assert c.finetune_fields()["target_loss"] is None
    assert cfg(target_loss=2.5).finetune_fields()["target_loss"] == 2.5
    for bad in ({"merge-delta": -1.0}, {"num-server-rounds": 0}, {"users-per-round": -1}, {"max-parents": 0},
                {"max-parents": protocol.MAX_PARENTS + 1}):  # devices refuse a select request beyond it
        with pytest.raises(RunConfigError):
            XPerTConfig.from_run_config(run_config(bad))


def test_two_rounds_grow_the_cache_and_later_users_start_from_uploads(tmp_path):
    server = make_server(tmp_path)
    rounds = []
    strategy = XPerTStrategy(cfg(), server, on_round=rounds.append)
    history = strategy.start(FakeGrid(devices(3)))
    assert [r.round for r in history] == [1, 2] and rounds == history
    first, second = history
    # round 1: empty cache -> every device starts from the base model; nothing to judge
    assert [u.status for u in first.users] == ["ok"] * 3
    assert all(u.choice == "base" and u.offered == 0 and u.correct is None and u.distance is None for u in first.users)
    assert first.cache_size == 3 and first.basis_size > 0
    # round 2: devices choose among the uploads of round 1; the new entries name them as parents
    assert all(u.offered == 3 and u.choice == "single" and u.status == "ok" for u in second.users)
    for u in second.users:
        entry = server.cache.get(u.new_id)
        assert entry.parents == tuple(u.chosen) and entry.label == u.label
        assert entry.coords is not None and len(entry.coords) == server.basis.size
        assert u.chosen_label in ("style0", "style1") and u.correct == (u.chosen_label == u.label)
    assert second.cache_size == 6
    # every cached pLLM is explained on the final basis
    assert all(e.coords is not None and len(e.coords) == server.basis.size for e in server.cache.entries())


def test_bytes_are_measured_per_device_and_kind(tmp_path):
    server = make_server(tmp_path, n_initial=2)
    grid = FakeGrid(devices(2))
    strategy = XPerTStrategy(cfg(num_server_rounds=1), server)
    (result,) = strategy.start(grid)
    for u in result.users:
        b = u.bytes
        assert all(b[k] > 0 for k in protocol.KINDS if k != protocol.OFFER) and b[protocol.OFFER] == 0, b
        dev = grid.devices[u.node_id]
        mine = [m for m in grid.sent if m.metadata.dst_node_id == dev.node]
        by_type = {m.metadata.message_type: protocol.message_bytes(m) for m in mine}
        assert b[protocol.REGISTER_DOWN] == by_type[protocol.REGISTER]
        assert b[protocol.BASIS_COORDS] == by_type[protocol.SELECT]
        assert b[protocol.ADAPTER_DOWN] == by_type[protocol.TRAIN]
        # the selection exchange is tiny next to one adapter
        assert b[protocol.BASIS_COORDS] + b[protocol.CHOICE] < b[protocol.ADAPTER_DOWN] + b[protocol.ADAPTER_UP]
        assert u.bytes_received == b[protocol.REGISTER_DOWN] + b[protocol.BASIS_COORDS] + b[protocol.ADAPTER_DOWN]
        assert u.bytes_sent == b[protocol.REGISTER_UP] + b[protocol.CHOICE] + b[protocol.ADAPTER_UP]
        # exactly the chosen adapter went down: one adapter's records
        assert u.bytes[protocol.ADAPTER_DOWN] > server.cache.get(u.chosen[0]).size_bytes // 2


def test_failures_are_logged_and_skipped_and_the_round_goes_on(tmp_path):
    server = make_server(tmp_path, n_initial=2)
    modes = {0: "select-error", 1: "select-timeout", 2: "select-invalid", 3: "train-error", 4: "train-timeout",
             5: "wrong-base", 6: "wrong-shape", 7: "ok", 8: "duplicate"}
    devs = devices(9, modes)
    strategy = XPerTStrategy(cfg(num_server_rounds=1), server)
    (result,) = strategy.start(FakeGrid(devs))
    status = {u.user: u.status for u in result.users}
    assert status == {
        "user-0": "select-error", "user-1": "select-timeout", "user-2": "select-invalid",
        "user-3": "train-error", "user-4": "train-timeout", "user-5": "upload-rejected",
        "user-6": "upload-rejected", "user-7": "ok", "user-8": "duplicate",
    }
    by_user = {u.user: u for u in result.users}
    assert "select crashed" in by_user["user-0"].error and "not offered" in by_user["user-2"].error
    assert by_user["user-5"].error and "base model" in by_user["user-5"].error
    # failed selections get no adapter; failed uploads are not cached
    assert all(by_user[f"user-{i}"].bytes[protocol.ADAPTER_DOWN] == 0 for i in range(3))
    assert len(server.cache) == 3 and by_user["user-7"].new_id in server.cache
    assert by_user["user-8"].new_id == by_user["user-8"].chosen[0]


def test_an_upload_that_breaks_the_protocol_is_invalid_not_a_failed_explanation(tmp_path):
    """A forged upload (a tensor whose .npy header claims 2^40 floats in 64 bytes, which numpy would try to
    allocate; a complex tensor, which it would silently make real) is recorded as ``upload-invalid`` with
    the parser's reason, apart from a well-formed adapter the server refuses (``upload-rejected``) and
    from the server's own failures (``explain-failed``); the round goes on."""
    server = make_server(tmp_path, n_initial=1)
    devs = devices(4, {0: "forged-npy", 1: "complex", 2: "wrong-base"})
    (result,) = XPerTStrategy(cfg(num_server_rounds=1), server).start(FakeGrid(devs))
    by_user = {u.user: u for u in result.users}
    assert [by_user[f"user-{i}"].status for i in range(4)] == ["upload-invalid", "upload-invalid", "upload-rejected",
                                                                 "ok"]
    assert "lora_A.weight' has 1099511627776 elements, over the limit" in by_user["user-0"].error
    assert "lora_A.weight' must hold real floats" in by_user["user-1"].error
    assert "base model" in by_user["user-2"].error
    assert len(server.cache) == 2 and all(by_user[f"user-{i}"].new_id is None for i in range(3))


def test_a_failed_explanation_removes_the_upload_and_the_round_goes_on(tmp_path):
    server = make_server(tmp_path, n_initial=1)
    strategy = XPerTStrategy(cfg(num_server_rounds=1), server)
    server.explainer.fail_next = True  # the first upload (user-0, ingested first) fails to explain
    (result,) = strategy.start(FakeGrid(devices(2)))
    a, b = result.users
    assert (a.status, b.status) == ("explain-failed", "ok") and "probe crashed" in a.error
    assert len(server.cache) == 2 and a.new_id is None and b.new_id in server.cache


def test_a_failed_ingest_never_removes_an_entry_another_writer_added(tmp_path, monkeypatch):
    """Another writer (a second server, the CLI) commits the same content while this upload is checked:
    the upload is a duplicate, and its failure must not remove the other writer's entry."""
    server = make_server(tmp_path, n_initial=1)
    upload = adapter(5)
    other = PLLMCache(tmp_path / "cache")
    other.add(upload, label="theirs")
    monkeypatch.setattr(PLLMCache, "__contains__", lambda self, id: False)  # committed after any look
    server.explainer.fail_next = True
    done = server.ingest(upload, [], {"steps": 1}, None)
    assert done.duplicate and done.entry.label == "theirs"
    assert other.get(upload.content_hash).label == "theirs" and len(other) == 2


def test_merge_choice_sends_every_parent_and_records_them(tmp_path):
    server = make_server(tmp_path, n_initial=3)
    grid = FakeGrid(devices(1, {0: "merge"}))
    (result,) = XPerTStrategy(cfg(num_server_rounds=1), server).start(grid)
    (u,) = result.users
    assert u.choice == "merge" and len(u.chosen) == 2 and u.weights == [0.6, 0.4]
    assert u.chosen_label == "style0"  # the heavier parent
    train = [m for m in grid.devices[u.node_id].received if m.metadata.message_type == protocol.TRAIN][0]
    req = protocol.parse_train_request(train.content)
    assert [a.content_hash for a in req.adapters] == u.chosen
    assert server.cache.get(u.new_id).parents == tuple(u.chosen)


def test_choices_over_max_parents_are_invalid(tmp_path):
    server = make_server(tmp_path, n_initial=3)
    (result,) = XPerTStrategy(cfg(num_server_rounds=1, max_parents=1), server).start(
        FakeGrid(devices(1, {0: "merge"}))
    )
    assert result.users[0].status == "select-invalid"


def test_sampling_is_a_seeded_arrival_order_independent_of_node_ids(tmp_path):
    def arrivals(first_node: int, seed: int) -> list[list[str]]:
        server = make_server(tmp_path / f"{first_node}-{seed}")
        history = XPerTStrategy(cfg(num_server_rounds=3, users_per_round=2, seed=seed), server).start(
            FakeGrid(devices(4, first_node=first_node))
        )
        return [sorted(u.user for u in r.users) for r in history]

    a = arrivals(101, 0)
    assert a == arrivals(9_000_001, 0)  # same users, other (random) node ids: same schedule
    assert sorted(a[0] + a[1]) == [f"user-{i}" for i in range(4)]  # rounds 1-2 cover everyone once
    assert a[2] == a[0]  # then the order repeats
    assert any(arrivals(101, s) != a for s in range(1, 5))  # the seed matters


def test_unregistered_nodes_are_not_sampled_and_retried(tmp_path):
    server = make_server(tmp_path)
    devs = devices(2, {1: "register-error"})
    grid = FakeGrid(devs)
    strategy = XPerTStrategy(cfg(num_server_rounds=2), server)
    history = strategy.start(grid)
    assert [[u.user for u in r.users] for r in history] == [["user-0"], ["user-0"]]
    registers = [m for m in grid.sent if m.metadata.message_type == protocol.REGISTER]
    assert [m.metadata.dst_node_id for m in registers].count(devs[1].node) == 2  # retried each round
    assert [m.metadata.dst_node_id for m in registers].count(devs[0].node) == 1  # registered once
    # registration bytes are attributed to the user's first round only
    assert history[0].users[0].bytes[protocol.REGISTER_UP] > 0 == history[1].users[0].bytes[protocol.REGISTER_UP]


def test_aggregate_steps_work_on_replies_alone(tmp_path):
    """The Flower-style steps, called one by one with hand-made replies (no grid at all)."""
    server = make_server(tmp_path, n_initial=2)
    strategy = XPerTStrategy(cfg(num_server_rounds=1), server)
    reg = strategy.configure_register([5, 6])
    strategy.aggregate_register([Message(protocol.register_reply(f"user-{m.metadata.dst_node_id}", None),
                                         reply_to=m) for m in reg])
    msgs = strategy.configure_select(1, strategy.sample(1, [5, 6]))
    ids = protocol.parse_select_request(msgs[0].content).ids
    replies = [Message(protocol.choice_reply(Choice("single", (ids[0],), (1.0,), 0.2)), reply_to=msgs[0]),
               Message(RecordDict(), reply_to=msgs[1])]  # node 6: no choice record
    choices = strategy.aggregate_select(1, replies)
    assert list(choices) == [msgs[0].metadata.dst_node_id]
    train = strategy.configure_train(1, choices)
    up = Message(protocol.upload_reply(adapter(77), {"steps": 1}, {}), reply_to=train[0])
    records = {r.user: r for r in strategy.aggregate_train(1, [up])}
    assert records["user-5"].status == "ok" and records["user-6"].status == "select-invalid"
    assert records["user-5"].label is None and records["user-5"].correct is None  # no label reported
    result = strategy.finish_round(1, 0.0)
    assert result.cache_size == 3


def test_self_reports_explain_an_upload_only_when_they_agree_with_the_probe(tmp_path):
    """An upload's self-report (its training data's embedding) replaces the server's probe drift when its
    cosine with the pLLM's probe answers' embedding reaches self-report-min-cosine (run config
    self-reports = true, the default), keeping the probe's candidate words;
    an unrelated vector, another summarizer's, or self-reports turned off leave the probe drift in charge.
    All of it crosses the wire."""
    server = make_server(tmp_path, n_initial=2)
    strategy = XPerTStrategy(cfg(num_server_rounds=1, self_reports=True), server)
    reg = strategy.configure_register([5, 6, 7, 8])
    strategy.aggregate_register([Message(protocol.register_reply(f"user-{m.metadata.dst_node_id}", None),
                                         reply_to=m) for m in reg])
    msgs = strategy.configure_select(1, strategy.sample(1, [5, 6, 7, 8]))
    ids = protocol.parse_select_request(msgs[0].content).ids
    choices = strategy.aggregate_select(1, [Message(protocol.choice_reply(Choice("single", (ids[0],), (1.0,), 0.2)),
                                                    reply_to=m) for m in msgs])
    train = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, choices)}
    probe = {n: FakeExplainer().drift(adapter(n)).vector for n in train}
    noise = np.random.default_rng(0).normal(size=DIM).astype(np.float32)
    reports = {
        5: (probe[5] + 0.3 * np.linalg.norm(probe[5]) / np.sqrt(DIM) * noise, "fake-summarizer"),  # honest
        6: (noise, "fake-summarizer"),  # unrelated: cosine ~ 0
        7: (probe[7], "another-summarizer"),
        8: None,
    }
    ups = [wire(Message(protocol.upload_reply(adapter(n), {"steps": 1}, {} if r is None else {"summarizer": r[1]},
                                              None if r is None else r[0]), reply_to=train[n]))
           for n, r in reports.items()]
    records = {r.node_id: r for r in strategy.aggregate_train(1, ups)}
    assert records[5].explained_by == "self-report" and records[5].self_report.startswith("trusted: cosine 0.9")
    assert records[6].explained_by == "probe" and records[6].self_report.startswith("rejected: cosine")
    assert records[7].explained_by == "probe" and "another-summarizer" in records[7].self_report
    assert records[8].explained_by == "probe" and records[8].self_report is None
    drifts = load_drifts(tmp_path / "cache" / DRIFTS_FILE)
    np.testing.assert_allclose(drifts[records[5].new_id], reports[5][0], rtol=1e-6)
    np.testing.assert_allclose(drifts[records[6].new_id], probe[6], rtol=1e-6)
    # with a human offset, a trusted report (human text, as a device's data) goes on the users' footing
    shifted = make_server(tmp_path / "shifted", n_initial=0)
    h = np.random.default_rng(1).normal(size=DIM).astype(np.float32)
    shifted.basis.set_human_offset(h, 0.4)
    done = shifted.ingest(adapter(5), [], {}, None, reports[5])
    assert done.explained_by == "self-report"
    stored = load_drifts(tmp_path / "shifted" / "cache" / DRIFTS_FILE)[done.entry.id]
    np.testing.assert_allclose(stored, reports[5][0] - 0.4 * h, rtol=1e-5, atol=1e-6)
    # self-reports off: the server never trusts one
    off = XPerTStrategy(cfg(num_server_rounds=1, self_reports=False), make_server(tmp_path / "off", n_initial=0))
    done = off.server.ingest(adapter(5), [], {}, None, reports[5], None)
    assert done.explained_by == "probe" and done.self_report.startswith("rejected")
    with pytest.raises(protocol.ProtocolError, match="name its summarizer"):
        protocol.parse_upload(protocol.upload_reply(adapter(5), {}, {}, probe[5]))
    with pytest.raises(protocol.ProtocolError, match="drift.* must be finite"):
        protocol.parse_upload(protocol.upload_reply(adapter(5), {}, {"summarizer": "s"}, np.full(DIM, np.nan)))
    with pytest.raises(ValueError, match="self-report-min-cosine"):
        cfg(self_report_min_cosine=2.0)


def test_human_weight_is_a_number_from_the_run_config():
    assert cfg().select.human_weight == 1.0 and cfg(human_weight=0.5).select.human_weight == 0.5
    for bad in ("banana", "auto", -1.0):
        with pytest.raises(RunConfigError, match="human.weight"):  # named, whether not a number or out of range
            cfg(human_weight=bad)


def test_protocol_round_trips_and_hides_distances():
    basis = Basis(dim=DIM, words=["a", "b"], vectors=np.eye(2, DIM, dtype=np.float32), summarizer="s")
    coords = np.array([[0.5, -1.0], [2.0, 0.25]])
    req = protocol.SelectRequest(basis, ("x", "y"), coords, math.inf, 2, {"max_new_tokens": 8})
    msg = wire(Message(protocol.select_request(req), dst_node_id=3, message_type=protocol.SELECT))
    got = protocol.parse_select_request(msg.content)
    assert got.ids == ("x", "y") and got.delta == math.inf and got.basis.words == ["a", "b"]
    assert got.basis.human_offset is None and got.basis.human_weight == 0.0
    # the human offset travels with the basis, so the device removes what the server measured
    h = np.arange(DIM, dtype=np.float32)
    basis.set_human_offset(h, 0.4)
    got = protocol.parse_select_request(wire(Message(protocol.select_request(req), dst_node_id=3,
                                                     message_type=protocol.SELECT)).content)
    assert got.basis.human_weight == 0.4 and np.array_equal(got.basis.human_offset, h)
    e = np.linspace(-1, 1, DIM)
    np.testing.assert_array_equal(got.basis.user_coordinates(e), basis.user_coordinates(e))
    np.testing.assert_allclose(got.coords_by_id()["y"], coords[1])
    reply = protocol.choice_reply(Choice("single", ("x",), (1.0,), 0.7, {"x": 0.7, "y": 2.1}))
    parsed = protocol.parse_choice(reply)
    assert parsed.distances == {} and parsed.distance == 0.7
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_select_request(RecordDict())


def test_cache_and_basis_persist_across_runs(tmp_path):
    """A second run (new server objects, same directory) offers what the first left and builds on it."""
    from xpert_fl.explain import BASIS_FILE

    server = make_server(tmp_path)
    XPerTStrategy(cfg(num_server_rounds=1), server).start(FakeGrid(devices(2)))
    ids, coords = server.offer()
    assert len(ids) == 2 and (tmp_path / "cache" / BASIS_FILE).is_file()

    again = PLLMServer(PLLMCache(tmp_path / "cache"), Basis.load(tmp_path / "cache" / BASIS_FILE), FakeExplainer())
    assert again.explain_pending() == 0  # nothing to re-explain
    ids2, coords2 = again.offer()
    assert ids2 == ids and np.allclose(coords2, coords) and again.basis.words == server.basis.words
    (result,) = XPerTStrategy(cfg(num_server_rounds=1), again).start(FakeGrid(devices(2, first_node=500, seed=50)))
    assert all(u.offered == 2 and u.status == "ok" for u in result.users)
    assert len(again.cache) == 4 and {e.parents[0] for e in again.cache.entries()[2:]} <= set(ids)


# --- baseline selection methods in the same round loop ---------------------------------------------
BASELINES = sorted(set(SELECTORS) - {"xpert"})


def _selecting(tmp_path, method: str, n_initial: int = 3, **kw) -> tuple[XPerTStrategy, list[Message]]:
    """A strategy with ``selection=method`` whose two registered users (labels style0, style1) were just
    sent their ``query.select``."""
    strategy = XPerTStrategy(cfg(num_server_rounds=1, selection=method, **kw), make_server(tmp_path, n_initial))
    reg = strategy.configure_register([5, 6])
    strategy.aggregate_register(
        [Message(protocol.register_reply(f"user-{i}", f"style{i}"), reply_to=m) for i, m in enumerate(reg)]
    )
    return strategy, strategy.configure_select(1, strategy.sample(1, [5, 6]))


def test_config_selection_names_a_registered_method():
    assert cfg().select.selection == "xpert" and cfg(selection="bo").select.selection == "bo"
    with pytest.raises(RunConfigError, match=r"selection must be one of \['bo', 'exhaustive', .*got 'grid'"):
        cfg(selection="grid")
    with pytest.raises(RunConfigError, match="selection-trials"):
        cfg(selection="exhaustive", selection_trials=2)
    with pytest.raises(RunConfigError, match="report-labels"):
        cfg(selection="oracle", report_labels=False)


@pytest.mark.parametrize("method", ["exhaustive", "bo", "hyperband"])
def test_adapter_methods_offer_every_adapter_and_the_wire_counts_them_all(tmp_path, method):
    strategy, msgs = _selecting(tmp_path, method, selection_trials=2 if method == "bo" else 0)
    server, (ids, _) = strategy.server, strategy.server.offer()
    adapters = [server.adapter(i) for i in ids]
    payload = sum(protocol.adapter_bytes(a) for a in adapters)
    for msg in msgs:
        req = protocol.parse_select(wire(msg).content)
        assert isinstance(req, protocol.OfferRequest) and req.method == method and req.ids == tuple(ids)
        assert [a.content_hash for a in req.adapters] == ids  # every offered pLLM, whole
        assert req.trials == (2 if method == "bo" else None) and req.embeddings is None and req.labels == ()
        assert (req.max_seq_len, req.eval_batch_size) == (128, 4)  # the fine-tuning budget's loss settings
        rec = strategy._current[msg.metadata.dst_node_id]
        assert rec.method == method and rec.basis_size == 0 and rec.bytes[protocol.BASIS_COORDS] == 0
        assert rec.bytes[protocol.OFFER] == protocol.message_bytes(msg)
        assert abs(rec.bytes[protocol.OFFER] - payload) < 4096  # the adapters, plus ids and settings
    assert payload > sum(a.num_bytes for a in adapters)


def test_text_encoder_offers_server_side_embeddings_computed_once_per_pllm(tmp_path):
    strategy, msgs = _selecting(tmp_path, "text-encoder")
    ids, _ = strategy.server.offer()
    explainer = strategy.server.explainer
    assert sorted(explainer.answered) == sorted(ids)  # the server probed each pLLM once, for both users
    for msg in msgs:
        req = protocol.parse_select(wire(msg).content)
        assert req.adapters == () and req.encoder == FakeEncoder.fingerprint
        assert req.embeddings.shape == (len(ids), FakeEncoder.dim)
        np.testing.assert_allclose(req.embeddings[1], FakeEncoder().mean([f"answer of {ids[1]}"]))
        assert strategy._current[msg.metadata.dst_node_id].bytes[protocol.OFFER] == protocol.message_bytes(msg)
    strategy.configure_select(2, [5, 6])
    assert len(explainer.answered) == len(ids)  # the next round reuses them


def test_free_methods_offer_ids_seeds_and_for_the_oracle_labels(tmp_path):
    ids = None
    for method in ("scratch", "random", "oracle"):
        strategy, msgs = _selecting(tmp_path / method, method)
        ids = ids or strategy.server.offer()[0]
        reqs = [protocol.parse_select(wire(m).content) for m in msgs]
        users = [strategy._current[m.metadata.dst_node_id] for m in msgs]
        for msg, req, rec in zip(msgs, reqs, users, strict=True):
            assert req.ids == tuple(ids) and req.adapters == () and req.embeddings is None
            assert req.seed == selection_seed(0, 1, rec.user)  # per user-round, from the run seed
            assert rec.bytes[protocol.OFFER] == protocol.message_bytes(msg) < 2048  # nothing heavy
        assert reqs[0].seed != reqs[1].seed
        if method == "oracle":
            assert [r.labels for r in reqs] == [("style0", "style1", "style2")] * 2
            assert [r.user_label for r in reqs] == [u.label for u in users] == ["style0", "style1"]
        else:
            assert all(r.labels == () and r.user_label is None for r in reqs)


def test_offer_requests_are_validated_both_ways():
    a = adapter(1)
    with pytest.raises(protocol.ProtocolError, match="content hash"):
        protocol.OfferRequest("exhaustive", ("not-its-id",), adapters=(a,))
    with pytest.raises(protocol.ProtocolError, match="2 offered ids but 1 labels"):
        protocol.OfferRequest("oracle", ("x", "y"), labels=("s",))
    with pytest.raises(protocol.ProtocolError, match="encoder"):
        protocol.OfferRequest("text-encoder", ("x",), embeddings=np.ones((1, 4)))
    with pytest.raises(protocol.ProtocolError, match="baseline"):
        protocol.OfferRequest("xpert", ("x",))
    content = protocol.offer_request(protocol.OfferRequest("exhaustive", (a.content_hash,), adapters=(a,)))
    del content["offer-0.arrays"]
    with pytest.raises(protocol.ProtocolError, match="offer-0.arrays"):
        protocol.parse_select(content)
    with pytest.raises(protocol.ProtocolError, match="non-negative"):
        protocol.SelectionCost("bo", {"adapters": -1})


@pytest.mark.parametrize("method", BASELINES)
def test_choice_replies_record_the_devices_selection_cost(tmp_path, method):
    strategy, msgs = _selecting(tmp_path, method)
    ids = protocol.parse_select(msgs[0].content).ids
    good = protocol.SelectionCost(method, {"adapters": 1234}, evaluations=3, tokens=210, seconds=1.5, downloaded=3)
    replies = [
        Message(protocol.choice_reply(Choice("single", (ids[1],), (1.0,)), good), reply_to=msgs[0]),
        Message(protocol.choice_reply(Choice("base"), protocol.SelectionCost("xpert")), reply_to=msgs[1]),
    ]
    choices = strategy.aggregate_select(1, [wire(r) for r in replies])
    first, second = (strategy._current[m.metadata.dst_node_id] for m in msgs)
    assert list(choices) == [msgs[0].metadata.dst_node_id] and first.chosen == [ids[1]]
    assert first.selection == good.to_json() and first.selection["bytes_down"] == 1234 and first.method == method
    assert first.distance is None  # a baseline's choice has no selection distance
    assert first.to_json()["selection"]["evaluations"] == 3
    assert second.status == "select-invalid" and "ran selection 'xpert'" in second.error


def test_a_baseline_round_trains_exactly_the_chosen_adapter(tmp_path):
    server = make_server(tmp_path, n_initial=3)
    grid = FakeGrid(devices(2))
    (result,) = XPerTStrategy(cfg(num_server_rounds=1, selection="exhaustive"), server).start(grid)
    for u in result.users:
        assert u.status == "ok" and u.method == u.selection["method"] == "exhaustive"
        train = [m for m in grid.devices[u.node_id].received if m.metadata.message_type == protocol.TRAIN][0]
        req = protocol.parse_train_request(train.content)
        assert [a.content_hash for a in req.adapters] == u.chosen  # the chosen one again, only it
        assert u.bytes[protocol.OFFER] > u.bytes[protocol.ADAPTER_DOWN] > 0
        assert u.bytes_received == sum(u.bytes[k] for k in protocol.DOWN_KINDS)


def test_an_unreadable_offered_adapter_fails_the_selection_and_the_round_goes_on(tmp_path):
    server = make_server(tmp_path, n_initial=2)
    victim = server.cache.entries()[0]
    (victim.path / "adapter_model.safetensors").write_bytes(b"garbage")
    (result,) = XPerTStrategy(cfg(num_server_rounds=1, selection="bo"), server).start(FakeGrid(devices(2)))
    assert [u.status for u in result.users] == ["select-unavailable"] * 2 and result.users[0].error


def test_the_run_config_in_pyproject_is_the_dataclasses_defaults():
    """One source per setting: every run-config key of pyproject is exactly one field of one config section,
    read by the server (XPerTConfig), the device (DeviceConfig) or both through the same section; no field
    has a default that could disagree with pyproject's; both sides read pyproject's run config as it is."""
    import dataclasses

    from clients.config import DeviceConfig
    from protocol.run_config import fields_by_key, pyproject_defaults
    from strategies.config import Budget

    rc = pyproject_defaults()
    owners: dict[str, set] = {}
    for tree in (XPerTConfig, DeviceConfig):
        for key, owner in fields_by_key(tree).items():
            owners.setdefault(key, set()).add(owner)
    assert {k: o for k, o in owners.items() if len(o) > 1} == {}  # a key both sides read: one shared section
    assert sorted(owners) == sorted(rc)  # every pyproject key is read; nothing is read that pyproject lacks
    for key, ((cls, name),) in owners.items():
        (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
        assert f.default in (dataclasses.MISSING, rc[key]), f"{cls.__name__}.{name} = {f.default!r}, {key} = {rc[key]}"
    server, device = XPerTConfig.from_run_config(rc), DeviceConfig.from_run_config(rc)
    assert server.common is not device.common and server.common == device.common
    # every budget key travels to the devices: no FinetuneConfig default (the library's, offline) stands in
    budget = {f.name for f in dataclasses.fields(Budget)} - {"compare_scratch", "target_loss"}
    assert budget <= set(server.finetune_fields()) and "target_loss" in server.finetune_fields()


def test_run_config_keys_are_required_and_typed():
    """No fallbacks and no coercion: a missing key or a value of another type is an error naming the key."""
    rc = run_config()
    del rc["tau-res"]
    with pytest.raises(RunConfigError, match="no key 'tau-res'"):
        XPerTConfig.from_run_config(rc)
    for key, bad in (("self-reports", "false"), ("orthogonalize", 0), ("max-steps", 1.5), ("max-steps", True),
                     ("lr", "3e-3"), ("model", 135), ("timeout", False)):
        with pytest.raises(RunConfigError, match=f"run config {key} = {bad!r} is not a"):
            XPerTConfig.from_run_config(run_config({key: bad}))
    assert cfg(timeout=60).rounds.timeout == 60.0  # an integer where a float is expected is the same number
    with pytest.raises(KeyError, match="max-step"):  # the tests' helper refuses unknown keys, as Flower does
        run_config(max_step=3)
