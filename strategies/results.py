"""The results folder of an XPerT run (written by the ServerApp, round by round).

    config.json          the run config as the server saw it, plus resolved paths
    rounds.jsonl         one line per user-round (strategies.xpert.UserRound.to_json)
    summary.csv          one row per round (round 0: the starting cache); the selection method and
                         the devices' own mean selection cost (seconds, evaluations, bytes)
    cache.json           every cached pLLM: id, label, parents, explanation, metrics
    basis.json           the basis words (the vectors are in <cache>/basis.safetensors)
    cache_basis.png      cache size and basis size per round
    selection_accuracy.png
    finetune_cost.png    steps and seconds to the target loss: from the chosen pLLM vs from scratch
    bytes.png            bytes per device per round, by message kind
    cache/               the pLLM cache with basis.safetensors (unless --run-config cache-dir=... elsewhere)

Everything is rewritten after each round, so an interrupted run still leaves a consistent folder.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import protocol  # noqa: E402
from strategies.xpert import RoundResult  # noqa: E402

PLOTS = ("cache_basis.png", "selection_accuracy.png", "finetune_cost.png", "bytes.png")
SUMMARY_FIELDS = (
    "round", "method", "users", "ok", "failed", "cache_size", "basis_size", "accuracy", "judged", "merges",
    "base_starts", "selection_seconds", "selection_evaluations", "selection_bytes_down",
    "steps", "seconds", "samples", "energy_joules", "steps_to_target", "seconds_to_target",
    "scratch_steps_to_target", "scratch_seconds_to_target", "bytes_received", "bytes_sent",
    *(f"bytes_{k}" for k in protocol.KINDS), "round_seconds", "select_seconds", "train_seconds", "ingest_seconds",
)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return mean(vals) if vals else None


def to_target(m: Mapping, prefix: str, what: str) -> float | None:
    """Cost to the target loss: at the target if reached, else the whole run's (a lower bound)."""
    if not m:
        return None
    if m.get(f"{prefix}reached_target") and m.get(f"{prefix}{what}_to_target") is not None:
        return m[f"{prefix}{what}_to_target"]
    return m.get(f"{prefix}{what}")


def round_summary(result: RoundResult) -> dict:
    users = result.users
    done = [u for u in users if u.status in ("ok", "duplicate")]
    judged = [u for u in users if u.correct is not None]
    costs = [u.selection for u in users if u.selection]  # as each device's method counted it
    row = {
        "round": result.round,
        "method": ",".join(sorted({u.method for u in users})) or None,
        "users": len(users),
        "ok": len(done),
        "failed": len(users) - len(done),
        "cache_size": result.cache_size,
        "basis_size": result.basis_size,
        "accuracy": (sum(u.correct for u in judged) / len(judged)) if judged else None,
        "judged": len(judged),
        "merges": sum(u.choice == "merge" for u in users),
        "base_starts": sum(u.choice == "base" for u in users),
        "selection_seconds": _mean([c["seconds"] for c in costs]),
        "selection_evaluations": _mean([c["evaluations"] for c in costs]),
        "selection_bytes_down": _mean([c["bytes_down"] for c in costs]),
        "steps": _mean([u.finetune.get("steps") for u in done]),
        "seconds": _mean([u.finetune.get("seconds") for u in done]),
        "samples": _mean([u.finetune.get("samples_consumed") for u in done]),
        "energy_joules": _mean([u.finetune.get("energy_joules") for u in done]),
        "steps_to_target": _mean([to_target(u.finetune, "", "steps") for u in done]),
        "seconds_to_target": _mean([to_target(u.finetune, "", "seconds") for u in done]),
        "scratch_steps_to_target": _mean([to_target(u.finetune, "scratch_", "steps") for u in done]),
        "scratch_seconds_to_target": _mean([to_target(u.finetune, "scratch_", "seconds") for u in done]),
        "bytes_received": sum(u.bytes_received for u in users),
        "bytes_sent": sum(u.bytes_sent for u in users),
        "round_seconds": round(result.seconds, 1),
        "select_seconds": result.phases.get("select"),
        "train_seconds": result.phases.get("train"),
        "ingest_seconds": result.phases.get("ingest"),
    }
    for k in protocol.KINDS:
        row[f"bytes_{k}"] = sum(u.bytes[k] for u in users)
    return row


