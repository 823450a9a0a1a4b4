"""The main job in miniature, framework-free: cloud pLLMs -> explanations -> users select -> fine-tune.

1. The "cloud" fine-tunes one pLLM per style (similarity s) into a cache.
2. The server probes and explains every pLLM in one common basis.
3. Each user maps their own data onto the basis and picks the nearest pLLM (drift distance, the default).
4. One user per style fine-tunes from the chosen pLLM and from scratch to the same target loss.

Everything lands in one results folder (config, JSONL per user, CSV summary, PNG).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from xpert_fl.basis import report  # noqa: E402
from xpert_fl.cache import PLLMCache  # noqa: E402
from xpert_fl.data import load_corpus, split_roles, train_test_split, user_samples  # noqa: E402
from xpert_fl.explain import (  # noqa: E402
    Explainer,
    ProbeConfig,
    calibrate_users,
    explain_cache,
    human_references,
    open_basis,
    unexplained,
    user_coordinates,
)
from xpert_fl.finetune import FinetuneConfig, finetune, target_from_scratch, with_target  # noqa: E402
from xpert_fl.models import DEFAULT_SPEC, load_model  # noqa: E402
from xpert_fl.probe import probe_set  # noqa: E402
from xpert_fl.production import build_cache, cloud_reports  # noqa: E402
from xpert_fl.select import nearest  # noqa: E402
from xpert_fl.summarizer import Summarizer  # noqa: E402


@dataclass(frozen=True)
class QuickstartConfig:
    spec: str = DEFAULT_SPEC
    corpus: str = "builtin"
    styles: tuple[str, ...] = ("sarcastic", "poetic", "elementary", "expert")
    similarity: float = 0.9
    pllm_steps: int = 16
    probe_prompts: int = 8
    human_weight: float = 1.0  # share of the users' reference devices remove (Basis.human_weight)
    user_samples: int = 12
    user_steps: int = 16
    max_seq_len: int = 128
    seed: int = 0
    out: str = "results/quickstart"
    extra: dict = field(default_factory=dict)


def run(cfg: QuickstartConfig) -> list[dict]:
    """Run the whole loop; returns one row per user (also written to ``cfg.out``)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.perf_counter()
    base = load_model(cfg.spec)
    corpus = load_corpus(cfg.corpus)
    roles = split_roles(corpus, seed=cfg.seed)

    print(f"[1/4] cloud: {len(cfg.styles)} pLLMs at similarity {cfg.similarity}", flush=True)
    pllm_cfg = FinetuneConfig(max_steps=cfg.pllm_steps, max_seq_len=cfg.max_seq_len, eval_every=4, seed=cfg.seed)
    build_cache(base, corpus, cfg.similarity, out / "cache", pllm_cfg, styles=cfg.styles, seed=cfg.seed)
    cache = PLLMCache(out / "cache")

    print("[2/4] server: probe + explain every pLLM in one basis", flush=True)
    summarizer = Summarizer(base)
    probe = ProbeConfig()
    basis = open_basis(cache.root, summarizer, tau_orth=0.1, tau_res=0.2, orthogonalize=True)
    probes = probe_set(cfg.probe_prompts, roles["test"], seed=cfg.seed)
    explainer = Explainer(base, summarizer, probes.prompts, probe, chat=probes.chat)
    calibrate_users(basis, explainer, human_references(roles["test"], probes.prompts), cfg.human_weight)
    pending = unexplained(cache)
    decs = explain_cache(cache, explainer, basis, reports=cloud_reports(summarizer, base.tokenizer, corpus, pending))
    entries = {e.id: e for e in cache.entries()}
    coords = {i: e.coords for i, e in entries.items()}

    print("[3/4] devices: coordinates of their own data -> nearest pLLM", flush=True)
    rows = []
    for style in cfg.styles:
        data = user_samples(roles["user"], style, cfg.user_samples, seed=cfg.seed)
        train, test = train_test_split(data, 0.25, seed=cfg.seed)
        mine = user_coordinates(base, summarizer, basis, train, probe)
        choice = nearest(mine.coords, coords, size=basis.size, gram=basis.metric("drift"))
        chosen = entries[choice.ids[0]]
        rows.append({"user_style": style, "chosen": chosen.id, "chosen_style": chosen.label,
                     "correct": chosen.label == style, "distance": choice.distance,
                     "user_explanation": mine.text, "_train": train, "_test": test})

    print("[4/4] devices: fine-tune from the chosen pLLM vs from scratch, to the same target", flush=True)
    ft = FinetuneConfig(max_steps=cfg.user_steps, max_seq_len=cfg.max_seq_len, seed=cfg.seed)
    for row in rows:
        train, test = row.pop("_train"), row.pop("_test")
        scratch = finetune(base, train, test, ft, progress=False)
        target = target_from_scratch(scratch)
        scratch = with_target(scratch, target)
        start = cache.load_adapter(row["chosen"])
        warm = finetune(base, train, test, replace(ft, target_loss=target), start=start, progress=False)
        row.update(target_loss=target, scratch_steps=scratch.steps_to_target, pllm_steps=warm.steps_to_target,
                   scratch_seconds=scratch.seconds_to_target, pllm_seconds=warm.seconds_to_target,
                   pllm_start_loss=warm.start_loss, scratch_start_loss=scratch.start_loss)

    summary = {"seconds": time.perf_counter() - t0, "basis_size": basis.size, "basis_words": basis.words,
               "table2": report(list(decs.values())) if decs else None,
               "accuracy": sum(r["correct"] for r in rows) / len(rows),
               "pllm_explanations": {e.label: e.explanation for e in entries.values()}}
    _write(out, rows, summary)
    return rows


def _write(out: Path, rows: list[dict], summary: dict) -> None:
    with open(out / "users.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "user_explanation"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["scratch_steps"] or 0 for r in rows], 0.4, label="from scratch")
    ax.bar([i + 0.2 for i in x], [r["pllm_steps"] if r["pllm_steps"] is not None else 0 for r in rows], 0.4,
           label="from chosen pLLM")
    ax.set_xticks(list(x), [f"{r['user_style']}\n→{r['chosen_style']}" for r in rows])
    ax.set_ylabel("steps to target loss")
    ax.set_title("Fine-tuning cost per user (same target)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "finetune_steps.png", dpi=120)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'user':<12}{'chose':<12}{'ok':<4}{'dist':>7}{'scratch':>9}{'pLLM':>6}  user's data explained as")
    for r in rows:
        ps = "-" if r["pllm_steps"] is None else r["pllm_steps"]
        ss = "-" if r["scratch_steps"] is None else r["scratch_steps"]
        print(f"{r['user_style']:<12}{r['chosen_style']:<12}{'✓' if r['correct'] else '✗':<4}{r['distance']:>7.2f}"
              f"{ss:>9}{ps:>6}  {r['user_explanation']}")
