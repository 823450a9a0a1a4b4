"""The server's pLLM side, framework-free: the cache, the common basis, the explainer.

It answers three questions for the strategy: what to offer devices (basis + every explained pLLM's
coordinates; for the baselines their adapters, labels or text embeddings), which adapters a choice
needs, and what to do with an upload (validate, cache with its parents, probe + explain it — growing
the basis when needed — and re-project every pLLM on the basis). The cache directory holds
everything that persists across rounds and runs: the SQLite index, the adapters,
``basis.safetensors`` and ``drifts.safetensors``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from strategies.config import XPerTConfig
from xpert_fl.adapters import Adapter
from xpert_fl.basis import Basis
from xpert_fl.cache import BaseInfo, CacheEntry, PLLMCache
from xpert_fl.data import load_corpus, split_roles
from xpert_fl.data.corpus import StyleCorpus
from xpert_fl.explain import (
    SELF_REPORT_MIN_COSINE,
    Explainer,
    calibrate_users,
    explain_cache,
    human_references,
    offered_coordinates,
    open_basis,
    trusted_drift,
    unexplained,
)
from xpert_fl.models import load_model
from xpert_fl.probe import nonempty, probe_set
from xpert_fl.production import cloud_reports
from xpert_fl.summarizer import Drift, Summarizer, SummarizerConfig

if TYPE_CHECKING:  # the sentence encoder loads only for the text-encoder baseline
    from xpert_fl.baselines import TextEncoderSelector


@dataclass(frozen=True)
class Ingested:
    """The outcome of one upload: its cache entry, whether it was already cached, what it cost."""

    entry: CacheEntry
    duplicate: bool
    added_words: list[str]
    examined: int  # candidate words whose sub-vector was computed (paper Table 2)
    residual_ratio: float | None
    explain_seconds: float
    explained_by: str = "probe"  # "probe" | "self-report" (the uploader's, verified against the probe)
    self_report: str | None = None  # what became of a self-report: "cosine 0.64" or why it was ignored


class PLLMServer:
    """Cache + basis + explainer. ``explainer`` needs ``drift(adapter)`` and ``summarizer.subvector``
    (and ``pllm_answers(adapter)`` for the text-encoder baseline). ``text_encoder``: that baseline's
    server side (default: created on first use with the packaged sentence encoder)."""

    def __init__(
        self, cache: PLLMCache, basis: Basis, explainer: Explainer, text_encoder: TextEncoderSelector | None = None
    ):
        self.cache, self.basis, self.explainer = cache, basis, explainer
        self.text_encoder = text_encoder

    @classmethod
    def open(cls, config: XPerTConfig) -> PLLMServer:
        """Load the models (once), open or create the cache and its basis, explain what is unexplained.

        Everything it needs comes from the run's config (no defaults of its own, so a run and a test
        opening a server agree with pyproject.toml). The cache is ``config.storage.cache_path()``. Probe
        prompts come from the corpus's *test* role, disjoint from every user's data, topped up from the
        built-in probe set when more are asked for (``probe.probe_prompts``). ``max-candidates``:
        candidate words Algorithm 1 may examine per pLLM (each costs one forward). ``human-weight``: the
        share of the users' reference devices remove (``Basis.human_weight``), the reference measured on
        the test role's neutral human texts. An existing basis must have been grown with the run's basis
        settings (``open_basis`` refuses others).
        """
        common, b = config.common, config.basis
        base = load_model(common.model)
        summ_model = base if common.summarizer == common.model else load_model(common.summarizer)
        summ = Summarizer(summ_model, SummarizerConfig(n_candidates=b.max_candidates))
        cache = PLLMCache(config.storage.cache_path(), BaseInfo.from_loaded(base))
        basis = open_basis(cache.root, summ, b.tau_orth, b.tau_res, b.orthogonalize, b.complete_basis)
        corpus = load_corpus(common.corpus)
        test = split_roles(corpus, seed=common.seed)["test"]
        probes = probe_set(config.probe.num_probe_prompts, test, seed=common.seed)
        server = cls(cache, basis, Explainer(base, summ, probes.prompts, config.probe.config(), chat=probes.chat))
        calibrate_users(basis, server.explainer, human_references(test, probes.prompts), config.select.human_weight)
        server.explain_pending(corpus)
        return server

    # --- what devices see ------------------------------------------------------------------------
    def explain_pending(self, corpus: StyleCorpus | None = None) -> int:
        """Explain cached pLLMs that have no drift yet (e.g. a freshly built cloud cache); the cloud pLLMs
        of ``corpus`` by the data they were trained on (``production.cloud_reports``)."""
        pending = unexplained(self.cache)
        summ = self.explainer.summarizer
        reports = cloud_reports(summ, self.explainer.base.tokenizer, corpus, pending) if corpus and pending else {}
        return len(explain_cache(self.cache, self.explainer, self.basis, progress=False, reports=reports))

    def offer(self) -> tuple[list[str], np.ndarray]:
        """Ids of the explained pLLMs (creation order) and their coordinates on the current basis (n x k)."""
        return offered_coordinates(self.cache.entries(), self.basis.size)

    def adapter(self, id: str) -> Adapter:
        return self.cache.load_adapter(id)

    def label(self, id: str) -> str | None:
        return self.cache.get(id).label

    def text_embeddings(self, ids: Sequence[str]) -> tuple[np.ndarray, str]:
        """The text-encoder baseline's offer: each pLLM's answers to the explainer's probe prompts,
        embedded and averaged (once per pLLM, as ``TextEncoderSelector`` does offline), as n x d (n >= 1),
        and the encoder's fingerprint. Server work: no device pays for it."""
        if self.text_encoder is None:
            from xpert_fl.baselines import TextEncoderSelector

            self.text_encoder = TextEncoderSelector()
        known = self.text_encoder.vectors
        for i in ids:
            if i not in known:
                self.text_encoder.add_texts(i, nonempty(self.explainer.pllm_answers(self.adapter(i))))
        return np.stack([known[i] for i in ids]), self.text_encoder.encoder.fingerprint

    # --- uploads ---------------------------------------------------------------------------------
    def ingest(
        self,
        adapter: Adapter,
        parents: list[str],
        metrics: dict,
        label: str | None,
        self_report: tuple[np.ndarray, str] | None = None,
        min_cosine: float | None = SELF_REPORT_MIN_COSINE,
    ) -> Ingested:
        """Validate, cache (parents = the chosen ids), probe + explain (may grow the basis).

        ``self_report``: (drift, summarizer fingerprint) of the uploader's own data; it explains the
        pLLM when it comes from this summarizer and agrees with the probe (``trusted_drift``;
        ``min_cosine=None`` never trusts one). All or nothing: an adapter that fails validation is never
        written; one whose explanation fails is removed again. Content already cached is returned as is
        (``duplicate=True``), also when another writer committed it while this call ran: the removal
        after a failed explanation only ever undoes an entry this call created (``PLLMCache.insert``).
        """
        entry, created = self.cache.insert(adapter, parents=parents, metrics=metrics, label=label)
        if not created:
            return Ingested(entry, True, [], 0, None, 0.0)
        t0 = time.perf_counter()
        try:
            drift, by, note = self._drift(adapter, self_report, min_cosine)
            decs = explain_cache(self.cache, self.explainer, self.basis, ids=[entry.id], progress=False,
                                 given={entry.id: drift})
        except BaseException:
            self.cache.remove(entry.id)
            raise
        dec = decs.get(entry.id)
        return Ingested(
            self.cache.get(entry.id), False, list(dec.added) if dec else [], dec.examined if dec else 0,
            dec.residual_ratio if dec else None, time.perf_counter() - t0, by, note,
        )

    def _drift(
        self, adapter: Adapter, self_report: tuple[np.ndarray, str] | None, min_cosine: float | None
    ) -> tuple[Drift, str, str | None]:
        """The probe drift, or a trusted self-report; how the pLLM is explained; what became of a report."""
        probe = self.explainer.drift(adapter)
        if self_report is None:
            return probe, "probe", None
        vector, summarizer = self_report
        mine = self.explainer.summarizer
        if summarizer != mine.fingerprint:
            return probe, "probe", f"ignored: summarizer {summarizer} is not the server's {mine.fingerprint}"
        if vector.shape != (mine.dim,):
            return probe, "probe", f"ignored: shape {vector.shape} != ({mine.dim},)"
        # a report is a device's embedding of its training data, checked against the pLLM's own probe answers
        used, cosine = trusted_drift(probe, vector, self.basis, math.inf if min_cosine is None else min_cosine)
        if cosine is None:
            return probe, "probe", "ignored: the slot embedding has no text embedding to check a report against"
        if used is probe:
            return probe, "probe", f"rejected: cosine {cosine:.2f} with the pLLM's probe answers"
        return used, "self-report", f"trusted: cosine {cosine:.2f} with the pLLM's probe answers"
