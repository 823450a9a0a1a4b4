"""`xpert ...`: the command-line entry point. Each command is a small function over the library."""

from __future__ import annotations

import argparse
import json
import sys
import time

from xpert_fl.data.corpus import BUILTIN, NEUTRAL, CorpusError, corpus_stats, load_corpus
from xpert_fl.models import DEFAULT_SPEC, LoadOptions, ModelLoadError, convert_embedded, load_model


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


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default, end to end, as far as the product goes today."""
    print(f"== model: {args.spec}")
    start = time.perf_counter()
    loaded = load_model(args.spec)
    print(f"loaded from {loaded.source} in {loaded.load_seconds:.1f}s "
          f"({loaded.num_parameters() / 1e6:.0f}M parameters)")
    print("\n== built-in corpus")
    cmd_corpus_show(argparse.Namespace(corpus="builtin", examples=False))
    print(f"\ndemo finished in {time.perf_counter() - start:.1f}s")
    return 0


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

    p = sub.add_parser("demo", help="run the main job end to end on the embedded default")
    p.add_argument("--spec", default=DEFAULT_SPEC)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelLoadError, CorpusError, ValueError, KeyError) as err:
        print(f"xpert: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
