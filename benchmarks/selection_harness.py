"""The selection evaluation harness: every method, over a list of corpora, through the product's path.

For each corpus, the experiment workbench (``simulations.experiments.bench.Workbench``) trains one
pLLM per style at each similarity (cloud role; resumable), explains them as the server does (the
product's summarizer, basis and probe settings, read from the run config in pyproject.toml), and hands
every user (disjoint samples of one style from the user role: independent users, no shared texts) to
every method through the ``xpert_fl.baselines`` selectors, the same objects the Flower devices run.
Device seconds and bytes come from those selectors' meters.

Writes, per corpus, ``<out>/<corpus>.json`` (per-user choices, accuracy with Wilson CIs, confusion
matrix and hubness per method and similarity, device seconds and bytes) and ``<corpus>.png``
(confusion matrices and users attracted per pLLM), then ``<out>/summary.json`` + ``summary.png``
(accuracy per corpus and method) and prints a Markdown table. Every result names the corpora each
default parameter was chosen on (:data:`DEVELOPMENT`), so a number on a corpus it was tuned on is
never mistaken for one on a corpus it was not.

Generations, drifts and pLLMs are cached under ``--work``; rows are appended to
``<work>/<corpus>/rows.jsonl`` as they are measured, so an interrupted run continues where it stopped
and result files are written whole (temp file, then rename) or not at all.

    python benchmarks/real_corpora.py       # builds the real corpora under benchmarks/results/corpora
    python benchmarks/selection_harness.py --corpora builtin benchmarks/results/corpora/debian-fortunes \\
        benchmarks/results/corpora/debian-dictionaries
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from protocol.run_config import pyproject_defaults  # noqa: E402
from simulations.experiments.bench import Workbench, slug  # noqa: E402
from simulations.experiments.runner import Context, ExperimentConfig  # noqa: E402
from xpert_fl.data.corpus import load_corpus  # noqa: E402
from xpert_fl.data.mixing import split_roles  # noqa: E402
from xpert_fl.evaluation import confusion, hubness, wilson  # noqa: E402
from xpert_fl.explain import trusted_drift  # noqa: E402
from xpert_fl.files import atomic_write_text  # noqa: E402

METHODS = ("xpert", "text-encoder", "random", "exhaustive", "oracle")
LOSS_METHODS = ("exhaustive", "bo", "hyperband")  # evaluate pLLMs' losses on the device: minutes per user
# Which corpora each default parameter of the product's selection was chosen on. A result on one of
# these corpora is a development figure; only the others say whether the default carries.
DEVELOPMENT = {
    "summarizer layer, whitening texts, probe prompts (pre-2026-12)": ["builtin"],
    "users' reference (neutral human texts' embedding, not paired base texts)": ["debian-fortunes"],
    "openings as probes for prompt-less corpora": ["debian-fortunes"],
    "sentence-encoder embedding; pLLMs placed by their training data (self-reports, cloud data)": ["debian-fortunes"],
    "self-report-min-cosine": ["debian-fortunes"],
}


class HarnessError(ValueError):
    """A corpus cannot supply what was asked (names the style, what it supports and what to lower)."""


def run_config() -> dict:
    """The product's run-config defaults (pyproject.toml), the one source of the probe settings."""
    return pyproject_defaults(ROOT / "pyproject.toml")


def check_capacity(corpus_dir: str, styles: list[str], users_per_style: int, samples: int, seed: int) -> None:
    """Fail before any training when a style's user role cannot give every user disjoint samples."""
    roles = split_roles(load_corpus(corpus_dir), seed=seed)
    for style in styles:
        have = len(roles["user"].styles.get(style, []))
        if have < users_per_style * samples:
            fixes = [f"--users-per-style to {have // samples}"] if have >= samples else []
            fixes += [f"--user-samples to {have // users_per_style}"] if have >= users_per_style else []
            raise HarnessError(
                f"corpus {corpus_dir}: style {style!r} has {have} user-role samples, enough for "
                f"{have // samples} users of {samples} samples, not {users_per_style}; lower "
                + " or ".join(fixes + ["give the style more text"])
            )


