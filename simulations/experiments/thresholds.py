"""Sweeps of Algorithm 1's thresholds τ_orth and τ_res (paper Tables 8, 9).

The pLLMs' drift embeddings and candidate words are computed once (stored per summarizer); each
threshold value then rebuilds the basis from them (a word's sub-vector is memoised by the summarizer,
so a sweep costs little) and re-selects for every user (Eq. 1 on the new basis). Reported per value:
candidate words examined, basis size, pLLMs whose candidates ran out (Eq. 3 unmet), accuracy. Both
basis modes are swept: the paper's Algorithm 1, and the project's default (Gram-Schmidt + residual
completion), where the thresholds matter less by construction.
"""

from __future__ import annotations

from pathlib import Path

from xpert_fl.basis import report
from xpert_fl.evaluation import wilson

from . import plots
from .runner import Outcome

NAME = "thresholds"
TITLE = "Algorithm 1 thresholds: candidate words examined, basis size, accuracy (Tables 8, 9)"
SMALL = {"styles": (), "similarities": (0.9,)}
FULL = {"users_per_style": 3, "probe_prompts": 50, "pllm_steps": 60, "tau_orth": (0.01, 0.05, 0.1, 0.2, 0.5),
        "tau_res": (0.02, 0.1, 0.2, 0.4, 0.6)}
ROW_KEYS = ("mode", "swept", "tau_orth", "tau_res", "examined", "basis_size", "accuracy")
PAPER = {
    "source": "Tables 8 and 9 (defaults τ_orth = 0.1, τ_res = 0.2)",
    "tau_orth": {"values": [0.01, 0.1, 0.5], "examined": [372, 185, None], "accuracy_pct": [None, 96.4, 60.7]},
    "tau_res": {"values": [0.02, 0.2, 0.6], "examined": [372, 78, None], "accuracy_pct": [None, 96.4, 14.3]},
}


def run(bench) -> Outcome:
    cfg = bench.cfg
    summarizer = bench.summarizer()
    entries = [e for s in cfg.similarities for e in bench.pllms(s)]
    drifts = bench.pllm_drifts(entries, summarizer)
    users = bench.users()
    sweeps = [("tau_orth", t, 0.2) for t in cfg.tau_orth] + [("tau_res", 0.1, t) for t in cfg.tau_res]
    rows = []
    for mode, paper in (("paper", True), ("project", False)):
        for swept, tau_orth, tau_res in sweeps:
            basis, decs, coords = bench.fresh_basis(drifts, summarizer, tau_orth, tau_res, paper=paper)
            correct = sum(bench.nearest_label(u, summarizer, basis, coords) == u.label for u in users)
            rep = report(decs)
            lo, hi = wilson(correct, len(users))
            rows.append({"mode": mode, "swept": swept, "tau_orth": tau_orth, "tau_res": tau_res,
                         "examined": rep["n_examined"], "basis_size": basis.size, "exhausted": rep["n_exhausted"],
                         "max_residual_ratio": rep["max_residual_ratio"], "accuracy": correct / len(users),
                         "ci_low": lo, "ci_high": hi, "n_users": len(users), "n_pllms": len(entries)})
            print(f"  {mode:<8} τ_orth={tau_orth:<5} τ_res={tau_res:<5} examined={rep['n_examined']:<4} "
                  f"k={basis.size:<3} acc={correct}/{len(users)}", flush=True)
    return Outcome(rows, {"n_users": len(users), "n_pllms": len(entries), "chance": 1 / len(entries)}, [
        "paper mode: Algorithm 1 as published (sub-vectors as computed, no residual completion); project mode: "
        "Gram-Schmidt on accepted words and the residual as a last word when candidates run out.",
        f"Each pLLM's candidate words: the summarizer's top {summarizer.config.n_candidates} adjective-slot words."])


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, swept in zip(axes, ("tau_orth", "tau_res"), strict=True):
        ax2 = ax.twinx()
        for mode in ("paper", "project"):
            sel = [r for r in result["rows"] if r["swept"] == swept and r["mode"] == mode]
            xs = [r[swept] for r in sel]
            ax.plot(xs, [r["accuracy"] for r in sel], marker="o", label=f"accuracy ({mode})")
            ax2.plot(xs, [r["examined"] for r in sel], ls="--", marker="x", label=f"words examined ({mode})")
        ax.set(xscale="log", xlabel=swept, ylabel="selection accuracy", ylim=(-0.05, 1.05))
        ax2.set_ylabel("candidate words examined")
        ax.legend(fontsize=7, loc="lower left")
        ax2.legend(fontsize=7, loc="upper right")
    plots.save(fig, path, TITLE)


def markdown(result: dict) -> str:
    out = []
    for swept in ("tau_orth", "tau_res"):
        paper = result["paper"][swept]
        by_value = dict(zip(paper["values"], zip(paper["examined"], paper["accuracy_pct"], strict=True), strict=True))
        rows = []
        for r in (r for r in result["rows"] if r["swept"] == swept):
            ex, acc = by_value.get(r[swept], (None, None))
            rows.append([r["mode"], r[swept], r["examined"], r["basis_size"], r["exhausted"],
                         f"{100 * r['accuracy']:.0f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}]",
                         "–" if ex is None else ex, "–" if acc is None else f"{acc}%"])
        out.append(plots.md_table([f"basis mode ({swept} swept)", swept, "words examined", "basis size",
                                   "pLLMs short of Eq. 3", "accuracy (ours)", "paper: examined", "paper: accuracy"],
                                  rows))
    return "\n".join(out) + f"\n{result['summary']['n_pllms']} pLLMs, {result['summary']['n_users']} users.\n"
