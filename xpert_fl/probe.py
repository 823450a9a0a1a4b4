"""Probing (paper §3.1, §4.1): answers of the base model and of a pLLM to the same prompts.

Greedy, bounded, batched with left padding, so the same prompts always give the same answers: the
drift between base and pLLM answers is what the summarizer explains.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from xpert_fl.adapters import Adapter
from xpert_fl.chat import chat_prompt
from xpert_fl.data.corpus import StyleCorpus
from xpert_fl.models import LoadedModel


@dataclass(frozen=True)
class ProbeSet:
    """What pLLMs are probed with: instructions answered in a chat turn, or (prompt-less corpora) plain
    openings the pLLM continues as text."""

    prompts: tuple[str, ...]
    chat: bool = True

    def contexts(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The text each answer follows: its chat turn, or the opening itself."""
        return [chat_prompt(tokenizer, p) for p in self.prompts] if self.chat else list(self.prompts)


@dataclass(frozen=True)
class ProbeConfig:
    """How models are probed. Paper: 50 Alpaca prompts; CPU default: fewer, shorter answers."""

    max_new_tokens: int = 48
    batch_size: int = 8
    prefix_fraction: float = 0.3  # prompt-less text: the share of words given to the base as prefix


def probe_set(n: int, corpus: StyleCorpus | None = None, seed: int = 0) -> ProbeSet:
    """The server's probes for a corpus (pass its held-out *test* role): ``probe_prompts`` for
    instruction data; for a prompt-less corpus the first ``n`` built-in openings, continued as plain
    text. Why openings: a pLLM trained on plain text never saw a chat turn, and a prefix of someone's
    text imposes that text's topic; from a bare opening it writes what it learned. On debian-fortunes
    (benchmarks/selection_harness.py) openings took the text encoder from 0.36 to 0.62 over neutral
    prefixes."""
    if corpus is not None and corpus.neutral and not any(s.prompt for s in corpus.neutral):
        openings = builtin_openings()
        if n > len(openings):
            raise ValueError(f"prompt-less corpus {corpus.name}: {len(openings)} built-in openings, {n} requested")
        return ProbeSet(tuple(openings[:n]), chat=False)
    return ProbeSet(tuple(probe_prompts(n, corpus, seed)), chat=True)


def probe_prompts(n: int = 50, corpus: StyleCorpus | None = None, seed: int = 0) -> list[str]:
    """``n`` probe instructions, a fixed deterministic sample: a corpus's own prompts first (pass its
    held-out *test* role), topped up from the built-in probe set; without a corpus, the probe set alone.

    Why this order: prompts from the users' own domain reveal a style better. On the built-in corpus
    (benchmarks/selection_harness.py, 240 users) 16 held-out corpus prompts selected better than
    16, and even 48, generic everyday prompts of the probe set.
    """
    own = sorted({s.prompt for s in corpus.neutral if s.prompt}) if corpus is not None else []
    extra = [p for p in builtin_probe_set() if p not in set(own)]
    rng = random.Random(seed)
    rng.shuffle(own)
    rng.shuffle(extra)
    prompts = own + extra
    if n > len(prompts):
        where = f"corpus {corpus.name} + the built-in probe set" if corpus is not None else "the built-in probe set"
        raise ValueError(f"{where}: {len(prompts)} prompts, {n} requested")
    return prompts[:n]


def builtin_probe_set() -> list[str]:
    """The built-in probe prompts (``xpert_fl/data/builtin/probes.json``), in file order: 64 everyday
    instructions disjoint from every built-in corpus prompt (no pLLM trained on them, no user wrote them)."""
    return list(_probes_file()["prompts"])


def builtin_openings() -> list[str]:
    """The built-in openings for prompt-less corpora (``probes.json``), in file order: 64 generic
    sentence starts with no topic of their own."""
    return list(_probes_file()["openings"])


def _probes_file() -> dict:
    return json.loads((resources.files("xpert_fl.data") / "builtin" / "probes.json").read_text(encoding="utf-8"))


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat: bool = True,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (as chat turns, or as plain text prefixes when chat=False)."""
    if not prompts:
        return []
    texts = [chat_prompt(tokenizer, p) if chat else p for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch together
    outputs: list[str] = [""] * len(texts)
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="probe", disable=not progress, leave=False):
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            for i, row in zip(batch, new, strict=True):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = saved_side
    return outputs


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


def nonempty(texts: Sequence[str]) -> list[str]:
    """``texts`` with each blank one replaced by the text "(no answer)": a model may answer with nothing (an
    immediate end of turn), and the summarizer and the text encoder need some text to embed."""
    return [t if t.strip() else "(no answer)" for t in texts]
