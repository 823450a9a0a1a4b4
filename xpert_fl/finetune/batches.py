"""A user's samples as token ids and padded batches: what every engine trains and evaluates on.

* Loss masking: prompt tokens (the chat template's system + user turn, from
  :func:`xpert_fl.chat.prompt_and_completion`) are labelled :data:`IGNORE_INDEX` (-100), so only
  completion tokens count. Prompt and completion are tokenized separately and concatenated, exactly
  the tokens a model sees when it generates after the prompt.
* Training batches: each epoch shuffles the samples, cuts them into pools of ``bucket_batches *
  batch_size``, sorts each pool by length and cuts it into batches, then shuffles the batch order;
  right padding. Held-out batches are sorted by length over the whole set (:func:`eval_batches`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from xpert_fl.chat import prompt_and_completion
from xpert_fl.data.corpus import Sample

IGNORE_INDEX = -100


def encode(tokenizer: PreTrainedTokenizerBase, samples: Sequence[Sample], max_seq_len: int) -> list[dict]:
    """Token ids and labels per sample; labels are -100 on the prompt (chat template) tokens.

    Too long: the completion is cut at the right; if the prompt would leave the completion fewer than
    ``max_seq_len // 2`` tokens, the prompt is cut at the left instead so that it does.
    """
    out = []
    for sample in samples:
        prompt, completion = prompt_and_completion(tokenizer, sample)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        keep_c = min(len(c), max(max_seq_len - len(p), max_seq_len // 2))
        c = c[:keep_c]
        p = p[max(0, len(p) - (max_seq_len - keep_c)) :]
        out.append({"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c})
    return out


def collate(items: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (pad id), attention_mask (0 on pads), labels (-100 on pads)."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.tensor(it["input_ids"])
        labels[i, :n] = torch.tensor(it["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bucketed_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random, bucket_batches: int = 4
) -> list[list[int]]:
    """One epoch of index batches: shuffle, sort by length within pools of ``bucket_batches`` batches, cut,
    shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])  # stable: ties stay shuffled
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used to right-pad batches: the tokenizer's pad token, else its eos token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return int(pad)


def length_batches(encoded: Sequence[dict], batch_size: int) -> list[list[int]]:
    """Index batches of similar lengths (least padding): the evaluation order of a whole set."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def eval_batches(encoded: Sequence[dict], pad_id: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Held-out batches sorted by length (little padding); every backend evaluates exactly these."""
    for idx in length_batches(encoded, batch_size):
        yield collate([encoded[i] for i in idx], pad_id)
