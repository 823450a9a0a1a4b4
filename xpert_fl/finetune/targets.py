"""The target protocol: one target loss, set by the run from scratch, for every start point.

``target = target_from_scratch(scratch)`` is that run's best held-out loss x (1 + 1%);
``with_target(scratch, target)`` reads the from-scratch steps/seconds/samples to target off its own
history (the run is deterministic, so a re-run with the target would stop at the same evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from xpert_fl.finetune.results import EvalPoint, FinetuneResult

TARGET_TOLERANCE = 0.01  # target = best from-scratch held-out loss x (1 + 1%)


def first_at_or_below(history: Sequence[EvalPoint], target: float) -> EvalPoint | None:
    """The first evaluation whose held-out loss is at or below ``target``."""
    return next((p for p in history if p.test_loss <= target), None)


def with_target(result: FinetuneResult, target: float) -> FinetuneResult:
    """The result with its to-target fields recomputed for ``target`` from its history.

    Valid for targets the run could have stopped at (a run is deterministic; a run that stopped early
    cannot say when it would have reached a lower target: such a target reads as unreached).
    """
    point = first_at_or_below(result.history, target)
    last = result.history[-1]
    hit = point or last
    return replace(
        result,
        target_loss=target,
        reached_target=point is not None,
        steps_to_target=point.step if point else None,
        seconds_to_target=point.seconds if point else None,
        train_seconds_to_target=point.train_seconds if point else None,
        energy_joules_to_target=point.energy_joules if point else None,
        samples_consumed=hit.samples,
    )


def target_from_scratch(result: FinetuneResult, tolerance: float = TARGET_TOLERANCE) -> float:
    """THE target of every start point: the from-scratch run's best held-out loss x (1 + tolerance).

    The tolerance (1%) turns "the best" into "the plateau": from scratch, the target is reached at the
    first evaluation within 1% of the best, not at a lucky last-digit minimum.
    """
    if result.start_adapter is not None:
        raise ValueError("target_from_scratch needs the result of a run from the base model (start=None)")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    return result.best_test_loss * (1.0 + tolerance)
