"""Selection accuracy of XPerT on a corpus (issue: method core, item 8).

One pLLM per style at a similarity (cloud role, `xpert_fl.production.build_cache`), users holding
disjoint samples of one style (user role). Each user's drift is projected on the basis built over the
pLLMs (Algorithm 1) and the nearest pLLM (Eq. 1) is chosen; a choice is correct when the pLLM's
training style is the user's. Every summarizer variant is scored on the same pLLMs, probes and users,
both on basis coordinates (the method) and on the raw drift vectors (what the basis can at best keep).

    python benchmarks/selection_accuracy.py --similarity 0.9 --out benchmarks/results

`--loss-oracle` also finds, per user, the pLLM with the lowest loss on the user's own texts (what
exhaustive search would pick) and reports how often each route agrees with it: a "wrong" style can be
the better model when a pLLM did not learn its own style. `--max-steps` (pLLM training) and
`--max-new-tokens` (probe answer length) are the sensitivity knobs.

Users' drifts are moved onto the pLLMs' footing as the product does: the basis carries the server's
human offset ``h`` (the drift of the test role's neutral human answers, `explain.human_references`)
and devices remove `--human-weight` of it (`Basis.user_coordinates`; default: the share the pLLMs'
drifts lack, `Basis.fit_human_weight`). `--fit-weight` sweeps that weight, picks it on the users of
the first half of the shuffles and scores it on the second half.

Writes selection_accuracy_<corpus>_<sim>.json and .png. Probe/user generations (and oracle losses)
are cached in the work dir, so re-running with other variants only pays for the summarizer.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import cached_answers  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from xpert_fl.basis import AUTO, Basis, parse_human_weight, report  # noqa: E402
from xpert_fl.cache import PLLMCache  # noqa: E402
from xpert_fl.chat import chat_prompt  # noqa: E402
from xpert_fl.data import load_corpus, similarity_mixture, split_roles, user_samples  # noqa: E402
from xpert_fl.evaluation import wilson  # noqa: E402
from xpert_fl.explain import (  # noqa: E402
    SELF_REPORT_MIN_COSINE,
    ProbeConfig,
    adapter_answers,
    human_references,
    trusted_drift,
    user_drift,
)
from xpert_fl.finetune import FinetuneConfig, collate, encode, length_batches, pad_token_id, row_nll  # noqa: E402
from xpert_fl.models import load_model  # noqa: E402
from xpert_fl.probe import generate, probe_prompts  # noqa: E402
from xpert_fl.production import build_cache  # noqa: E402
from xpert_fl.select import nearest  # noqa: E402
from xpert_fl.summarizer import Summarizer, SummarizerConfig  # noqa: E402

VARIANTS = {
    "response-pool (default)": SummarizerConfig(),
    "response-pool, not whitened": SummarizerConfig(whiten=False),
    "paper-slot+null": SummarizerConfig(embedding="slot", calibrate=True),
    "paper-slot-raw": SummarizerConfig(embedding="slot", calibrate=False),
    "mean-pool+ref": SummarizerConfig(embedding="mean-pool", calibrate=True, layer=1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="builtin")
    ap.add_argument("--similarity", type=float, default=0.9)
    ap.add_argument("--user-samples", type=int, default=8)
    ap.add_argument("--users-per-style", type=int, default=3)
    ap.add_argument("--probe-prompts", type=int, default=21)
    ap.add_argument("--probes", choices=("test", "set"), default="test",
                    help="chat corpora: the corpus's held-out test prompts topped up from the built-in probe set "
                         "(as the server), or the built-in probe set alone")
    ap.add_argument("--user-seeds", type=int, default=1,
                    help="draw users from this many shuffles of the user role (disjoint within one shuffle; "
                         "users of different shuffles share texts, so their choices are not independent)")
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--styles", nargs="*", default=None, help="pLLM styles in build order (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when sharing the CPU)")
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=ProbeConfig.max_new_tokens, help="probe answer budget")
    ap.add_argument("--work", default="results/selection", help="generation cache")
    ap.add_argument("--cache", default=None, help="pLLM cache to build into / reuse (default: under --work)")
    ap.add_argument("--self-reported", type=int, default=24,
                    help="also score pLLM coordinates self-reported from this many of their training samples (0: off)")
    ap.add_argument("--loss-oracle", action="store_true",
                    help="also score choices against the pLLM with the lowest loss on each user's data")
    ap.add_argument("--human-weight", type=parse_human_weight, default=AUTO,
                    help="share of the human-vs-generated text offset users remove (Basis.human_weight): auto (what "
                         "the pLLMs' drifts lack of it, as the server computes it; default) or a number (0: none)")
    ap.add_argument("--fit-weight", action="store_true",
                    help="sweep the human weight: fit on the first half of the user shuffles, score on the rest")
    ap.add_argument("--paper-basis", action="store_true",
                    help="Algorithm 1 as published (no Gram-Schmidt, no residual completion)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    tag = f"{args.corpus.replace('/', '_')}_{args.similarity:g}"
    work = Path(args.work) / tag
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base = load_model()
    corpus = load_corpus(args.corpus)
    roles = split_roles(corpus, seed=args.seed)
    config = FinetuneConfig(max_steps=args.max_steps, max_seq_len=args.max_seq_len, eval_every=5, seed=args.seed)
    cache_dir = Path(args.cache) if args.cache else work / "cache"
    entries = build_cache(base, corpus, args.similarity, cache_dir, config, styles=args.styles, seed=args.seed)
    cache = PLLMCache(cache_dir)
    probe = ProbeConfig(max_new_tokens=args.max_new_tokens)
    chat = bool(corpus.neutral[0].prompt)

    # probe prompts never seen by any pLLM in training nor written by any user
    if chat:
        prompts = probe_prompts(args.probe_prompts, roles["test"] if args.probes == "test" else None, seed=args.seed)
    else:  # prompt-less corpus: probe with prefixes of held-out neutral text
        prompts = [" ".join(s.response.split()[:8]) for s in roles["test"].neutral][: args.probe_prompts]
    contexts = [chat_prompt(base.tokenizer, p) for p in prompts] if chat else prompts
    def answers(name: str, generate_missing) -> list[str]:  # a growing store per model, keyed by probe
        got = cached_answers(work / f"probe_{name}.json", prompts, generate_missing)
        return [got[p] for p in prompts]

    def base_texts(todo: list[str], chat_turn: bool) -> list[str]:  # a BaseAnswers over the probe store
        assert chat_turn == chat, "one corpus is all chat or all plain text"
        got = cached_answers(work / "probe_base.json", todo, lambda missing: generate(
            base.model, base.tokenizer, missing, probe.max_new_tokens, probe.batch_size, chat=chat))
        return [got[p] for p in todo]

    base_answers = base_texts(prompts, chat)
    references = human_references(roles["test"], prompts)
    pllm_answers = {e.id: answers(e.id, lambda todo, e=e: adapter_answers(
        base, cache.load_adapter(e.id), todo, probe, chat=chat)) for e in tqdm(entries, desc="probe")}

    styles = list(corpus.styles)
    users = [
        (style, f"{k}.{u}", user_samples(roles["user"], style, args.user_samples, user_index=u, seed=args.seed + k))
        for k in range(args.user_seeds)
        for style in styles
        for u in range(args.users_per_style)
    ]
    user_refs = _user_references(base, users, probe, work, chat)
    own = []  # self-reported: each pLLM's own training data, as its uploader would embed it
    if args.self_reported:
        own = [(e.label, 0, similarity_mixture(roles["cloud"], e.label, args.similarity, seed=args.seed)
                [: args.self_reported]) for e in entries]
        own_refs = _user_references(base, own, probe, work, chat, name="own")

    # the loss oracle: the pLLM that best predicts the user's own texts (what exhaustive search finds)
    by_loss = _loss_choices(base, cache, entries, users, config, work) if args.loss_oracle else None

    results = {"config": vars(args), "n_users": len(users), "n_pllms": len(entries), "chance": 1 / len(entries),
               "variants": {}}
    label = {e.id: e.label for e in entries}
    for name in args.variants:
        summarizer = Summarizer(base, VARIANTS[name])
        tv = time.perf_counter()
        drifts = {e.id: summarizer.drift(base_answers, _nonempty(pllm_answers[e.id]), contexts) for e in entries}
        basis = _basis(summarizer, args)
        decs = [basis.decompose(d.vector, d.candidates, summarizer.subvector) for d in drifts.values()]
        coords = dict(zip(drifts, basis.project_all([d.vector for d in drifts.values()]), strict=True))
        raw = {i: d.vector for i, d in drifts.items()}
        user_drifts = [summarizer.drift(*triple, candidates=False).vector
                       for triple in tqdm(user_refs, desc=f"{name}: users", leave=False)]
        # the server's human offset, measured as a device measures its drift (Explainer.human_offset)
        h = user_drift(base, summarizer, references, probe, base_answers=base_texts).vector
        basis.set_human_offset(h, args.human_weight or 0.0)
        if args.human_weight is None:
            basis.fit_human_weight(list(raw.values()))
        mine = [basis.user_coordinates(v) for v in user_drifts]
        routes = {  # route -> (the pLLMs' vectors, the users' vectors, Gram matrix: None = L1, Eq. 1)
            "basis": (coords, mine, None),
            "basis_drift": (coords, mine, basis.gram),
            "no_offset_drift": (coords, [basis.coordinates(v) for v in user_drifts], basis.gram),
            "raw": (raw, user_drifts, None),
            "raw_l2": (raw, user_drifts, np.eye(summarizer.dim)),
        }
        if own:
            # each pLLM's uploader reports the drift of its training data; the server trusts a report as
            # PLLMServer.ingest does (trusted_drift: cosine with its own probe drift), else keeps the probe
            reports = {e.id: summarizer.drift(*t, candidates=False).vector
                       for e, t in zip(entries, own_refs, strict=True)}
            checked = {i: trusted_drift(drifts[i], reports[i], summarizer) for i in drifts}
            cosines = {label[i]: {label[j]: _cosine(drifts[i].vector, reports[j]) for j in reports} for i in drifts}
            # as PLLMServer: a trusted report embeds human text, so it goes on the users' footing too
            own_drift = {i: d.vector if d is drifts[i] else basis.user_vector(d.vector)
                         for i, (d, _) in checked.items()}
            own_basis = _basis(summarizer, args)
            own_basis.set_human_offset(h, basis.human_weight)
            for i, (d, _) in checked.items():
                own_basis.decompose(own_drift[i], d.candidates, summarizer.subvector)
            own_coords = dict(zip(own_drift, own_basis.project_all(list(own_drift.values())), strict=True))
            verified = sum(d is not drifts[i] for i, (d, _) in checked.items())
            # a forged report (another pLLM's) that the same check would have let through
            forged = sum(c >= SELF_REPORT_MIN_COSINE for i, row in cosines.items() for j, c in row.items() if i != j)
            own_mine = [own_basis.user_coordinates(v) for v in user_drifts]
            routes["self"] = (own_coords, own_mine, None)
            routes["self_drift"] = (own_coords, own_mine, own_basis.gram)
        choices = {r: _choices(label, *spec) for r, spec in routes.items()}
        per_user = [{"style": style, "user": u, **{r: c[k] for r, c in choices.items()}}
                    for k, (style, u, _) in enumerate(users)]
        hits = {r: sum(c == style for c, (style, _, _) in zip(cs, users, strict=True)) for r, cs in choices.items()}
        n = len(users)
        if by_loss is not None:
            for u, best in zip(per_user, by_loss, strict=True):
                u["loss_oracle"] = best
            oracle = {"loss_oracle_accuracy": sum(b == s for b, (s, _, _) in zip(by_loss, users, strict=True)) / n,
                      **{f"{r}_agrees_with_loss_oracle": sum(map(str.__eq__, cs, by_loss)) / n
                         for r, cs in choices.items()}}
        results["variants"][name] = {
            "accuracy": hits["basis"] / n,
            "ci95": wilson(hits["basis"], n),
            "drift_distance_accuracy": hits["basis_drift"] / n,
            "drift_distance_ci95": wilson(hits["basis_drift"], n),
            "no_offset_drift_accuracy": hits["no_offset_drift"] / n,
            "no_offset_drift_ci95": wilson(hits["no_offset_drift"], n),
            "human_weight": basis.human_weight,
            "human_weight_auto": args.human_weight is None,
            "human_offset_norm_ratio": float(np.linalg.norm(h) / np.mean([np.linalg.norm(v) for v in user_drifts])),
            **({"weight_fit": _fit_weight(label, coords, basis, user_drifts, h, users, args)}
               if args.fit_weight else {}),
            "raw_drift_accuracy": hits["raw"] / n,
            "raw_ci95": wilson(hits["raw"], n),
            "raw_l2_accuracy": hits["raw_l2"] / n,
            "raw_l2_ci95": wilson(hits["raw_l2"], n),
            **({"self_reported_accuracy": hits["self"] / n,
                "self_reported_ci95": wilson(hits["self"], n),
                "self_reported_drift_accuracy": hits["self_drift"] / n,
                "self_reported_drift_ci95": wilson(hits["self_drift"], n),
                "self_reports_trusted": verified / len(entries),
                "other_pllms_reports_passing_the_check": forged / (len(entries) * (len(entries) - 1)),
                "probe_vs_report_cosines": cosines} if own else {}),
            **(oracle if by_loss is not None else {}),
            "basis_size": basis.size,
            "basis_words": basis.words,
            "residual_words": sorted(basis.residual_words),
            "table2": report(decs),
            "explanations": {label[i]: basis.explain(c) for i, c in coords.items()},
            "seconds": time.perf_counter() - tv,
            "per_user": per_user,
        }
        print(json.dumps({name: {k: v for k, v in results["variants"][name].items() if k != "per_user"}}), flush=True)
        results["seconds"] = time.perf_counter() - t0  # written after every variant: a long run keeps what it has
        (out / f"selection_accuracy_{tag}.json").write_text(json.dumps(results, indent=2))
        plot_accuracy(results, out / f"selection_accuracy_{tag}.png", tag)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _choices(label: dict, pllms: dict, users: list, gram) -> list[str]:
    """The style of the pLLM each user picks (Eq. 1 when ``gram`` is None, else the drift distance)."""
    return [label[nearest(v, pllms, gram=gram).ids[0]] for v in users]


WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))


def _fit_weight(label, coords, basis: Basis, user_drifts, h, users, args) -> dict:
    """Drift-distance accuracy per human weight on two halves of the users (shuffles < user_seeds/2 fit,
    the rest held out); the weight that fits best, and how it does on users it was not fitted on."""
    fit = [int(name.split(".")[0]) < args.user_seeds // 2 for _, name, _ in users]
    if all(fit) or not any(fit):
        raise SystemExit("--fit-weight needs --user-seeds >= 2 (one half to fit on, one to score)")
    styles = [style for style, _, _ in users]

    def accuracy(weight: float, half: bool) -> float:
        picks = [(c, s) for c, s, f in zip(
            _choices(label, coords, [basis.coordinates(v - weight * h) for v in user_drifts], basis.gram),
            styles, fit, strict=True) if f == half]
        return sum(c == s for c, s in picks) / len(picks)

    sweep = {w: {"fit": accuracy(w, True), "held_out": accuracy(w, False)} for w in WEIGHTS}
    best = max(WEIGHTS, key=lambda w: (sweep[w]["fit"], -w))  # ties: the smaller weight
    held = sum(not f for f in fit)
    return {"weights": sweep, "fitted_weight": best, "held_out_users": held,
            "held_out_accuracy": sweep[best]["held_out"],
            "held_out_ci95": wilson(round(sweep[best]["held_out"] * held), held),
            "held_out_accuracy_without_offset": sweep[0.0]["held_out"]}


def _loss_choices(base, cache, entries, users, config, work) -> list[str]:
    """Per user, the style of the pLLM with the lowest token-weighted NLL on the user's own samples.

    Per-sample (NLL, tokens) are stored in the work dir, so a re-run only evaluates new pLLMs/samples.
    """
    key = "{0.prompt}\n{0.response}".format  # one sample -> its row in the loss store
    samples = {key(s): s for _, _, ss in users for s in ss}
    pad = pad_token_id(base.tokenizer)

    def nlls(entry, keys):
        model = cache.load_adapter(entry.id).to_peft(copy.deepcopy(base.model))
        encoded = encode(base.tokenizer, [samples[k] for k in keys], config.max_seq_len)
        return _sample_nlls(model, encoded, pad)

    table = {e.label: cached_answers(work / f"loss_{e.id}.json", sorted(samples), lambda keys, e=e: nlls(e, keys))
             for e in tqdm(entries, desc="loss oracle", leave=False)}
    choices = []
    for _, _, ss in users:
        keys = [key(s) for s in ss]
        loss = {label: sum(t[k][0] for k in keys) / sum(t[k][1] for k in keys) for label, t in table.items()}
        choices.append(min(loss, key=loss.get))
    return choices


@torch.no_grad()
def _sample_nlls(model, encoded: list[dict], pad: int, batch_size: int = 8) -> list[list[float]]:
    """[summed completion NLL, completion tokens] per encoded sample, batched by length."""
    model.eval()
    out: list[list[float]] = [[]] * len(encoded)
    for idx in length_batches(encoded, batch_size):
        nll, n = row_nll(model, collate([encoded[i] for i in idx], pad))
        for i, a, b in zip(idx, nll.tolist(), n.tolist(), strict=True):
            out[i] = [a, b]
    return out


def _basis(summarizer: Summarizer, args) -> Basis:
    product = not args.paper_basis
    return Basis(dim=summarizer.dim, summarizer=summarizer.fingerprint, orthogonalize=product, complete=product)


def _user_references(base, users, probe, work, chat, name="user"):
    """(references, texts, contexts) per user: base answers to the user's prompts in the same chat turn
    (or base continuations of the same prefixes of the user's texts)."""
    from xpert_fl.explain import _split_text

    if chat:
        prompts = sorted({s.prompt for _, _, samples in users for s in samples})
        answers = cached_answers(
            work / f"{name}_base_answers.json", prompts,
            lambda todo: generate(base.model, base.tokenizer, todo, probe.max_new_tokens, probe.batch_size),
        )
        return [(_nonempty([answers[s.prompt] for s in samples]), [s.response for s in samples],
                 [chat_prompt(base.tokenizer, s.prompt) for s in samples]) for _, _, samples in users]
    splits = [[_split_text(s.response, probe.prefix_fraction) for s in samples] for _, _, samples in users]
    prefixes = sorted({p for sp in splits for p, _ in sp})
    conts = cached_answers(
        work / f"{name}_base_continuations.json", prefixes,
        lambda todo: generate(base.model, base.tokenizer, todo, probe.max_new_tokens, probe.batch_size, chat=False),
    )
    return [(_nonempty([conts[p] for p, _ in sp]), [r for _, r in sp], [p for p, _ in sp]) for sp in splits]


def _nonempty(texts):
    return [t if t.strip() else "(no answer)" for t in texts]


ROUTES = (  # (accuracy key, CI key, legend)
    ("accuracy", "ci95", "basis coordinates, Eq. 1 (L1)"),
    ("drift_distance_accuracy", "drift_distance_ci95", "basis coordinates, drift distance (default)"),
    ("no_offset_drift_accuracy", "no_offset_drift_ci95", "drift distance, users without the human offset"),
    ("raw_l2_accuracy", "raw_l2_ci95", "raw drift vectors (L2)"),
    ("self_reported_drift_accuracy", "self_reported_drift_ci95", "trusted self-reports (opt-in), drift distance"),
)


def plot_accuracy(results: dict, path: Path, tag: str) -> None:
    """Grouped bars: accuracy per route (with 95% CI) for each entry of ``results["variants"]``."""
    names = list(results["variants"])
    routes = [r for r in ROUTES if all(r[0] in results["variants"][n] for n in names)]
    fig, ax = plt.subplots(figsize=(5.0 + 2.2 * len(names), 4.2))
    x, width = np.arange(len(names)), 0.8 / len(routes)
    for j, (key, ci, lab) in enumerate(routes):
        vals = [results["variants"][n][key] for n in names]
        lo = [v - results["variants"][n][ci][0] for n, v in zip(names, vals, strict=True)]
        hi = [results["variants"][n][ci][1] - v for n, v in zip(names, vals, strict=True)]
        ax.bar(x + (j - (len(routes) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=3, label=lab)
    ax.axhline(results["chance"], color="grey", ls="--", label="chance")
    ax.axhline(0.96, color="black", ls=":", lw=1, label="goal (paper, 8B summarizer)")
    ax.set_xticks(x, names, rotation=10)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("selection accuracy")
    ax.set_title(f"{tag}: {results['n_users']} users, {results['n_pllms']} pLLMs (95% Wilson CI)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
