"""The device ClientApp's handlers called directly, with the real embedded model and the real strategy.

One XPerT round without the Flower runtime: the server side (cache + one random pLLM, explained with
4 probe prompts of 16 tokens) builds the real messages, the handlers answer them, the strategy
ingests the upload. Then the privacy audit: every byte the device sent is searched for the user's
texts and for its drift embedding and coordinates. Then every baseline selection method through the
same select handler, on the pLLMs that round left cached.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from run_configs import run_config

import protocol
from clients import client_app, device
from clients.config import DeviceConfig
from clients.device import device_models
from clients.users import DataConfig, UserData, parse_user_styles, user_data
from protocol.run_config import Common, RunConfigError
from strategies.config import XPerTConfig
from strategies.pllm_server import PLLMServer
from strategies.xpert import XPerTStrategy
from xpert_fl.adapters import Adapter
from xpert_fl.baselines import SELECTORS, SelectionTask, make_selector
from xpert_fl.cache import BaseInfo, PLLMCache
from xpert_fl.data import load_corpus, split_roles
from xpert_fl.explain import Explainer, ProbeConfig, open_basis, user_drift
from xpert_fl.finetune import FinetuneConfig
from xpert_fl.models import DEFAULT_SPEC
from xpert_fl.probe import probe_prompts
from xpert_fl.summarizer import Summarizer, SummarizerConfig

pytestmark = pytest.mark.usefixtures("flower_task_identity", "one_thread")

RUN_CONFIG = run_config({
    "model": DEFAULT_SPEC, "summarizer": DEFAULT_SPEC, "user-styles": "sarcastic;poetic", "user-samples": 4,
    "num-server-rounds": 1, "min-nodes": 1, "num-probe-prompts": 4, "probe-max-new-tokens": 16, "probe-batch-size": 4,
    "max-steps": 2, "eval-every": 1, "patience": 2, "max-seq-len": 96, "rank": 2, "compare-scratch": True,
})
PROBE = ProbeConfig(max_new_tokens=16, batch_size=4)


def _user_0() -> UserData:
    """The data of the round's device (partition 0), as its ClientApp reads it from the run config."""
    cfg = DeviceConfig.from_run_config(RUN_CONFIG)
    return user_data(0, cfg.data, cfg.common)


@pytest.fixture(scope="module")
def round_trip(base, random_pllm, tmp_path_factory):
    """Server + device through one round; returns everything the tests look at."""
    root = tmp_path_factory.mktemp("client")
    summarizer = Summarizer(base, SummarizerConfig(n_candidates=8))  # few candidate words: fast
    cache = PLLMCache(root / "cache", BaseInfo.from_loaded(base))
    cache.add(random_pllm(0), label="sarcastic")
    basis = open_basis(cache.root, summarizer, 0.1, 0.2, True)
    prompts = probe_prompts(4, split_roles(load_corpus("builtin"))["test"])
    server = PLLMServer(cache, basis, Explainer(base, summarizer, prompts, PROBE))
    server.explain_pending()
    cfg = XPerTConfig.from_run_config(RUN_CONFIG)
    strategy = XPerTStrategy(cfg, server)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config=RUN_CONFIG)
    sent: dict[str, Message] = {}

    (reg,) = strategy.configure_register([7])
    sent["register"] = client_app.register(reg, context)
    strategy.aggregate_register([sent["register"]])
    (sel,) = strategy.configure_select(1, strategy.sample(1, [7]))
    sent["select"] = client_app.select(sel, context)
    choices = strategy.aggregate_select(1, [sent["select"]])
    (train,) = strategy.configure_train(1, choices)
    sent["train"] = client_app.fit(train, context)
    (record,) = strategy.aggregate_train(1, [sent["train"]])
    return {"server": server, "record": record, "sent": sent, "context": context, "select_msg": sel,
            "summarizer": summarizer, "strategy": strategy, "choices": choices}


def test_user_specs_and_partitions_are_deterministic_and_disjoint():
    assert parse_user_styles("sarcastic; poetic:0.7,expert:0.3") == [{"sarcastic": 1.0}, {"poetic": 0.7, "expert": 0.3}]
    with pytest.raises(ValueError):
        parse_user_styles(" ; ")
    cfg, common = DataConfig(user_styles="sarcastic;poetic:0.75,expert:0.25", user_samples=8, test_fraction=0.25), \
        Common(DEFAULT_SPEC, DEFAULT_SPEC, "builtin", 0)
    users = [user_data(p, cfg, common) for p in range(4)]
    assert [u.label for u in users] == ["sarcastic", "poetic", "sarcastic", "poetic"]
    assert user_data(2, cfg, common) == users[2]  # deterministic
    a, b = ({(s.prompt, s.response) for s in u.train + u.test} for u in (users[0], users[2]))
    assert len(a) == len(b) == 8 and not a & b  # same spec: disjoint samples


