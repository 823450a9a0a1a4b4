"""The server's run config: ``XPerTConfig``, every key the ServerApp reads, in sections.

Read once by ``XPerTConfig.from_run_config(context.run_config)`` (``protocol.run_config.read``: no
fallbacks, pyproject.toml holds the defaults); the sections the devices read too (``Common``,
``Probe``, ``Reports``) come from ``protocol.run_config``. Each section checks its own ranges, and
``XPerTConfig`` what spans sections, so a bad run fails at its start, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import protocol
from protocol.run_config import Common, Probe, Reports, RunConfigError, Section, require
from xpert_fl.baselines import SELECTORS
from xpert_fl.basis import parse_human_weight
from xpert_fl.select import check_distance

TRIAL_METHODS = ("bo", "hyperband")  # the methods with a budget of evaluated pLLMs (selection-trials)


@dataclass(frozen=True)
class Rounds(Section):
    """How the run proceeds: rounds, arrivals, waiting, the server's threads."""

    num_server_rounds: int
    users_per_round: int  # 0: every registered user, every round
    min_nodes: int  # wait for this many connected nodes before the first round
    timeout: float  # seconds to wait for the replies of one phase
    server_threads: int  # torch threads of the server process (0: torch's default, all cores)

    def __post_init__(self) -> None:
        if self.num_server_rounds < 1 or self.users_per_round < 0 or self.min_nodes < 1:
            raise RunConfigError("num-server-rounds and min-nodes must be >= 1, users-per-round >= 0")


@dataclass(frozen=True)
class Storage(Section):
    """Where the run writes: relative paths resolve against the ServerApp's working directory."""

    cache_dir: str  # "": <results-dir>/cache; an existing cache is continued
    results_dir: str

    def results_path(self) -> Path:
        return Path(self.results_dir).expanduser().resolve()

    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser().resolve() if self.cache_dir else self.results_path() / "cache"


@dataclass(frozen=True)
class BasisSettings(Section):
    """How the common basis grows (Algorithm 1); fixed when the cache's basis is created."""

    tau_orth: float
    tau_res: float
    orthogonalize: bool
    complete_basis: bool  # residual completion when candidate words run out (basis.py)
    max_candidates: int  # candidate words examined per pLLM at most (each costs one forward)


@dataclass(frozen=True)
class Selection(Section):
    """How devices choose: XPerT's rules, or the baseline method that replaces it."""

    merge_delta: float  # selection distance above which a merge is tried; inf: never merge
    distance: str  # selection distance: "drift" (between explained drifts) | "l1" (paper's Eq. 1)
    human_weight: float  # share of the users' reference (neutral human texts' embedding) devices remove
    max_parents: int
    selection: str  # selection method: a name of xpert_fl.baselines.SELECTORS
    selection_trials: int  # bo / hyperband: pLLMs evaluated at most (0: bo half of them, hyperband all)

    def __post_init__(self) -> None:
        top = protocol.MAX_PARENTS  # devices refuse a select request beyond it
        require(1 <= self.max_parents <= top, "max_parents", self.max_parents, f"must be in [1, {top}]")
        try:
            parse_human_weight(self.human_weight)
        except ValueError as err:
            raise RunConfigError(f"run config human-weight: {err}") from err
        require(self.merge_delta >= 0, "merge_delta", self.merge_delta, "must be >= 0 (inf: never merge)")
        check_distance(self.distance)
        if self.selection not in SELECTORS:
            raise RunConfigError(f"selection must be one of {sorted(SELECTORS)}, got {self.selection!r}")
        if self.selection_trials < 0 or (self.selection_trials and self.selection not in TRIAL_METHODS):
            raise RunConfigError(f"selection-trials (>= 0) applies to {' and '.join(TRIAL_METHODS)} only")


@dataclass(frozen=True)
class Budget(Section):
    """The devices' fine-tuning budget, sent in every ``train`` message (``XPerTConfig.finetune_fields``)."""

    max_steps: int
    lr: float
    rank: int
    alpha: float
    batch_size: int
    max_seq_len: int
    eval_every: int
    patience: int
    target_loss: float  # > 0: stop at this held-out loss; ignored when compare-scratch sets one
    compare_scratch: bool  # devices also fine-tune from the base model to measure savings


@dataclass(frozen=True)
class XPerTConfig(Section):
    """Every key the server reads (the devices' own keys: ``clients.config.DeviceConfig``)."""

    rounds: Rounds
    common: Common
    storage: Storage
    probe: Probe
    basis: BasisSettings
    select: Selection
    reports: Reports
    budget: Budget

    def __post_init__(self) -> None:
        if self.select.selection == "oracle" and not self.reports.report_labels:
            raise RunConfigError("selection 'oracle' reads the style labels devices report: set report-labels = true")

    def finetune_fields(self) -> dict:
        """The fine-tuning budget sent to devices (FinetuneConfig field names): every run-config key of it,
        so no FinetuneConfig default (the library's, for offline use) stands in for a run setting."""
        b = self.budget
        return {
            "max_steps": b.max_steps, "lr": b.lr, "rank": b.rank, "alpha": b.alpha,
            "batch_size": b.batch_size, "eval_batch_size": max(b.batch_size, 4),
            "max_seq_len": b.max_seq_len, "eval_every": b.eval_every, "patience": b.patience,
            "target_loss": b.target_loss if b.target_loss > 0 else None, "seed": self.common.seed,
        }
