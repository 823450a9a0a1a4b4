import json

import pytest

from xpert_fl.cli import build_parser, main


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


def test_models_reports_the_converted_cache(base, capsys):
    assert main(["models", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"] == base.source and info["fingerprint"] == base.fingerprint
    assert info["parameters"] == base.num_parameters() and info["vocab_size"] == 49152


def test_missing_cache_is_a_clean_error(capsys, tmp_path):
    assert main(["cache", "list", "--cache", str(tmp_path / "none")]) == 2
    assert "no pLLM cache" in capsys.readouterr().err