def test_models_are_loaded_once_per_process():
    assert device_models(DEFAULT_SPEC, DEFAULT_SPEC) is device_models(DEFAULT_SPEC, DEFAULT_SPEC)
    models = device_models(DEFAULT_SPEC, DEFAULT_SPEC)
    assert models.summarizer.loaded is models.base  # one model serves as base and summarizer


def test_one_round_through_the_handlers(round_trip):
    rec, server = round_trip["record"], round_trip["server"]
    assert rec.user == "user-0" and rec.label == "sarcastic"
    assert rec.status == "ok", rec.error
    assert rec.choice == "single" and rec.offered == 1 and rec.chosen_label == "sarcastic" and rec.correct
    entry = server.cache.get(rec.new_id)
    assert entry.parents == tuple(rec.chosen) and entry.label == "sarcastic"
    assert entry.coords is not None and len(entry.coords) == server.basis.size and rec.explanation
    assert rec.self_report is not None  # self-reports are on by default: trusted or not, the server says which
    assert rec.explained_by == ("self-report" if rec.self_report.startswith("trusted") else "probe")
    ft = rec.finetune
    assert ft["scratch_steps"] >= 1 and "target_loss" in ft and ft["n_train"] == 3 and ft["n_test"] == 1
    assert ft["energy_joules"] > 0 and ft["seconds"] > 0
    assert all(rec.bytes[k] > 0 for k in protocol.KINDS if k != protocol.OFFER)
    cost = rec.selection  # what XPerT's selection cost the device, as it reported it
    assert cost["method"] == "xpert" and cost["evaluations"] == 0 and cost["seconds"] > 0
    assert 0 < cost["bytes"]["basis+coords"] == cost["bytes_down"] < rec.bytes[protocol.BASIS_COORDS]


def test_empty_cache_select_needs_no_model(round_trip, monkeypatch):
    monkeypatch.setattr(device, "device_models", lambda *a: pytest.fail("no model needed"))
    msg = Message(
        protocol.select_request(protocol.SelectRequest(round_trip["server"].basis, (), np.zeros((0, 0)), 1.0, 3, {})),
        dst_node_id=7, message_type=protocol.SELECT,
    )
    reply = client_app.select(msg, round_trip["context"])
    assert protocol.parse_choice(reply.content).kind == "base"


def test_handler_errors_surface_as_exceptions(round_trip):
    """Flower turns a handler exception into an error reply, which the strategy logs and skips."""
    bad = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=RUN_CONFIG)
    with pytest.raises(ValueError, match="partition-id"):
        client_app.register(round_trip["select_msg"], bad)
    with pytest.raises(protocol.ProtocolError):
        client_app.fit(round_trip["select_msg"], round_trip["context"])


def test_the_device_reads_every_setting_from_the_run_config_without_fallbacks(round_trip):
    """The ClientApp reads the run config through DeviceConfig only: a missing key or a value of another
    type (the string "false" for a boolean) is an error naming the key, never a default or ``bool("false")``."""
    reg = round_trip["strategy"].configure_register([8])[0]

    def register(rc: dict) -> Message:
        return client_app.register(reg, Context(run_id=1, node_id=8, node_config={"partition-id": 1},
                                                state=RecordDict(), run_config=rc))

    assert protocol.parse_register(register(RUN_CONFIG).content) == ("user-1", "poetic")
    assert protocol.parse_register(register(run_config(RUN_CONFIG, report_labels=False)).content) == ("user-1", None)
    with pytest.raises(RunConfigError, match="run config report-labels = 'false' is not a bool"):
        register(run_config(RUN_CONFIG, report_labels="false"))
    for key in ("report-labels", "trainer", "device-threads", "self-reports", "probe-max-new-tokens"):
        with pytest.raises(RunConfigError, match=f"no key '{key}'"):
            register({k: v for k, v in RUN_CONFIG.items() if k != key})


