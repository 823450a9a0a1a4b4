"""Calibration of the users' reference ``h``: what a device removes from its drift before projecting.

A user's drift is how its writing differs from neutral human writing, as a pLLM's is how its writing
differs from the base's; the server measures that neutral reference once per basis, on public neutral
human texts embedded exactly as a device embeds its own, and the basis carries it to the devices.
"""

from __future__ import annotations

from collections.abc import Sequence

from xpert_fl.basis import Basis
from xpert_fl.data.corpus import Sample, StyleCorpus
from xpert_fl.explain.coordinates import check_basis
from xpert_fl.explain.explainer import Explainer


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
    check_basis(basis, explainer.summarizer)
    h = basis.human_offset
    if h is None and weight > 0:
        if not references:
            raise ValueError("a human weight needs neutral human reference texts to measure the reference on")
        h = explainer.human_offset(references)
    basis.set_human_offset(h, weight)
