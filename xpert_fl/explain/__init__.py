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

One module per concern, all names re-exported here (``from xpert_fl.explain import Explainer``):
``explainer`` (the server's explainer and ``explain_cache``), ``user`` (the device's side),
``calibration`` (the users' reference), ``state`` (basis and drifts on disk, offered coordinates),
``trust`` (self-reports), ``coordinates`` (the :class:`Explanation` both sides produce). How models
are probed (``ProbeConfig``, ``adapter_answers``, ``base_generator``) lives in :mod:`xpert_fl.probe`.
"""

from xpert_fl.explain.calibration import calibrate_users, human_references
from xpert_fl.explain.coordinates import Explanation
from xpert_fl.explain.explainer import Explainer, explain_cache
from xpert_fl.explain.state import (
    BASIS_FILE,
    DRIFTS_FILE,
    load_drifts,
    offered_coordinates,
    open_basis,
    save_drifts,
    unexplained,
)
from xpert_fl.explain.trust import SELF_REPORT_MIN_COSINE, reported_drift, trusted_drift
from xpert_fl.explain.user import user_coordinates, user_drift
from xpert_fl.probe import BaseAnswers, ProbeConfig, adapter_answers, base_generator

__all__ = [
    "BASIS_FILE",
    "DRIFTS_FILE",
    "SELF_REPORT_MIN_COSINE",
    "BaseAnswers",
    "Explainer",
    "Explanation",
    "ProbeConfig",
    "adapter_answers",
    "base_generator",
    "calibrate_users",
    "explain_cache",
    "human_references",
    "load_drifts",
    "offered_coordinates",
    "open_basis",
    "reported_drift",
    "save_drifts",
    "trusted_drift",
    "unexplained",
    "user_coordinates",
    "user_drift",
]
