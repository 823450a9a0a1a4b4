"""The JVM device (android_client/) against Python's Flower: codec parity, JUnit, and real runs.

* Codec: messages built by Python's Flower (select request, train request with a > 5 MiB array in
  several chunks, every config/metric value type, an error message) are decoded and verified by the
  Java object-tree codec and re-encoded there; every object id must come out identical.
* JUnit (android_client/lib/src/test): JSON, NPY, object-tree tampering/truncation, selection, merge.
* Deployment: a real `flower-superlink` on loopback and two JVM SuperNodes (`java -jar
  xpert-fleet.jar`), reaching it through a loopback proxy that can alter objects in transit.
  Run 1, a probe ServerApp (tests/jvm_probe_app): unknown message type, basis/embedding dimension
  mismatch, a tampered object, nearest and merge selection in both distances (compared with
  xpert_fl.select), training
  from a single and a merged start (merge compared with xpert_fl.merge), an adapter that does not fit
  the device, an adapter with the wrong content hash; the device answers each bad input with an error
  reply and keeps working. Run 2, our ServerApp (strategies.server_app), one XPerT round: the good
  JVM device registers, selects, receives the train message, "trains" and uploads; the server
  validates, probes, explains and caches the upload. The second JVM device has an embedding of the
  wrong dimension: its select fails with a clear error, recorded by the server, and the round goes on.

THE JVM DEVICE DOES NOT TRAIN HERE: it uses NoOpTrainer (returns the start adapter unchanged; its
metrics say noop_trainer=1). Its drift embedding is a fixed random vector, not a summarizer output.
The start adapter for a base-model start is a PEFT LoRA (rank 2, q_proj) for the real base model with small
random B (standing in for the ORT artifacts' initial LoRA), so the server explains a pLLM that
differs from the base. Skipped only when no JDK (java, javac, jar) or protoc is installed
(`make -C android_client deps` installs protoc and the jars from Debian packages).
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from simulations.launch import FlowerProcesses, repo_root
from strategies.results import read_rounds

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "android_client"
JAR = CLIENT / "build" / "xpert-fleet.jar"
PROTO_JAR = Path("/usr/share/java/protobuf.jar")
MISSING = [t for t in ("java", "javac", "jar", "protoc") if shutil.which(t) is None]
if not PROTO_JAR.is_file():
    MISSING.append(str(PROTO_JAR) + " (libprotobuf-java)")
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"JVM client needs a JDK and protoc: missing {', '.join(MISSING)} "
    "(run `make -C android_client deps` as root)"
)
EMBED_DIM = 384  # the default embedding space: the sentence encoder (all-MiniLM-L6-v2)
# One round, tiny server budgets (as tests/test_flower_runs.py); the device-side keys are unused by the JVM device.
TINY = {
    "num-server-rounds": 1, "num-probe-prompts": 4, "probe-max-new-tokens": 16, "probe-batch-size": 4, "max-steps": 2,
    "eval-every": 1, "patience": 2, "batch-size": 2, "max-seq-len": 96, "rank": 2, "compare-scratch": False,
}


@pytest.fixture(scope="module")
def jar() -> Path:
    """Build the library jar (protobuf classes generated from this flwr's descriptors) once."""
    res = subprocess.run(["make", "-C", str(CLIENT), "jar", f"PY={sys.executable}"], capture_output=True, text=True,
                         timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return JAR


def _java(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["java", "-cp", f"{JAR}:{PROTO_JAR}", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


# --- codec parity -------------------------------------------------------------------------------------
def _message_file(msg, path: Path) -> dict:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    tree = get_object_tree(msg)
    path.write_text(json.dumps({
        "tree": base64.b64encode(tree.SerializeToString()).decode(),
        "objects": {k: base64.b64encode(v).decode() for k, v in objects.items()},
    }))
    return objects


def test_codec_matches_python_object_ids(jar, tmp_path, flower_task_identity):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

    import protocol
    from xpert_fl.basis import Basis

    rng = np.random.default_rng(0)
    basis = Basis(dim=8, words=["terse", "poetic"], vectors=rng.standard_normal((2, 8)).astype(np.float32))
    select = protocol.select_request(protocol.SelectRequest(
        basis, ("a" * 20, "b" * 20), np.ones((2, 2), np.float32), float("inf"), 3, {"max_new_tokens": 4}))
    big = rng.standard_normal(1_500_000).astype(np.float32)  # 6 MB: two array chunks
    mixed = RecordDict({
        "big": ArrayRecord({"x": Array(big), "zeros": Array(np.zeros((3, 2), np.float64)), "i": Array(np.arange(5))}),
        "cfg": ConfigRecord({"b": True, "i": -7, "f": 0.1, "s": "héllo \"q\"", "y": b"\x00\x01", "li": [1, 2],
                             "lf": [1.5, 2.0], "ls": ["a", "b"], "lb": [True, False], "ly": [b"x"],
                             "inf": float("inf")}),
        "m": MetricRecord({"loss": 0.25, "steps": 3, "hist": [0.5, 0.25], "counts": [1, 2]}),
    })
    messages = {
        "select": Message(select, dst_node_id=5, message_type=protocol.SELECT, group_id="1"),
        "mixed": Message(mixed, dst_node_id=5, message_type="train", group_id="2"),
    }
    reply_to = messages["select"]
    reply_to.metadata.__dict__["_message_id"] = reply_to.object_id
    messages["error"] = Message(Error(code=2, reason="boom"), reply_to=reply_to)
    for name, msg in messages.items():
        path = tmp_path / f"{name}.json"
        objects = _message_file(msg, path)
        res = _java("dev.xpertfl.fleet.CodecCheck", str(path))
        assert res.returncode == 0, res.stderr[-2000:]
        got = json.loads(res.stdout)
        assert got["root"] == msg.object_id, name
        assert sorted(got["ids"]) == sorted(objects), name


# --- JUnit --------------------------------------------------------------------------------------------
def test_junit(jar):
    res = subprocess.run(["make", "-C", str(CLIENT), "junit", f"PY={sys.executable}"], capture_output=True, text=True,
                         timeout=900, check=False)
    assert res.returncode == 0 and "OK (" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]


# --- a proxy that can alter objects in transit --------------------------------------------------------
class TamperingProxy:
    """Forwards the Fleet API to the SuperLink; in pull-object answers, rewrites b"TAMPER-ME"."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        from flwr.proto.message_pb2 import PullObjectResponse

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                skip = {"host", "content-length", "connection"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                for attempt in (0, 1):  # one upstream keep-alive connection per client connection
                    if getattr(self, "upstream", None) is None:
                        self.upstream = http.client.HTTPConnection(host, int(port), timeout=60)
                    try:
                        self.upstream.request("POST", self.path, body, headers)
                        res = self.upstream.getresponse()
                        data = res.read()
                        break
                    except (OSError, http.client.HTTPException):
                        self.upstream.close()
                        self.upstream = None
                        if attempt:
                            raise
                if self.path.endswith("/pull-object") and res.status == 200:
                    obj = PullObjectResponse.FromString(data)
                    if b"TAMPER-ME" in obj.object_content:
                        obj.object_content = obj.object_content.replace(b"TAMPER-ME", b"TAMPERED!")
                        data = obj.SerializeToString()
                self.send_response(res.status)
                for k, v in res.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class JvmNode:
    """`java -jar xpert-fleet.jar` as a SuperNode; its XPERT-OUTCOME lines are collected."""

    def __init__(self, superlink: str, user: str, embedding: Path, adapter: Path, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            ["java", "-Xmx256m", "-jar", str(JAR), "--superlink", superlink, "--user", user,
             "--embedding", str(embedding), "--initial-adapter", str(adapter), "--poll-ms", "500"],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,  # noqa: SIM115 - closed with the process
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_connected(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith("XPERT-NODE "):
                    return int(line.split()[1])
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"JVM node did not connect; see {self.log}: {self.log.read_text()[-2000:]}")

    def outcomes(self) -> list[dict]:
        return [json.loads(line.split(" ", 1)[1]) for line in self.lines if line.startswith("XPERT-OUTCOME ")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # its shutdown hook deactivates and unregisters the node
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _initial_adapter(base, path: Path):
    """A PEFT LoRA (rank 2 on q_proj: 60 tensors, few objects to move) for the real base model, small random B."""
    import torch

    from xpert_fl.adapters import Adapter
    from xpert_fl.finetune import FinetuneConfig, prepare_model

    torch.manual_seed(0)
    model = prepare_model(base, None, FinetuneConfig(rank=2, alpha=4.0, target_modules=("q_proj",)))
    adapter = Adapter.from_peft(model, base.fingerprint)
    g = torch.Generator().manual_seed(0)
    adapter.tensors = {k: (torch.randn(v.shape, generator=g) * 0.02 if "lora_B" in k else v)
                       for k, v in adapter.tensors.items()}
    adapter.save(path)
    return Adapter.load(path)


def test_jvm_device_against_real_superlink(jar, tmp_path, base):
    adapter = _initial_adapter(base, tmp_path / "initial")
    good = tmp_path / "good.json"
    rng = np.random.default_rng(1)
    good.write_text(json.dumps({"vector": rng.standard_normal(EMBED_DIM).tolist()}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vector": rng.standard_normal(EMBED_DIM - 1).tolist()}))
    results = tmp_path / "results"
    probe_out = tmp_path / "probe.json"
    flower = FlowerProcesses(tmp_path / "logs", workdir=tmp_path)
    proxy = nodes = None
    try:
        superlink = flower.start_superlink(simulation=False)
        proxy = TamperingProxy(superlink)
        nodes = [JvmNode(proxy.address, "jvm-good", good, tmp_path / "initial", tmp_path / "logs" / "jvm-good.log"),
                 JvmNode(proxy.address, "jvm-baddim", bad, tmp_path / "initial", tmp_path / "logs" / "jvm-baddim.log")]
        for n in nodes:
            n.wait_connected()
        t0 = time.monotonic()
        probe = {"out": str(probe_out), "good-user": "jvm-good", "embedding": str(good),
                 "initial-adapter": str(tmp_path / "initial")}
        flower.run(ROOT / "tests" / "jvm_probe_app", probe, timeout=300, echo=False)
        probe_seconds = time.monotonic() - t0
        t0 = time.monotonic()
        run_config = {**TINY, "min-nodes": 2, "results-dir": str(results), "timeout": 300.0}
        status = flower.run(repo_root(), run_config, timeout=600, echo=False)
        round_seconds = time.monotonic() - t0
    finally:
        for n in nodes or []:
            n.stop()
        if proxy:
            proxy.close()
        flower.stop()

    # --- run 1: bad input gets clear error replies, and the device keeps answering ---
    p = json.loads(probe_out.read_text())
    assert p["users"] == ["jvm-baddim", "jvm-good"]
    assert p["unknown_type"]["code"] == 2 and "unknown message type 'query.unknown'" in p["unknown_type"]["reason"]
    want = f"basis dimension {EMBED_DIM + 3} != the device's drift embedding dimension {EMBED_DIM}"
    assert want in p["dims_mismatch"]["reason"]
    assert p["tampered"]["code"] == 3 and "failed verification" in p["tampered"]["reason"]
    for case in ("nearest-l1", "merge-l1", "nearest-drift", "merge-drift"):
        sel = p["select"][case]
        assert sel["error"] is None, sel
        dev, py = sel["device"], sel["python"]
        assert (dev["kind"], dev["ids"]) == (py["kind"], py["ids"]), sel
        assert np.allclose(dev["weights"], py["weights"], rtol=1e-6)
        assert np.isclose(dev["distance"], py["distance"], rtol=1e-6)
    for dist in ("l1", "drift"):
        assert p["select"][f"nearest-{dist}"]["device"]["kind"] == "single"
        assert p["select"][f"merge-{dist}"]["device"]["kind"] == "merge"
    t = p["train"]
    assert t["single"]["error"] is None and t["single"]["upload"] == t["single"]["sent"][0]  # no-op: unchanged
    assert t["single"]["metrics"]["noop_trainer"] == 1.0 and "no-op trainer" in t["single"]["report"]["stop_reason"]
    assert t["merge"]["error"] is None and t["merge"]["upload"] == t["merge"]["python_merge"]  # Java merge == Python
    assert "this device's artifacts expect" in t["mismatch"]["error"]["reason"]
    assert f"not the chosen {'f' * 20}" in t["wrong_hash"]["error"]["reason"]
    assert p["register_after"] == "jvm-good"

    # --- run 2: one XPerT round, checked on the server side ---
    assert status["status"] == "finished:completed"
    rows = {r["user"]: r for r in read_rounds(results)}
    assert sorted(rows) == ["jvm-baddim", "jvm-good"]
    ok, failed = rows["jvm-good"], rows["jvm-baddim"]
    assert ok["status"] == "ok" and ok["choice"] == "base", ok
    assert ok["new_id"] == adapter.content_hash  # the upload arrived bit-exact (no-op trainer: the start adapter)
    assert ok["finetune"]["noop_trainer"] == 1.0 and ok["explanation"]
    assert ok["bytes"]["adapter-up"] > 100 * ok["bytes"]["choice"] > 0
    assert failed["status"] == "select-error", failed
    assert f"drift embedding dimension {EMBED_DIM - 1}" in failed["error"], failed
    from xpert_fl.cache import PLLMCache

    entries = PLLMCache(results / "cache").entries()
    assert [e.id for e in entries] == [adapter.content_hash] and entries[0].explanation

    good_outcomes = nodes[0].outcomes()
    run2 = [o for o in good_outcomes if o["type"] == "train"][-1]
    (tmp_path / "summary.json").write_text(json.dumps({
        "probe_seconds": probe_seconds, "round_seconds": round_seconds, "train_outcome": run2,
        "adapter_up_bytes": ok["bytes"]["adapter-up"], "fleet_bytes": status["network-traffic"]["total-bytes"],
    }, indent=1))
    print(json.dumps({"probe_seconds": round(probe_seconds, 1), "round_seconds": round(round_seconds, 1),
                      "good_node": good_outcomes}, indent=1))
