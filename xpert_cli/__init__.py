"""`xpert ...`: the command-line entry point. Each command is a small function over the library.

The top layer (``[tool.importlinter]`` in pyproject.toml): the one package that drives ``simulations``,
so it lives outside the framework-free method package ``xpert_fl``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from xpert_fl.cache import CacheError
from xpert_fl.data.corpus import BUILTIN, NEUTRAL, CorpusError, corpus_stats, load_corpus
from xpert_fl.models import DEFAULT_SPEC, LoadOptions, ModelLoadError, convert_embedded, load_model
from xpert_fl.select import DISTANCES


def _options(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(dtype=args.dtype, device=args.device, threads=args.threads)


def cmd_models(args: argparse.Namespace) -> int:
    """Resolve a model spec, load it, and report source, load time and size."""
    if args.reconvert:
        convert_embedded(args.spec, force=True)
    loaded = load_model(args.spec, _options(args))
    info = {
        "spec": loaded.spec,
        "source": loaded.source,
        "load_seconds": round(loaded.load_seconds, 2),
        "parameters": loaded.num_parameters(),
        "dtype": str(next(loaded.model.parameters()).dtype),
        "vocab_size": len(loaded.tokenizer),
        "fingerprint": loaded.fingerprint,
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>13}: {value}")
    return 0


def cmd_corpus_show(args: argparse.Namespace) -> int:
    """Print styles, counts, word statistics and one example per style."""
    corpus = load_corpus(args.corpus)
    stats = corpus_stats(corpus)
    print(f"corpus {corpus.name}: {len(corpus.styles)} styles + {NEUTRAL}")
    print(f"{'style':<18}{'samples':>8}{'words':>8}{'min':>6}{'max':>6}{'prompts':>9}")
    for style, st in stats.items():
        print(f"{style:<18}{st['samples']:>8}{st['words']:>8}{st['min_words']:>6}{st['max_words']:>6}"
              f"{st['with_prompt']:>9}")
    if corpus.levels:
        print("ordered levels: " + " < ".join(corpus.levels))
    if args.examples:
        for style, samples in {**corpus.styles, NEUTRAL: corpus.neutral}.items():
            s = samples[0]
            print(f"\n[{style}] {s.prompt or '(no prompt)'}\n  {s.response}")
    return 0


def _finetune_config(args: argparse.Namespace):
    from xpert_fl.finetune import FinetuneConfig

    return FinetuneConfig(max_steps=args.max_steps, lr=args.lr, rank=args.rank, batch_size=args.batch_size,
                          max_seq_len=args.max_seq_len, seed=args.seed)


def cmd_cache_build(args: argparse.Namespace) -> int:
    """Fine-tune one pLLM per style of a corpus at a similarity and add them to a cache (resumable)."""
    from xpert_fl.production import build_cache

    base = load_model(args.spec)
    corpus = load_corpus(args.corpus)
    entries = build_cache(base, corpus, args.similarity, args.out, _finetune_config(args),
                          styles=args.styles, n_train=args.n_train, seed=args.seed)
    _print_entries(entries)
    return 0


def cmd_cache_list(args: argparse.Namespace) -> int:
    """List the pLLMs of a cache with their labels, sizes and explanations."""
    from xpert_fl.cache import PLLMCache

    _print_entries(PLLMCache(args.cache).entries())
    return 0


def _print_entries(entries) -> None:
    print(f"{'id':<22}{'label':<14}{'sim':>5}{'loss':>7}{'KiB':>7}  explanation")
    for e in entries:
        m = e.metrics
        loss = m.get("best_test_loss")
        print(f"{e.id:<22}{(e.label or '-'):<14}{m.get('similarity', '-'):>5}"
              f"{(f'{loss:.3f}' if loss is not None else '-'):>7}{e.size_bytes // 1024:>7}  {e.explanation or '-'}")


def _method(args: argparse.Namespace):
    """Base model, summarizer and probe settings shared by explain and select (one model load)."""
    from xpert_fl.explain import ProbeConfig
    from xpert_fl.summarizer import Summarizer, SummarizerConfig

    base = load_model(args.spec)
    summ_model = base if args.summarizer in (None, args.spec) else load_model(args.summarizer)
    summarizer = Summarizer(summ_model, SummarizerConfig())
    return base, summarizer, ProbeConfig(max_new_tokens=args.max_new_tokens)


def cmd_explain(args: argparse.Namespace) -> int:
    """Server side: probe and explain the cache's pLLMs; grow and save the common basis."""
    from xpert_fl.basis import report
    from xpert_fl.cache import PLLMCache
    from xpert_fl.data import split_roles
    from xpert_fl.explain import (
        Explainer,
        calibrate_users,
        explain_cache,
        human_references,
        open_basis,
        unexplained,
    )
    from xpert_fl.probe import probe_set
    from xpert_fl.production import cloud_reports

    base, summarizer, probe = _method(args)
    cache = PLLMCache(args.cache)
    corpus = load_corpus(args.corpus)
    basis = open_basis(cache.root, summarizer, args.tau_orth, args.tau_res, args.orthogonalize, args.complete)
    test = split_roles(corpus)["test"]  # held out from every pLLM and user, as the server's
    probes = probe_set(args.probe_prompts, test)
    explainer = Explainer(base, summarizer, probes.prompts, probe, chat=probes.chat)
    calibrate_users(basis, explainer, human_references(test, probes.prompts), args.human_weight)
    start = time.perf_counter()
    pending = unexplained(cache)
    decs = explain_cache(cache, explainer, basis, reports=cloud_reports(summarizer, base.tokenizer, corpus, pending))
    seconds = time.perf_counter() - start
    _print_entries(cache.entries())
    print(f"\nbasis: {basis.size} words ({', '.join(basis.words[:12])}{' ...' if basis.size > 12 else ''})")
    if decs:
        print(f"explained {len(decs)} pLLM(s) in {seconds:.1f}s ({seconds / len(decs):.1f}s each); "
              f"{json.dumps(report(list(decs.values())))}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    """Device side: coordinates of the user's own data on the received basis -> the choice."""
    import numpy as np

    from xpert_fl.basis import Basis
    from xpert_fl.cache import PLLMCache
    from xpert_fl.data.corpus import read_samples
    from xpert_fl.explain import BASIS_FILE, user_coordinates
    from xpert_fl.select import select

    base, summarizer, probe = _method(args)
    cache = PLLMCache(args.cache)
    basis = Basis.load(args.basis or cache.root / BASIS_FILE, expect_summarizer=summarizer.fingerprint)
    coords = {e.id: np.asarray(e.coords) for e in cache.entries() if e.coords is not None}
    if not coords:
        raise ValueError(f"no explained pLLM in {cache.root}: run `xpert explain --cache {cache.root}` first")
    mine = user_coordinates(base, summarizer, basis, read_samples(args.data), probe)
    choice = select(mine.coords, coords, args.delta, size=basis.size, gram=basis.metric(args.distance))
    print(f"your data:  {mine.text}")
    by_id = {e.id: e for e in cache.entries()}
    for i, w in zip(choice.ids, choice.weights, strict=True):
        print(f"choice:     {choice.kind} {i} (weight {w:.2f}, label {by_id[i].label}): {by_id[i].explanation}")
    if choice.kind == "base":
        print("choice:     base model (empty cache)")
    for i, d in sorted(choice.distances.items(), key=lambda kv: kv[1]):
        print(f"  {args.distance} {d:8.3f}  {i}  {by_id[i].label or '-'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default, end to end (see simulations/quickstart.py)."""
    from simulations.quickstart import QuickstartConfig, print_table, run

    cfg = QuickstartConfig(spec=args.spec, out=args.out)
    rows = run(cfg)
    print_table(rows)
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    print(f"\nselection accuracy {summary['accuracy']:.2f} over {len(rows)} users; basis of {summary['basis_size']}"
          f" words; {summary['seconds']:.0f}s in all; results in {cfg.out}/")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """The main job as a Flower simulation: cloud pLLMs, then users building on uploads (simulations/simulate.py)."""
    from flwr.common.config import parse_config_args

    from simulations.simulate import SimulateConfig, simulate

    cfg = SimulateConfig(out=args.out, spec=args.spec, num_users=args.users, seed=args.seed, resume=args.resume,
                         cloud_styles=tuple(args.cloud_styles), cloud_steps=args.cloud_steps, threads=args.threads,
                         run_config=parse_config_args(args.run_config))
    simulate(cfg)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """One experiment of the suite (simulations/experiments): JSON + CSV + PNG under --out."""
    from simulations.experiments import load
    from simulations.experiments.bench import Workbench
    from simulations.experiments.runner import Context, parse_overrides, preset, run

    module = load(args.name)
    ctx = Context(name=args.name, out=Path(args.out), config=preset(module, args.config, parse_overrides(args.set)),
                  config_name=args.config + (" " + " ".join(args.set) if args.set else ""),
                  corpus=args.corpus or getattr(module, "CORPUS", "builtin"),
                  seed=args.seed, source_cache=Path(args.cache) if args.cache else None,
                  work=Path(args.work) if args.work else None, summarizers=tuple(args.summarizer),
                  threads=args.threads)
    run(module, ctx, Workbench)
    return 0


def _human_weight(value: str) -> float:
    from xpert_fl.basis import parse_human_weight

    try:
        return parse_human_weight(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xpert", description="XPerT on Flower: explainable pLLM selection.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--spec", default=DEFAULT_SPEC, help="embedded name, local checkpoint dir or HF id")
        p.add_argument("--dtype", default="float32", help="float32 (default on CPU), bfloat16, float16")
        p.add_argument("--device", default="cpu")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")

    p = sub.add_parser("models", help="resolve a model spec and report how it loads")
    model_args(p)
    p.add_argument("--reconvert", action="store_true", help="redo the GGUF conversion of an embedded model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("corpus", help="inspect style corpora")
    corpus_sub = p.add_subparsers(dest="corpus_command", required=True)
    p = corpus_sub.add_parser("show", help="styles, counts and an example per style")
    p.add_argument("--corpus", default="builtin", help=f"a corpus directory or one of: {', '.join(BUILTIN)}")
    p.add_argument("--no-examples", dest="examples", action="store_false")
    p.set_defaults(func=cmd_corpus_show)

    def finetune_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-steps", type=int, default=40)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--rank", type=int, default=8)
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--max-seq-len", type=int, default=192)
        p.add_argument("--seed", type=int, default=0)

    def method_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--spec", default=DEFAULT_SPEC, help="base model spec")
        p.add_argument("--summarizer", default=None, help="summarizer model spec (default: the base model)")
        p.add_argument("--max-new-tokens", type=int, default=48, help="probe answer length")

    p = sub.add_parser("cache", help="build and inspect pLLM caches")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    p = cache_sub.add_parser("build", help="fine-tune one pLLM per style at a similarity into a cache")
    p.add_argument("--corpus", default="builtin", help=f"a corpus directory or one of: {', '.join(BUILTIN)}")
    p.add_argument("--similarity", type=float, default=0.9, help="fraction of styled samples (paper §7)")
    p.add_argument("--out", required=True, help="cache directory (created if missing)")
    p.add_argument("--styles", nargs="*", default=None, help="default: every style of the corpus")
    p.add_argument("--n-train", type=int, default=None, help="training samples per pLLM (default: all)")
    p.add_argument("--spec", default=DEFAULT_SPEC)
    finetune_args(p)
    p.set_defaults(func=cmd_cache_build)
    p = cache_sub.add_parser("list", help="list a cache's pLLMs")
    p.add_argument("--cache", required=True)
    p.set_defaults(func=cmd_cache_list)

    p = sub.add_parser("explain", help="server side: probe + explain a cache's pLLMs, growing the basis")
    p.add_argument("--cache", required=True)
    p.add_argument("--probe-prompts", type=int, default=24, help="paper: 50")
    p.add_argument("--tau-orth", type=float, default=0.1)
    p.add_argument("--tau-res", type=float, default=0.2)
    p.add_argument("--orthogonalize", action="store_true", help="Gram-Schmidt the basis (exact coordinates)")
    p.add_argument("--no-complete", dest="complete", action="store_false",
                   help="paper's Algorithm 1 only: no residual word when candidate words run out")
    p.add_argument("--corpus", default="builtin",
                   help="probe prompts and neutral human answers come from its held-out test role")
    p.add_argument("--human-weight", type=_human_weight, default=1.0,
                   help="share of the users' reference (the embedding of neutral human texts) devices remove "
                        "from their vector (default 1; 0: none)")
    method_args(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("select", help="device side: choose a pLLM for your data from a basis + coordinates")
    p.add_argument("--cache", required=True, help="where the explained coordinates come from")
    p.add_argument("--basis", default=None, help="basis file (default: the cache's)")
    p.add_argument("--data", required=True, help="your data: a JSONL file of {prompt, response} lines")
    p.add_argument("--delta", type=float, default=float("inf"), help="merge when the best distance exceeds this")
    p.add_argument("--distance", choices=DISTANCES, default="drift",
                   help="drift: Euclidean between the explained drifts (default); l1: the paper's Eq. 1")
    method_args(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("demo", help="run the main job end to end on the embedded default")
    p.add_argument("--spec", default=DEFAULT_SPEC)
    p.add_argument("--out", default="results/quickstart", help="results folder")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("simulate", help="the main job as a Flower simulation (cloud pLLMs, then users over rounds)")
    p.add_argument("--out", default="results/simulate", help="results folder")
    p.add_argument("--spec", default=DEFAULT_SPEC)
    p.add_argument("--users", type=int, default=4, help="virtual users (simulated SuperNodes)")
    p.add_argument("--cloud-styles", nargs="+", default=["sarcastic", "poetic", "expert"])
    p.add_argument("--cloud-steps", type=int, default=20, help="fine-tuning steps per cloud pLLM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (server, each device)")
    p.add_argument("--resume", action="store_true", help="start from the cache the previous run left")
    p.add_argument("--run-config", action="append", default=[],
                   help='run-config overrides (pyproject keys), e.g. "num-server-rounds=3 users-per-round=1"')
    p.set_defaults(func=cmd_simulate)

    from simulations.experiments import names

    p = sub.add_parser("experiment", help="run one experiment of the paper's §7 (JSON + CSV + PNG)",
                       description="Experiments: " + ", ".join(names()) + ". See simulations/README.md.")
    p.add_argument("name", choices=names())
    p.add_argument("--out", required=True, help="results folder (<name>.json/.csv/.png)")
    p.add_argument("--corpus", default=None, help=f"a corpus directory or one of: {', '.join(BUILTIN)} "
                   "(default: builtin; builtin-levels for latent-space)")
    p.add_argument("--config", default="small", choices=["small", "full"],
                   help="small: minutes on a 2-core CPU; full: the paper-sized run for a GPU machine")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set similarities=0.5,0.9 --set users_per_style=2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="an existing pLLM cache to start from (copied, never written)")
    p.add_argument("--work", default=None, help="generations/drifts/working cache (default: <out>/work)")
    p.add_argument("--summarizer", action="append", default=[], metavar="SPEC",
                   help="summarizer model spec(s) for summarizer-size (default: the embedded model)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    p.set_defaults(func=cmd_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelLoadError, CorpusError, CacheError, ValueError, KeyError, OSError) as err:
        print(f"xpert: error: {err}", file=sys.stderr)
        return 2
