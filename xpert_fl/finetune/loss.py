"""The loss every start point is judged by: token-weighted mean next-token NLL over completion tokens.

Prompt tokens are masked (:mod:`xpert_fl.finetune.batches`); sums and counts are kept apart so that
the mean over a set weights every completion token equally, whatever the batching.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from xpert_fl.data.corpus import Sample
from xpert_fl.finetune.batches import IGNORE_INDEX, collate, encode, length_batches, pad_token_id
from xpert_fl.finetune.config import FinetuneConfig


def row_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed next-token NLL over labelled tokens (fp32) and their count (per-sample losses)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none").sum(1)
    return nll, (labels != IGNORE_INDEX).sum(1)


def summed_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled tokens (fp32) and their count."""
    nll, n = row_nll(model, batch)
    return nll.sum(), int(n.sum())


@torch.no_grad()
def batch_nll(
    model: torch.nn.Module, encoded: Sequence[dict], pad_id: int, batches: Iterable[Sequence[int]]
) -> Iterator[tuple[float, int, int]]:
    """Per batch, in the given order: summed completion NLL, completion tokens, tokens forwarded (non-pad).

    A generator so that a caller can stop early (HyperBand's evaluation batches); the model runs in
    eval mode and gets its mode back when the generator finishes or is closed.
    """
    was_training = model.training
    model.eval()
    try:
        for idx in batches:
            batch = collate([encoded[i] for i in idx], pad_id)
            nll, n = summed_nll(model, batch)
            yield float(nll), n, int(batch["attention_mask"].sum())
    finally:
        model.train(was_training)


def encoded_loss(model: torch.nn.Module, encoded: list[dict], pad_id: int, batch_size: int) -> float:
    total, count = 0.0, 0
    for nll, n, _ in batch_nll(model, encoded, pad_id, length_batches(encoded, batch_size)):
        total, count = total + nll, count + n
    if count == 0:
        raise ValueError("no completion tokens to evaluate")
    return total / count


def evaluate_loss(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[Sample],
    config: FinetuneConfig | None = None,
) -> float:
    """Token-weighted mean NLL over completion tokens of ``samples`` (no grad; model left in its mode)."""
    config = config or FinetuneConfig()
    if not samples:
        raise ValueError("evaluate_loss needs at least one sample")
    return encoded_loss(
        model, encode(tokenizer, samples, config.max_seq_len), pad_token_id(tokenizer), config.eval_batch_size
    )
