import json
import time

import numpy as np
import pytest

from xpert_cli import build_parser, main


def _commands(parser, prefix=()):
    """Every (sub)command path of the CLI."""
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


@pytest.mark.parametrize("command", [(), *_commands(build_parser())], ids=lambda c: " ".join(c) or "xpert")
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: xpert" in capsys.readouterr().out


def test_corpus_show(capsys):
    assert main(["corpus", "show", "--no-examples"]) == 0
    out = capsys.readouterr().out
    assert "8 styles + neutral" in out and "sarcastic" in out


def test_bad_corpus_is_a_clean_error(capsys, tmp_path):
    assert main(["corpus", "show", "--corpus", str(tmp_path)]) == 2
    assert "neutral.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize(("file", "content", "match"), [
    ("levels.json", b"5", "levels.json: expected a JSON list"),
    ("levels.json", b'["poetic",', "levels.json:1: not valid JSON"),
    ("poetic.jsonl", b'{"prompt": "", "response": "\xff"}\n', "poetic.jsonl:1: not UTF-8"),
])
def test_a_malformed_corpus_file_is_named_without_a_traceback(capsys, tmp_path, file, content, match):
    for style in ("neutral", "poetic"):
        (tmp_path / f"{style}.jsonl").write_text(json.dumps({"prompt": "", "response": "text"}) + "\n")
    (tmp_path / file).write_bytes(content)
    assert main(["corpus", "show", "--corpus", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xpert: error: ") and match in err and str(tmp_path) in err


def test_models_with_an_unknown_spec_offline_answers_at_once(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(["models", "--spec", "nope"]) == 2
    err = capsys.readouterr().err
    assert "model 'nope' is not an embedded model" in err and "HF_HUB_OFFLINE is set" in err
    assert time.perf_counter() - start < 5


def test_models_reports_the_converted_cache(base, capsys):
    assert main(["models", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"] == base.source and info["fingerprint"] == base.fingerprint
    assert info["parameters"] == base.num_parameters() and info["vocab_size"] == 49152


def test_missing_cache_is_a_clean_error(capsys, tmp_path):
    assert main(["cache", "list", "--cache", str(tmp_path / "none")]) == 2
    assert "no pLLM cache" in capsys.readouterr().err


def test_explain_then_select_from_the_command_line(base, tmp_path, capsys):
    """The server and device commands end to end on two tiny pLLMs: `xpert explain` grows the basis and
    gives it the human offset (measured on the corpus's test role); `xpert select` maps a user's JSONL
    data onto it and prints the choice."""
    from xpert_fl.basis import Basis
    from xpert_fl.cache import BaseInfo, PLLMCache
    from xpert_fl.data import load_corpus
    from xpert_fl.explain import BASIS_FILE
    from xpert_fl.finetune import FinetuneConfig, finetune

    corpus = load_corpus("builtin")
    cache = PLLMCache(tmp_path / "cache", BaseInfo.from_loaded(base))
    cfg = FinetuneConfig(max_steps=2, eval_every=2, max_seq_len=96, rank=4, seed=0)
    for style in ("sarcastic", "poetic"):
        s = corpus.styles[style]
        cache.add(finetune(base, s[:4], s[4:6], cfg, progress=False).adapter, label=style)
    small = ["--probe-prompts", "2", "--max-new-tokens", "8"]
    assert main(["explain", "--cache", str(cache.root), *small]) == 0
    out = capsys.readouterr().out
    assert "explained 2 pLLM(s)" in out and "basis:" in out
    basis = Basis.load(cache.root / BASIS_FILE)
    assert basis.human_weight == 1.0 and np.linalg.norm(basis.human_offset) > 0

    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": x.prompt, "response": x.response}) + "\n"
                            for x in corpus.styles["poetic"][20:22]))
    assert main(["select", "--cache", str(cache.root), "--data", str(data), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "your data:" in out and "choice:     single" in out and out.count("drift ") == 2
