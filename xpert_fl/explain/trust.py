"""Trust of self-reports: when an uploader's embedding of its training data may explain its pLLM.

A device could report anything; what the pLLM writes under the server's probes is the server's own
evidence, so a report is used only where it agrees with that evidence.
"""

from __future__ import annotations

import numpy as np

from xpert_fl.basis import Basis
from xpert_fl.summarizer import Drift

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
