"""Personalization cost after each method's choice, vs from scratch (paper Table 5), and the generation
quality of the final models (Table 6).

Per user: fine-tune from the base model until the held-out loss plateaus; its best loss x 1.01 is the
target (``finetune.target_from_scratch``). Then, from the pLLM each method chose, fine-tune with the same
data, optimizer and schedule until that target (``finetune.finetune``; a run that never reaches it
counts its whole run). Costs are steps, wall seconds, energy (RAPL or the CPU-seconds estimate of
``finetune.EnergyMeter``) and samples consumed; with ``efficiency_counts`` also the smallest sample count
that reaches the target (``finetune.samples_to_target``, the paper's "Data" column). Each final model
(best held-out weights) answers held-out prompts of the user's style; BLEU (sacrebleu) and ROUGE-1 /
ROUGE-L F1 (rouge-score) compare those answers with the user-style reference answers.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from xpert_fl.evaluation import COST_KEYS, cost_ratio, costs_to_target, generation_scores
from xpert_fl.finetune import samples_to_target

from . import plots
from .runner import Outcome
from .selection_accuracy import selection_rows

NAME = "personalization-cost"
TITLE = "Fine-tuning cost after each method's choice vs from scratch (Table 5) and generation quality (Table 6)"
SMALL = {"similarities": (0.5, 0.9), "methods": ("xpert", "random", "oracle", "exhaustive"), "finetune_steps": 8}
FULL = {"styles": (), "similarities": (0.3, 0.5, 0.7, 0.9), "users_per_style": 2, "user_samples": 24,
        "probe_prompts": 50, "pllm_steps": 60, "finetune_steps": 60, "gen_prompts": 12,
        "efficiency_counts": (6, 12, 18, 24),
        "methods": ("xpert", "random", "oracle", "exhaustive", "bo", "hyperband", "text-encoder")}
ROW_KEYS = ("similarity", "user", "method", "chosen_style", "steps", "seconds", "energy_joules", "samples", "reached",
            "bleu", "rouge1", "rougeL")
PAPER = {
    "source": "Table 5 (synthetic): FT-time, energy, data saved vs from scratch; Table 6: BLEU / ROUGE-1 / ROUGE-L",
    "similarities": [0.3, 0.5, 0.7, 0.9],
    "ft_time_min": {"Llama-3.2-1B": [97.8, 92.4, 81.8, 56.7, 17.9], "Qwen2-0.5B": [26.4, 23.1, 21.9, 13.4, 4.4],
                    "SmolLM-360M": [93.6, 89.4, 84.4, 70.8, 26.2]},
    "ft_time_columns": ["scratch", "0.3", "0.5", "0.7", "0.9"],
    "data_saved_pct": {"Llama-3.2-1B": [4.6, 16.7, 17.1, 35.7], "Qwen2-0.5B": [2.4, 14.4, 15.2, 33.2],
                       "SmolLM-360M": [3.6, 9.9, 4.4, 21.7]},
    "generation_quality_llama_1b": {"scratch": [0.13, 0.32, 0.23], "0.3": [0.13, 0.33, 0.21],
                                    "0.7": [0.12, 0.33, 0.21], "0.9": [0.15, 0.33, 0.22]},
    "headline": "§7.1: time -55% / energy -57% at 0.7, -82% / -83% at 0.9; data up to -51% (real-world)",
}


def _quality(bench, user, result) -> dict[str, float]:
    prompts = [s.prompt for s in user.generation]
    answers = bench.answers(result.adapter, prompts, max_new_tokens=bench.cfg.gen_tokens)
    return generation_scores(answers, [s.response for s in user.generation])


def run(bench) -> Outcome:
    cfg = bench.cfg
    users = bench.users()
    bench.explain([e for s in cfg.similarities for e in bench.pllms(s)])
    rows = []
    quality: dict[tuple[str, str], dict] = {}
    efficiency: dict[tuple[str, str], int | None] = {}

    def measured(user, start: str | None, **row) -> dict:
        result = bench.finetune_from(user, start)
        key = (user.name, start or "scratch")
        if key not in quality:
            quality[key] = _quality(bench, user, result)
        if cfg.efficiency_counts and key not in efficiency:
            config = replace(bench.finetune_config(), target_loss=bench.scratch(user).target_loss)
            counts = [c for c in cfg.efficiency_counts if c <= len(user.samples)]
            start_adapter = None if start is None else bench.cache.load_adapter(start)
            efficiency[key] = samples_to_target(bench.base, list(user.samples), list(user.validation), config,
                                                start_adapter, counts).samples_needed
        return {**row, "user": user.name, "style": user.label, **costs_to_target(result), **quality[key],
                "target_loss": bench.scratch(user).target_loss, "start_loss": result.start_loss,
                "samples_needed": efficiency.get(key)}

    for user in users:
        rows.append(measured(user, None, similarity=None, method="scratch", chosen_style="base", correct=None))
    for s in cfg.similarities:
        for sel in selection_rows(bench, s, users, [m for m in cfg.methods if m != "scratch"]):
            user = next(u for u in users if u.name == sel["user"])
            rows.append(measured(user, sel["chosen"], similarity=s, method=sel["method"],
                                 chosen_style=sel["chosen_style"], correct=sel["correct"]))
    return Outcome(rows, _summary(rows), [
        f"{len(users)} users; target = each user's from-scratch plateau x 1.01; max {cfg.finetune_steps} steps.",
        "Runs that never reach the target count their whole run (understating the saving).",
        "Energy: RAPL when readable, else process CPU-seconds x 5 W/core (an estimate, see xpert_fl.finetune).",
        f"BLEU/ROUGE over {cfg.gen_prompts} held-out prompts per user, {cfg.gen_tokens} new tokens, greedy."])


def _summary(rows: list[dict]) -> dict:
    """Per similarity and method: cost ratios to from scratch (sums over users) and mean generation scores."""
    scratch = {r["user"]: r for r in rows if r["method"] == "scratch"}
    out: dict = {"scratch": _quality_means(list(scratch.values())), "ratios": {}}
    for s in dict.fromkeys(r["similarity"] for r in rows if r["similarity"] is not None):
        for method in dict.fromkeys(r["method"] for r in rows if r["similarity"] == s):
            sel = [r for r in rows if r["similarity"] == s and r["method"] == method]
            pairs = [{"pllm": r, "scratch": scratch[r["user"]]} for r in sel]
            cell = {k: cost_ratio(pairs, k) for k in COST_KEYS}
            both = [p for p in pairs if p["pllm"]["samples_needed"] and p["scratch"]["samples_needed"]]
            cell["samples_needed"] = cost_ratio(both, "samples_needed") if both else None
            cell["reached"] = sum(r["reached"] for r in sel) / len(sel)
            cell["accuracy"] = sum(bool(r["correct"]) for r in sel) / len(sel)
            out["ratios"].setdefault(str(s), {})[method] = {**cell, **_quality_means(sel)}
    return out


def _quality_means(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("bleu", "rouge1", "rougeL")}


def plot(result: dict, path: Path) -> None:
    ratios = result["summary"]["ratios"]
    sims = list(ratios)
    methods = list(dict.fromkeys(m for s in sims for m in ratios[s]))
    series = {m: [1 - (ratios[s].get(m, {}).get("seconds") or 1) for s in sims] for m in methods}
    plots.grouped_bars([f"s = {s}" for s in sims], series, "fine-tuning seconds saved vs scratch",
                       "Fine-tuning to the from-scratch target, from each method's choice", path)


def markdown(result: dict) -> str:
    ratios, scratch = result["summary"]["ratios"], result["summary"]["scratch"]

    def start_loss(similarity: object, method: str) -> str:
        sel = [r["start_loss"] for r in result["rows"] if r["method"] == method and str(r["similarity"]) == similarity]
        return plots.num(sum(sel) / len(sel), 3)

    rows = [["scratch", "–", "1.00", "1.00", "1.00", "1.00", "–", "–", start_loss("None", "scratch"),
             *(plots.num(scratch[k]) for k in ("bleu", "rouge1", "rougeL"))]]
    for s, per in ratios.items():
        for m, c in per.items():
            rows.append([m, s, *(plots.num(c[k]) for k in ("steps", "seconds", "energy_joules", "samples",
                                                            "samples_needed")),
                         f"{100 * c['reached']:.0f}%", start_loss(s, m),
                         *(plots.num(c[k]) for k in ("bleu", "rouge1", "rougeL"))])
    ours = plots.md_table(["start (ours)", "similarity", "steps", "seconds", "energy", "samples consumed",
                           "samples needed", "reached target", "loss at step 0", "BLEU", "ROUGE-1", "ROUGE-L"], rows)
    paper = result["paper"]
    prow = [[model, *(f"{v:.1f}" for v in vals), *(f"-{100 * (1 - v / vals[0]):.0f}%" for v in vals[1:])]
            for model, vals in paper["ft_time_min"].items()]
    ptable = plots.md_table(["paper FT-time (min)", "scratch", "0.3", "0.5", "0.7", "0.9",
                             "saved 0.3", "saved 0.5", "saved 0.7", "saved 0.9"], prow)
    q = paper["generation_quality_llama_1b"]
    qtable = plots.md_table(["paper Llama-3.2-1B", "BLEU", "ROUGE-1", "ROUGE-L"], [[k, *v] for k, v in q.items()])
    return ("Cost columns are ratios to from scratch (sum over users; < 1 is a saving).\n\n" + ours +
            "\nPaper (Table 5, synthetic):\n\n" + ptable + "\nPaper (Table 6, synthetic):\n\n" + qtable)
