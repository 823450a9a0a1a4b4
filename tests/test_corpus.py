import json

import pytest

from xpert_fl.data import NEUTRAL, CorpusError, load_corpus, write_corpus
from xpert_fl.data.corpus import corpus_stats


def _write(dir_, name, rows):
    (dir_ / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _ok(dir_):
    _write(dir_, "neutral", [{"prompt": "p1", "response": "plain answer"}])
    _write(dir_, "poetic", [{"prompt": "p1", "response": "moonlit answer"}])


def test_builtin_corpus_is_valid_and_large_enough():
    corpus = load_corpus("builtin")
    assert len(corpus.styles) >= 8
    prompts = {s.prompt for s in corpus.neutral}
    assert len(prompts) >= 100
    for style, samples in corpus.styles.items():
        assert {s.prompt for s in samples} == prompts, style
        words = [len(s.response.split()) for s in samples]
        assert 25 <= min(words) and max(words) <= 80, style
    for expected in ("elementary", "expert", "concise", "informative", "sarcastic", "poetic"):
        assert expected in corpus.styles


def test_builtin_levels_are_ordered_styles():
    corpus = load_corpus("builtin-levels")
    assert len(corpus.levels) == 4 and set(corpus.levels) == set(corpus.styles)


def test_builtin_plain_corpus_has_no_prompts():
    corpus = load_corpus("builtin-plain")
    assert all(not s.prompt for samples in corpus.styles.values() for s in samples)
    assert min(corpus_stats(corpus)[st]["samples"] for st in corpus.styles) >= 30


def test_missing_neutral_file(tmp_path):
    _write(tmp_path, "poetic", [{"prompt": "", "response": "x"}])
    with pytest.raises(CorpusError, match="neutral.jsonl"):
        load_corpus(tmp_path)


def test_empty_style(tmp_path):
    _ok(tmp_path)
    (tmp_path / "sarcastic.jsonl").write_text("\n")
    with pytest.raises(CorpusError, match="'sarcastic' has no samples"):
        load_corpus(tmp_path)


def test_bad_json_line_reports_line_number(tmp_path):
    _ok(tmp_path)
    (tmp_path / "poetic.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    with pytest.raises(CorpusError, match=r"poetic.jsonl:2: not valid JSON"):
        load_corpus(tmp_path)


def test_undecodable_line_names_file_and_line(tmp_path):
    _ok(tmp_path)
    (tmp_path / "poetic.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(CorpusError, match=r"poetic.jsonl:2: not UTF-8 text"):
        load_corpus(tmp_path)


@pytest.mark.parametrize(("text", "match"), [
    ("5", r"levels.json: expected a JSON list of distinct style names, got 5"),
    ('["poetic", 3]', r"levels.json: expected a JSON list"),
    ('["poetic", "poetic"]', r"levels.json: expected a JSON list of distinct"),
    ('[\n"poetic",\n]', r"levels.json:3: not valid JSON"),
    ('["ghost"]', r"levels.json: levels \['ghost'\] have no style file"),
])
def test_bad_levels_file_names_the_file(tmp_path, text, match):
    _ok(tmp_path)
    (tmp_path / "levels.json").write_text(text)
    with pytest.raises(CorpusError, match=match):
        load_corpus(tmp_path)


def test_wrong_field_types(tmp_path):
    _ok(tmp_path)
    _write(tmp_path, "poetic", [{"prompt": 3, "response": "b"}])
    with pytest.raises(CorpusError, match="poetic.jsonl:1"):
        load_corpus(tmp_path)


def test_duplicate_style_names(tmp_path):
    _ok(tmp_path)
    _write(tmp_path, "Poetic", [{"prompt": "", "response": "b"}])
    with pytest.raises(CorpusError, match="duplicate style name 'poetic'"):
        load_corpus(tmp_path)


def test_no_style_besides_neutral(tmp_path):
    _write(tmp_path, "neutral", [{"prompt": "", "response": "b"}])
    with pytest.raises(CorpusError, match="no style files"):
        load_corpus(tmp_path)


def test_unknown_corpus_name():
    with pytest.raises(CorpusError, match="neither a directory nor a built-in"):
        load_corpus("no-such-corpus")


def test_write_then_load_round_trips(tmp_path):
    corpus = load_corpus("builtin-levels")
    write_corpus(corpus, tmp_path / "copy")
    again = load_corpus(tmp_path / "copy")
    assert again.styles == corpus.styles and again.neutral == corpus.neutral and again.levels == corpus.levels
    assert not list((tmp_path / "copy").glob(".*.tmp"))
    assert NEUTRAL not in again.styles


def test_hub_loader_fails_clearly_offline(monkeypatch):
    from xpert_fl.data.hub import HubUnavailableError, hub_corpus

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match="armanc/scientific_papers.*built-in corpus"):
        hub_corpus(["arxiv"], per_style=2)
    with pytest.raises(KeyError, match="unknown hub source"):
        hub_corpus(["no-such-source"])


def test_builtin_probe_set_is_disjoint_from_every_corpus_prompt():
    """The server never probes a pLLM on an instruction it trained on, nor on a user's own prompt."""
    from xpert_fl.probe import builtin_probe_set, probe_prompts

    probes = builtin_probe_set()
    assert len(probes) == 64 and len(set(probes)) == 64
    corpus_prompts = {s.prompt.strip().lower() for name in ("builtin", "builtin-levels")
                      for s in load_corpus(name).neutral}
    assert not {p.lower() for p in probes} & corpus_prompts
    assert probe_prompts(50) == probe_prompts(50) and set(probe_prompts(50)) < set(probes)
    assert probe_prompts(8, seed=1) != probe_prompts(8, seed=0)
    with pytest.raises(ValueError, match="the built-in probe set: 64 prompts, 65 requested"):
        probe_prompts(65)
    # a corpus's held-out prompts come first (same domain as its users), topped up from the probe set
    from xpert_fl.data import split_roles

    test = split_roles(load_corpus("builtin"), seed=0)["test"]
    own = {s.prompt for s in test.neutral}
    mixed = probe_prompts(len(own) + 10, test)
    assert set(mixed[: len(own)]) == own and set(mixed[len(own):]) < set(probes)
    assert mixed[:5] == probe_prompts(5, test)


def test_probe_set_continues_openings_for_prompt_less_corpora_and_answers_prompts_otherwise():
    from xpert_fl.data import split_roles
    from xpert_fl.probe import builtin_openings, probe_set

    plain = probe_set(5, split_roles(load_corpus("builtin-plain"))["test"])
    assert not plain.chat and list(plain.prompts) == builtin_openings()[:5]
    assert plain.contexts(None) == list(plain.prompts)  # an opening is its own context: no chat turn
    chat = probe_set(5, split_roles(load_corpus("builtin"))["test"])
    assert chat.chat and len(chat.prompts) == 5 and all(p.strip() for p in chat.prompts)
    assert len(builtin_openings()) == len(set(builtin_openings())) == 64
    with pytest.raises(ValueError, match="64 built-in openings, 65 requested"):
        probe_set(65, split_roles(load_corpus("builtin-plain"))["test"])
