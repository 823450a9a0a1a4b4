"""Fault tolerance in a real round: Flower's Simulation Engine (Ray), the project's ServerApp, and a
ClientApp whose handlers are the real device's except on three virtual nodes, which fail in training:

* ``raise``: the handler raises (Flower replies with an error) -> ``train-error``;
* ``timeout``: the handler fine-tunes for real but replies only after the phase ``timeout`` ->
  ``train-timeout`` (a valid upload that arrives late must not be cached either);
* ``garbage``: the handler fine-tunes for real, then one tensor of its upload loses half its bytes (a
  record the protocol parser must refuse) -> ``upload-invalid``.

The round must complete with the other devices, record each failure with its kind in ``rounds.jsonl``,
and leave the cache, its drifts and its basis as they were plus the healthy uploads only. The server
starts from a one-pLLM cache, explained before the run, so "as they were" is not vacuous; devices
select with the ``random`` baseline (an id pick, no model), so fine-tuning is the only device work.

``run_simulation`` runs the ServerApp in this process and takes no run config, so both apps are thin
wrappers that hand the real ``main`` and handlers the run config `flwr run` would have given them
(pyproject's with the test's overrides: ``run_configs.run_config``).
Budgets are test_flower_runs.TINY's. The phase timeout is the price of the silent device (the server
waits it out) and applies to every phase, so it must outlast the healthy devices' slowest one: on a
2-core CPU with one other job, registering (the Ray actors' start-up) took ~40 s and fine-tuning ~30 s,
and the timeouts below leave about three times that. On a CPU loaded beyond that the healthy devices
miss it too, and the test says so rather than reporting a wrong status.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import pytest
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from flwr.supercore import telemetry
from run_configs import run_config
from safetensors.numpy import load_file
from test_flower_runs import TINY

import protocol
from clients import client_app
from strategies import server_app
from strategies.config import XPerTConfig
from strategies.pllm_server import PLLMServer
from strategies.results import read_rounds
from xpert_fl.basis import TENSOR_KEY, Basis
from xpert_fl.cache import BaseInfo, PLLMCache
from xpert_fl.explain import BASIS_FILE, DRIFTS_FILE

pytestmark = pytest.mark.usefixtures("one_thread", "flower_task_identity")

STATUS = {"raise": "train-error", "timeout": "train-timeout", "garbage": "upload-invalid"}


def _configured(context: Context, config: dict) -> Context:
    return Context(context.run_id, context.node_id, context.node_config, context.state, dict(config))


def apps(config: dict, faults: dict[int, str], uploads: Path) -> tuple[ServerApp, ClientApp]:
    """The project's ServerApp and ClientApp behind wrappers that supply the run config ``config``; the devices of
    partition ids in ``faults`` fail in ``train`` as their kind says; those that fine-tuned write the
    content hash of their (late or garbled) adapter to ``uploads/user-<partition id>``. Local functions:
    Ray pickles them by value into its actors, with this configuration."""
    timeout = float(config["timeout"])
    server, devices = ServerApp(), ClientApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        server_app.main(grid, _configured(context, config))

    @devices.query("register")
    def register(msg: Message, context: Context) -> Message:
        return client_app.register(msg, _configured(context, config))

    @devices.query("select")
    def select(msg: Message, context: Context) -> Message:
        return client_app.select(msg, _configured(context, config))

    @devices.train()
    def fit(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        fault = faults.get(partition)
        t0 = time.monotonic()  # the server's deadline started before this handler did
        if fault == "raise":
            raise RuntimeError("injected fault: the device crashed")
        reply = client_app.fit(msg, _configured(context, config))
        if fault == "timeout":  # a valid upload, held back until the deadline has passed
            time.sleep(max(0.0, timeout + 5.0 - (time.monotonic() - t0)))
        if fault is not None:  # a real upload: which adapter it was, for the test to look for in the cache
            adapter = protocol.parse_upload(reply.content).adapter
            (uploads / f"user-{partition}").write_text(adapter.content_hash)
        if fault == "garbage":
            arrays = reply.content["upload.arrays"]
            key = sorted(arrays.keys())[0]
            a = arrays[key]
            arrays[key] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[: len(a.data) // 2])
            reply = Message(reply.content, reply_to=msg)
        return reply

    return server, devices


def starting_cache(cache_dir, base, random_pllm) -> dict:
    """A cache with one explained pLLM (basis and drifts written), and what a round may only add to:
    its entries (parents, label, metrics), drifts, basis vectors and words."""
    PLLMCache(cache_dir, BaseInfo.from_loaded(base)).add(random_pllm(0), label="sarcastic")
    server = PLLMServer.open(XPerTConfig.from_run_config(run_config(TINY, cache_dir=str(cache_dir))))
    return state(server.cache)


def state(cache: PLLMCache) -> dict:
    return {
        "entries": {e.id: (e.parents, e.label, e.metrics) for e in cache.entries()},
        "drifts": load_file(cache.root / DRIFTS_FILE),
        "basis": load_file(cache.root / BASIS_FILE),
        "words": Basis.load(cache.root / BASIS_FILE).words,
    }


def faulty_round(tmp_path, monkeypatch, base, random_pllm, num_nodes: int, faults: dict[int, str], timeout: float):
    """One round on ``num_nodes`` virtual devices, ``faults`` among them (partition id -> kind); checks what
    the round recorded and that the cache changed by the healthy uploads only."""
    cache_dir, results = tmp_path / "cache", tmp_path / "results"
    before = starting_cache(cache_dir, base, random_pllm)
    config = run_config(TINY, min_nodes=num_nodes, timeout=timeout, selection="random", results_dir=str(results),
                        cache_dir=str(cache_dir))
    # the Ray backend rewrites PYTHONPATH for its workers: give it back afterwards; and no usage reports
    # (`flwr run` gets FLWR_TELEMETRY_ENABLED=0 from simulations.launch; here flwr has read it already)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")
    uploads = tmp_path / "faulty-uploads"
    uploads.mkdir()
    server, devices = apps(config, faults, uploads)
    # one actor more than the cores: the late device holds one for the whole timeout
    run_simulation(server, devices, num_nodes, backend_config={
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 3}})

    rows = read_rounds(results)  # the round completed, every device in it: none failed to register in time
    assert len(rows) == num_nodes, f"{len(rows)} of {num_nodes} devices registered within {timeout}s (loaded CPU?)"
    by_user = {r["user"]: r for r in rows}
    failed = {f"user-{p}": kind for p, kind in faults.items()}
    healthy = [by_user[u] for u in sorted(by_user) if u not in failed]
    missed = [r["user"] for r in healthy if r["status"].endswith("-timeout")]
    assert not missed, f"healthy devices {missed} missed the {timeout}s phase timeout (loaded CPU?)"
    for user, kind in failed.items():  # each failure recorded with its kind, nothing cached for it
        r = by_user[user]
        assert r["status"] == STATUS[kind] and r["error"], r
        assert r["new_id"] is None and r["added_words"] == [] and r["choice"] == "single", r
    assert "injected fault" in by_user[f"user-{_partition(faults, 'raise')}"]["error"]
    assert "header announces" in by_user[f"user-{_partition(faults, 'garbage')}"]["error"]
    assert all(r["status"] == "ok" and r["new_id"] and r["finetune"]["steps"] >= 1 for r in healthy), healthy
    with open(results / "summary.csv", newline="") as f:
        start, first = csv.DictReader(f)
    assert (int(first["ok"]), int(first["failed"])) == (len(healthy), len(faults))
    assert int(first["cache_size"]) == int(start["cache_size"]) + len(healthy)

    after = state(PLLMCache(cache_dir))
    new = {r["new_id"]: r for r in healthy}
    assert set(after["entries"]) == set(before["entries"]) | set(new)
    late_and_garbled = [(uploads / f"user-{p}").read_text() for p, kind in faults.items() if kind != "raise"]
    assert len(late_and_garbled) == 2 and not set(late_and_garbled) & set(after["entries"])
    assert len(after["entries"]) == len(before["entries"]) + len(healthy)
    for id, entry in before["entries"].items():
        assert after["entries"][id] == entry
    for id, r in new.items():  # every new entry is a healthy device's upload, from what that device chose
        parents, label, metrics = after["entries"][id]
        assert (list(parents), label, metrics["user"]) == (r["chosen"], r["label"], r["user"])
    assert set(after["drifts"]) == set(after["entries"])
    assert all((after["drifts"][id] == v).all() for id, v in before["drifts"].items())
    # the basis grew by the healthy uploads' words (ingested in user order), its earlier vectors kept
    k = len(before["words"])
    assert after["words"] == before["words"] + [w for r in healthy for w in r["added_words"]]
    assert (after["basis"][TENSOR_KEY][:k] == before["basis"][TENSOR_KEY]).all()


def _partition(faults: dict[int, str], kind: str) -> int:
    return next(p for p, k in faults.items() if k == kind)


@pytest.mark.slow  # about 3.5 min, most of it waiting out the silent device; timing-sensitive on a loaded CPU
def test_a_round_goes_on_past_a_crashed_a_late_and_a_garbling_device(tmp_path, monkeypatch, base, random_pllm):
    """4 devices, 3 of them faulty: the cheaper variant."""
    faulty_round(tmp_path, monkeypatch, base, random_pllm, 4, {1: "raise", 2: "timeout", 3: "garbage"}, timeout=120.0)


@pytest.mark.slow
def test_a_round_of_ten_goes_on_past_thirty_percent_faulty_devices(tmp_path, monkeypatch, base, random_pllm):
    faulty_round(tmp_path, monkeypatch, base, random_pllm, 10, {2: "raise", 5: "timeout", 8: "garbage"}, timeout=240.0)
