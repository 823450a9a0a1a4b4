"""Protocol probe for the XPerT JVM device (tests/test_jvm_client.py; needs no model).

All checks are sent at once (the device handles them one by one) and the replies are recorded in
``out`` (JSON), so the test can assert on them. The device must answer bad input with an error reply
and keep answering: the probe registers it again at the end. Selection and merge results are compared with the Python
implementation on the same inputs (the device's drift embedding file is shared with this app).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
client = ClientApp()  # unused: the devices are JVM processes


def _reply(grid: Grid, node: int, content: RecordDict, message_type: str) -> Message:
    replies = list(grid.send_and_receive([Message(content, dst_node_id=node, message_type=message_type)], timeout=120))
    if len(replies) != 1:
        raise RuntimeError(f"{message_type}: expected one reply, got {len(replies)}")
    return replies[0]


def _replies(
    grid: Grid, node: int, batch: dict[str, tuple[RecordDict, str]], timeout: float = 300
) -> dict[str, Message]:
    """Send every message of ``batch`` at once (the device handles them one by one) and collect the replies."""
    names = list(batch)
    ids = list(grid.push_messages([Message(c, dst_node_id=node, message_type=t) for c, t in batch.values()]))
    by_id = dict(zip(ids, names, strict=True))
    got: dict[str, Message] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no reply to {sorted(set(names) - set(got))}")
        for reply in grid.pull_messages([i for i in ids if by_id[i] not in got]):
            got[by_id[reply.metadata.reply_to_message_id]] = reply
        time.sleep(0.3)
    return got


def _error(reply: Message) -> dict | None:
    return {"code": int(reply.error.code), "reason": reply.error.reason} if reply.has_error() else None


@app.main()
def main(grid: Grid, context: Context) -> None:
    import torch

    import protocol
    from xpert_fl.adapters import Adapter
    from xpert_fl.basis import Basis
    from xpert_fl.merge import merge_adapters
    from xpert_fl.select import Choice, select

    cfg = context.run_config
    out: dict = {}
    deadline = time.monotonic() + 120
    while len(nodes := sorted(grid.get_node_ids())) < 1:
        if time.monotonic() > deadline:
            raise TimeoutError("no node connected")
        time.sleep(0.5)
    users = {}
    for node in nodes:
        reply = _reply(grid, node, protocol.register_request(), protocol.REGISTER)
        if not reply.has_error():
            users[protocol.parse_register(reply.content)[0]] = node
    out["users"] = sorted(users)
    node = users[str(cfg["good-user"])]

    batch: dict[str, tuple[RecordDict, str]] = {}
    # 1. a message type the device does not know
    batch["unknown_type"] = (RecordDict({"x": ConfigRecord({"a": 1})}), "query.unknown")

    # 2. a basis whose dimension does not match the device's drift embedding
    doc = json.loads(Path(str(cfg["embedding"])).read_text())
    e = np.asarray(doc["vector"], dtype=np.float64)
    d = e.size
    rng = np.random.default_rng(0)
    bad = Basis(dim=d + 3, words=["terse"], vectors=rng.standard_normal((1, d + 3)).astype(np.float32))
    req = protocol.SelectRequest(bad, ("a" * 20,), np.ones((1, 1), np.float32), float("inf"), 3, {})
    batch["dims_mismatch"] = (protocol.select_request(req), protocol.SELECT)

    # 3. an object altered in transit (the test's proxy rewrites the marker inside this config record)
    tampered = RecordDict({"select": ConfigRecord({"meta": "TAMPER-ME"})})
    batch["tampered"] = (tampered, protocol.SELECT)

    # 4. selection on a synthetic basis: nearest (delta = inf) and merge (delta = 0), vs Python
    k, ids = 3, tuple(f"{i:020x}" for i in range(1, 5))
    basis = Basis(dim=d, words=["terse", "poetic", "formal"], vectors=rng.standard_normal((k, d)).astype(np.float32),
                  human_offset=rng.standard_normal(d).astype(np.float32), human_weight=0.4)
    mine = basis.user_coordinates(e)  # the device must remove the same share of the human offset
    coords = np.stack([mine + rng.normal(0, s, k) for s in (0.5, 0.05, 0.8, 0.3)]).astype(np.float32)
    coords[3] = 0.5 * coords[1] + 0.5 * mine  # a pLLM whose mix with #1 reaches the user
    by_id = {i: coords[r].astype(np.float64) for r, i in enumerate(ids)}
    deltas = {f"{kind}-{dist}": (delta, dist) for kind, delta in (("nearest", float("inf")), ("merge", 0.0))
              for dist in ("l1", "drift")}
    for name, (delta, dist) in deltas.items():
        req = protocol.SelectRequest(basis, ids, coords, delta, 2, {}, dist)
        batch[f"select-{name}"] = (protocol.select_request(req), protocol.SELECT)

    # 5. train: single start, merge start (device merges), adapter not matching the device, wrong hash
    initial = Adapter.load(str(cfg["initial-adapter"]))
    g = torch.Generator().manual_seed(1)

    def variant() -> Adapter:
        tensors = {n: torch.randn(t.shape, generator=g) * 0.02 for n, t in initial.tensors.items()}
        return Adapter(dict(initial.config), tensors, initial.base_fingerprint)

    budget = {"max_steps": 1}
    a1, a2 = variant(), variant()
    cases = {
        "single": (Choice("single", (a1.content_hash,), (1.0,), 0.1), [a1], None),
        "merge": (Choice("merge", (a1.content_hash, a2.content_hash), (0.7, 0.4), 0.1), [a1, a2],
                  merge_adapters([a1, a2], [0.7, 0.4]).content_hash),
    }
    wrong = Adapter(dict(initial.config), {n: t[..., :1].clone() if n.endswith("lora_A.weight") else t
                                           for n, t in a1.tensors.items()}, initial.base_fingerprint)
    cases["mismatch"] = (Choice("single", (wrong.content_hash,), (1.0,), 0.1), [wrong], None)
    cases["wrong_hash"] = (Choice("single", ("f" * 20,), (1.0,), 0.1), [a1], None)
    for name, (choice, adapters, _) in cases.items():
        batch[f"train-{name}"] = (protocol.train_request(choice, adapters, budget, False), protocol.TRAIN)

    t0 = time.monotonic()
    replies = _replies(grid, node, batch)
    out["batch_seconds"] = time.monotonic() - t0
    for name in ("unknown_type", "dims_mismatch", "tampered"):
        out[name] = _error(replies[name])
    out["select"] = {}
    for name, (delta, dist) in deltas.items():
        reply = replies[f"select-{name}"]
        expected = select(mine, by_id, delta, 2, size=k, gram=basis.metric(dist))
        got = protocol.parse_choice(reply.content) if not reply.has_error() else None
        out["select"][name] = {
            "error": _error(reply),
            "device": json.loads(got.to_json()) if got else None,
            "python": json.loads(Choice(expected.kind, expected.ids, expected.weights, expected.distance).to_json()),
        }
    out["train"] = {}
    for name, (_, adapters, merged_hash) in cases.items():
        reply = replies[f"train-{name}"]
        rec = {"error": _error(reply), "sent": [a.content_hash for a in adapters], "python_merge": merged_hash}
        if not reply.has_error():
            up = protocol.parse_upload(reply.content)
            rec.update(upload=up.adapter.content_hash, metrics=up.metrics, report=up.report,
                       bytes_up=protocol.message_bytes(reply))
        out["train"][name] = rec

    # 6. the device still answers
    reply = _reply(grid, node, protocol.register_request(), protocol.REGISTER)
    out["register_after"] = None if reply.has_error() else protocol.parse_register(reply.content)[0]
    Path(str(cfg["out"])).write_text(json.dumps(out, indent=1))
