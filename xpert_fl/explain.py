"""Explaining pLLMs on the server and users' data on the device, in one shared basis.

Server (paper §3.1, §4): probe base and pLLM with the same prompts, embed their drift, decompose it
over the common basis (growing it when needed) -> coordinates + words ("0.42 sarcastic · ...").
Device (§3.2): embed the user's own texts, remove the users' reference the basis carries (the same
embedding of neutral human texts, measured once by the server on public data:
``Explainer.human_offset``) and project the resulting drift on the received basis without adding to
it (``Basis.user_coordinates``). Only the choice leaves the device.

Both drifts say how a writer differs from its neutral counterpart: a pLLM from the base model on the
probe prompts, a user from neutral human writing. Neither is a paired difference on the user's own
prompts, which would cancel the topic a user's texts share with them (``user_drift``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from xpert_fl.adapters import Adapter
from xpert_fl.basis import Basis, BasisError, Decomposition
from xpert_fl.cache import CacheEntry, PLLMCache
from xpert_fl.chat import chat_prompt
from xpert_fl.data.corpus import Sample, StyleCorpus
from xpert_fl.files import atomic_file
from xpert_fl.models import LoadedModel
from xpert_fl.probe import ProbeSet, generate, nonempty
from xpert_fl.summarizer import Drift, Summarizer


@dataclass(frozen=True)
class ProbeConfig:
    """How models are probed. Paper: 50 Alpaca prompts; CPU default: fewer, shorter answers."""

    max_new_tokens: int = 48
    batch_size: int = 8
    prefix_fraction: float = 0.3  # prompt-less text: the share of words given to the base as prefix


@dataclass
class Explanation:
    """A pLLM (or a user's data) in the basis: coordinates, words, readable text, and the raw drift."""

    coords: np.ndarray
    words: list[str]
    text: str
    drift: Drift
    decomposition: Decomposition | None = None  # server side only: how the basis grew


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
        _check_basis(basis, self.summarizer)
        d = self.drift(adapter)
        dec = basis.decompose(d.vector, d.candidates, self.summarizer.subvector)
        return Explanation(dec.coords, list(basis.words), basis.explain(dec.coords), d, dec)


def adapter_answers(
    base: LoadedModel, adapter: Adapter, prompts: Sequence[str], probe: ProbeConfig, chat: bool = True
) -> list[str]:
    """A pLLM's greedy answers (or plain continuations) to ``prompts``; ``base.model`` is left untouched."""
    model = adapter.to_peft(copy.deepcopy(base.model))
    return generate(model, base.tokenizer, prompts, probe.max_new_tokens, probe.batch_size, chat=chat)


# (prompts, chat) -> the base model's greedy answers (chat turns) or continuations (plain prefixes)
BaseAnswers = Callable[[list[str], bool], list[str]]


def base_generator(base: LoadedModel, probe: ProbeConfig) -> BaseAnswers:
    """What a device runs to get the base model's texts in the place of the user's (no caching)."""
    return lambda prompts, chat: generate(
        base.model, base.tokenizer, prompts, probe.max_new_tokens, probe.batch_size, chat=chat
    )


def user_drift(
    base: LoadedModel,
    summarizer: Summarizer,
    samples: Sequence[Sample],
    probe: ProbeConfig,
    base_answers: BaseAnswers | None = None,
) -> Drift:
    """The device's vector for its own texts, before the basis's users' reference is removed
    (``Basis.user_vector``).

    Pooled embeddings (default): the embedding of the texts themselves, each in its own context (its
    chat turn, or nothing for plain text), ``Summarizer.embed``; the base model generates nothing. The
    reference the device then removes is the same embedding of neutral human texts, measured by the
    server (``Explainer.human_offset``), so the user's drift is how its writing differs from neutral
    human writing, as a pLLM's drift is how its writing differs from the base's.
    The paper's slot embedding reads pairs, so there the device pairs its texts with what the base
    model writes in their place (its answers to the same prompts, or continuations of the same
    prefixes); ``base_answers`` (default :func:`base_generator`) lets an evaluation reuse stored ones.
    """
    if not samples:
        raise ValueError("user data is empty: at least one sample is needed to compute coordinates")
    if summarizer.pooled:
        texts = nonempty([s.response for s in samples])
        return Drift(summarizer.embed(texts, [chat_prompt(base.tokenizer, s.prompt) for s in samples]))
    answer = base_answers or base_generator(base, probe)
    chat = [s for s in samples if s.prompt]
    plain = [s for s in samples if not s.prompt]
    refs, styled, contexts = [], [], []
    if chat:
        refs += answer([s.prompt for s in chat], True)
        styled += [s.response for s in chat]
        contexts += [chat_prompt(base.tokenizer, s.prompt) for s in chat]
    if plain:
        prefixes, rests = zip(*(_split_text(s.response, probe.prefix_fraction) for s in plain), strict=True)
        conts = answer(list(prefixes), False)
        refs += conts
        styled += list(rests)
        contexts += list(prefixes)
    # the device only maps onto the received basis: no candidate words, so no slot prompts to run
    return summarizer.drift(nonempty(refs), nonempty(styled), contexts, candidates=False)


def user_coordinates(
    base: LoadedModel, summarizer: Summarizer, basis: Basis, samples: Sequence[Sample], probe: ProbeConfig
) -> Explanation:
    """The device's coordinates: its drift projected on the received basis (the basis is not changed)."""
    _check_basis(basis, summarizer)
    d = user_drift(base, summarizer, samples, probe)
    coords = basis.user_coordinates(d.vector)
    return Explanation(coords, list(basis.words), basis.explain(coords), d)


def human_references(test: StyleCorpus, prompts: Sequence[str]) -> list[Sample]:
    """Public neutral human texts to measure ``h`` on: a chat corpus's neutral answers to the probe
    prompts (in probe order; the base's answers to them are already known), or, for a prompt-less
    corpus, as many neutral texts as there are probe prompts. Pass the held-out *test* role."""
    if not test.neutral:
        raise ValueError(f"corpus {test.name} has no neutral texts to measure the human offset on")
    if not test.neutral[0].prompt:
        return list(test.neutral[: len(prompts)])
    by_prompt = {s.prompt: s for s in test.neutral}
    return [by_prompt[p] for p in prompts if p in by_prompt]


def calibrate_users(basis: Basis, explainer: Explainer, references: Sequence[Sample], weight: float = 1.0) -> None:
    """Give the basis the users' reference devices remove (``h``, with weight ``weight``): measured once
    per basis on ``references`` and kept. Weight 0 with no ``h`` measures nothing."""
    _check_basis(basis, explainer.summarizer)
    h = basis.human_offset
    if h is None and weight > 0:
        if not references:
            raise ValueError("a human weight needs neutral human reference texts to measure the reference on")
        h = explainer.human_offset(references)
    basis.set_human_offset(h, weight)


def _check_basis(basis: Basis, summarizer: Summarizer) -> None:
    if basis.summarizer and basis.summarizer != summarizer.fingerprint:
        raise BasisError(
            f"basis was built with summarizer {basis.summarizer}, not {summarizer.fingerprint}: "
            "coordinates from different summarizers are not comparable"
        )
    if basis.dim != summarizer.dim:
        raise BasisError(f"basis dimension {basis.dim} != summarizer hidden size {summarizer.dim}")


def _split_text(text: str, fraction: float) -> tuple[str, str]:
    words = text.split()
    cut = max(1, min(len(words) - 1, round(fraction * len(words))))
    return " ".join(words[:cut]), " ".join(words[cut:])


# --- server state: the basis and every pLLM's drift live next to the cache -----------------------
BASIS_FILE = "basis.safetensors"
DRIFTS_FILE = "drifts.safetensors"


def load_drifts(path: Path) -> dict[str, np.ndarray]:
    return load_file(path) if path.is_file() else {}


def save_drifts(path: Path, drifts: dict[str, np.ndarray]) -> None:
    """Atomically rewrite the drift store (temp file + rename)."""
    with atomic_file(path) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in drifts.items()}, tmp)


