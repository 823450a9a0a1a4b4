"""On-device merging for users whose data mixes two styles (paper §5.2, §7.6, Fig. 16).

Users hold samples of two styles (``mixes``, e.g. ``sarcastic+poetic`` at 50/50); the cache offers one
pLLM per style at one similarity. Three starts are fine-tuned to the user's from-scratch target:
the base model, the best single pLLM (XPerT's Eq. 1 choice) and the merged pLLM (``select.select``
with δ = 0: NNLS weights over the coordinates, applied with task arithmetic by
``merge.merge_adapters``; if no mix is closer than the nearest pLLM, the method keeps the single one).
"""

from __future__ import annotations

from pathlib import Path

from xpert_fl.baselines import make_selector
from xpert_fl.evaluation import COST_KEYS, cost_ratio, costs_to_target
from xpert_fl.merge import merge_adapters

from . import plots
from .runner import Outcome

NAME = "merging"
TITLE = "Merged vs best single pLLM for users mixing two styles (Fig. 16)"
SMALL = {"finetune_steps": 8}
FULL = {"styles": (), "mixes": ("sarcastic+poetic", "elementary+friendly", "expert+concise", "informative+persuasive",
                                "sarcastic:0.7+poetic:0.3"), "users_per_style": 2, "user_samples": 24,
        "probe_prompts": 50, "pllm_steps": 60, "finetune_steps": 60}
ROW_KEYS = ("user", "start", "chosen", "steps", "seconds", "reached")
PAPER = {"source": "Fig. 16, §7.6 (Llama-3.2-1B)",
         "finding": "with more than one style in the user's data, the merged pLLM always saves more, by up to 25%"}


def run(bench) -> Outcome:
    cfg = bench.cfg
    entries = bench.pllms(cfg.similarity)
    bench.explain(entries)
    users = bench.users(list(cfg.mixes))
    label = {e.id: e.label for e in entries}
    merger = make_selector("xpert", summarizer=bench.summarizer(), probe=bench.probe, delta=0.0)
    rows = []
    for user in users:
        single = bench.select("xpert", user, entries)
        mixed = bench.select("xpert", user, entries, selector=merger)
        choice = mixed.choice
        merged = merge_adapters([bench.cache.load_adapter(i) for i in choice.ids], choice.weights) \
            if choice.kind == "merge" else single.chosen
        starts = {"scratch": None, "single": single.chosen, "merged": merged}
        for start, what in starts.items():
            result = bench.finetune_from(user, what)
            chosen = {"scratch": "base", "single": label.get(single.chosen, "base"),
                      "merged": " + ".join(f"{w:.2f} {label[i]}" for i, w in zip(choice.ids, choice.weights,
                                                                                     strict=True))}[start]
            rows.append({"user": user.name, "mix": user.label, "start": start, "chosen": chosen,
                         "merge_kind": choice.kind, "l1_single": single.choice.distance,
                         "l1_merged": choice.distance, **costs_to_target(result), "start_loss": result.start_loss,
                         "target_loss": bench.scratch(user).target_loss})
            print(f"  {user.name:<24} {start:<8} {chosen:<36} steps={rows[-1]['steps']}", flush=True)
    by = {(r["user"], r["start"]): r for r in rows}
    pairs = {s: [{"pllm": by[(u.name, s)], "scratch": by[(u.name, "scratch")]} for u in users]
             for s in ("single", "merged")}
    summary = {s: {k: cost_ratio(p, k) for k in COST_KEYS} for s, p in pairs.items()}
    merged_vs_single = [{"pllm": by[(u.name, "merged")], "scratch": by[(u.name, "single")]} for u in users]
    summary["merged_over_single"] = {k: cost_ratio(merged_vs_single, k) for k in COST_KEYS}
    summary["merges_chosen"] = sum(r["merge_kind"] == "merge" for r in rows if r["start"] == "merged")
    return Outcome(rows, summary, [f"{len(users)} users of mixes {', '.join(cfg.mixes)}; pLLMs at similarity "
                                   f"{cfg.similarity:g}; costs to the user's from-scratch target."])


def plot(result: dict, path: Path) -> None:
    users = list(dict.fromkeys(r["user"] for r in result["rows"]))
    series = {s: [next(r["seconds"] for r in result["rows"] if r["user"] == u and r["start"] == s) for u in users]
              for s in ("scratch", "single", "merged")}
    plots.grouped_bars(users, series, "fine-tuning seconds to target", TITLE, path)


def markdown(result: dict) -> str:
    s = result["summary"]

    def start_loss(start: str) -> str:
        sel = [r["start_loss"] for r in result["rows"] if r["start"] == start]
        return plots.num(sum(sel) / len(sel), 3)

    rows = [[start, *(plots.num(s[start][k]) for k in COST_KEYS), start_loss(start)] for start in ("single", "merged")]
    rows.append(["merged / single", *(plots.num(s["merged_over_single"][k]) for k in COST_KEYS), "–"])
    return (plots.md_table(["start (ours), ratio to scratch", *COST_KEYS, "held-out loss at step 0"], rows) +
            f"\nFrom-scratch held-out loss at step 0: {start_loss('scratch')}.\n" +
            f"\nMerges chosen by the δ rule: {s['merges_chosen']}. Paper: {result['paper']['finding']}.\n")
