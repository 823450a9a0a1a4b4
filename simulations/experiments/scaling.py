"""Selection cost and accuracy as the cache grows from a few to hundreds of pLLMs (paper Fig. 12).

The cache starts with the real pLLMs (one per style at one similarity, explained by probing). It is
filled up to the largest size with *synthetic* pLLMs, cheap to make and honest to select among:
each is an exact task-arithmetic interpolation ``θ0 + λ Δ_a + (1 − λ) Δ_b`` of two real pLLMs
(``merge.merge_adapters``, rank r_a + r_b, so twice a real adapter's bytes), with λ ~ U(0.55, 0.95)
seeded, labelled with its dominant parent's style. It is explained WITHOUT probing, by the paper's
rule for merged pLLMs (§5.2: the weighted union of the parents' coordinates,
``select.merged_coordinates``) - that is the "cheap probe". Loss-based methods evaluate the synthetic
adapters for real. At each size the first ``size`` entries (real first) are offered. The text encoder
needs probe answers of every pLLM, so it is left to the full preset.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from xpert_fl.cache import PLLMCache
from xpert_fl.explain import BASIS_FILE
from xpert_fl.merge import merge_adapters
from xpert_fl.select import merged_coordinates

from . import plots
from .bench import slug
from .runner import Outcome

NAME = "scaling"
TITLE = "Selection cost and accuracy vs cache size (Fig. 12)"
SMALL = {"methods": ("xpert", "exhaustive", "hyperband", "bo"), "bo_trials": 8, "user_samples": 4,
         "max_seq_len": 64}
FULL = {"styles": (), "users_per_style": 2, "user_samples": 8, "max_seq_len": 128, "bo_trials": 0,
        "cache_sizes": (8, 16, 32, 64, 128, 256, 512), "probe_prompts": 50, "pllm_steps": 60,
        "methods": ("xpert", "exhaustive", "hyperband", "bo", "text-encoder")}
ROW_KEYS = ("size", "user", "method", "bytes_down", "device_seconds", "correct")
PAPER = {"source": "Fig. 12, §7.2", "finding": "baselines' selection cost grows linearly with the number of cached "
                                               "pLLMs; XPerT's stays constantly low"}


def scaled_cache(bench, size: int) -> PLLMCache:
    """The real explained pLLMs plus synthetic interpolations up to ``size`` entries (resumable)."""
    real = bench.pllms(bench.cfg.similarity)
    bench.explain(real)
    real = [bench.cache.get(e.id) for e in real]
    root = bench.work / f"scaling-{slug(bench.corpus.name)}-{bench.cfg.similarity:g}"
    cache = PLLMCache(root, bench.cache.base)
    shutil.copyfile(bench.cache.root / BASIS_FILE, root / BASIS_FILE)
    for e in real:
        if e.id not in cache:
            cache.add(bench.cache.load_adapter(e.id), label=e.label, metrics=e.metrics)
        cache.set_explanation(e.id, e.coords, e.words, e.explanation)
    rng = random.Random(f"{bench.seed}:scaling")
    for i in range(len(cache), size):
        a, b = rng.sample(real, 2) if len(real) > 1 else (real[0], real[0])
        lam = rng.uniform(0.55, 0.95)
        adapter = merge_adapters([bench.cache.load_adapter(a.id), bench.cache.load_adapter(b.id)], [lam, 1 - lam])
        entry = cache.add(adapter, parents=(a.id, b.id), label=a.label,
                          metrics={"synthetic": "task-arithmetic interpolation", "lambda": lam, "index": i})
        coords = merged_coordinates([a.coords, b.coords], [lam, 1 - lam])
        cache.set_explanation(entry.id, coords.tolist(), a.words, f"{lam:.2f} {a.label} + {1 - lam:.2f} {b.label}")
    return cache


def run(bench) -> Outcome:
    cfg = bench.cfg
    cache = scaled_cache(bench, max(cfg.cache_sizes))
    entries = cache.entries()
    users = bench.users()
    rows = []
    for size in cfg.cache_sizes:
        offered = entries[:size]
        for user in users:
            for method in cfg.methods:
                sel = bench.select(method, user, offered, cache=cache)
                chosen = cache.get(sel.chosen).label if sel.chosen else "base"
                rows.append({"size": size, "user": user.name, "style": user.label, "method": method,
                             "bytes_down": sel.bytes_down, "device_seconds": sel.seconds,
                             "evaluations": sel.evaluations, "chosen_style": chosen, "correct": chosen == user.label,
                             "synthetic_chosen": bool(cache.get(sel.chosen).metrics.get("synthetic"))
                             if sel.chosen else False})
                print(f"  n={size:<4} {user.name:<14} {method:<12} {sel.bytes_down / 1e6:9.2f} MB "
                      f"{sel.seconds:7.1f} s -> {chosen}", flush=True)
    summary: dict = {}
    for method in cfg.methods:
        for size in cfg.cache_sizes:
            sel = [r for r in rows if r["method"] == method and r["size"] == size]
            summary.setdefault(method, {})[str(size)] = {
                k: sum(r[k] for r in sel) / len(sel)
                for k in ("bytes_down", "device_seconds", "evaluations", "correct")}
    real = sum(1 for e in entries if not e.metrics.get("synthetic"))
    return Outcome(rows, {"per_method": summary, "real_pllms": real}, [
        f"{real} real pLLMs (similarity {cfg.similarity:g}) + synthetic task-arithmetic interpolations of two of "
        "them, explained by the merged-coordinate rule (no probing); synthetic adapters are rank 2r (2x bytes).",
        f"bo: {cfg.bo_trials or 'half the offered'} trials; {len(users)} users of {cfg.user_samples} samples."])


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    pm = result["summary"]["per_method"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in ((axes[0], "bytes_down", "MB downloaded"), (axes[1], "device_seconds", "device seconds"),
                           (axes[2], "correct", "selection accuracy")):
        for method, cells in pm.items():
            xs = [int(s) for s in cells]
            ys = [c[key] / (1e6 if key == "bytes_down" else 1) for c in cells.values()]
            ax.plot(xs, ys, marker="o", label=method)
        ax.set(xscale="log", xlabel="pLLMs in the cache", ylabel=label)
        if key != "correct":
            ax.set_yscale("symlog", linthresh=1e-2)
        ax.legend(fontsize=7)
    plots.save(fig, path, TITLE)


def markdown(result: dict) -> str:
    pm = result["summary"]["per_method"]
    rows = [[m, size, f"{c['bytes_down'] / 1e6:.3f}", f"{c['device_seconds']:.1f}", f"{c['evaluations']:.0f}",
             f"{100 * c['correct']:.0f}%"] for m, cells in pm.items() for size, c in cells.items()]
    return plots.md_table(["method (ours)", "pLLMs", "MB down", "device s", "loss evaluations", "accuracy"], rows) + \
        f"\nPaper: {result['paper']['finding']}.\n"