def evaluate(corpus: str, args: argparse.Namespace) -> dict:
    """Every method on every user of one corpus, at each similarity; resumable through rows.jsonl."""
    t0 = time.perf_counter()
    rc = run_config()
    styles = list(load_corpus(corpus).styles)
    plan = [(s, args.users_per_style if s == args.similarities[0] else args.small_users_per_style)
            for s in args.similarities]
    check_capacity(corpus, styles, max(n for _, n in plan), args.user_samples, args.seed)
    config = ExperimentConfig(
        styles=tuple(styles), similarities=tuple(args.similarities), users_per_style=max(n for _, n in plan),
        user_samples=args.user_samples, probe_prompts=args.probe_prompts or rc["num-probe-prompts"],
        probe_tokens=args.probe_tokens or rc["probe-max-new-tokens"],
        pllm_steps=args.pllm_steps, methods=tuple(args.methods), human_weight=float(rc["human-weight"]),
    )
    name = slug(Path(corpus).name)
    work = Path(args.work) / name
    ctx = Context(name="selection-harness", out=Path(args.out), config=config, corpus=corpus, seed=args.seed,
                  work=work, source_cache=Path(args.cache_from) / name if args.cache_from else None,
                  threads=args.threads)
    bench = Workbench(ctx)  # loads models and opens the working cache; no row is read or written yet
    _check_resume(work, {"probe_prompts": config.probe_prompts, "probe_tokens": config.probe_tokens,
                         "pllm_steps": config.pllm_steps, "user_samples": config.user_samples, "seed": args.seed,
                         "human_weight": config.human_weight, "summarizer": bench.summarizer().fingerprint})
    entries = {s: bench.pllms(s) for s, _ in plan}
    basis = bench.explain([e for es in entries.values() for e in es])
    checks = report_checks(bench, basis, [e for es in entries.values() for e in es], args.seed)
    users = bench.users()
    label = {e.id: e.label for e in bench.cache.entries()}
    done_path = work / "rows.jsonl"
    done = [json.loads(line) for line in done_path.read_text().splitlines()] if done_path.is_file() else []
    have = {(r["similarity"], r["user"], r["method"]) for r in done}
    rows = list(done)
    with done_path.open("a") as log:
        for s, n in plan:
            chosen_users = [u for u in users if int(u.name.rsplit("#", 1)[1]) < n]
            for k, user in enumerate(chosen_users):
                skip_loss = int(user.name.rsplit("#", 1)[1]) >= args.loss_users_per_style
                for method in args.methods:
                    if (s, user.name, method) in have or (method in LOSS_METHODS and skip_loss):
                        continue
                    sel = bench.select(method, user, entries[s])
                    row = {"similarity": s, "user": user.name, "style": user.label, "method": method,
                           "chosen": sel.chosen, "chosen_style": label.get(sel.chosen or "", "base"),
                           "correct": sel.chosen is not None and label.get(sel.chosen) == user.label,
                           "bytes_down": sel.bytes_down, "device_seconds": sel.seconds,
                           "evaluations": sel.evaluations}
                    rows.append(row)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                print(f"  {name} s={s:g} user {k + 1}/{len(chosen_users)} {user.name}: " + ", ".join(
                    f"{r['method']}->{r['chosen_style']}" for r in rows if r["user"] == user.name
                    and r["similarity"] == s), flush=True)
    result = summarize(name, corpus, rows, styles, plan, args, time.perf_counter() - t0)
    result["self_report_check"] = checks
    return result


def report_checks(bench: Workbench, basis, entries, seed: int) -> dict:
    """The self-report check (``explain.trusted_drift``) on this corpus's pLLMs as if each had been
    uploaded: the cosine of an honest report (the embedding of its training data) with the pLLM's own
    probe answers, beside forged ones (a random unit vector, the honest report negated, another
    pLLM's report) and whether the run config's threshold accepts each."""
    summarizer = bench.summarizer()
    reports = bench.cloud_reports(entries)
    threshold = float(run_config()["self-report-min-cosine"])
    rng = np.random.default_rng(seed)
    out = {"threshold": threshold, "pllms": {}}
    ids = [e.id for e in entries if e.id in reports]
    for e in entries:
        if e.id not in reports:
            continue
        probe = bench.pllm_drift(bench.cache.load_adapter(e.id), summarizer)
        forged = {"honest": reports[e.id], "random": rng.standard_normal(summarizer.dim).astype(np.float32),
                  "negated": -reports[e.id], "another pLLM's": reports[ids[(ids.index(e.id) + 1) % len(ids)]]}
        row = {}
        for kind, vector in forged.items():
            used, cosine = trusted_drift(probe, vector, basis, threshold)
            row[kind] = {"cosine": cosine, "accepted": used is not probe}
        out["pllms"][f"{e.label}@{e.metrics.get('similarity')}"] = row
    for kind in ("honest", "random", "negated", "another pLLM's"):
        rows = [r[kind] for r in out["pllms"].values()]
        out[f"{kind} accepted"] = f"{sum(r['accepted'] for r in rows)}/{len(rows)}"
    return out


