"""Selection accuracy by summarizer model (paper Fig. 13).

For every ``--summarizer SPEC`` (default: the embedded SmolLM2-135M; any spec ``models.load_model``
accepts: an embedded name, a local checkpoint directory, a Hugging Face id in the local cache), the
pLLMs' drifts, the basis (Algorithm 1) and the users' coordinates are recomputed with that summarizer,
and users are matched by Eq. 1. Generations (pLLM probe answers, the base model's answers) do not
depend on the summarizer and are shared. On a machine without other models only the embedded one runs.
"""

from __future__ import annotations

from pathlib import Path

from xpert_fl.models import DEFAULT_SPEC

from . import plots
from .runner import Outcome
from .selection_accuracy import accuracy_summary

NAME = "summarizer-size"
TITLE = "Selection accuracy by summarizer model (Fig. 13)"
SMALL = {"styles": (), "similarities": (0.9,)}
FULL = {"users_per_style": 3, "probe_prompts": 50, "pllm_steps": 60, "similarities": (0.5, 0.7, 0.9)}
ROW_KEYS = ("summarizer", "parameters", "similarity", "user", "style", "chosen_style", "correct")
PAPER = {
    "source": "Fig. 13 and §7.3 (no numbers in the text)",
    "finding": "Llama-3.2-1B as summarizer noticeably lowers accuracy; Llama-3.1-8B removes the loss; "
               "Llama-3.1-70B adds little.",
}


def run(bench) -> Outcome:
    cfg = bench.cfg
    users = bench.users()
    rows = []
    for spec in bench.ctx.summarizers or (DEFAULT_SPEC,):
        summarizer = bench.summarizer(spec)
        params = summarizer.loaded.num_parameters()
        for s in cfg.similarities:
            basis, _, coords = bench.fresh_basis(bench.pllm_drifts(bench.pllms(s), summarizer), summarizer)
            for u in users:
                chosen = bench.nearest_label(u, summarizer, basis, coords)
                rows.append({"summarizer": spec, "parameters": params, "similarity": s, "user": u.name,
                             "style": u.label, "chosen_style": chosen, "correct": chosen == u.label,
                             "basis_size": basis.size, "method": f"{spec} ({params / 1e6:.0f}M)"})
    return Outcome(rows, {"accuracy": accuracy_summary(rows), "chance": 1 / len(bench.styles), "n_users": len(users)},
                   ["Summarizers run: " + ", ".join(bench.ctx.summarizers or (DEFAULT_SPEC,)) + "."])


def plot(result: dict, path: Path) -> None:
    plots.accuracy_lines(result["summary"]["accuracy"], result["summary"]["chance"], "data similarity", TITLE, path)


def markdown(result: dict) -> str:
    acc = result["summary"]["accuracy"]
    sims = list(next(iter(acc.values())))
    rows = [[m, *(plots.pct_ci(acc[m][s]) for s in sims)] for m in acc]
    return plots.md_table(["summarizer (ours)", *(f"s = {s}" for s in sims)], rows) + \
        f"\nPaper: {result['paper']['finding']}\n"
