"""The experiment suite of paper §7 : `xpert experiment NAME --out DIR`.

One module per experiment; each defines NAME, TITLE, SMALL / FULL presets (overrides of
``runner.ExperimentConfig``), ROW_KEYS, PAPER (the paper's reference numbers), ``run(bench) -> Outcome``,
``plot(result, path)`` and ``markdown(result)`` (its table in benchmarks/results.md). See README.md.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

MODULES = ("selection_accuracy", "personalization_cost", "selection_cost", "scaling", "merging", "thresholds",
           "latent_space", "summarizer_size")


def load(name: str) -> ModuleType:
    """The module of experiment ``name`` (e.g. "selection-accuracy")."""
    if name.replace("-", "_") not in MODULES:
        raise ValueError(f"unknown experiment {name!r}; choose one of {names()}")
    return import_module(f"{__name__}.{name.replace('-', '_')}")


def experiments() -> dict[str, ModuleType]:
    """Experiment name -> module, in the order of the paper's §7."""
    return {name: load(name) for name in names()}


def names() -> list[str]:
    return [m.replace("_", "-") for m in MODULES]