def _check_resume(work: Path, setting: dict) -> None:
    """Rows measured under one setting must not be mixed with another's: the work dir keeps its setting
    and a run with a different one is refused, naming what differs."""
    path = work / "setting.json"
    if path.is_file():
        had = json.loads(path.read_text())
        differ = {k: (had.get(k), v) for k, v in setting.items() if had.get(k) != v}
        if differ:
            what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
            raise HarnessError(f"{work} holds rows measured with another setting ({what}); pass another --work")
        return
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(setting))


def summarize(name: str, corpus: str, rows: list[dict], styles: list[str], plan, args, seconds: float) -> dict:
    """Accuracy (Wilson CI), confusion, hubness and device costs per similarity and method."""
    out: dict = {}
    for s, _ in plan:
        for method in args.methods:
            sel = [r for r in rows if r["similarity"] == s and r["method"] == method]
            k = sum(r["correct"] for r in sel)
            truth, chosen = [r["style"] for r in sel], [r["chosen_style"] for r in sel]
            out.setdefault(str(s), {})[method] = {
                "n": len(sel), "correct": k, "accuracy": k / len(sel) if sel else math.nan, "ci95": wilson(k, len(sel)),
                "confusion": confusion(truth, chosen, styles), "hubness": hubness(chosen, styles),
                "device_seconds_mean": float(np.mean([r["device_seconds"] for r in sel])) if sel else math.nan,
                "bytes_down_mean": float(np.mean([r["bytes_down"] for r in sel])) if sel else math.nan,
            }
    return {"corpus": name, "path": corpus, "styles": styles, "chance": 1 / len(styles), "seconds": seconds,
            "development_corpora": DEVELOPMENT, "tuned_here": sorted(p for p, cs in DEVELOPMENT.items() if name in cs),
            "config": {k: v for k, v in vars(args).items() if k != "corpora"}, "run_config": run_config(),
            "results": out, "rows": rows}


