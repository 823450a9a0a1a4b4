"""The results folder: JSONL per user-round, CSV per round, the plots, the printed table."""

from __future__ import annotations

import csv
import json

import protocol
from strategies.results import PLOTS, ResultsWriter, read_rounds, round_summary, user_round_table
from strategies.xpert import RoundResult, UserRound
from xpert_fl.basis import Basis
from xpert_fl.cache import BaseInfo, PLLMCache


class FakeServer:
    def __init__(self, root):
        self.cache = PLLMCache(root, BaseInfo("fake", "fp0", {"m.q_proj": (6, 4)}))
        self.basis = Basis(dim=4, words=["terse"], vectors=[[1.0, 0, 0, 0]])


def user_round(rnd: int, user: str, label: str, chosen_label: str | None, status: str = "ok") -> UserRound:
    u = UserRound(rnd, 1, user, label, status=status, offered=2, choice="single", chosen=["abc"],
                  weights=[1.0], chosen_label=chosen_label, distance=0.4, style_available=True,
                  correct=None if chosen_label is None else chosen_label == label)
    u.finetune = {"steps": 6, "seconds": 3.0, "samples_consumed": 12, "energy_joules": 5.0, "reached_target": 1.0,
                  "steps_to_target": 2, "seconds_to_target": 1.0, "scratch_reached_target": 0.0, "scratch_steps": 6,
                  "scratch_seconds": 3.0}
    for i, k in enumerate(protocol.KINDS):
        u.bytes[k] = 1000 * (i + 1)
    return u


def test_writer_produces_the_whole_folder(tmp_path):
    out = tmp_path / "results"
    server = FakeServer(tmp_path / "cache")
    w = ResultsWriter(out, {"seed": 0, "merge-delta": float("inf")}, tmp_path / "cache")
    w.start(server)
    users = [user_round(1, "user-0", "poetic", "poetic"), user_round(1, "user-1", "sarcastic", "poetic"),
             user_round(1, "user-2", "expert", None, status="train-error")]
    w.on_round(RoundResult(1, users, 3, 1, ["terse"], 12.5, {"select": 2.0, "train": 8.0, "ingest": 2.5}))
    assert all((out / name).stat().st_size > 1000 for name in PLOTS)
    assert json.loads((out / "config.json").read_text())["run_config"]["seed"] == 0
    rows = read_rounds(out)
    assert [r["user"] for r in rows] == ["user-0", "user-1", "user-2"]
    assert rows[0]["bytes_received"] == sum(rows[0]["bytes"][k] for k in protocol.DOWN_KINDS)
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [s["round"] for s in summary] == ["0", "1"]
    one = summary[1]
    assert float(one["accuracy"]) == 0.5 and one["judged"] == "2" and one["ok"] == "2" and one["failed"] == "1"
    assert float(one["steps_to_target"]) == 2.0 and float(one["scratch_steps_to_target"]) == 6.0  # unreached: run
    assert (out / "basis.safetensors").exists() is False  # the cache lives elsewhere but has no basis file yet
    assert json.loads((out / "basis.json").read_text())["words"] == ["terse"]
    table = user_round_table(rows)
    assert "user-1" in table and "✗" in table and "train-error" in table and len(table.splitlines()) == 4


def test_round_summary_without_labels_has_no_accuracy():
    u = user_round(1, "user-0", "poetic", "poetic")
    u.label, u.correct = None, None
    row = round_summary(RoundResult(1, [u], 1, 1, ["w"], 1.0))
    assert row["accuracy"] is None and row["judged"] == 0 and row["bytes_sent"] == u.bytes_sent
