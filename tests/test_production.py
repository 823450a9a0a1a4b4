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
