"""pLLM production, the "cloud" side of the paper (§2.1, §7): one pLLM per style into a cache.

Each style's pLLM is fine-tuned from the base model on that style's similarity-s mixture (fraction s
styled, the rest neutral) from the corpus's cloud role, and evaluated on the style's test role. The
run is resumable: a style whose pLLM for this similarity is already cached is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from xpert_fl.cache import BaseInfo, CacheEntry, PLLMCache
from xpert_fl.chat import chat_prompt
from xpert_fl.data.corpus import Sample, StyleCorpus
from xpert_fl.data.mixing import similarity_mixture, split_roles
from xpert_fl.finetune import FinetuneConfig, finetune
from xpert_fl.models import LoadedModel
from xpert_fl.probe import nonempty
from xpert_fl.summarizer import Summarizer


def build_cache(
    base: LoadedModel,
    corpus: StyleCorpus,
    similarity: float,
    out: str | Path,
    config: FinetuneConfig | None = None,
    styles: Sequence[str] | None = None,
    n_train: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[CacheEntry]:
    """Fine-tune and cache one pLLM per style; return the entries for these styles (new or existing)."""
    config = config or FinetuneConfig()
    styles = list(styles or corpus.styles)
    unknown = [s for s in styles if s not in corpus.styles]
    if unknown:
        raise KeyError(f"styles {unknown} not in corpus {corpus.name} ({', '.join(corpus.styles)})")
    roles = split_roles(corpus, seed=seed)
    cache = PLLMCache(out, BaseInfo.from_loaded(base))
    entries = []
    for style in tqdm(styles, desc=f"pLLMs @ similarity {similarity:g}", disable=not progress):
        existing = find_pllm(cache, style, similarity, seed)
        if existing is not None:
            entries.append(existing)
            continue
        train = similarity_mixture(roles["cloud"], style, similarity, n=n_train, seed=seed)
        test = roles["test"].styles[style]
        result = finetune(base, train, test, config, progress=progress)
        metrics = {"similarity": similarity, "seed": seed, "style": style, "corpus": corpus.name, "n_train": n_train,
                   **result.to_json()}
        entries.append(cache.add(result.adapter, metrics=metrics, label=style))
    return entries


def find_pllm(cache: PLLMCache, style: str, similarity: float, seed: int) -> CacheEntry | None:
    """The cached cloud pLLM of a style at a similarity and seed, if any (what makes builds resumable)."""
    for entry in cache.entries():
        m = entry.metrics
        if entry.label == style and m.get("similarity") == similarity and m.get("seed") == seed:
            return entry
    return None


def training_samples(corpus: StyleCorpus, entry: CacheEntry) -> list[Sample] | None:
    """The samples ``build_cache`` trained this cloud pLLM on (rebuilt from its metrics), or None for an
    entry that is no cloud pLLM of this corpus."""
    m = entry.metrics
    if m.get("corpus") != corpus.name or entry.label not in corpus.styles or entry.parents:
        return None
    try:
        seed, similarity, n = int(m["seed"]), float(m["similarity"]), m.get("n_train")
        roles = split_roles(corpus, seed=seed)
        return similarity_mixture(roles["cloud"], entry.label, similarity, n=None if n is None else int(n), seed=seed)
    except (KeyError, TypeError, ValueError):
        return None


def cloud_reports(summarizer: Summarizer, tokenizer, corpus: StyleCorpus, entries: Sequence[CacheEntry]
                  ) -> dict[str, np.ndarray]:
    """The embedding of each cloud pLLM's training data, by id, as a device embeds its own texts
    (``Summarizer.embed``, each text in its chat turn): what ``explain.explain_cache`` explains them by.
    Pooled embeddings only (the slot has no embedding of a set of texts): empty otherwise."""
    if not summarizer.pooled:
        return {}
    out = {}
    for entry in entries:
        samples = training_samples(corpus, entry)
        if samples:
            texts = nonempty([s.response for s in samples])
            out[entry.id] = summarizer.embed(texts, [chat_prompt(tokenizer, s.prompt) for s in samples])
    return out
