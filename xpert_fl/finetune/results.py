"""What a fine-tuning run produced and cost: one record per evaluation and one for the run.

Kept apart from the loop because engines, the target protocol, data-efficiency searches and the
experiments all read these records, while only the loop writes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from xpert_fl.adapters import Adapter
from xpert_fl.finetune.config import FinetuneConfig


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation: step, mean train loss since the previous evaluation (None at step 0), held-out
    loss, and the cumulative costs up to and including this evaluation."""

    step: int
    train_loss: float | None
    test_loss: float
    seconds: float
    train_seconds: float
    samples: int
    tokens: int
    energy_joules: float


@dataclass
class FinetuneResult:
    """What a run produced and cost. ``adapter`` holds the weights of the best held-out evaluation.

    To-target fields (``steps_to_target``, ``seconds_to_target``, ``train_seconds_to_target``,
    ``samples_consumed``, ``energy_joules_to_target``) are read at the first evaluation at or below
    ``target_loss``. Unreached (or no target): all ``*_to_target`` fields are None and
    ``samples_consumed`` is the whole run's; the whole-run costs are ``steps``, ``seconds``, ``energy_joules``.
    ``history`` has one :class:`EvalPoint` per evaluation, step 0 first.
    """

    adapter: Adapter
    start_loss: float
    best_test_loss: float
    best_step: int
    final_train_loss: float | None
    final_test_loss: float
    steps: int
    stop_reason: str  # "target" | "patience" | "max_steps" | "max_seconds"
    target_loss: float | None
    reached_target: bool
    steps_to_target: int | None
    seconds: float
    train_seconds: float
    eval_seconds: float
    seconds_to_target: float | None
    train_seconds_to_target: float | None
    samples_consumed: int
    tokens_trained: int
    tokens_per_second: float
    pad_fraction: float
    peak_memory_mb: float
    peak_memory_method: str
    cpu_seconds: float
    energy_joules: float
    energy_joules_to_target: float | None
    energy_method: str
    n_train: int
    n_test: int
    start_adapter: str | None  # content hash of the continued adapter, None from the base model
    config: FinetuneConfig
    history: list[EvalPoint] = field(default_factory=list)

    def to_json(self) -> dict:
        """JSON-ready summary (the adapter by content hash and size, not its tensors)."""
        skip = ("adapter", "config", "history")
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        d["adapter_hash"] = self.adapter.content_hash
        d["adapter_bytes"] = self.adapter.num_bytes
        d["config"] = self.config.to_json()
        d["history"] = [asdict(p) for p in self.history]
        return d
