"""XPerT through real Flower runtimes, started on loopback with `flwr run`.

* Deployment Engine: a `flower-superlink` and two `flower-supernode` processes (insecure, private
  FLWR_HOME, runtime dependency installation and update checks off), one XPerT round; the run's
  status, the cache, the results folder and the byte accounting (against the SuperLink's own
  traffic counter) are checked, and every process started is stopped, even on failure.
* Simulation (slow): a SuperLink in simulation mode, 3 virtual users on Ray, 2 rounds; the cache
  grows and round-2 users choose among round-1 uploads.
* Both, slow, with the devices on the ONNX Runtime engine (``trainer = "ort"``).
* Deployment Engine, slow: a baseline selection method (run-config ``selection``) in the same round
  loop, over a starting cache of two random pLLMs; the devices' reported selection cost is checked
  against the offered adapters and the run's summary.

Budgets are tiny: 4 probe prompts x 16 tokens, 4 samples per user, 2 fine-tuning steps, 96 tokens.
"""

from __future__ import annotations

import csv
import json

import psutil
import pytest

import protocol
from simulations.launch import FlowerProcesses, repo_root
from strategies.results import PLOTS, read_rounds
from xpert_fl.cache import BaseInfo, PLLMCache

TINY = {
    "num-server-rounds": 1, "user-styles": "sarcastic;poetic", "user-samples": 4, "test-fraction": 0.25,
    "num-probe-prompts": 4, "probe-max-new-tokens": 16, "probe-batch-size": 4, "max-steps": 2, "eval-every": 1,
    "patience": 2, "batch-size": 2, "max-seq-len": 96, "rank": 2, "compare-scratch": False, "timeout": 600.0,
}


def _started(flower: FlowerProcesses) -> list[psutil.Process]:
    out = []
    for _, proc in flower.procs:
        try:
            p = psutil.Process(proc.pid)
            out += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


def test_deployment_engine_one_round(tmp_path):
    deployment_round(tmp_path, "torch")


@pytest.mark.slow
def test_deployment_engine_one_round_ort_trainer(tmp_path):
    """The devices fine-tune with ONNX Runtime (the first run exports the 135M model: ~1.5 min, ~5 GB)."""
    deployment_round(tmp_path, "ort")


def deployment_round(tmp_path, trainer: str) -> None:
    results = tmp_path / "results"
    status, rows = deploy(tmp_path, {**TINY, "results-dir": str(results), "trainer": trainer})
    assert sorted(r["user"] for r in rows) == ["user-0", "user-1"]
    assert all(r["status"] == "ok" and r["choice"] == "base" and r["trainer"] == trainer for r in rows), rows
    cache = PLLMCache(results / "cache")
    entries = cache.entries()
    assert sorted(e.id for e in entries) == sorted(r["new_id"] for r in rows)
    assert all(e.explanation and e.label in ("sarcastic", "poetic") for e in entries)
    assert (results / "cache" / "basis.safetensors").is_file()
    assert all((results / name).is_file() for name in (*PLOTS, "summary.csv", "config.json"))
    for r in rows:
        assert r["bytes"][protocol.ADAPTER_UP] > 100 * r["bytes"][protocol.CHOICE] > 0
    json.dumps(status)


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["exhaustive", "text-encoder"])
def test_deployment_engine_baseline_selection(tmp_path, base, random_pllm, selection):
    cache = PLLMCache(tmp_path / "cache", BaseInfo.from_loaded(base))
    cached = [cache.add(random_pllm(seed), label=label).id for seed, label in enumerate(("sarcastic", "poetic"))]
    results = tmp_path / "results"
    run_config = {**TINY, "results-dir": str(results), "cache-dir": str(tmp_path / "cache"), "selection": selection}
    _, rows = deploy(tmp_path, run_config)
    assert sorted(r["user"] for r in rows) == ["user-0", "user-1"]
    adapters = sum(protocol.adapter_bytes(cache.load_adapter(i)) for i in cached)
    for r in rows:
        assert r["status"] == "ok" and r["method"] == r["selection"]["method"] == selection, r
        assert r["offered"] == 2 and r["choice"] == "single" and set(r["chosen"]) <= set(cached)
        cost, offer = r["selection"], r["bytes"][protocol.OFFER]
        assert r["bytes"][protocol.BASIS_COORDS] == 0 and cost["seconds"] > 0
        if selection == "exhaustive":  # every adapter on the wire and evaluated, 3 samples in one batch each
            assert cost["bytes"] == {"adapters": adapters} and cost["evaluations"] == cost["downloaded"] == 2
            assert abs(offer - adapters) < 4096
        else:
            assert set(cost["bytes"]) == {"embeddings"} and cost["evaluations"] == 0 and offer < adapters / 10
    with open(results / "summary.csv", newline="") as f:
        start, first = csv.DictReader(f)  # round 0 (the starting cache), round 1
    assert first["method"] == selection and start["method"] == ""
    assert float(first["selection_evaluations"]) == (2 if selection == "exhaustive" else 0)


