"""The shared workbench: base model, corpus roles, the pLLM cache, users, and memoised expensive steps.

Everything an experiment measures goes through the library's own code paths: pLLMs from
``production.build_cache``, explanations from ``explain.explain_cache`` (Algorithm 1), selections from
``xpert_fl.baselines`` selectors, fine-tuning from ``finetune.finetune`` with the from-scratch target.
What is memoised is only what does not depend on the measured quantity: greedy generations (a
``TextStore`` in the work dir, keyed by model, mode, length and prompt), drift embeddings (per
summarizer and pLLM), and fine-tuning runs within one process (per user and start point).

The working cache is ``<work>/cache-<corpus>-p<prompts>x<tokens>``: a copy of ``--cache`` when given (the
source is never written), grown by ``build_cache`` with whatever (style, similarity) pLLM is missing.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from protocol import MessageSizes
from xpert_fl.adapters import Adapter
from xpert_fl.baselines import Selection, SelectionTask, Selector, make_selector
from xpert_fl.baselines.core import selection_seed
from xpert_fl.basis import Basis, Decomposition, parse_human_weight
from xpert_fl.cache import BaseInfo, CacheEntry, PLLMCache
from xpert_fl.data import load_corpus, split_roles, user_samples
from xpert_fl.data.corpus import Sample
from xpert_fl.evaluation import TextStore
from xpert_fl.explain import (
    BASIS_FILE,
    DRIFTS_FILE,
    Explainer,
    ProbeConfig,
    adapter_answers,
    calibrate_users,
    explain_cache,
    human_references,
    open_basis,
    unexplained,
    user_drift,
)
from xpert_fl.finetune import FinetuneConfig, FinetuneResult, finetune, target_from_scratch, with_target
from xpert_fl.models import DEFAULT_SPEC, load_model
from xpert_fl.probe import ProbeSet, generate, nonempty, probe_set
from xpert_fl.production import build_cache, cloud_reports
from xpert_fl.select import nearest
from xpert_fl.summarizer import Drift, Summarizer

from .runner import Context


@dataclass(frozen=True)
class User:
    """One simulated device: its training samples, a validation set (fine-tuning's held-out loss) and
    generation prompts (BLEU/ROUGE), all of its style(s); ``label`` is ground truth for accuracy only."""

    name: str
    label: str
    mix: tuple[tuple[str, float], ...]
    samples: tuple[Sample, ...]
    validation: tuple[Sample, ...]
    generation: tuple[Sample, ...]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "x"


class StoredExplainer(Explainer):
    """The server's explainer with its generations and drifts kept in the workbench's stores."""

    def __init__(self, bench: Workbench, summarizer: Summarizer):
        super().__init__(bench.base, summarizer, bench.probe_prompts, bench.probe, chat=bench.chat)
        self.bench = bench

    def _answers(self, model) -> list[str]:
        return self.bench.answers(None, self.prompts)

    def pllm_answers(self, adapter: Adapter) -> list[str]:
        return self.bench.answers(adapter, self.prompts)

    def drift(self, adapter: Adapter) -> Drift:
        return self.bench.pllm_drift(adapter, self.summarizer)

    def base_texts(self, prompts: list[str], chat: bool) -> list[str]:
        return self.bench.answers(None, prompts, chat)


class Workbench:
    """Shared state of one experiment run (see the module docstring)."""

    def __init__(self, ctx: Context):
        torch.set_num_threads(ctx.threads)
        self.ctx, self.cfg, self.seed = ctx, ctx.config, ctx.seed
        self.work = Path(ctx.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.base = load_model()
        self.corpus = load_corpus(ctx.corpus)
        self.roles = split_roles(self.corpus, seed=self.seed)
        self.styles = list(self.cfg.styles) or list(self.corpus.styles)
        unknown = [s for s in self.styles if s not in self.corpus.styles]
        if unknown:
            raise KeyError(f"styles {unknown} not in corpus {self.corpus.name} ({', '.join(self.corpus.styles)})")
        self.chat = any(s.prompt for s in self.corpus.neutral)
        self.probe = ProbeConfig(max_new_tokens=self.cfg.probe_tokens)
        self.texts = TextStore(self.work / "generations.json")
        self.cache = self._working_cache()
        self._summarizers: dict[str, Summarizer] = {}
        self._drifts: dict[str, dict[str, dict]] = {}
        self._user_drifts: dict[tuple[str, str], Drift] = {}
        self._selectors: dict[str, Selector] = {}
        self._runs: dict[tuple[str, str], FinetuneResult] = {}
        self._reports: dict[str, np.ndarray] = {}  # cloud pLLMs' training-data embeddings, by id

    # --- the cache ----------------------------------------------------------------------------
    def _working_cache(self) -> PLLMCache:
        # One working cache per probe setting: its basis and drifts are only comparable within one setting.
        root = self.work / f"cache-{slug(self.corpus.name)}-p{self.cfg.probe_prompts}-{self.probe_digest}"
        src = self.ctx.source_cache
        if src is not None and not (root / "index.sqlite").is_file():
            # the pLLMs only: a basis and drifts of another summarizer or probe setting are not this one's
            skip = shutil.ignore_patterns("writer.lock", "*.tmp", BASIS_FILE, DRIFTS_FILE)
            shutil.copytree(src, root, ignore=skip, dirs_exist_ok=True)
        return PLLMCache(root, BaseInfo.from_loaded(self.base))

    def pllms(self, similarity: float, styles: list[str] | None = None) -> list[CacheEntry]:
        """One pLLM per style at this similarity (trained now if the cache lacks it)."""
        config = FinetuneConfig(max_steps=self.cfg.pllm_steps, max_seq_len=self.cfg.max_seq_len, eval_every=5,
                                seed=self.seed)
        return build_cache(self.base, self.corpus, similarity, self.cache.root, config, styles=styles or self.styles,
                           seed=self.seed)

    # --- generations --------------------------------------------------------------------------
    @cached_property
    def probe_prompts(self) -> list[str]:
        """The server's probes (``probe.probe_set``): the test role's prompts (never in any pLLM's training
        data, nor a user's) topped up from the built-in probe set; for plain text, the built-in openings."""
        return list(probe_set(self.cfg.probe_prompts, self.roles["test"], seed=self.seed).prompts)

    @cached_property
    def probe_digest(self) -> str:
        """Identity of the probe setting (prompts and answer length): drifts and bases differ per setting."""
        probe = "\x1f".join([str(self.probe.max_new_tokens), *self.probe_prompts])
        return hashlib.sha256(probe.encode()).hexdigest()[:12]

    def answers(self, adapter: Adapter | None, prompts: list[str], chat: bool | None = None,
                max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers of the base model (None) or of an adapter, stored by content hash."""
        chat = self.chat if chat is None else chat
        probe = replace(self.probe, max_new_tokens=max_new_tokens or self.probe.max_new_tokens)
        who = "base" if adapter is None else adapter.content_hash
        keys = [f"{who}|{int(chat)}|{probe.max_new_tokens}|{p}" for p in prompts]
        by_key = dict(zip(keys, prompts, strict=True))

        def make(missing: list[str]) -> list[str]:
            todo = [by_key[k] for k in missing]
            if adapter is None:
                return generate(self.base.model, self.base.tokenizer, todo, probe.max_new_tokens, probe.batch_size,
                                chat=chat)
            return adapter_answers(self.base, adapter, todo, probe, chat=chat)

        return self.texts.get(keys, make)

    # --- summarizers and drifts ---------------------------------------------------------------
    def summarizer(self, spec: str | None = None) -> Summarizer:
        """A summarizer over the embedded model (default) or any model spec ``load_model`` accepts."""
        spec = spec or DEFAULT_SPEC
        if spec not in self._summarizers:
            model = self.base if spec == self.base.spec else load_model(spec)
            self._summarizers[spec] = Summarizer(model)
        return self._summarizers[spec]

    def _drift_store(self, summarizer: Summarizer) -> tuple[Path, dict[str, dict]]:
        """Drifts by pLLM, one file per summarizer and probe setting."""
        path = self.work / "drifts" / f"{slug(summarizer.fingerprint)}-{self.probe_digest}.json"
        if path.name not in self._drifts:
            self._drifts[path.name] = json.loads(path.read_text()) if path.is_file() else {}
        return path, self._drifts[path.name]

    def pllm_drift(self, adapter: Adapter, summarizer: Summarizer) -> Drift:
        """A pLLM's drift from the base on the probe prompts (stored per summarizer)."""
        path, store = self._drift_store(summarizer)
        if adapter.content_hash not in store:
            prompts = self.probe_prompts
            contexts = ProbeSet(tuple(prompts), self.chat).contexts(self.base.tokenizer)
            d = summarizer.drift(nonempty(self.answers(None, prompts)), nonempty(self.answers(adapter, prompts)),
                                 contexts)
            store[adapter.content_hash] = {"vector": d.vector.tolist(), "candidates": d.candidates,
                                           "probabilities": d.probabilities,
                                           "styled": None if d.styled is None else d.styled.tolist()}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(store))
        s = store[adapter.content_hash]
        styled = None if s.get("styled") is None else np.asarray(s["styled"], np.float32)
        return Drift(np.asarray(s["vector"], np.float32), list(s["candidates"]), list(s["probabilities"]), styled)

    def user_drift(self, user: User, summarizer: Summarizer) -> Drift:
        """A user's drift (the device computation), with the base model's answers from the store."""
        key = (summarizer.fingerprint, user.name)
        if key not in self._user_drifts:
            self._user_drifts[key] = user_drift(
                self.base, summarizer, user.samples, self.probe,
                base_answers=lambda ps, chat: self.answers(None, ps, chat),
            )
        return self._user_drifts[key]

    def explain(self, entries: list[CacheEntry]) -> Basis:
        """Explain these pLLMs into the working cache's basis with the default summarizer (what the
        XPerT selector reads): Algorithm 1 in cache order, then every entry re-projected."""
        summarizer = self.summarizer()
        basis = open_basis(self.cache.root, summarizer, 0.1, 0.2, orthogonalize=not self.cfg.paper_basis,
                           complete=not self.cfg.paper_basis)
        explainer = StoredExplainer(self, summarizer)
        calibrate_users(basis, explainer, human_references(self.roles["test"], self.probe_prompts),
                        parse_human_weight(self.cfg.human_weight))
        wanted = {e.id for e in entries}
        pending = [e for e in unexplained(self.cache) if e.id in wanted]
        reports = self.cloud_reports(pending)
        explain_cache(self.cache, explainer, basis, ids=[e.id for e in entries], reports=reports)
        return basis

    def cloud_reports(self, entries: list[CacheEntry]) -> dict[str, np.ndarray]:
        """``production.cloud_reports`` with the default summarizer, each embedded once per run (explaining
        and the harness's self-report checks read the same ones)."""
        todo = [e for e in entries if e.id not in self._reports]
        self._reports.update(cloud_reports(self.summarizer(), self.base.tokenizer, self.corpus, todo))
        return {e.id: self._reports[e.id] for e in entries if e.id in self._reports}

    def fresh_basis(self, drifts: dict[str, Drift], summarizer: Summarizer, tau_orth: float = 0.1,
                    tau_res: float = 0.2, paper: bool | None = None
                    ) -> tuple[Basis, list[Decomposition], dict[str, np.ndarray]]:
        """Algorithm 1 over these drifts (by id, in order) into a new in-memory basis (threshold sweeps,
        other summarizers); returns the basis, the decompositions and every id's coordinates on it."""
        paper = self.cfg.paper_basis if paper is None else paper
        basis = Basis(dim=summarizer.dim, tau_orth=tau_orth, tau_res=tau_res, summarizer=summarizer.fingerprint,
                      orthogonalize=not paper, complete=not paper)
        decs = [basis.decompose(d.vector, d.candidates, summarizer.subvector) for d in drifts.values()]
        coords = dict(zip(drifts, basis.project_all([d.vector for d in drifts.values()]), strict=True))
        return basis, decs, coords

    def pllm_drifts(self, entries: list[CacheEntry], summarizer: Summarizer) -> dict[str, Drift]:
        return {e.id: self.pllm_drift(self.cache.load_adapter(e.id), summarizer) for e in entries}

    def nearest_label(self, user: User, summarizer: Summarizer, basis: Basis, coords: dict[str, np.ndarray]) -> str:
        """Eq. 1 on an in-memory basis: the label of the pLLM nearest to the user's coordinate."""
        choice = nearest(basis.user_coordinates(self.user_drift(user, summarizer).vector), coords)
        return self.cache.get(choice.ids[0]).label

    # --- users --------------------------------------------------------------------------------
    def users(self, specs: list[str] | None = None, per_spec: int | None = None, n: int | None = None) -> list[User]:
        """Users of each spec (a style, or a mix ``a+b`` / ``a:0.7+b:0.3``), disjoint samples per spec.

        Validation and generation samples come from the test role of the user's style(s).
        """
        out = []
        for spec in specs or self.styles:
            mix = _parse_mix(spec)
            for u in range(per_spec or self.cfg.users_per_style):
                samples = user_samples(self.roles["user"], dict(mix), n or self.cfg.user_samples, user_index=u,
                                       seed=self.seed)
                held = [s for style, _ in mix for s in self.roles["test"].styles[style]]
                held = [held[i] for i in np.random.default_rng(self.seed + u).permutation(len(held))]
                val, gen = held[: self.cfg.val_samples], held[self.cfg.val_samples:][: self.cfg.gen_prompts]
                out.append(User(f"{spec}#{u}", spec, tuple(mix), tuple(samples), tuple(val), tuple(gen)))
        return out[: self.cfg.max_users or None]

    # --- selection ----------------------------------------------------------------------------
    def selector(self, name: str) -> Selector:
        if name not in self._selectors:
            options: dict[str, object] = {}
            if name == "xpert":
                options = {"summarizer": self.summarizer(), "probe": self.probe}
            elif name == "bo" and self.cfg.bo_trials:
                options = {"trials": self.cfg.bo_trials}
            elif name == "text-encoder":
                options = {"prompts": self.probe_prompts, "probe": self.probe}
            self._selectors[name] = make_selector(name, **options)
        return self._selectors[name]

    def select(self, name: str, user: User, entries: list[CacheEntry], selector: Selector | None = None,
               cache: PLLMCache | None = None) -> Selection:
        """One selection by method ``name`` (or by ``selector``) among ``entries``; the text encoder reads
        the stored probe answers instead of probing again."""
        selector = selector or self.selector(name)
        if name == "text-encoder":
            for e in entries:
                if e.id not in selector.vectors:
                    answers = self.answers((cache or self.cache).load_adapter(e.id), self.probe_prompts)
                    selector.add_texts(e.id, nonempty(answers))
        config = FinetuneConfig(max_seq_len=self.cfg.max_seq_len)
        # a seed per user, drawn as the Flower round loop draws it (one shared seed: the same random pick for all)
        task = SelectionTask(self.base, cache or self.cache, user.samples, label=user.label,
                             seed=selection_seed(self.seed, 0, user.name), ids=tuple(e.id for e in entries),
                             config=config, sizes=MessageSizes())
        return selector.select(task)

    # --- fine-tuning --------------------------------------------------------------------------
    def finetune_config(self) -> FinetuneConfig:
        return FinetuneConfig(max_steps=self.cfg.finetune_steps, max_seq_len=self.cfg.max_seq_len,
                              eval_every=self.cfg.eval_every, seed=self.seed)

    def scratch(self, user: User) -> FinetuneResult:
        """The user's from-scratch run, with its own plateau as the target (``target_from_scratch``)."""
        key = (user.name, "scratch")
        if key not in self._runs:
            run = finetune(self.base, user.samples, user.validation, self.finetune_config())
            self._runs[key] = with_target(run, target_from_scratch(run))
        return self._runs[key]

    def finetune_from(self, user: User, start: str | Adapter | None) -> FinetuneResult:
        """Fine-tune from a cached pLLM id, an adapter (a merge) or the base (None) to the scratch target."""
        if start is None:
            return self.scratch(user)
        adapter = self.cache.load_adapter(start) if isinstance(start, str) else start
        key = (user.name, adapter.content_hash)
        if key not in self._runs:
            config = replace(self.finetune_config(), target_loss=self.scratch(user).target_loss)
            self._runs[key] = finetune(self.base, user.samples, user.validation, config, start=adapter)
        return self._runs[key]


def _parse_mix(spec: str) -> tuple[tuple[str, float], ...]:
    parts = []
    for part in spec.split("+"):
        style, _, weight = part.partition(":")
        parts.append((style.strip(), float(weight) if weight else 1.0))
    total = sum(w for _, w in parts)
    return tuple((s, w / total) for s, w in parts)
