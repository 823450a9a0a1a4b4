"""`xpert cache build`: one pLLM per style into a cache, resumable."""

from __future__ import annotations

import xpert_fl.production as production
from xpert_fl.cache import PLLMCache
from xpert_fl.data import load_corpus
from xpert_fl.finetune import FinetuneConfig


def test_build_cache_is_resumable(base, tmp_path, monkeypatch):
    corpus = load_corpus("builtin")
    cfg = FinetuneConfig(max_steps=1, eval_every=1, max_seq_len=64, rank=2, seed=0)
    calls = []
    real = production.finetune

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(production, "finetune", counting)
    first = production.build_cache(base, corpus, 0.9, tmp_path / "c", cfg, styles=["poetic"], n_train=4,
                                   progress=False)
    assert len(calls) == 1 and len(first) == 1 and first[0].label == "poetic"
    assert first[0].metrics["similarity"] == 0.9 and first[0].metrics["style"] == "poetic"
    again = production.build_cache(base, corpus, 0.9, tmp_path / "c", cfg, styles=["poetic"], n_train=4,
                                   progress=False)
    assert len(calls) == 1, "a finished entry must not be trained again"
    assert [e.id for e in again] == [e.id for e in first]
    assert len(PLLMCache(tmp_path / "c")) == 1
    # the training set really is the similarity mixture: 4 samples, round(0.9 * 4) = 4 styled
    poetic = {s.response for s in corpus.styles["poetic"]}
    assert sum(s.response in poetic for s in calls[0]) == 4
    # the server can name that training set again from the entry alone (what explains a cloud pLLM)
    assert production.training_samples(corpus, first[0]) == calls[0]


def test_cloud_pllms_are_explained_by_their_training_data_when_it_agrees_with_their_probe(base, tmp_path):
    """``cloud_reports`` embeds each cloud pLLM's training set as a device embeds its own data; an entry
    that is no cloud pLLM of this corpus (an upload, another corpus) gets none; ``explain_cache`` uses a
    report only where the self-report check accepts it."""
    import numpy as np

    from xpert_fl.adapters import Adapter
    from xpert_fl.basis import Basis
    from xpert_fl.data.corpus import StyleCorpus
    from xpert_fl.explain import DRIFTS_FILE, Explainer, ProbeConfig, explain_cache, load_drifts, unexplained
    from xpert_fl.summarizer import Summarizer, SummarizerConfig

    corpus = load_corpus("builtin")
    cfg = FinetuneConfig(max_steps=1, eval_every=1, max_seq_len=64, rank=2, seed=0)
    (entry,) = production.build_cache(base, corpus, 0.9, tmp_path / "c", cfg, styles=["poetic"], n_train=4,
                                      progress=False)
    cache = PLLMCache(tmp_path / "c")
    cloud = cache.load_adapter(entry.id)
    other = Adapter({**cloud.config, "lora_alpha": 8}, cloud.tensors, cloud.base_fingerprint)
    upload = cache.add(other, parents=[entry.id], metrics=dict(entry.metrics), label="poetic")
    summarizer = Summarizer(base, SummarizerConfig(n_candidates=4))
    reports = production.cloud_reports(summarizer, base.tokenizer, corpus, unexplained(cache))
    assert set(reports) == {entry.id}, "an upload naming the corpus in its metrics is not a cloud pLLM"
    texts = [s.response for s in production.training_samples(corpus, entry)]
    np.testing.assert_allclose(reports[entry.id], summarizer.embed(texts), atol=1e-6)
    elsewhere = StyleCorpus("another-corpus", corpus.styles, corpus.neutral)
    assert production.cloud_reports(summarizer, base.tokenizer, elsewhere, [entry]) == {}

    explainer = Explainer(base, summarizer, ["Describe the sea."], ProbeConfig(max_new_tokens=8))
    basis = Basis(dim=summarizer.dim, summarizer=summarizer.fingerprint)
    forged = {entry.id: reports[entry.id], upload.id: -reports[entry.id]}  # the negated one cannot agree
    explain_cache(cache, explainer, basis, progress=False, reports=forged, min_cosine=0.0)
    drifts = load_drifts(tmp_path / "c" / DRIFTS_FILE)
    np.testing.assert_allclose(drifts[entry.id], reports[entry.id], atol=1e-6)  # no human offset: the report
    probe = explainer.drift(cache.load_adapter(upload.id)).vector
    np.testing.assert_allclose(drifts[upload.id], probe, atol=1e-5)
