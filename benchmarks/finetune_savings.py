"""Headline measurement of the fine-tuning engine (paper Table 5).

For each similarity s, one cloud pLLM per style (`production.build_cache`). For each style a user holds
samples of that style; the same target loss (from the from-scratch run's best held-out loss, see
`finetune.target_from_scratch`) is then chased from the base model and from the matching pLLM.
Reports steps / seconds / energy / samples to target and their ratios, plus the trainer's throughput
and its fraction of this CPU's measured fp32 matmul rate.

    python benchmarks/finetune_savings.py --out benchmarks/results

Writes finetune_savings.json and finetune_savings.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from xpert_fl.cache import PLLMCache  # noqa: E402
from xpert_fl.data import load_corpus, split_roles, user_samples  # noqa: E402
from xpert_fl.evaluation import cost_ratio, costs_to_target  # noqa: E402
from xpert_fl.finetune import FinetuneConfig, finetune, samples_to_target, target_from_scratch, with_target  # noqa: E402
from xpert_fl.models import load_model  # noqa: E402
from xpert_fl.production import build_cache, find_pllm  # noqa: E402


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """This CPU's practical fp32 peak: a large square matmul with torch's threads (GFLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def training_flops_per_token(model: torch.nn.Module) -> float:
    """LoRA training FLOPs per token ~ 4N: forward (2N) + backward through frozen weights for the
    activations' gradients (2N); no weight gradients for the frozen base, LoRA's own are negligible."""
    return 4.0 * sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--styles", nargs="*", default=["sarcastic", "poetic", "elementary", "expert"])
    ap.add_argument("--similarities", nargs="*", type=float, default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--user-samples", type=int, default=24)
    ap.add_argument("--pllm-steps", type=int, default=40)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--efficiency-similarities", nargs="*", type=float, default=[0.9])
    ap.add_argument("--counts", nargs="*", type=int, default=[6, 12, 18, 24])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when sharing the CPU)")
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--work", default="results/finetune_savings")
    ap.add_argument("--cache", default=None, help="pLLM cache to build into / reuse (default: under --work)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base = load_model()
    corpus = load_corpus("builtin")
    roles = split_roles(corpus, seed=args.seed)
    pcfg = FinetuneConfig(max_steps=args.pllm_steps, max_seq_len=args.max_seq_len, eval_every=5, seed=args.seed)
    cache_dir = Path(args.cache) if args.cache else Path(args.work) / "cache"
    for sim in args.similarities:
        build_cache(base, corpus, sim, cache_dir, pcfg, styles=args.styles, seed=args.seed)
    cache = PLLMCache(cache_dir)

    ucfg = FinetuneConfig(max_steps=args.max_steps, max_seq_len=args.max_seq_len, seed=args.seed)
    rows, efficiency, throughput = [], [], []
    for style in args.styles:
        train = user_samples(roles["user"], style, args.user_samples, seed=args.seed)
        test = roles["test"].styles[style]
        scratch = finetune(base, train, test, ucfg, progress=False)
        target = target_from_scratch(scratch)
        scratch = with_target(scratch, target)
        throughput.append(scratch.tokens_per_second)
        tcfg = replace(ucfg, target_loss=target)
        for sim in args.similarities:
            entry = find_pllm(cache, style, sim, args.seed)
            warm = finetune(base, train, test, tcfg, start=cache.load_adapter(entry.id), progress=False)
            rows.append({
                "style": style, "similarity": sim, "target_loss": target,
                "scratch": costs_to_target(scratch), "pllm": costs_to_target(warm), "pllm_start_loss": warm.start_loss,
                "scratch_start_loss": scratch.start_loss,
            })
            print(json.dumps(rows[-1]), flush=True)
            if sim in args.efficiency_similarities:
                eff_s = samples_to_target(base, train, test, tcfg, None, args.counts)
                eff_p = samples_to_target(base, train, test, tcfg, cache.load_adapter(entry.id), args.counts)
                efficiency.append({"style": style, "similarity": sim, "scratch_samples": eff_s.samples_needed,
                                   "pllm_samples": eff_p.samples_needed, "counts": args.counts,
                                   "search": "ascending scan, first count reaching the target"})
                print(json.dumps(efficiency[-1]), flush=True)

    peak = matmul_gflops()
    tok_s = float(np.mean(throughput))
    achieved = tok_s * training_flops_per_token(base.model) / 1e9
    summary = {}
    for sim in args.similarities:
        sel = [r for r in rows if r["similarity"] == sim]
        summary[str(sim)] = {k: cost_ratio(sel, k) for k in ("steps", "seconds", "energy_joules", "samples")}
        summary[str(sim)]["reached"] = sum(r["pllm"]["reached"] for r in sel) / len(sel)
    eff_summary = {
        str(sim): _eff_ratio([e for e in efficiency if e["similarity"] == sim]) for sim in args.efficiency_similarities
    }
    results = {
        "config": vars(args),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "summary_pllm_over_scratch": summary,
        "data_efficiency_pllm_over_scratch": eff_summary,
        "throughput": {"tokens_per_second": tok_s, "achieved_gflops": achieved, "matmul_peak_gflops": peak,
                       "fraction_of_matmul_peak": achieved / peak,
                       "flops_model": "4 x parameters per trained token (forward + activation backward)"},
        "rows": rows,
        "efficiency": efficiency,
        "seconds": time.perf_counter() - t0,
    }
    (out / "finetune_savings.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "finetune_savings.png")
    print(json.dumps({k: results[k] for k in ("summary_pllm_over_scratch", "data_efficiency_pllm_over_scratch",
                                              "throughput", "seconds")}, indent=2))


def _eff_ratio(rows: list[dict]) -> dict:
    both = [r for r in rows if r["scratch_samples"] and r["pllm_samples"] is not None]
    if not both:
        return {"ratio": None, "users": len(rows)}
    return {"ratio": sum(r["pllm_samples"] for r in both) / sum(r["scratch_samples"] for r in both),
            "users": len(rows), "compared": len(both)}


def _plot(results: dict, path: Path) -> None:
    sims = [float(s) for s in results["summary_pllm_over_scratch"]]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, marker in (("steps", "o"), ("seconds", "s"), ("samples", "^")):
        vals = [results["summary_pllm_over_scratch"][str(s)][key] for s in sims]
        ax.plot(sims, [1 - v if v is not None else np.nan for v in vals], marker=marker, label=f"{key} saved")
    ax.set_xlabel("data similarity of the cached pLLM")
    ax.set_ylabel("saving vs from scratch")
    ax.set_ylim(-0.2, 1.05)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_title("Fine-tuning to the same target from the matching pLLM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