class ResultsWriter:
    """Writes the results folder; ``on_round`` is the strategy's callback."""

    def __init__(self, out: str | Path, run_config: Mapping, cache_dir: str | Path):
        self.out, self.cache_dir = Path(out), Path(cache_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        config = {"run_config": dict(run_config), "results_dir": str(self.out), "cache_dir": str(self.cache_dir)}
        (self.out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        (self.out / "rounds.jsonl").write_text("")
        self.rows: list[dict] = []
        self.server = None

    def start(self, server) -> None:
        """Round 0: the cache the run starts from (after explaining any unexplained pLLM)."""
        self.server = server
        row = dict.fromkeys(SUMMARY_FIELDS)
        row.update(round=0, users=0, ok=0, failed=0, cache_size=len(server.cache), basis_size=server.basis.size)
        self.rows = [row]
        self._snapshot()

    def on_round(self, result: RoundResult) -> None:
        with open(self.out / "rounds.jsonl", "a") as f:
            for u in result.users:
                f.write(json.dumps(u.to_json()) + "\n")
        self.rows.append(round_summary(result))
        self._snapshot()

    def _snapshot(self) -> None:
        with open(self.out / "summary.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(SUMMARY_FIELDS))
            w.writeheader()
            w.writerows(self.rows)
        if self.server is not None:
            entries = [e.record() for e in self.server.cache.entries()]
            (self.out / "cache.json").write_text(json.dumps(entries, indent=2))
            basis = self.server.basis
            (self.out / "basis.json").write_text(json.dumps({"words": basis.words, "dim": basis.dim}, indent=2))
            src = self.cache_dir / "basis.safetensors"
            if src.is_file() and self.cache_dir.resolve().parent != self.out.resolve():
                shutil.copy2(src, self.out / "basis.safetensors")
        plot(self.rows, self.out)


def plot(rows: Sequence[dict], out: Path) -> list[Path]:
    """The four PNGs of a results folder from its summary rows."""
    rounds = [r["round"] for r in rows]
    done = [r for r in rows if r["round"] > 0]
    paths = []

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(rounds, [r["cache_size"] for r in rows], "o-", label="cached pLLMs")
    ax.plot(rounds, [r["basis_size"] for r in rows], "s--", label="basis words")
    ax.set_xlabel("round (0 = start)")
    ax.set_xticks(rounds)
    ax.set_ylabel("count")
    ax.set_title("Cache and basis size")
    ax.legend()
    paths.append(_save(fig, out / PLOTS[0]))

    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = [r["round"] for r in done]
    acc = [r["accuracy"] if r["accuracy"] is not None else 0.0 for r in done]
    ax.bar(xs, acc, color="tab:green")
    for x, r in zip(xs, done, strict=True):
        label = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.2f} (n={r['judged']})"
        ax.text(x, 0.02, label, ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("round")
    ax.set_ylabel("selection accuracy")
    ax.set_title("Chosen pLLM has the user's style")
    paths.append(_save(fig, out / PLOTS[1]))

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, what, unit in ((axes[0], "steps", "steps"), (axes[1], "seconds", "s")):
        warm = [r[f"{what}_to_target"] or 0 for r in done]
        cold = [r[f"scratch_{what}_to_target"] or 0 for r in done]
        ax.bar([x - 0.2 for x in xs], cold, 0.4, label="from scratch", color="tab:gray")
        ax.bar([x + 0.2 for x in xs], warm, 0.4, label="from chosen pLLM", color="tab:blue")
        ax.set_xlabel("round")
        ax.set_ylabel(f"{what} to target ({unit}), mean per user")
        ax.set_xticks(xs)
        ax.set_ylim(0, 1.35 * max([*warm, *cold, 1e-9]))  # room for the legend
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("Fine-tuning cost to the same target loss")
    paths.append(_save(fig, out / PLOTS[2]))

    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / len(protocol.KINDS)
    for j, k in enumerate(protocol.KINDS):
        per_user = [(r[f"bytes_{k}"] or 0) / max(r["users"], 1) for r in done]
        ax.bar([x - 0.4 + (j + 0.5) * width for x in xs], [max(v, 1) for v in per_user], width, label=k)
    ax.set_yscale("log")
    ax.set_ylim(top=ax.get_ylim()[1] * 30)  # room for the legend
    ax.set_xlabel("round")
    ax.set_ylabel("bytes per device (log)")
    ax.set_xticks(xs)
    ax.set_title("Bytes on the wire by message kind")
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, out / PLOTS[3]))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_rounds(out: str | Path) -> list[dict]:
    path = Path(out) / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def user_round_table(rows: Sequence[dict]) -> str:
    """The short table `xpert simulate` prints: one line per user-round."""
    head = (f"{'rnd':>3} {'user':<8} {'style':<11} {'chose':<7} {'pLLM style':<12} {'ok':<2} {'dist':>6} "
            f"{'steps':>5} {'scratch':>7} {'sec':>5} {'down KB':>8} {'up KB':>7}  status")
    lines = [head]
    for r in rows:
        ft = r.get("finetune") or {}
        steps = to_target(ft, "", "steps")
        scratch = to_target(ft, "scratch_", "steps")
        secs = to_target(ft, "", "seconds")
        ok = "-" if r.get("correct") is None else ("✓" if r["correct"] else "✗")
        dist = "-" if r.get("distance") is None else f"{r['distance']:.2f}"
        lines.append(
            f"{r['round']:>3} {r['user']:<8} {str(r.get('label') or '-'):<11} {str(r.get('choice') or '-'):<7} "
            f"{str(r.get('chosen_label') or '-'):<12} {ok:<2} {dist:>6} "
            f"{'-' if steps is None else int(steps):>5} {'-' if scratch is None else int(scratch):>7} "
            f"{'-' if secs is None else round(secs):>5} {r['bytes_received'] / 1024:>8.1f} "
            f"{r['bytes_sent'] / 1024:>7.1f}  {r['status']}"
        )
    return "\n".join(lines)


def round_lines(out: str | Path) -> str:
    """One line per round from summary.csv: cache/basis growth, accuracy, savings, traffic."""
    with open(Path(out) / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    def num(r: dict, k: str) -> float | None:
        return float(r[k]) if r.get(k) not in (None, "") else None

    lines, prev = [], None
    for r in rows:
        if r["round"] == "0":
            lines.append(f"start:   cache {r['cache_size']} pLLMs, basis {r['basis_size']} words")
        else:
            acc = num(r, "accuracy")
            judged = int(r["judged"] or 0)
            acc_text = "n/a" if acc is None else f"{round(acc * judged)}/{judged}"
            warm, cold = num(r, "steps_to_target"), num(r, "scratch_steps_to_target")
            cost = "-" if warm is None or cold is None else f"{warm:.1f} vs {cold:.1f} from scratch"
            select_kinds = (protocol.BASIS_COORDS, protocol.OFFER, protocol.CHOICE)
            select_kb = sum(int(r[f"bytes_{k}"]) for k in select_kinds) / 1024
            lines.append(
                f"round {r['round']}: {r['ok']}/{r['users']} users ok, cache {prev['cache_size']}->{r['cache_size']}"
                f" pLLMs, basis {r['basis_size']} words, accuracy {acc_text}, steps to target {cost}, "
                f"{int(r['bytes_received']) / 2**20:.1f} MB down / {int(r['bytes_sent']) / 2**20:.1f} MB up "
                f"(selection {r['method']}: {select_kb:.0f} KB)"
            )
        prev = r
    return "\n".join(lines)
