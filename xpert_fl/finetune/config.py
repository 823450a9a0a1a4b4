"""The hyper-parameters of one fine-tuning run, checked once when they are made.

One frozen, validated config is what makes runs from different start points and engines compare:
they all read the same optimizer, batch, evaluation and stop settings from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from xpert_fl.finetune.meter import DEFAULT_WATTS_PER_CORE


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run. Defaults: a 135M model on 2 CPU cores in minutes.

    ``rank``/``alpha``/``target_modules`` only apply to a fresh adapter (a continued adapter keeps
    its own). ``eval_every``/``patience``: evaluate the held-out loss every ``eval_every`` steps;
    stop after ``patience`` evaluations in a row without an improvement larger than ``min_delta``.
    ``target_loss``: stop at the first evaluation at or below it (None: no target). ``max_steps=0``
    only evaluates the start point.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    batch_size: int = 4
    eval_batch_size: int = 8
    bucket_batches: int = 4
    max_seq_len: int = 192
    max_steps: int = 60
    max_seconds: float | None = None
    eval_every: int = 2
    patience: int = 5
    min_delta: float = 0.0
    target_loss: float | None = None
    seed: int = 0
    threads: int | None = None
    watts_per_core: float = DEFAULT_WATTS_PER_CORE

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"FinetuneConfig.{name} must be an integer >= {minimum}, got {value!r}")

        for name in ("rank", "batch_size", "eval_batch_size", "bucket_batches", "eval_every", "patience"):
            positive_int(name)
        positive_int("max_steps", 0)
        positive_int("max_seq_len", 8)
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(
                f"FinetuneConfig.target_modules must name at least one module, got {self.target_modules!r}"
            )
        checks = {
            "alpha": self.alpha > 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_seconds": self.max_seconds is None or self.max_seconds > 0,
            "min_delta": self.min_delta >= 0,
            "target_loss": self.target_loss is None or self.target_loss > 0,
            "threads": self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
            "watts_per_core": self.watts_per_core > 0,
        }
        rules = {
            "alpha": "> 0",
            "dropout": "in [0, 1)",
            "lr": "> 0",
            "weight_decay": ">= 0",
            "max_grad_norm": "> 0 or None",
            "max_seconds": "> 0 or None",
            "min_delta": ">= 0",
            "target_loss": "> 0 or None",
            "threads": "an integer >= 1 or None",
            "watts_per_core": "> 0",
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                ok = False
            if not ok:
                raise ValueError(f"FinetuneConfig.{name} must be {rules[name]}, got {value!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d