def open_basis(
    root: Path, summarizer: Summarizer, tau_orth: float, tau_res: float, orthogonalize: bool, complete: bool = True
) -> Basis:
    """The cache's basis, or a new empty one for this summarizer and these settings (an existing one
    grown under other settings is refused: ``Basis.expect_settings``)."""
    path = root / BASIS_FILE
    if path.is_file():
        basis = Basis.load(path, expect_summarizer=summarizer.fingerprint)
        basis.expect_settings(tau_orth, tau_res, orthogonalize, complete, where=f"basis {path}")
        return basis
    return Basis(
        dim=summarizer.dim, tau_orth=tau_orth, tau_res=tau_res, summarizer=summarizer.fingerprint,
        orthogonalize=orthogonalize, complete=complete,
    )


def offered_coordinates(entries: Iterable[CacheEntry], size: int) -> tuple[list[str], np.ndarray]:
    """Ids of the explained entries (in the given order) and their coordinates zero-padded to ``size``
    words (n x size): what a device compares its own coordinate with."""
    ids, rows = [], []
    for e in entries:
        if e.coords is None:
            continue
        c = np.zeros(size)
        c[: len(e.coords)] = e.coords[:size]
        ids.append(e.id)
        rows.append(c)
    return ids, np.array(rows, dtype=np.float64).reshape(len(ids), size)