def test_the_self_report_is_the_embedding_of_the_training_data_and_a_run_config_key_turns_it_off(base, round_trip):
    """By default the upload carries exactly one embedding, of the data the adapter was trained on (the
    vector the device's selection came from), named by its summarizer; ``self-reports = false`` sends
    none, and then no embedding of any kind leaves the device."""
    data = _user_0()
    want = user_drift(base, round_trip["summarizer"], data.train, PROBE).vector
    upload = protocol.parse_upload(round_trip["sent"]["train"].content)
    np.testing.assert_allclose(upload.self_report, want, rtol=1e-5, atol=1e-6)
    assert upload.report["summarizer"] == round_trip["summarizer"].fingerprint
    # the server's side (trust only what agrees with its probe) is tested in test_strategy
    ctx = round_trip["context"]
    off = Context(run_id=1, node_id=7, node_config=ctx.node_config, state=RecordDict(),
                  run_config=run_config(RUN_CONFIG, self_reports=False))
    (train,) = [m for m in round_trip["strategy"].configure_train(1, round_trip["choices"])]
    reply = client_app.fit(train, off)
    assert protocol.parse_upload(reply.content).self_report is None
    blob = _payload(reply)
    for dtype in (np.float32, np.float64):
        v = np.asarray(want, dtype=dtype)
        assert all(v[i : i + 2].tobytes() not in blob for i in range(len(v) - 1))
    assert "summarizer" not in dict(reply.content["report"])


def _payload(msg: Message) -> bytes:
    return b"".join(obj.deflate() for obj in get_all_nested_objects(msg).values())


def test_audit_no_personal_text_or_embedding_leaves_the_device(base, round_trip):
    data = _user_0()
    payloads = {name: _payload(msg) for name, msg in round_trip["sent"].items()}
    assert set(payloads) == {"register", "select", "train"}  # every message the device sent
    blob = b"\x00".join(payloads.values())
    text = blob.decode("latin-1").lower()

    # 1. No sample text: no prompt or response, nor any 24-character window of one.
    checked = 0
    for s in data.train + data.test:
        for t in (s.prompt, s.response):
            t = t.lower()
            for i in range(0, max(1, len(t) - 24), 8):
                assert t[i : i + 24] not in text, f"user text leaked: {t[i:i + 24]!r}"
                checked += 1
    assert checked > 50

    # 2. No coordinates, and no embedding but one: the self-report, the embedding of the data the uploaded
    # adapter was trained on, once, in the upload. Not the held-out data's, not in register or select; in
    # float32 or float64, whole or any two consecutive values.
    basis = round_trip["server"].basis
    assert basis.size >= 1, "the audit needs coordinates to look for"
    summarizer = round_trip["summarizer"]
    drift = user_drift(base, summarizer, data.train, PROBE).vector
    held_out = user_drift(base, summarizer, data.test, PROBE).vector
    coords = basis.user_coordinates(drift)
    before_upload = payloads["register"] + payloads["select"]
    for vec, where in ((drift, before_upload), (held_out, blob), (coords, blob)):
        for dtype in (np.float32, np.float64):
            v = np.asarray(vec, dtype=dtype)
            assert v.tobytes() not in where
            for i in range(len(v) - 1):
                assert v[i : i + 2].tobytes() not in where
    upload = protocol.parse_upload(round_trip["sent"]["train"].content)
    np.testing.assert_allclose(upload.self_report, drift, rtol=1e-5, atol=1e-6)
    assert payloads["train"].count(upload.self_report.astype(np.float32).tobytes()) == 1
    # 3. The choice carries one distance, no per-candidate distances (they would encode c_u).
    choice = protocol.parse_choice(round_trip["sent"]["select"].content)
    assert choice.distances == {} and choice.ids == tuple(round_trip["record"].chosen)
    # 4. What the select and register replies hold, exhaustively.
    assert set(round_trip["sent"]["select"].content.keys()) == {"choice", "cost"}
    cost = protocol.parse_selection_cost(round_trip["sent"]["select"].content)
    assert set(cost.to_json()) == {"method", "bytes", "evaluations", "tokens", "seconds", "downloaded", "bytes_down"}
    assert dict(round_trip["sent"]["register"].content["register"]) == {"user": "user-0", "label": "sarcastic"}
    assert set(round_trip["sent"]["train"].content.keys()) == {"upload.arrays", "upload.config", "finetune", "report",
                                                               "self_report"}


