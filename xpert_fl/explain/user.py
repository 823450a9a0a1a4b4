"""The device's side (paper §3.2): a user's drift from its own texts and its coordinates in the received basis.

The device embeds its own texts, removes the users' reference the basis carries (the same embedding of
neutral human texts, measured once by the server on public data: ``Explainer.human_offset``) and
projects the resulting drift on the received basis without adding to it (``Basis.user_coordinates``).
Only the choice leaves the device.
"""

from __future__ import annotations

from collections.abc import Sequence

from xpert_fl.basis import Basis
from xpert_fl.chat import chat_prompt
from xpert_fl.data.corpus import Sample
from xpert_fl.explain.coordinates import Explanation, check_basis
from xpert_fl.models import LoadedModel
from xpert_fl.probe import BaseAnswers, ProbeConfig, base_generator, nonempty
from xpert_fl.summarizer import Drift, Summarizer


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
    check_basis(basis, summarizer)
    d = user_drift(base, summarizer, samples, probe)
    coords = basis.user_coordinates(d.vector)
    return Explanation(coords, list(basis.words), basis.explain(coords), d)


def _split_text(text: str, fraction: float) -> tuple[str, str]:
    words = text.split()
    cut = max(1, min(len(words) - 1, round(fraction * len(words))))
    return " ".join(words[:cut]), " ".join(words[cut:])
