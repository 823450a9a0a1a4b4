"""Data efficiency: the fewest samples (of a grid) with which a start point reaches the target."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from xpert_fl.adapters import Adapter
from xpert_fl.data.corpus import Sample
from xpert_fl.finetune.config import FinetuneConfig
from xpert_fl.finetune.loop import finetune
from xpert_fl.finetune.results import FinetuneResult
from xpert_fl.models import LoadedModel

DEFAULT_COUNTS = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@dataclass
class DataEfficiency:
    """Smallest sample count (of those tried) with which a start point reached the target, or None."""

    samples_needed: int | None
    target_loss: float
    counts: list[int]  # the search grid, ascending
    runs: dict[int, FinetuneResult]  # the counts actually run

    def to_json(self) -> dict:
        return {
            "samples_needed": self.samples_needed,
            "target_loss": self.target_loss,
            "counts": self.counts,
            "search": "ascending scan over counts, stop at the first that reaches the target",
            "runs": {str(n): r.to_json() for n, r in self.runs.items()},
        }


def default_counts(pool_size: int) -> list[int]:
    """The search grid: DEFAULT_COUNTS up to the pool size, plus the pool size itself."""
    if pool_size < 1:
        raise ValueError("the sample pool is empty")
    return sorted({n for n in DEFAULT_COUNTS if n < pool_size} | {pool_size})


def samples_to_target(
    loaded: LoadedModel,
    pool: Sequence[Sample],
    test: Sequence[Sample],
    config: FinetuneConfig,
    start: Adapter | None = None,
    counts: Sequence[int] | None = None,
    progress: bool = False,
) -> DataEfficiency:
    """Data efficiency: the smallest n such that fine-tuning ``start`` on ``pool[:n]`` reaches the target.

    Search: ascending scan over ``counts`` (default :func:`default_counts`), one full run per count
    with the same config (``config.target_loss`` is required: the from-scratch target), stopping at
    the first count that reaches it. No monotonicity is assumed (a binary search would need it; with a
    step budget and early stopping, more data is not guaranteed to reach a target sooner), so the
    answer is exactly "the smallest count of the grid that works", at the price of running every
    smaller count. Subsets are nested prefixes of ``pool``: shuffle the pool beforehand.
    """
    if config.target_loss is None:
        raise ValueError("samples_to_target needs config.target_loss (e.g. target_from_scratch(scratch_result))")
    grid = list(counts) if counts is not None else default_counts(len(pool))
    if not grid or grid != sorted(set(grid)) or grid[0] < 1 or grid[-1] > len(pool):
        raise ValueError(f"counts must be strictly increasing integers in [1, {len(pool)}], got {grid}")
    runs: dict[int, FinetuneResult] = {}
    for n in grid:
        result = finetune(loaded, pool[:n], test, config, start=start, progress=progress)
        runs[n] = result
        if result.reached_target:
            return DataEfficiency(n, config.target_loss, grid, runs)
    return DataEfficiency(None, config.target_loss, grid, runs)
