"""Selection methods behind one interface: XPerT and the paper's baselines (issue 6, item 1).

``make_selector("exhaustive").select(SelectionTask(base, cache, samples, seed=0, sizes=sizes))`` -> ``Selection``
(a ``Choice`` plus the device's bytes, loss evaluations, tokens and seconds; ``sizes`` weighs what the
device receives, e.g. ``protocol.MessageSizes()``). ``SELECTORS`` maps every method name (what a run
config or the CLI names) to its class; constructor keywords are its options.
A Flower device runs the same selectors on a ``ReceivedOffer`` (what its ``query.select`` carried)
instead of the cache (``clients.device.choose``). See ``core`` for the accounting, ``methods`` and
``text_encoder`` for each method.
"""

from __future__ import annotations

from xpert_fl.baselines.core import OfferedPLLM, ReceivedOffer, Selection, SelectionTask, Selector, needs_base
from xpert_fl.baselines.methods import (
    BayesOptSelector,
    ExhaustiveSelector,
    HyperbandSelector,
    OracleSelector,
    RandomSelector,
    ScratchSelector,
    XPerTSelector,
)
from xpert_fl.baselines.text_encoder import TextEncoder, TextEncoderSelector

SELECTORS: dict[str, type] = {
    cls.name: cls
    for cls in (
        XPerTSelector, ScratchSelector, RandomSelector, OracleSelector, ExhaustiveSelector, BayesOptSelector,
        HyperbandSelector, TextEncoderSelector,
    )
}


def make_selector(name: str, **options: object) -> Selector:
    """The selector registered as ``name``, constructed with ``options``."""
    try:
        cls = SELECTORS[name]
    except KeyError:
        raise ValueError(f"unknown selection method {name!r}; choose one of {sorted(SELECTORS)}") from None
    return cls(**options)


__all__ = [
    "SELECTORS", "BayesOptSelector", "ExhaustiveSelector", "HyperbandSelector", "OfferedPLLM", "OracleSelector",
    "RandomSelector", "ReceivedOffer", "ScratchSelector", "Selection", "SelectionTask", "Selector", "TextEncoder",
    "TextEncoderSelector", "XPerTSelector", "make_selector", "needs_base",
]
