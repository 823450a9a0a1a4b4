"""LoRA fine-tuning of a starting model on a user's samples, to a target loss, with cost accounting.

A *start point* is the base model (a fresh LoRA adapter, ``start=None``) or a cached / merged pLLM
(an :class:`~xpert_fl.adapters.Adapter` whose weights are continued: its rank, alpha and target
modules win over the config, every LoRA tensor of it is trainable). Everything else (optimizer,
batches, evaluation schedule, stop rules) is the same for every start point, so "steps to target"
compares fairly.

Protocol:

1. Fine-tune from the base (``start=None``) with no target: it runs until the held-out loss stops
   improving (``patience`` evaluations without improvement), ``max_steps`` or ``max_seconds``.
2. ``target = target_from_scratch(scratch)`` = that run's best held-out loss x (1 + 1%).
   The same number is the target of every start point. ``with_target(scratch, target)`` reads the
   from-scratch steps/seconds/samples to target off its own history (the run is deterministic, so a
   re-run with the target would stop at the same evaluation).
3. Fine-tune from each pLLM with ``config.target_loss = target``: it stops at the first evaluation
   at or below the target. A pLLM that already starts at or below it reports 0 steps.
4. Data efficiency: :func:`samples_to_target` scans increasing sample counts.

One module per concept, all names re-exported here (``from xpert_fl.finetune import finetune``):
``config`` (hyper-parameters), ``batches`` (tokens and padded batches), ``loss`` (completion NLL),
``model`` (the trained PeftModel over a weight-sharing copy of the base), ``meter`` (energy, peak
memory), ``results`` (what a run produced and cost), ``targets`` (the target protocol), ``engine``
(the backend interface and the PyTorch engine), ``loop`` (the training loop), ``efficiency`` (the
data-efficiency search).
"""

from xpert_fl.finetune.batches import (
    IGNORE_INDEX,
    bucketed_batches,
    collate,
    encode,
    eval_batches,
    length_batches,
    pad_token_id,
)
from xpert_fl.finetune.config import FinetuneConfig
from xpert_fl.finetune.efficiency import DEFAULT_COUNTS, DataEfficiency, default_counts, samples_to_target
from xpert_fl.finetune.engine import TorchSession, TrainSession
from xpert_fl.finetune.loop import finetune, train_loop
from xpert_fl.finetune.loss import batch_nll, evaluate_loss, row_nll
from xpert_fl.finetune.meter import DEFAULT_WATTS_PER_CORE, RAPL_ENERGY, EnergyMeter, PeakRSS
from xpert_fl.finetune.model import prepare_model, shared_copy
from xpert_fl.finetune.results import EvalPoint, FinetuneResult
from xpert_fl.finetune.targets import TARGET_TOLERANCE, first_at_or_below, target_from_scratch, with_target

__all__ = [
    "DEFAULT_COUNTS",
    "DEFAULT_WATTS_PER_CORE",
    "IGNORE_INDEX",
    "RAPL_ENERGY",
    "TARGET_TOLERANCE",
    "DataEfficiency",
    "EnergyMeter",
    "EvalPoint",
    "FinetuneConfig",
    "FinetuneResult",
    "PeakRSS",
    "TorchSession",
    "TrainSession",
    "batch_nll",
    "bucketed_batches",
    "collate",
    "default_counts",
    "encode",
    "eval_batches",
    "evaluate_loss",
    "finetune",
    "first_at_or_below",
    "length_batches",
    "pad_token_id",
    "prepare_model",
    "row_nll",
    "samples_to_target",
    "shared_copy",
    "target_from_scratch",
    "train_loop",
    "with_target",
]
