"""Probing (paper §3.1, §4.1): answers of the base model and of a pLLM to the same prompts.

Greedy, bounded, batched with left padding, so the same prompts always give the same answers: the
drift between base and pLLM answers is what the summarizer explains.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from importlib import resources

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from xpert_fl.chat import chat_prompt
from xpert_fl.data.corpus import StyleCorpus


def probe_prompts(n: int = 50, corpus: StyleCorpus | None = None, seed: int = 0) -> list[str]:
    """``n`` probe instructions, a fixed deterministic sample: of the built-in probe set (64 everyday
    instructions disjoint from every built-in corpus prompt), or of a corpus's prompts."""
    if corpus is None:
        name, prompts = "the built-in probe set", builtin_probe_set()
    else:
        name, prompts = f"corpus {corpus.name}", sorted({s.prompt for s in corpus.neutral if s.prompt})
    if not prompts:
        raise ValueError(f"{name} has no prompts to probe with")
    random.Random(seed).shuffle(prompts)
    if n > len(prompts):
        raise ValueError(f"{name} has {len(prompts)} prompts, {n} requested")
    return prompts[:n]


def builtin_probe_set() -> list[str]:
    """The server's default probe prompts (``xpert_fl/data/builtin/probes.txt``), in file order.

    More probes average out more of each answer's content: on the embedded model, selection accuracy
    rose from 0.65 to 0.92 going from 8 to 16 probes (benchmarks/selection_accuracy.py), and a
    corpus's held-out test prompts alone are too few (21 in the built-in corpus).
    """
    text = (resources.files("xpert_fl.data") / "builtin" / "probes.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


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
