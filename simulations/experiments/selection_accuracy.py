"""Selection accuracy vs data similarity, every method (paper Table 5, "Acc").

At each similarity s the cache offers one pLLM per style trained on a fraction s of that style (the
rest neutral, ``production.build_cache``); every user (samples of one style, disjoint from training)
is given to every method through the ``xpert_fl.baselines`` selectors. A choice is correct when the
chosen pLLM's training style is the user's. XPerT's basis is built once over all offered pLLMs (the
server's cache holds them all); each similarity offers only its own pLLMs.
"""

from __future__ import annotations

from pathlib import Path

from xpert_fl.baselines.core import ADAPTERS, BASIS_COORDS, EMBEDDINGS
from xpert_fl.evaluation import wilson

from . import plots
from .runner import Outcome

NAME = "selection-accuracy"
TITLE = "Selection accuracy vs data similarity (Table 5, Acc)"
SMALL: dict = {}
FULL = {"styles": (), "users_per_style": 3, "probe_prompts": 50, "pllm_steps": 60, "bo_trials": 0}
ROW_KEYS = ("similarity", "user", "style", "method", "chosen_style", "correct", "bytes_down", "device_seconds")
PAPER = {
    "source": "Table 5 (synthetic data), selection accuracy in % at similarity 0.3 / 0.5 / 0.7 / 0.9",
    "similarities": [0.3, 0.5, 0.7, 0.9],
    "xpert_accuracy": {"Llama-3.2-1B": [25.0, 53.6, 85.7, 96.4], "Qwen2-0.5B": [28.6, 64.2, 82.1, 100.0],
                       "SmolLM-360M": [17.8, 57.1, 82.1, 89.3]},
    "real_world_xpert_accuracy": {"Llama-3.2-1B": [16.4, 60.7, 88.2, 96.7], "Qwen2-0.5B": [16.9, 48.3, 80.5, 92.4],
                                  "SmolLM-360M": [8.3, 40.7, 76.3, 92.8]},
}


def selection_rows(bench, similarity: float, users, methods) -> list[dict]:
    """Every method's choice for every user among the pLLMs of one similarity, with its device costs."""
    entries = bench.pllms(similarity)
    label = {e.id: e.label for e in bench.cache.entries()}
    rows = []
    for user in users:
        for method in methods:
            sel = bench.select(method, user, entries)
            chosen = label.get(sel.chosen) if sel.chosen else None
            rows.append({
                "similarity": similarity, "user": user.name, "style": user.label, "method": method,
                "n_offered": len(entries), "chosen": sel.chosen, "chosen_style": chosen or "base",
                "correct": chosen == user.label, "bytes_down": sel.bytes_down,
                "bytes_adapters": sel.bytes.get(ADAPTERS, 0), "bytes_basis_coords": sel.bytes.get(BASIS_COORDS, 0),
                "bytes_embeddings": sel.bytes.get(EMBEDDINGS, 0), "evaluations": sel.evaluations,
                "tokens": sel.tokens, "device_seconds": sel.seconds, "choice_kind": sel.choice.kind,
            })
            print(f"  s={similarity:g} {user.name:<16} {method:<13} -> {chosen or 'base':<12} "
                  f"{sel.bytes_down / 1e6:8.2f} MB {sel.seconds:7.1f} s", flush=True)
    return rows


def accuracy_summary(rows: list[dict], key: str = "similarity") -> dict:
    """Accuracy with a 95% Wilson interval per method and ``key`` value."""
    out: dict = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        for value in dict.fromkeys(r[key] for r in rows):
            sel = [r for r in rows if r["method"] == method and r[key] == value]
            k = sum(r["correct"] for r in sel)
            out.setdefault(method, {})[str(value)] = {"accuracy": k / len(sel), "ci95": wilson(k, len(sel)),
                                                      "n": len(sel)}
    return out


def run(bench) -> Outcome:
    cfg = bench.cfg
    users = bench.users()
    for s in cfg.similarities:
        bench.pllms(s)
    bench.explain([e for s in cfg.similarities for e in bench.pllms(s)])
    rows = [r for s in cfg.similarities for r in selection_rows(bench, s, users, cfg.methods)]
    chance = 1 / len(bench.styles)
    notes = [f"{len(users)} users x {len(cfg.methods)} methods x {len(cfg.similarities)} similarities; "
             f"{len(bench.styles)} pLLMs per similarity, chance {chance:.2f}.",
             "oracle = the pLLM trained on the user's style (reference line); scratch never picks a pLLM."]
    return Outcome(rows, {"accuracy": accuracy_summary(rows), "chance": chance, "n_users": len(users)}, notes)


def plot(result: dict, path: Path) -> None:
    plots.accuracy_lines(result["summary"]["accuracy"], result["summary"]["chance"], "data similarity of the pLLMs",
                         f"{TITLE}\n{result['summary']['n_users']} users, 95% Wilson CIs", path)


def markdown(result: dict) -> str:
    acc = result["summary"]["accuracy"]
    sims = list(next(iter(acc.values())))
    rows = [[f"{m} (ours)", *(plots.pct_ci(acc[m][s]) for s in sims)] for m in acc]
    paper = result["paper"]
    for model, vals in paper["xpert_accuracy"].items():
        by_sim = dict(zip(paper["similarities"], vals, strict=True))
        rows.append([f"XPerT, paper ({model})", *(f"{by_sim[float(s)]:.1f}%" if float(s) in by_sim else "–"
                                                  for s in sims)])
    return plots.md_table(["method", *(f"s = {s}" for s in sims)], rows) + \
        f"\nChance: {result['summary']['chance']:.2f}.\n"
