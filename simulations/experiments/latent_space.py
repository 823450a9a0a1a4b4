"""Validity of the explainable latent space: ordered style levels are ordered in coordinate space (§7.5).

Corpus ``builtin-levels``: 30 questions answered at elementary_school < high_school < undergraduate < phd.
Each level is one "style". Small preset (data route, no training): users holding a few texts of one
level compute their drifts on the device path (``explain.user_drift``); Algorithm 1 over the levels' mean
drifts gives the basis, and every user's coordinate is projected on it. Full preset
(``level_pllms``): one pLLM per level (``build_cache`` at similarity 1.0) explained by probing, as in the
paper. Measured: Spearman ρ between level rank and the position along the coordinates' first principal
direction (sign-free: |ρ|), and the fraction of level triples i < j < k with L1(c_i, c_j) < L1(c_i, c_k)
("consecutive levels are closer", the paper's check), plus the adjacent-level distances.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from xpert_fl.summarizer import Drift

from . import plots
from .runner import Outcome

NAME = "latent-space"
TITLE = "Ordered expertise levels in coordinate space (§7.5)"
CORPUS = "builtin-levels"
SMALL = {"styles": (), "user_samples": 4}
FULL = {"level_users": 3, "user_samples": 6, "level_pllms": True, "probe_prompts": 6, "pllm_steps": 60}
ROW_KEYS = ("user", "level", "rank", "pc1", "coords")
PAPER = {
    "source": "§7.5, Figs. 14-15 (no numbers in the text)",
    "finding": "With Llama-3.1-8B as summarizer, consecutive levels are closer (L1) in coordinate space; "
               "Llama-3.2-1B shows noticeable inconsistency.",
}


def run(bench) -> Outcome:
    levels = bench.corpus.levels
    if not levels:
        raise ValueError(f"corpus {bench.corpus.name} has no ordered levels: use --corpus builtin-levels")
    summarizer = bench.summarizer()
    users = bench.users(levels, per_spec=bench.cfg.level_users)
    user_drifts = {u.name: bench.user_drift(u, summarizer) for u in users}
    if bench.cfg.level_pllms:
        entries = bench.pllms(1.0, levels)
        level_drifts = {e.label: d for e, d in zip(entries, bench.pllm_drifts(entries, summarizer).values(),
                                                   strict=True)}
    else:
        level_drifts = {lv: _mean([user_drifts[u.name] for u in users if u.label == lv]) for lv in levels}
    basis, _, level_coords = bench.fresh_basis(level_drifts, summarizer)
    coords = np.stack([basis.coordinates(user_drifts[u.name].vector) for u in users])
    centred = coords - coords.mean(0)
    pc1 = np.linalg.svd(centred, full_matrices=False)[2][0] if len(users) > 1 else np.ones(basis.size)
    position = centred @ pc1
    ranks = [levels.index(u.label) for u in users]
    rho = float(spearmanr(ranks, position).statistic)
    means = {lv: coords[[r == i for r in ranks]].mean(0) for i, lv in enumerate(levels)}
    triples = list(itertools.combinations(range(len(levels)), 3))
    l1 = {(a, b): float(np.abs(means[levels[a]] - means[levels[b]]).sum()) for a in range(len(levels))
          for b in range(len(levels))}
    ordered = [l1[(i, j)] < l1[(i, k)] and l1[(k, j)] < l1[(k, i)] for i, j, k in triples]
    rows = [{"user": u.name, "level": u.label, "rank": r, "pc1": float(p),
             "coords": " ".join(f"{c:.4f}" for c in row)}
            for u, r, p, row in zip(users, ranks, position, coords, strict=True)]
    summary = {"spearman_rho": rho, "abs_spearman_rho": abs(rho), "ordered_triples": sum(ordered) / len(triples),
               "n_triples": len(triples), "levels": levels, "basis_words": basis.words,
               "adjacent_l1": [l1[(i, i + 1)] for i in range(len(levels) - 1)],
               "level_l1": [[l1[(a, b)] for b in range(len(levels))] for a in range(len(levels))],
               "route": "pLLMs per level" if bench.cfg.level_pllms else "level data (device route)",
               "level_coords": {k: v.tolist() for k, v in level_coords.items()}}
    return Outcome(rows, summary, [
        f"{len(users)} users, {bench.cfg.user_samples} texts each, route: {summary['route']}."
        + (" The basis is built from these users' own mean drifts (in-sample); the pLLM route (full preset) "
           "builds it from probed pLLMs." if not bench.cfg.level_pllms else ""),
        "A triple of levels i < j < k counts as ordered when L1(c_i, c_j) < L1(c_i, c_k) and "
        "L1(c_k, c_j) < L1(c_k, c_i) (level-mean coordinates): the middle level lies between the ends."])


def _mean(drifts: list[Drift]) -> Drift:
    """One drift for a level: the mean vector, candidate words merged by summed probability."""
    weights: dict[str, float] = {}
    for d in drifts:
        for w, p in zip(d.candidates, d.probabilities, strict=True):
            weights[w] = weights.get(w, 0.0) + p
    words = sorted(weights, key=lambda w: -weights[w])
    return Drift(np.mean([d.vector for d in drifts], axis=0), words, [weights[w] for w in words])


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ranks = [r["rank"] for r in result["rows"]]
    axes[0].scatter(ranks, [r["pc1"] for r in result["rows"]])
    axes[0].set_xticks(range(len(s["levels"])), s["levels"], rotation=15)
    axes[0].set(ylabel="position on 1st principal direction", title=f"Spearman ρ = {s['spearman_rho']:.2f}")
    im = axes[1].imshow(s["level_l1"], cmap="viridis")
    axes[1].set_xticks(range(len(s["levels"])), s["levels"], rotation=30)
    axes[1].set_yticks(range(len(s["levels"])), s["levels"])
    axes[1].set_title(f"L1 between level means; ordered triples {100 * s['ordered_triples']:.0f}%")
    fig.colorbar(im, ax=axes[1])
    plots.save(fig, path, TITLE)


def markdown(result: dict) -> str:
    s = result["summary"]
    rows = [["Spearman ρ (level rank vs 1st principal direction)", f"{s['spearman_rho']:.2f}"],
            ["ordered level triples (L1)", f"{100 * s['ordered_triples']:.0f}% of {s['n_triples']}"],
            ["adjacent-level L1", ", ".join(f"{d:.3f}" for d in s["adjacent_l1"])],
            ["route", s["route"]], ["basis words", ", ".join(s["basis_words"])]]
    return plots.md_table(["measure (ours)", "value"], rows) + f"\nPaper: {result['paper']['finding']}\n"
