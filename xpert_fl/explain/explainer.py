"""The server's side (paper §3.1, §4): explain pLLMs by probing them, and keep the cache explained.

Probe base and pLLM with the same prompts, embed their drift, decompose it over the common basis
(growing it when needed) -> coordinates + words ("0.42 sarcastic · ..."); :func:`explain_cache` does
that for every unexplained cache entry and persists basis, drifts and explanations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from xpert_fl.adapters import Adapter
from xpert_fl.basis import Basis, Decomposition
from xpert_fl.cache import PLLMCache
from xpert_fl.data.corpus import Sample
from xpert_fl.explain.coordinates import Explanation, check_basis
from xpert_fl.explain.state import BASIS_FILE, DRIFTS_FILE, load_drifts, save_drifts, unexplained
from xpert_fl.explain.trust import SELF_REPORT_MIN_COSINE, trusted_drift
from xpert_fl.explain.user import user_drift
from xpert_fl.models import LoadedModel
from xpert_fl.probe import ProbeConfig, ProbeSet, adapter_answers, base_generator, generate, nonempty
from xpert_fl.summarizer import Drift, Summarizer


class Explainer:
    """Server side: explains adapters over a fixed probe set; base answers are computed once."""

    def __init__(
        self, base: LoadedModel, summarizer: Summarizer, prompts: Sequence[str], probe: ProbeConfig, chat: bool = True
    ):
        """``chat``: the prompts are instructions answered in a chat turn; False: plain openings the
        models continue as text (prompt-less corpora, ``probe.probe_set``)."""
        if not prompts:
            raise ValueError("at least one probe prompt is needed")
        self.base, self.summarizer, self.prompts, self.probe = base, summarizer, list(prompts), probe
        self.chat = chat
        self._base_answers: list[str] | None = None

    @property
    def base_answers(self) -> list[str]:
        if self._base_answers is None:
            self._base_answers = self._answers(self.base.model)
        return self._base_answers

    def _answers(self, model) -> list[str]:
        p = self.probe
        return generate(model, self.base.tokenizer, self.prompts, p.max_new_tokens, p.batch_size, chat=self.chat)

    def pllm_answers(self, adapter: Adapter) -> list[str]:
        return adapter_answers(self.base, adapter, self.prompts, self.probe, chat=self.chat)

    @property
    def contexts(self) -> list[str]:
        """The text each probe answer follows (its chat turn, or the opening it continues)."""
        return ProbeSet(tuple(self.prompts), self.chat).contexts(self.base.tokenizer)

    def drift(self, adapter: Adapter) -> Drift:
        return self.summarizer.drift(nonempty(self.base_answers), nonempty(self.pllm_answers(adapter)), self.contexts)

    def base_texts(self, prompts: list[str], chat: bool) -> list[str]:
        """The base's texts in the place of a device's (a :data:`BaseAnswers`); its answers to the probe
        prompts are reused."""
        if chat == self.chat and set(prompts) <= set(self.prompts):
            known = dict(zip(self.prompts, self.base_answers, strict=True))
            return [known[p] for p in prompts]
        return base_generator(self.base, self.probe)(prompts, chat)

    def human_offset(self, references: Sequence[Sample]) -> np.ndarray:
        """``h``: the users' reference, neutral human-written texts embedded exactly as a device embeds
        its own (``user_drift``)."""
        return user_drift(self.base, self.summarizer, references, self.probe, base_answers=self.base_texts).vector

    def explain(self, adapter: Adapter, basis: Basis) -> Explanation:
        """Drift -> Algorithm 1 on the shared basis (which may grow) -> coordinates and words."""
        check_basis(basis, self.summarizer)
        d = self.drift(adapter)
        dec = basis.decompose(d.vector, d.candidates, self.summarizer.subvector)
        return Explanation(dec.coords, list(basis.words), basis.explain(dec.coords), d, dec)


def explain_cache(
    cache: PLLMCache,
    explainer: Explainer,
    basis: Basis,
    ids: Sequence[str] | None = None,
    progress: bool = True,
    given: Mapping[str, Drift] | None = None,
    reports: Mapping[str, np.ndarray] | None = None,
    min_cosine: float = SELF_REPORT_MIN_COSINE,
) -> dict[str, Decomposition]:
    """Explain cache entries that have no drift yet (Algorithm 1, sequentially), then re-project every
    entry on the final basis so all coordinates share its words; persist basis, drifts, explanations.
    ``given``: drifts already computed by id (e.g. a trusted self-report), used instead of probing.
    ``reports``: embeddings of the data pLLMs were trained on, by id (the server's own training data for
    the cloud pLLMs it made, ``production.cloud_reports``), each used where ``trusted_drift`` accepts it
    at ``min_cosine``: the check costs nothing once the probe ran, and an entry's metrics, which name
    its data, are not proof that the server made it."""
    root = Path(cache.root)
    drifts = load_drifts(root / DRIFTS_FILE)
    todo = [e.id for e in unexplained(cache) if ids is None or e.id in ids]
    decompositions = {}
    for entry_id in tqdm(todo, desc="explain pLLMs", disable=not progress):
        d = given[entry_id] if given and entry_id in given else explainer.drift(cache.load_adapter(entry_id))
        if reports and entry_id in reports:
            d, _ = trusted_drift(d, reports[entry_id], basis, min_cosine)
        decompositions[entry_id] = basis.decompose(d.vector, d.candidates, explainer.summarizer.subvector)
        drifts[entry_id] = d.vector
    basis.save(root / BASIS_FILE)
    save_drifts(root / DRIFTS_FILE, drifts)
    for entry in cache.entries():
        if entry.id in drifts:
            coords = basis.coordinates(drifts[entry.id])
            cache.set_explanation(entry.id, coords.tolist(), list(basis.words), basis.explain(coords))
    return decompositions