SELF_REPORT_MIN_COSINE = 0.3  # chosen on debian-fortunes (benchmarks/results.md: honest and forged reports)


def reported_drift(probe: Drift, report: np.ndarray, basis: Basis) -> Drift:
    """A pLLM's drift from the embedding of the data it was trained on (``report``, embedded as a device
    embeds its own texts): the report minus the users' reference, with the probe's candidate words.

    Why a pLLM is explained by its training data where that is known: a user is placed by its own
    texts, so the pLLM placed by the texts that made it compares like with like; its greedy answers to
    generic probes carry far less of its data's style and topic (benchmarks/selection_harness.py)."""
    return Drift(basis.user_vector(report).astype(np.float32), probe.candidates, probe.probabilities, probe.styled)


def trusted_drift(
    probe: Drift, report: np.ndarray | None, basis: Basis, min_cosine: float = SELF_REPORT_MIN_COSINE
) -> tuple[Drift, float | None]:
    """The drift to explain an uploaded pLLM by: its uploader's self-report (``reported_drift``) when the
    report agrees with the server's own evidence, else the probe drift.

    The check: the cosine between the report and the embedding of the pLLM's own answers to the probes
    (``probe.styled``) must reach ``min_cosine``. A device could report anything; what the pLLM writes is
    the server's evidence. The check rejects vectors that are not the embedding of text like the
    pLLM's (random, negated, another space's), not the report of a neighbouring style.
    Returns the drift used and the cosine (None without a report, or when the probe has no text
    embedding: the slot). A report of the wrong dimension or not finite is a ValueError.
    """
    if report is None or probe.styled is None:
        return probe, None
    report = np.asarray(report, dtype=np.float32)
    if report.shape != probe.styled.shape or not np.isfinite(report).all():
        raise ValueError(f"self-report must be finite with shape {probe.styled.shape}, got {report.shape}")
    norms = float(np.linalg.norm(probe.styled) * np.linalg.norm(report))
    cosine = float(probe.styled @ report / norms) if norms > 0 else 0.0
    if cosine < min_cosine:
        return probe, cosine
    return reported_drift(probe, report, basis), cosine


def unexplained(cache: PLLMCache) -> list[CacheEntry]:
    """The cache's entries that have no drift yet (what ``explain_cache`` will explain), in order."""
    drifts = load_drifts(Path(cache.root) / DRIFTS_FILE)
    return [e for e in cache.entries() if e.id not in drifts]


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
