"""The selection harness end to end on a tiny corpus: every method, resumable rows, files, results.md."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from xpert_fl.data import load_corpus, write_corpus
from xpert_fl.data.corpus import StyleCorpus

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    src = load_corpus("builtin")
    tiny = StyleCorpus("tiny", {s: src.styles[s][:40] for s in ("sarcastic", "poetic")}, src.neutral[:40])
    out = tmp_path_factory.mktemp("corpus") / "tiny"
    write_corpus(tiny, out)
    return out


def test_a_corpus_too_small_is_refused_before_training(tiny_corpus, tmp_path, capsys):
    harness = _load("selection_harness")
    args = ["--corpora", str(tiny_corpus), "--users-per-style", "50", "--work", str(tmp_path / "w"),
            "--out", str(tmp_path / "out")]
    assert harness.main(args) == 2
    err = capsys.readouterr().err
    assert "style 'poetic' has 12 user-role samples, enough for 1 users of 8 samples, not 50" in err
    assert "lower --users-per-style to 1 or give the style more text" in err
    assert not (tmp_path / "w").exists()  # nothing trained


def test_harness_end_to_end_on_a_tiny_corpus(tiny_corpus, tmp_path):
    harness = _load("selection_harness")
    args = ["--corpora", str(tiny_corpus), "--users-per-style", "3", "--user-samples", "2", "--pllm-steps", "1",
            "--probe-prompts", "2", "--probe-tokens", "6", "--loss-users-per-style", "1", "--threads", "2",
            "--methods", "xpert", "text-encoder", "random", "exhaustive", "oracle",
            "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")]
    assert harness.main(args) == 0
    result = json.loads((tmp_path / "out" / "tiny.json").read_text())
    by_method = result["results"]["0.9"]
    assert by_method["oracle"]["accuracy"] == 1.0 and by_method["oracle"]["n"] == 6
    assert by_method["exhaustive"]["n"] == 2  # one user per style for the loss-evaluating method
    for method, r in by_method.items():
        assert sum(sum(row.values()) for row in r["confusion"].values()) == r["n"], method
        assert sum(r["hubness"]["attracted"].values()) == r["n"]
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
    assert by_method["xpert"]["bytes_down_mean"] > 0 and by_method["exhaustive"]["bytes_down_mean"] > 0
    assert result["tuned_here"] == [] and result["development_corpora"]
    assert (tmp_path / "out" / "tiny.png").is_file() and (tmp_path / "out" / "summary.png").is_file()
    rows = (tmp_path / "w" / "tiny" / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 6 * 4 + 2

    # a rerun measures nothing again: every row is read back from rows.jsonl
    assert harness.main(args) == 0
    assert (tmp_path / "w" / "tiny" / "rows.jsonl").read_text().splitlines() == rows

    # rows of another setting are never mixed in
    assert harness.main([*args, "--probe-tokens", "7"]) == 2

    out = tmp_path / "results.md"
    _load("make_results_md").build(tmp_path / "no-experiments", out, tmp_path / "out")
    text = out.read_text()
    assert "Selection on human-written corpora" in text
    assert re.search(r"\| tiny \| 0\.9 \| \d+ \| oracle \| 1\.000", text)