def plot_corpus(result: dict, path: Path) -> None:
    """Confusion matrix per method (main similarity) and users attracted per pLLM."""
    s = next(iter(result["results"]))
    methods = list(result["results"][s])
    fig, axes = plt.subplots(2, len(methods), figsize=(3.2 * len(methods), 6.4), squeeze=False)
    for j, m in enumerate(methods):
        r = result["results"][s][m]
        rows = list(r["confusion"])
        cols = list(next(iter(r["confusion"].values())))
        mat = np.array([[r["confusion"][t][c] for c in cols] for t in rows])
        ax = axes[0][j]
        ax.imshow(mat, cmap="Blues")
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6)
        ax.set_yticks(range(len(rows)), rows if j == 0 else [], fontsize=6)
        ax.set_title(f"{m}: {r['accuracy']:.2f} (n={r['n']})", fontsize=8)
        att = r["hubness"]["attracted"]
        axes[1][j].bar(range(len(att)), list(att.values()))
        axes[1][j].axhline(r["n"] / len(result["styles"]), color="grey", ls="--", lw=1)
        axes[1][j].set_xticks(range(len(att)), list(att), rotation=90, fontsize=6)
        axes[1][j].set_title(f"users per pLLM (skew {r['hubness']['skewness']:.1f})", fontsize=8)
    fig.suptitle(f"{result['corpus']}, similarity {s}: confusion (true rows, chosen columns) and hubness", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(results: list[dict], path: Path) -> None:
    """Accuracy with 95% CI per corpus (groups) and method (bars), at each corpus's main similarity."""
    methods = list(dict.fromkeys(m for r in results for m in r["results"][next(iter(r["results"]))]))
    fig, ax = plt.subplots(figsize=(2.5 + 2.2 * len(results), 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals, lo, hi = [], [], []
        for r in results:
            v = r["results"][next(iter(r["results"]))].get(m, {"accuracy": 0.0, "ci95": (0.0, 0.0)})  # not run here
            vals.append(v["accuracy"])
            lo.append(max(0.0, v["accuracy"] - v["ci95"][0]))  # float rounding at 0 and 1
            hi.append(max(0.0, v["ci95"][1] - v["accuracy"]))
        ax.bar(np.arange(len(results)) + (j - (len(methods) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=2,
               label=m)
    ax.set_xticks(range(len(results)), [f"{r['corpus']}\n(n={r['results'][next(iter(r['results']))][methods[0]]['n']})"
                                        + ("\n[development]" if r["tuned_here"] else "") for r in results], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("selection accuracy (95% Wilson CI)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: list[dict]) -> str:
    lines = ["| corpus | similarity | texts / user | method | accuracy [95% CI] | n | device s / user | MB down / user "
             "| max share |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tag = f"{r['corpus']}{' (development)' if r['tuned_here'] else ''}"
        texts = r["config"]["user_samples"]
        for s, by_method in r["results"].items():
            for m, v in by_method.items():
                ci = f"[{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"
                lines.append(f"| {tag} | {s} | {texts} | {m} | {v['accuracy']:.3f} {ci} | "
                             f"{v['n']} | {v['device_seconds_mean']:.2f} | {v['bytes_down_mean'] / 1e6:.3f} | "
                             f"{v['hubness']['max_share']:.2f} |")
    checks = list({r["corpus"]: r for r in reversed(results) if r.get("self_report_check")}.values())[::-1]
    if checks:
        lines += ["", "Self-report check (``self-report-min-cosine``) on each corpus's pLLMs as if uploaded: reports "
                  "accepted, and the honest reports' cosine with the pLLM's own probe answers.", "",
                  "| corpus | threshold | honest | random vector | negated | another pLLM's | honest cosine |",
                  "|---|---|---|---|---|---|---|"]
        for r in checks:
            c = r["self_report_check"]
            cos = [p["honest"]["cosine"] for p in c["pllms"].values()]
            another = c["another pLLM's accepted"]
            lines.append(f"| {r['corpus']} | {c['threshold']} | {c['honest accepted']} | {c['random accepted']} | "
                         f"{c['negated accepted']} | {another} | {min(cos):.2f}-{max(cos):.2f} |")
    return "\n".join(lines)


def command(result: dict) -> str:
    """The command that measured a result (its non-default options included)."""
    c = result["config"]
    return (f"python benchmarks/selection_harness.py --corpora {result['path']} --methods {' '.join(c['methods'])} "
            f"--similarities {' '.join(str(s) for s in c['similarities'])} --users-per-style {c['users_per_style']} "
            f"--small-users-per-style {c['small_users_per_style']} --user-samples {c['user_samples']} "
            f"--loss-users-per-style {c['loss_users_per_style']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", nargs="+", default=["builtin"], help="built-in names or corpus directories")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--similarities", nargs="+", type=float, default=[0.9],
                    help="the first gets --users-per-style users, the others --small-users-per-style")
    ap.add_argument("--users-per-style", type=int, default=13, help="13 x 8 styles = 104 users")
    ap.add_argument("--small-users-per-style", type=int, default=4)
    ap.add_argument("--loss-users-per-style", type=int, default=1,
                    help="users per style given to the loss-evaluating methods (exhaustive, bo, hyperband)")
    ap.add_argument("--user-samples", type=int, default=8)
    ap.add_argument("--pllm-steps", type=int, default=40)
    ap.add_argument("--probe-prompts", type=int, default=0, help="0: the run config's num-probe-prompts")
    ap.add_argument("--probe-tokens", type=int, default=0, help="0: the run config's probe-max-new-tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="results/harness", help="caches: pLLMs, generations, drifts, rows")
    ap.add_argument("--cache-from", default=None, help="a folder of <corpus>/ pLLM caches to start from (copied)")
    ap.add_argument("--out", default="benchmarks/results/selection_harness")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for corpus in args.corpora:
            result = evaluate(corpus, args)
            atomic_write_text(out / f"{result['corpus']}.json", json.dumps(result, indent=1))
            plot_corpus(result, out / f"{result['corpus']}.png")
            results.append(result)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the summary covers every corpus evaluated into --out so far (a run may do one corpus at a time)
    done = {r["corpus"]: r for r in results}
    for path in sorted(out.glob("*.json")):
        if path.name != "summary.json" and path.stem not in done:
            done[path.stem] = json.loads(path.read_text())
    results = list(done.values())
    atomic_write_text(out / "summary.json", json.dumps([{k: v for k, v in r.items() if k != "rows"} for r in results],
                                                   indent=1))
    plot_summary(results, out / "summary.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
