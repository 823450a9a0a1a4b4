"""The method core end to end on the real embedded model, at toy sizes: adapters -> explanations ->
device coordinates -> a selection; plus the summarizer's invariants and bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from xpert_fl.basis import Basis, BasisError
from xpert_fl.cache import BaseInfo, PLLMCache
from xpert_fl.chat import chat_prompt
from xpert_fl.data import Sample, load_corpus, split_roles
from xpert_fl.explain import (
    BASIS_FILE,
    Explainer,
    ProbeConfig,
    calibrate_users,
    explain_cache,
    human_references,
    open_basis,
    user_coordinates,
    user_drift,
)
from xpert_fl.finetune import FinetuneConfig, finetune
from xpert_fl.layerwise import LayerwiseRunner
from xpert_fl.probe import probe_prompts
from xpert_fl.select import Choice, select
from xpert_fl.summarizer import Summarizer, SummarizerConfig

PROBE = ProbeConfig(max_new_tokens=12, batch_size=4)
TINY = SummarizerConfig(max_text_tokens=24, n_candidates=8)
POOL = SummarizerConfig(max_text_tokens=24, n_candidates=8, embedding="response-pool")  # S's own states


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("builtin")


@pytest.fixture(scope="module")
def summarizer(base):
    return Summarizer(base, TINY)


def test_null_drift_is_zero_and_candidates_are_words(summarizer, corpus):
    refs = [s.response for s in corpus.neutral[:3]]
    null = summarizer.drift(refs, refs[1:] + refs[:1])
    styled = [s.response for s in corpus.styles["sarcastic"][:3]]
    d = summarizer.drift(refs, styled)
    # the same texts, batched with other padding: zero up to float error
    assert np.linalg.norm(null.vector) < 1e-4 * np.linalg.norm(d.vector), "a null drift must calibrate to zero"
    assert d.vector.shape == (summarizer.dim,) and np.isfinite(d.vector).all()
    assert np.linalg.norm(d.vector) > 0.1  # unit-vector means (sentence encoder): well above float error
    assert len(d.candidates) == TINY.n_candidates and all(w.isalpha() for w in d.candidates)
    assert d.probabilities == sorted(d.probabilities, reverse=True)


@pytest.mark.parametrize("embedding", ["response-pool", "slot"])
def test_low_memory_mode_gives_the_same_embedding(base, corpus, embedding):
    refs = [s.response for s in corpus.neutral[:2]]
    styled = [s.response for s in corpus.styles["poetic"][:2]]
    contexts = [chat_prompt(base.tokenizer, s.prompt) for s in corpus.neutral[:2]]
    config = SummarizerConfig(max_text_tokens=24, n_candidates=8, embedding=embedding)
    lowmem = Summarizer(base, config, runner=LayerwiseRunner(base.spec))
    a, b = Summarizer(base, config).drift(refs, styled, contexts), lowmem.drift(refs, styled, contexts)
    np.testing.assert_allclose(a.vector, b.vector, atol=1e-4)
    assert a.candidates == b.candidates


def test_response_pool_reads_the_text_in_its_context(base, corpus):
    """The pool covers only the styled text's tokens, read after their prompt: the context changes the
    vector, and the slot variant (the paper's) still calibrates a null drift to zero."""
    summarizer = Summarizer(base, POOL)
    samples = corpus.styles["sarcastic"][:3]
    refs = [s.response for s in corpus.neutral[:3]]
    styled = [s.response for s in samples]
    contexts = [chat_prompt(base.tokenizer, s.prompt) for s in samples]
    bare, in_context = summarizer.drift(refs, styled), summarizer.drift(refs, styled, contexts)
    assert not np.allclose(bare.vector, in_context.vector, atol=1e-3)
    assert summarizer.layer_index == round(0.8 * base.model.config.num_hidden_layers)
    assert f":L{summarizer.layer_index}:" in summarizer.fingerprint
    with pytest.raises(ValueError, match="one context per text"):
        summarizer.drift(refs, styled, contexts[:2])
    slot = Summarizer(base, SummarizerConfig(max_text_tokens=24, n_candidates=8, embedding="slot"))
    assert np.allclose(slot.drift(refs, refs[1:] + refs[:1]).vector, 0, atol=1e-5)
    assert slot.fingerprint != summarizer.fingerprint


def test_whitening_rescales_each_dimension_by_the_calibration_spread(base, corpus):
    """Whitened pools are the plain pools divided by one fixed per-dimension scale, so a drift (a
    difference of means) is too; the scale is part of the embedding's identity."""
    samples = corpus.styles["expert"][:3]
    refs = [s.response for s in corpus.neutral[:3]]
    styled = [s.response for s in samples]
    contexts = [chat_prompt(base.tokenizer, s.prompt) for s in samples]
    summarizer = Summarizer(base, POOL)
    plain = Summarizer(base, replace(POOL, whiten=False))
    scale = summarizer.scale()
    assert scale.shape == (summarizer.dim,) and (scale > 0).all() and np.isfinite(scale).all()
    np.testing.assert_array_equal(scale, Summarizer(base, POOL).scale())  # fixed by the summarizer alone
    white, raw = summarizer.drift(refs, styled, contexts), plain.drift(refs, styled, contexts)
    np.testing.assert_allclose(white.vector * scale, raw.vector, rtol=1e-4, atol=1e-4 * np.abs(raw.vector).max())
    assert white.candidates == raw.candidates
    assert ":w32" in summarizer.fingerprint and ":w" not in plain.fingerprint
    with pytest.raises(ValueError, match="calibration_texts"):
        SummarizerConfig(calibration_texts=1)


def test_the_sentence_embedding_reads_texts_with_the_encoder_and_names_words_in_its_space(base, summarizer, corpus):
    """The default: texts (and a word's sentence) embedded by the sentence encoder, a set of texts as the
    normalised mean (8 texts and 200 on one sphere), contexts unused; S still names the candidate words;
    the encoder is part of the space's identity."""
    from xpert_fl.encoder import default_encoder

    encoder = default_encoder()
    texts = [s.response for s in corpus.styles["poetic"][:3]]
    assert summarizer.config.embedding == "sentence" and summarizer.dim == encoder.model.config.hidden_size
    v = summarizer.embed(texts)
    np.testing.assert_allclose(v, encoder.mean(texts), atol=1e-6)
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    np.testing.assert_allclose(summarizer.embed(texts, ["Write a poem."] * 3), v, atol=1e-6)
    refs = [s.response for s in corpus.neutral[:3]]
    d = summarizer.drift(refs, texts)
    np.testing.assert_allclose(d.vector, v - encoder.mean(refs), atol=1e-5)
    np.testing.assert_allclose(d.styled, v, atol=1e-6)
    assert d.candidates and all(w.isalpha() for w in d.candidates)
    assert summarizer.subvector("poetic").shape == (summarizer.dim,)
    assert ":sentence:" + encoder.fingerprint[:16] in summarizer.fingerprint
    assert summarizer.fingerprint != Summarizer(base, POOL).fingerprint


def test_pool_memo_overflow_recomputes(base, corpus, monkeypatch):
    """When the memo is full it starts over, and a call still gets every pool it asked for."""
    from xpert_fl import summarizer as summarizer_mod

    s = Summarizer(base, replace(POOL, max_text_tokens=16, whiten=False))
    texts = [x.response for x in corpus.neutral[:3]]
    first = s._pooled([""] * 3, texts)
    monkeypatch.setattr(summarizer_mod, "POOL_MEMO", 3)
    # 3 memoized + 1 new > 3: the memo is cleared and all 4 are pooled again
    again = s._pooled([""] * 4, [*texts, corpus.neutral[3].response])
    np.testing.assert_allclose(again[:3], first, atol=1e-5)
    assert len(s._pools) == 4


def test_a_device_drift_skips_candidate_words(base, summarizer, corpus):
    """Without candidates the pools run no slot prompt; the vector is the same."""
    samples = corpus.styles["friendly"][:2]
    refs, styled = [s.response for s in corpus.neutral[:2]], [s.response for s in samples]
    contexts = [chat_prompt(base.tokenizer, s.prompt) for s in samples]
    full, bare = summarizer.drift(refs, styled, contexts), summarizer.drift(refs, styled, contexts, candidates=False)
    np.testing.assert_allclose(full.vector, bare.vector, atol=1e-5)
    assert full.candidates and bare.candidates == [] and bare.probabilities == []


def test_bad_drift_input(summarizer):
    with pytest.raises(ValueError, match="equally many"):
        summarizer.drift(["a"], ["b", "c"])
    with pytest.raises(ValueError, match="non-empty"):
        summarizer.drift(["a"], ["  "])
    with pytest.raises(ValueError, match="embedding must be one of"):
        SummarizerConfig(embedding="cls")
    with pytest.raises(ValueError, match="fraction of the decoder layers"):
        SummarizerConfig(layer=1.5)


def test_adapters_to_explanations_to_selection(base, summarizer, corpus, tmp_path):
    """Two tiny pLLMs are explained in one basis; a user's data maps onto it and selects one of them."""
    cache = PLLMCache(tmp_path / "cache", BaseInfo.from_loaded(base))
    cfg = FinetuneConfig(max_steps=2, eval_every=2, max_seq_len=96, rank=4, seed=0)
    for style in ("sarcastic", "poetic"):
        samples = corpus.styles[style]
        result = finetune(base, samples[:4], samples[4:6], cfg, progress=False)
        cache.add(result.adapter, metrics=result.to_json(), label=style)
    prompts = [s.prompt for s in corpus.neutral[10:12]]
    basis = open_basis(cache.root, summarizer, tau_orth=0.1, tau_res=0.2, orthogonalize=True)
    explainer = Explainer(base, summarizer, prompts, PROBE)
    calibrate_users(basis, explainer, corpus.neutral[10:12])
    decs = explain_cache(cache, explainer, basis, progress=False)
    assert len(decs) == 2 and basis.size >= 1
    assert basis.human_weight == 1.0 and basis.human_offset is not None
    # words examined once are remembered by the basis, so a later pLLM may examine none of its own
    assert sum(d.examined for d in decs.values()) >= 1
    assert all(d.residual_ratio <= basis.tau_res or d.exhausted for d in decs.values())
    entries = cache.entries()
    assert all(e.coords is not None and len(e.coords) == basis.size and e.explanation for e in entries)
    assert (cache.root / BASIS_FILE).is_file()

    # the device: its own data, the received basis (unchanged), a choice that carries no coordinate
    before = (basis.size, list(basis.words))
    mine = user_coordinates(base, summarizer, basis, corpus.styles["poetic"][20:22], PROBE)
    assert (basis.size, list(basis.words)) == before
    np.testing.assert_allclose(mine.coords, basis.user_coordinates(mine.drift.vector))
    choice = select(mine.coords, {e.id: np.asarray(e.coords) for e in entries}, delta=float("inf"))
    assert choice.kind == "single" and choice.ids[0] in {e.id for e in entries}
    assert Choice.from_json(choice.to_json()) == choice

    # re-explaining is a no-op: drifts are stored, the basis is reloaded from disk
    again = open_basis(cache.root, summarizer, 0.1, 0.2, True)
    assert again.words == basis.words
    assert explain_cache(cache, Explainer(base, summarizer, prompts, PROBE), again, progress=False) == {}


def test_device_side_rejects_bad_input(base, summarizer):
    other = Basis(dim=summarizer.dim, summarizer="another-summarizer")
    with pytest.raises(BasisError, match="summarizer"):
        user_coordinates(base, summarizer, other, [Sample("Say hi.", "Hi!")], PROBE)
    wrong_dim = Basis(dim=summarizer.dim + 1, summarizer=summarizer.fingerprint)
    with pytest.raises(BasisError, match="dimension"):
        user_coordinates(base, summarizer, wrong_dim, [Sample("Say hi.", "Hi!")], PROBE)
    ok = Basis(dim=summarizer.dim, summarizer=summarizer.fingerprint)
    with pytest.raises(ValueError, match="empty"):
        user_coordinates(base, summarizer, ok, [], PROBE)


def test_a_device_embeds_its_own_texts_and_generates_nothing(base, summarizer, monkeypatch):
    """Pooled (default): the device's vector is the embedding of its texts in their own contexts (chat
    turn, or none for plain text); the base model writes nothing in their place."""
    monkeypatch.setattr("xpert_fl.probe.generate", lambda *a, **k: pytest.fail("the device generated text"))
    plain = load_corpus("builtin-plain").styles["tweet"][:2]
    got = user_drift(base, summarizer, plain, PROBE).vector
    np.testing.assert_allclose(got, summarizer.embed([s.response for s in plain], ["", ""]), rtol=1e-6)
    chat = load_corpus("builtin").styles["poetic"][:2]
    contexts = [chat_prompt(base.tokenizer, s.prompt) for s in chat]
    np.testing.assert_allclose(user_drift(base, summarizer, chat, PROBE).vector,
                               summarizer.embed([s.response for s in chat], contexts), rtol=1e-6)
    basis = Basis(dim=summarizer.dim, summarizer=summarizer.fingerprint)
    mine = user_coordinates(base, summarizer, basis, plain, PROBE)
    assert mine.coords.shape == (0,) and np.isfinite(mine.drift.vector).all()


def test_users_reference_is_neutral_human_text_embedded_as_a_device_embeds(base, summarizer, corpus):
    """The server measures h once, as a device embeds its own texts (on the test role's neutral answers to
    the probe prompts); the basis keeps it when the weight changes; a device's coordinates are Eq. 2 of
    its vector minus weight x h."""
    test = split_roles(corpus)["test"]
    prompts = probe_prompts(3, test)
    refs = human_references(test, prompts)
    assert [r.prompt for r in refs] == prompts and all(r in test.neutral for r in refs)
    explainer = Explainer(base, summarizer, prompts, PROBE)
    h = explainer.human_offset(refs)
    np.testing.assert_allclose(h, user_drift(base, summarizer, refs, PROBE).vector, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(h) > 0

    rng = np.random.default_rng(0)
    basis = Basis(dim=summarizer.dim, words=["a", "b"], vectors=rng.normal(size=(2, summarizer.dim)),
                  summarizer=summarizer.fingerprint)
    calibrate_users(basis, explainer, refs, 0.4)
    np.testing.assert_allclose(basis.human_offset, h, rtol=1e-6)
    explainer.human_offset = None  # measured once per basis: a new weight must not measure again
    calibrate_users(basis, explainer, [], 0.7)
    assert basis.human_weight == 0.7
    samples = corpus.styles["poetic"][20:22]
    mine = user_coordinates(base, summarizer, basis, samples, PROBE)
    np.testing.assert_allclose(mine.coords, basis.coordinates(mine.drift.vector - 0.7 * h), rtol=1e-5, atol=1e-6)

    fresh = Basis(dim=summarizer.dim, summarizer=summarizer.fingerprint)
    calibrate_users(fresh, explainer, [], 0.0)  # no weight: nothing measured, no offset
    assert fresh.human_offset is None
    with pytest.raises(ValueError, match="neutral human reference texts"):
        calibrate_users(fresh, explainer, [], 0.4)
    with pytest.raises(BasisError, match="summarizer"):
        calibrate_users(Basis(dim=summarizer.dim, summarizer="another"), explainer, refs, 0.4)
    plain = split_roles(load_corpus("builtin-plain"))["test"]
    assert human_references(plain, prompts) == list(plain.neutral[:3])  # prompt-less: as many texts as prompts