def deploy(tmp_path, run_config: dict) -> tuple[dict, list[dict]]:
    """One run on a loopback SuperLink with two SuperNodes; every process it started is stopped. Checks
    the run completed and that the strategy's byte counts are what the SuperLink's Fleet API carried
    (its counter adds only request framing: message metadata and object ids)."""
    flower = FlowerProcesses(tmp_path / "logs", workdir=tmp_path)
    started = []
    try:
        flower.start_superlink(simulation=False)
        for p in range(2):
            flower.start_supernode(p, 2)
        status = flower.run(repo_root(), {**run_config, "min-nodes": 2}, timeout=900, echo=False)
        started = _started(flower)
    finally:
        started = started or _started(flower)
        flower.stop()
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in started)
    assert status["status"] == "finished:completed"
    rows = read_rounds(run_config["results-dir"])
    ours = sum(r["bytes_received"] + r["bytes_sent"] for r in rows)
    fleet = status["network-traffic"]["total-bytes"]
    assert ours <= fleet <= 1.05 * ours + 64 * 1024, (ours, fleet)
    return status, rows


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["torch", "ort"])
def test_ray_simulation_two_rounds_grows_the_cache(tmp_path, trainer):
    results = tmp_path / "results"
    run_config = {**TINY, "num-server-rounds": 2, "min-nodes": 3, "results-dir": str(results), "trainer": trainer}
    with FlowerProcesses(tmp_path / "logs", workdir=tmp_path) as flower:
        flower.start_superlink(simulation=True)
        status = flower.run(repo_root(), run_config, {"num-supernodes": 3, "client-resources-num-cpus": 1},
                            timeout=1500, echo=False)
    assert status["status"] == "finished:completed"
    rows = read_rounds(results)
    first = [r for r in rows if r["round"] == 1]
    second = [r for r in rows if r["round"] == 2]
    assert len(first) == len(second) == 3 and all(r["status"] == "ok" for r in first), rows
    assert all(r["trainer"] == trainer for r in rows if r["status"] in ("ok", "duplicate"))
    # round 2 chooses among round-1 uploads; an upload equal to its start (no step beat it) is not re-cached
    round1_ids = {r["new_id"] for r in first}
    assert all(r["offered"] == 3 and set(r["chosen"]) <= round1_ids for r in second)
    assert all(r["status"] in ("ok", "duplicate") for r in second)
    new = [r for r in second if r["status"] == "ok"]
    assert new and len(PLLMCache(results / "cache")) == 3 + len(new)
    assert all(PLLMCache(results / "cache").get(r["new_id"]).parents == tuple(r["chosen"]) for r in new)
    summary = (results / "summary.csv").read_text().splitlines()
    assert len(summary) == 4  # header + rounds 0, 1, 2
