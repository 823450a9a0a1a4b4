"""Measurement helpers shared by the benchmarks (benchmarks/) and the experiment suite (simulations/experiments/).

Kept in the library so that every number in benchmarks/results.md is computed one way: proportions
with Wilson intervals, fine-tuning costs to a target, cost ratios, stored generations, and the
generation-quality scores of paper Table 6 (BLEU via sacrebleu, ROUGE-1/ROUGE-L via rouge-score).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from xpert_fl.files import atomic_write_text
from xpert_fl.finetune import FinetuneResult

COST_KEYS = ("steps", "seconds", "energy_joules", "samples")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound for small n, unlike the normal interval)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the interval always holds p itself (float rounding can put the bound a hair inside it at 0 and 1)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def costs_to_target(r: FinetuneResult) -> dict:
    """Costs to the target; a run that never reached it counts its whole run (understating the saving)."""
    hit = r.reached_target
    return {"steps": r.steps_to_target if hit else r.steps, "seconds": r.seconds_to_target if hit else r.seconds,
            "energy_joules": r.energy_joules_to_target if hit else r.energy_joules,
            "samples": r.samples_consumed, "reached": hit, "best_test_loss": r.best_test_loss}


def cost_ratio(rows: Sequence[dict], key: str, num: str = "pllm", den: str = "scratch") -> float | None:
    """Sum over users of ``row[num][key]`` / sum of ``row[den][key]`` (None when the denominator is 0)."""
    s = sum(r[den][key] for r in rows)
    p = sum(r[num][key] for r in rows)
    return p / s if s else None


class TextStore:
    """A growing ``key -> generated text`` JSON file: a re-run generates only the keys it lacks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.texts: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, keys: Sequence[str], make: Callable[[list[str]], list[str]]) -> list[str]:
        missing = [k for k in dict.fromkeys(keys) if k not in self.texts]
        if missing:
            self.texts.update(zip(missing, make(missing), strict=True))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.texts))
        return [self.texts[k] for k in keys]


def generation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, as a fraction like the paper's 0.13) and mean ROUGE-1 / ROUGE-L F1."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need equally many hypotheses and references (> 0), got {len(hypotheses)}, {len(references)}")
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score / 100.0
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references, strict=True)]
    return {
        "bleu": bleu,
        "rouge1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
        "rougeL": sum(s["rougeL"].fmeasure for s in scores) / len(scores),
    }


def confusion(truth: Sequence[str], chosen: Sequence[str], labels: Sequence[str]) -> dict[str, dict[str, int]]:
    """``matrix[true][chosen]`` counts over ``labels`` (every pair present, zeros included); a choice
    outside ``labels`` (e.g. "base") gets a column of its own."""
    if len(truth) != len(chosen):
        raise ValueError(f"need one choice per user, got {len(chosen)} for {len(truth)}")
    columns = list(dict.fromkeys([*labels, *chosen]))
    matrix = {t: dict.fromkeys(columns, 0) for t in dict.fromkeys([*labels, *truth])}
    for t, c in zip(truth, chosen, strict=True):
        matrix[t][c] += 1
    return matrix


def hubness(chosen: Sequence[str], candidates: Sequence[str]) -> dict:
    """How unevenly choices fall on the candidates: users attracted per candidate (zeros included), the
    largest share one candidate attracts, and the skewness of those counts (the k-occurrence skewness
    of hubness studies; 0 when every candidate attracts equally many, large when a few attract most).

    Why: a selector whose distances favour a few central pLLMs ("hubs") looks fine on its hubs' users
    and fails everyone else; accuracy alone hides which."""
    counts = dict.fromkeys(candidates, 0)
    for c in chosen:
        counts[c] = counts.get(c, 0) + 1
    values = list(counts.values())
    n = len(values)
    mean = sum(values) / n if n else 0.0
    var = sum((v - mean) ** 2 for v in values) / n if n else 0.0
    skew = sum((v - mean) ** 3 for v in values) / n / var**1.5 if var > 0 else 0.0
    return {"attracted": counts, "max_share": max(values) / len(chosen) if chosen else 0.0, "skewness": skew}
