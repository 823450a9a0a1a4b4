"""pLLM production, the "cloud" side of the paper (§2.1, §7): one pLLM per style into a cache.

Each style's pLLM is fine-tuned from the base model on that style's similarity-s mixture (fraction s
styled, the rest neutral) from the corpus's cloud role, and evaluated on the style's test role. The
run is resumable: a style whose pLLM for this similarity is already cached is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from xpert_fl.cache import BaseInfo, CacheEntry, PLLMCache
from xpert_fl.data.corpus import StyleCorpus
from xpert_fl.data.mixing import similarity_mixture, split_roles
from xpert_fl.finetune import FinetuneConfig, finetune
from xpert_fl.models import LoadedModel


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
        metrics = {"similarity": similarity, "seed": seed, "style": style, "corpus": corpus.name, **result.to_json()}
        entries.append(cache.add(result.adapter, metrics=metrics, label=style))
    return entries


def find_pllm(cache: PLLMCache, style: str, similarity: float, seed: int) -> CacheEntry | None:
    """The cached cloud pLLM of a style at a similarity and seed, if any (what makes builds resumable)."""
    for entry in cache.entries():
        m = entry.metrics
        if entry.label == style and m.get("similarity") == similarity and m.get("seed") == seed:
            return entry
    return None
