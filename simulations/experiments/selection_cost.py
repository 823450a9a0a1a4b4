"""Selection cost on the device per method: bytes downloaded and compute seconds (paper Table 7).

The same selections as selection-accuracy, at one similarity, with the device-side accounting of
``xpert_fl.baselines.core`` (bytes from the Flower message records; seconds of the device's own
computation: adapter application, loss forwards, optuna, the summarizer and encoders). The paper
reports download *time* at a fixed bandwidth; bytes are its bandwidth-free equivalent.
"""

from __future__ import annotations

from pathlib import Path

from . import plots
from .runner import Outcome
from .selection_accuracy import selection_rows

NAME = "selection-cost"
TITLE = "Selection cost on the device: bytes down and compute seconds (Table 7)"
SMALL = {"methods": ("xpert", "exhaustive", "bo", "hyperband", "text-encoder")}
FULL = {"styles": (), "users_per_style": 3, "probe_prompts": 50, "pllm_steps": 60}
ROW_KEYS = ("similarity", "user", "method", "bytes_down", "device_seconds", "evaluations")
PAPER = {
    "source": "Table 7 (synthetic data): T_comm (download), T_comp (device compute), energy; §7.2 text",
    "columns": ["T_comm", "T_comp", "energy"],
    "Llama-3.2-1B / OnePlus 12R": {"exhaustive": ["1.26h", "48.3min", "13.1kJ"],
                                   "bo": ["1.26h", "45.5min", "12.1kJ"], "hyperband": ["1.26h", "40.0min", "10.3kJ"],
                                   "xpert": ["2.7min", "13.8min", "3.7kJ"]},
    "Qwen2-0.5B / Pixel 9 Pro": {"exhaustive": ["29.9min", "19.6min", "4.51kJ"],
                                 "bo": ["27.8min", "17.3min", "4.00kJ"], "hyperband": ["29.9min", "16.2min", "3.76kJ"],
                                 "xpert": ["1.07min", "10.8min", "2.50kJ"]},
    "SmolLM-360M / Pixel 7": {"exhaustive": ["23.8min", "12.7min", "1.54kJ"], "bo": ["22.9min", "12.1min", "1.46kJ"],
                              "hyperband": ["23.8min", "10.6min", "1.29kJ"], "xpert": ["0.85min", "10.1min", "1.22kJ"]},
    "headline": "XPerT vs the baselines: communication -96.5%, computation -71.4% (largest model)",
}


def cost_summary(rows: list[dict]) -> dict:
    """Mean bytes / seconds / evaluations per method, and XPerT's ratios to exhaustive search."""
    out: dict = {"per_method": {}}
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        out["per_method"][method] = {k: sum(r[k] for r in sel) / len(sel)
                                     for k in ("bytes_down", "device_seconds", "evaluations", "correct")}
    pm = out["per_method"]
    if "xpert" in pm and "exhaustive" in pm:
        for key in ("bytes_down", "device_seconds"):
            out[f"xpert_over_exhaustive_{key}"] = pm["xpert"][key] / pm["exhaustive"][key] \
                if pm["exhaustive"][key] else None
    return out


def run(bench) -> Outcome:
    cfg = bench.cfg
    users = bench.users()
    bench.explain(bench.pllms(cfg.similarity))
    rows = selection_rows(bench, cfg.similarity, users, cfg.methods)
    notes = [f"{len(users)} users, {len(bench.styles)} pLLMs offered at similarity {cfg.similarity:g}.",
             "Device seconds on this machine's CPU (1 thread, shared), not a phone; "
             "bytes exclude the message envelope.",
             "XPerT's seconds include the base model's generation of its answers to the user's prompts and the "
             "summarizer's forward passes (the user coordinate), as a device runs them."]
    return Outcome(rows, cost_summary(rows), notes)


def plot(result: dict, path: Path) -> None:
    pm = result["summary"]["per_method"]
    methods = list(pm)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "bytes_down", "MB downloaded per selection"),
                           (axes[1], "device_seconds", "device seconds per selection")):
        scale = 1e6 if key == "bytes_down" else 1
        ax.bar(methods, [pm[m][key] / scale for m in methods])
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=20)
    plots.save(fig, path, TITLE)


def markdown(result: dict) -> str:
    pm = result["summary"]["per_method"]
    rows = [[m, f"{v['bytes_down'] / 1e6:.3f}", f"{v['device_seconds']:.1f}", f"{v['evaluations']:.1f}",
             f"{100 * v['correct']:.0f}%"] for m, v in pm.items()]
    table = plots.md_table(["method (ours)", "MB down", "device s", "loss evaluations", "accuracy"], rows)
    paper = result["paper"]
    models = [k for k in paper if "/" in k]
    ptable = plots.md_table(["method (paper)", *models],
                            [[m, *(" / ".join(paper[k][m]) for k in models)]
                             for m in ("exhaustive", "bo", "hyperband", "xpert")])
    s = result["summary"]
    ratio = f"XPerT / exhaustive: bytes {plots.num(s.get('xpert_over_exhaustive_bytes_down'), 4)}, device seconds " \
            f"{plots.num(s.get('xpert_over_exhaustive_device_seconds'))} (paper: 0.035 and 0.29 on Llama-3.2-1B).\n"
    return table + "\n" + ratio + "\nPaper (T_comm / T_comp / energy):\n\n" + ptable
