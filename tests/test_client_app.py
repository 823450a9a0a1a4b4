"""The device ClientApp's handlers called directly, with the real embedded model and the real strategy.

One XPerT round without the Flower runtime: the server side (cache + one random pLLM, explained with
4 probe prompts of 16 tokens) builds the real messages, the handlers answer them, the strategy
ingests the upload. Then the privacy audit: every byte the device sent is searched for the user's
texts and for its drift embedding and coordinates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from peft import LoraConfig, get_peft_model

from clients import client_app, device
from clients.device import device_models
from clients.users import DataConfig, parse_user_styles, user_data
from strategies import protocol
from strategies.pllm_server import PLLMServer
from strategies.xpert import XPerTConfig, XPerTStrategy
from xpert_fl.adapters import Adapter
from xpert_fl.cache import BaseInfo, PLLMCache
from xpert_fl.data import load_corpus, split_roles
from xpert_fl.explain import Explainer, ProbeConfig, open_basis, user_drift
from xpert_fl.finetune import shared_copy
from xpert_fl.models import DEFAULT_SPEC
from xpert_fl.probe import probe_prompts
from xpert_fl.summarizer import Summarizer, SummarizerConfig

pytestmark = pytest.mark.usefixtures("flower_task_identity", "one_thread")

RUN_CONFIG = {
    "model": DEFAULT_SPEC, "summarizer": DEFAULT_SPEC, "corpus": "builtin", "user-styles": "sarcastic;poetic",
    "user-samples": 4, "test-fraction": 0.25, "seed": 0, "device-threads": 1, "num-server-rounds": 1,
    "min-nodes": 1, "num-probe-prompts": 4, "probe-max-new-tokens": 16, "probe-batch-size": 4, "max-steps": 2,
    "eval-every": 1, "patience": 2, "batch-size": 2, "max-seq-len": 96, "rank": 2, "compare-scratch": True,
}
PROBE = ProbeConfig(max_new_tokens=16, batch_size=4)


def random_pllm(base, seed: int) -> Adapter:
    """A rank-2 LoRA on q_proj with random A and B (a 'style' the summarizer can see), base untouched."""
    torch.manual_seed(seed)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(shared_copy(base.model), lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.mul_(0.5)
    return Adapter.from_peft(model, base.fingerprint)


@pytest.fixture(scope="module")
def round_trip(base, tmp_path_factory):
    """Server + device through one round; returns everything the tests look at."""
    root = tmp_path_factory.mktemp("client")
    summarizer = Summarizer(base, SummarizerConfig(n_candidates=8))  # few candidate words: fast
    cache = PLLMCache(root / "cache", BaseInfo.from_loaded(base))
    cache.add(random_pllm(base, 0), label="sarcastic")
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
            "summarizer": summarizer}


def test_user_specs_and_partitions_are_deterministic_and_disjoint():
    assert parse_user_styles("sarcastic; poetic:0.7,expert:0.3") == [{"sarcastic": 1.0}, {"poetic": 0.7, "expert": 0.3}]
    with pytest.raises(ValueError):
        parse_user_styles(" ; ")
    cfg = DataConfig(user_styles="sarcastic;poetic:0.75,expert:0.25", user_samples=8)
    users = [user_data(p, cfg) for p in range(4)]
    assert [u.label for u in users] == ["sarcastic", "poetic", "sarcastic", "poetic"]
    assert user_data(2, cfg) == users[2]  # deterministic
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
    ft = rec.finetune
    assert ft["scratch_steps"] >= 1 and "target_loss" in ft and ft["n_train"] == 3 and ft["n_test"] == 1
    assert ft["energy_joules"] > 0 and ft["seconds"] > 0
    assert all(rec.bytes[k] > 0 for k in protocol.KINDS)


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


def _payload(msg: Message) -> bytes:
    return b"".join(obj.deflate() for obj in get_all_nested_objects(msg).values())


def test_audit_no_personal_text_or_embedding_leaves_the_device(base, round_trip):
    data = user_data(0, DataConfig.from_run_config(RUN_CONFIG))
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

    # 2. No drift embedding or coordinates, in float32 or float64, whole or any two consecutive values.
    basis = round_trip["server"].basis
    assert basis.size >= 1, "the audit needs coordinates to look for"
    drift = user_drift(base, round_trip["summarizer"], data.train, PROBE).vector
    coords = basis.coordinates(drift)
    for vec in (drift, coords):
        for dtype in (np.float32, np.float64):
            v = np.asarray(vec, dtype=dtype)
            assert v.tobytes() not in blob
            for i in range(len(v) - 1):
                assert v[i : i + 2].tobytes() not in blob
    # 3. The choice carries one distance, no per-candidate distances (they would encode c_u).
    choice = protocol.parse_choice(round_trip["sent"]["select"].content)
    assert choice.distances == {} and choice.ids == tuple(round_trip["record"].chosen)
    # 4. What the select and register replies hold, exhaustively.
    assert set(round_trip["sent"]["select"].content.keys()) == {"choice"}
    assert dict(round_trip["sent"]["register"].content["register"]) == {"user": "user-0", "label": "sarcastic"}
    assert set(round_trip["sent"]["train"].content.keys()) == {"upload.arrays", "upload.config", "finetune", "report"}


def test_start_adapter_merges_validates_or_starts_from_base(base):
    from xpert_fl.adapters import AdapterError
    from xpert_fl.select import Choice

    a, b = random_pllm(base, 1), random_pllm(base, 2)
    merged = device.start_adapter(base, Choice("merge", (a.content_hash, b.content_hash), (0.7, 0.3), 0.1), [a, b])
    assert merged.config["r"] == 4 and set(merged.tensors) == set(a.tensors)
    assert device.start_adapter(base, Choice("single", (a.content_hash,), (1.0,), 0.1), [a]) is a
    assert device.start_adapter(base, Choice("base"), []) is None
    foreign = Adapter(a.config, a.tensors, "another-base")
    with pytest.raises(AdapterError):
        device.start_adapter(base, Choice("single", (foreign.content_hash,), (1.0,), 0.1), [foreign])