def test_start_adapter_merges_validates_or_starts_from_base(base, random_pllm):
    from xpert_fl.adapters import AdapterError
    from xpert_fl.select import Choice

    a, b = random_pllm(1), random_pllm(2)
    merged = device.start_adapter(base, Choice("merge", (a.content_hash, b.content_hash), (0.7, 0.3), 0.1), [a, b])
    assert merged.config["r"] == 4 and set(merged.tensors) == set(a.tensors)
    assert device.start_adapter(base, Choice("single", (a.content_hash,), (1.0,), 0.1), [a]) is a
    assert device.start_adapter(base, Choice("base"), []) is None
    foreign = Adapter(a.config, a.tensors, "another-base")
    with pytest.raises(AdapterError):
        device.start_adapter(base, Choice("single", (foreign.content_hash,), (1.0,), 0.1), [foreign])


# --- baseline selection methods through the same handler --------------------------------------------
def _select_with(method: str, round_trip) -> tuple[Message, Message, object]:
    """One select exchange of a strategy with ``selection=method`` over the round's cache (2 pLLMs)."""
    config = XPerTConfig.from_run_config(run_config(RUN_CONFIG, selection=method))
    strategy = XPerTStrategy(config, round_trip["server"])
    context = round_trip["context"]
    (reg,) = strategy.configure_register([7])
    strategy.aggregate_register([client_app.register(reg, context)])
    (msg,) = strategy.configure_select(1, strategy.sample(1, [7]))
    reply = client_app.select(msg, context)
    strategy.aggregate_select(1, [reply])
    return msg, reply, strategy._current[7]


@pytest.mark.parametrize("method", sorted(set(SELECTORS) - {"xpert"}))
def test_each_baseline_chooses_on_the_device_and_reports_its_cost(round_trip, method):
    server = round_trip["server"]
    msg, reply, rec = _select_with(method, round_trip)
    offered = protocol.parse_select(msg.content).ids
    assert len(offered) == len(server.cache) == 2 and rec.offered == 2
    assert rec.status == "pending", rec.error  # a valid choice, ready for the train phase
    choice, cost = protocol.parse_choice(reply.content), protocol.parse_selection_cost(reply.content)
    assert set(reply.content.keys()) == {"choice", "cost"} and cost.method == rec.method == method
    assert rec.selection == cost.to_json() and rec.bytes[protocol.OFFER] == protocol.message_bytes(msg)
    assert (choice.kind == "base") == (method == "scratch") and set(choice.ids) <= set(offered)
    per_adapter = {i: protocol.adapter_bytes(server.adapter(i)) for i in offered}
    if method in ("exhaustive", "bo", "hyperband"):
        # the wire carried every offered adapter (objects they share, like an equal config, once); the
        # method paid for those it evaluated
        assert abs(rec.bytes[protocol.OFFER] - sum(per_adapter.values())) < 4096
        expected = {"exhaustive": 2, "bo": 1, "hyperband": 2}[method]  # bo's default budget: half of them
        assert cost.downloaded == expected and cost.evaluations >= expected and cost.tokens > 0
        if expected == 2:
            assert cost.bytes == {"adapters": sum(per_adapter.values())}
        else:
            assert set(cost.bytes) == {"adapters"} and cost.bytes["adapters"] in per_adapter.values()
        if method == "exhaustive":
            assert cost.evaluations == 2  # 3 samples in one batch of 4, per offered pLLM
    elif method == "text-encoder":
        assert set(cost.bytes) == {"embeddings"} and cost.bytes_down > 0 and cost.downloaded == cost.evaluations == 0
    else:
        assert cost.bytes_down == cost.evaluations == cost.downloaded == 0 and rec.bytes[protocol.OFFER] < 2048
    if method == "oracle":
        assert rec.chosen_label == rec.label == "sarcastic"


def test_the_device_runs_the_offline_selector(base, round_trip):
    """Exhaustive search in the Flower handler = the offline experiments' selector on the server's cache."""
    _, reply, rec = _select_with("exhaustive", round_trip)
    data = _user_0()
    config = FinetuneConfig(max_seq_len=RUN_CONFIG["max-seq-len"], eval_batch_size=4)
    offline = make_selector("exhaustive").select(SelectionTask(base, round_trip["server"].cache, data.train,
                                                               config=config, sizes=protocol.MessageSizes()))
    cost = protocol.parse_selection_cost(reply.content)
    assert protocol.parse_choice(reply.content).ids == offline.choice.ids == tuple(rec.chosen)
    assert (cost.bytes, cost.evaluations, cost.tokens) == (offline.bytes, offline.evaluations, offline.tokens)
