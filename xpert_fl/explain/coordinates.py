"""What both sides produce in the shared basis, and when a summarizer's drifts may be placed in it.

The server (pLLMs) and the device (the user's data) each turn a drift into coordinates and words of
one basis; both first check that the basis was built by the same summarizer (:func:`check_basis`),
since coordinates from different embeddings do not compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpert_fl.basis import Basis, BasisError, Decomposition
from xpert_fl.summarizer import Drift, Summarizer


@dataclass
class Explanation:
    """A pLLM (or a user's data) in the basis: coordinates, words, readable text, and the raw drift."""

    coords: np.ndarray
    words: list[str]
    text: str
    drift: Drift
    decomposition: Decomposition | None = None  # server side only: how the basis grew


def check_basis(basis: Basis, summarizer: Summarizer) -> None:
    """A BasisError unless ``basis`` can hold ``summarizer``'s drifts (no other summarizer named, same dimension)."""
    if basis.summarizer and basis.summarizer != summarizer.fingerprint:
        raise BasisError(
            f"basis was built with summarizer {basis.summarizer}, not {summarizer.fingerprint}: "
            "coordinates from different summarizers are not comparable"
        )
    if basis.dim != summarizer.dim:
        raise BasisError(f"basis dimension {basis.dim} != summarizer hidden size {summarizer.dim}")
