"""LoRA fine-tuning: masking, batching, training, continuation of a cached adapter, targets, costs.

Budget: the real embedded model on 2 shared CPU cores; runs use 4 train / 2 held-out samples of 64
tokens and a handful of steps. One intra-op thread: on a shared 2-core machine, two threads per
process oversubscribe the cores and run several times slower.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from xpert_fl.adapters import AdapterError
from xpert_fl.chat import chat_prompt
from xpert_fl.data import Sample, load_corpus, split_roles
from xpert_fl.finetune import (
    IGNORE_INDEX,
    EnergyMeter,
    FinetuneConfig,
    bucketed_batches,
    collate,
    default_counts,
    encode,
    evaluate_loss,
    finetune,
    first_at_or_below,
    pad_token_id,
    prepare_model,
    row_nll,
    samples_to_target,
    target_from_scratch,
    with_target,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = FinetuneConfig(
    max_seq_len=64, batch_size=2, eval_batch_size=2, max_steps=4, eval_every=2, lr=3e-3, seed=0, threads=1
)


@pytest.fixture(scope="module")
def data():
    roles = split_roles(load_corpus("builtin"), seed=0)
    return roles["user"].styles["sarcastic"][:4], roles["test"].styles["sarcastic"][:2]


@pytest.fixture(scope="module")
def base_checksum(base):
    return _checksum(base.model), {n: p.requires_grad for n, p in base.model.named_parameters()}


def _checksum(model) -> float:
    with torch.no_grad():
        return sum(float(p.double().sum()) for p in model.parameters())


@pytest.fixture(scope="module")
def scratch(base, data, base_checksum):
    train, test = data
    return finetune(base, train, test, TINY, progress=False)


# --- encoding and batching (no model forward) ------------------------------------------------------
def test_prompt_tokens_are_masked_exactly(base):
    tok = base.tokenizer
    sample = Sample("Name a colour.", "Blue, obviously.")
    (item,) = encode(tok, [sample], max_seq_len=128)
    n_prompt = len(tok(chat_prompt(tok, sample.prompt), add_special_tokens=False)["input_ids"])
    labels, ids = item["labels"], item["input_ids"]
    assert len(labels) == len(ids) > n_prompt
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[:n_prompt]) == chat_prompt(tok, sample.prompt)
    assert tok.decode(ids[n_prompt:]) == "Blue, obviously." + tok.eos_token


def test_plain_text_is_not_masked_and_long_samples_are_cut(base):
    tok = base.tokenizer
    (plain,) = encode(tok, [Sample("", "A short line of plain text.")], max_seq_len=128)
    assert plain["labels"] == plain["input_ids"]
    long = Sample("word " * 100, "answer " * 100)
    (item,) = encode(tok, [long], max_seq_len=64)
    assert len(item["input_ids"]) == 64
    n_completion = sum(label != IGNORE_INDEX for label in item["labels"])
    assert n_completion == 32  # the prompt is cut at the left to leave half the window to the answer
    (short_prompt,) = encode(tok, [Sample("Hi", "answer " * 100)], max_seq_len=64)
    assert len(short_prompt["input_ids"]) == 64 and short_prompt["labels"][0] == IGNORE_INDEX


def test_collate_right_pads():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_bucketed_batches_cover_each_sample_once_and_waste_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(20, 200) for _ in range(64)]
    batches = bucketed_batches(lengths, 4, random.Random(1), bucket_batches=4)
    assert sorted(i for b in batches for i in b) == list(range(64))
    assert batches == bucketed_batches(lengths, 4, random.Random(1), bucket_batches=4)
    assert batches != bucketed_batches(lengths, 4, random.Random(2), bucket_batches=4)

    def waste(bs):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs)

    shuffled = list(range(64))
    random.Random(1).shuffle(shuffled)
    unsorted = [shuffled[i : i + 4] for i in range(0, 64, 4)]
    assert waste(batches) < 0.5 * waste(unsorted)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rank": 0}, "rank"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"dropout": 1.0}, "dropout"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_steps": -1}, "max_steps"),
        ({"max_seq_len": 4}, "max_seq_len"),
        ({"eval_every": 0}, "eval_every"),
        ({"patience": 0}, "patience"),
        ({"target_modules": ()}, "target_modules"),
        ({"target_loss": -1.0}, "target_loss"),
        ({"max_seconds": 0}, "max_seconds"),
        ({"threads": 0}, "threads"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"FinetuneConfig.{field} "):
        FinetuneConfig(**kwargs)


def test_config_normalizes_target_modules():
    assert FinetuneConfig(target_modules=["q_proj"]).target_modules == ("q_proj",)
    assert FinetuneConfig(target_modules="v_proj").target_modules == ("v_proj",)


def test_energy_meter_reads_rapl_with_wraparound(tmp_path):
    counter = tmp_path / "energy_uj"
    (tmp_path / "max_energy_range_uj").write_text("1000000\n")
    counter.write_text("900000\n")
    meter = EnergyMeter(rapl_path=counter)
    assert meter.method == "rapl"
    counter.write_text("950000\n")
    assert meter.joules() == pytest.approx(0.05)
    counter.write_text("50000\n")  # wrapped at 1e6: +50000 + 50000 uJ
    assert meter.joules() == pytest.approx(0.15)


def test_energy_meter_falls_back_to_cpu_time_estimate(tmp_path):
    meter = EnergyMeter(watts_per_core=10.0, rapl_path=tmp_path / "missing")
    assert meter.method == "cpu-time x W/core estimate"
    sum(i * i for i in range(300_000))
    assert meter.joules() == pytest.approx(10.0 * meter.cpu_seconds, rel=0.05) and meter.joules() > 0


# --- training ---------------------------------------------------------------------------------------
def test_training_reduces_loss_on_tiny_budget(scratch):
    r = scratch
    assert r.steps == 4 and r.stop_reason == "max_steps"
    assert [p.step for p in r.history] == [0, 2, 4]
    assert r.best_test_loss < r.start_loss - 0.05
    assert r.history[2].train_loss < r.history[1].train_loss
    assert r.samples_consumed == 8 and r.tokens_trained > 0 and r.tokens_per_second > 0
    assert 0.0 <= r.pad_fraction < 0.5
    assert r.seconds >= r.train_seconds > 0 and r.peak_memory_mb > 100 and r.energy_joules > 0
    assert r.energy_method in ("rapl", "cpu-time x W/core estimate")
    assert r.adapter.base_fingerprint and r.start_adapter is None
    json.dumps(r.to_json())


def test_same_seed_gives_the_same_losses(base, data, scratch):
    train, test = data
    again = finetune(base, train, test, FinetuneConfig(**{**TINY.to_json(), "max_steps": 2}), progress=False)
    assert [(p.step, p.train_loss, p.test_loss) for p in again.history] == [
        (p.step, p.train_loss, p.test_loss) for p in scratch.history[:2]
    ]


def test_result_adapter_reproduces_best_loss_and_is_continued_from_its_weights(base, data, scratch):
    train, test = data
    adapter = scratch.adapter
    reloaded = adapter.to_peft(copy.deepcopy(base.model))
    own = evaluate_loss(reloaded, base.tokenizer, test, TINY)
    assert own == pytest.approx(scratch.best_test_loss, abs=1e-5)
    del reloaded

    cont = finetune(
        base, train, test, FinetuneConfig(**{**TINY.to_json(), "max_steps": 1}), start=adapter, progress=False
    )
    assert cont.start_loss == pytest.approx(own, abs=1e-5)
    assert abs(cont.start_loss - scratch.start_loss) > 0.05
    assert cont.start_adapter == adapter.content_hash and cont.steps == 1
    assert cont.adapter.config["r"] == adapter.config["r"]
    assert cont.history[1].test_loss != cont.start_loss  # it trained
    # the best weights come back: the start adapter itself if the step did not improve on it
    assert (cont.adapter.content_hash == adapter.content_hash) == (cont.best_step == 0)


def test_target_above_start_loss_is_reached_at_zero_steps(base, data, scratch):
    train, test = data
    cfg = FinetuneConfig(**{**TINY.to_json(), "target_loss": scratch.start_loss + 0.5})
    r = finetune(base, train, test, cfg, start=scratch.adapter, progress=False)
    assert r.reached_target and r.steps_to_target == 0 and r.steps == 0 and r.stop_reason == "target"
    assert r.samples_consumed == 0 and r.tokens_trained == 0
    assert r.adapter.content_hash == scratch.adapter.content_hash


def test_target_definition_and_reading_it_off_a_history(scratch):
    target = target_from_scratch(scratch)
    assert target == pytest.approx(scratch.best_test_loss * 1.01)
    at = with_target(scratch, target)
    point = first_at_or_below(scratch.history, target)
    assert at.reached_target and at.steps_to_target == point.step > 0
    assert at.samples_consumed == point.samples and at.seconds_to_target == point.seconds
    unreached = with_target(scratch, 0.5)
    assert not unreached.reached_target and unreached.steps_to_target is None


def test_patience_stops_and_keeps_best_weights(base, data):
    train, test = data
    cfg = FinetuneConfig(**{**TINY.to_json(), "lr": 0.5, "eval_every": 1, "patience": 1, "max_steps": 5})
    r = finetune(base, train, test, cfg, progress=False)
    assert r.stop_reason == "patience" and r.steps == 1
    assert r.final_test_loss > r.start_loss
    assert r.best_step == 0 and r.best_test_loss == r.start_loss
    assert all(float(t.abs().max()) == 0 for k, t in r.adapter.tensors.items() if "lora_B" in k)


def test_samples_to_target_scans_counts_in_order(base, data, scratch):
    train, test = data
    assert default_counts(30) == [4, 8, 12, 16, 24, 30] and default_counts(3) == [3]
    cfg = FinetuneConfig(**{**TINY.to_json(), "max_steps": 0, "target_loss": 0.5})
    miss = samples_to_target(base, train, test, cfg, counts=(2, 4))
    assert miss.samples_needed is None and sorted(miss.runs) == [2, 4]
    cfg = FinetuneConfig(**{**TINY.to_json(), "target_loss": scratch.start_loss + 0.5})
    hit = samples_to_target(base, train, test, cfg, counts=(2, 4))
    assert hit.samples_needed == 2 and list(hit.runs) == [2] and hit.runs[2].steps_to_target == 0
    json.dumps(hit.to_json())
    with pytest.raises(ValueError, match="target_loss"):
        samples_to_target(base, train, test, TINY)
    with pytest.raises(ValueError, match="increasing"):
        samples_to_target(base, train, test, cfg, counts=(4, 2))


def test_adapter_for_another_base_is_rejected(base, scratch):
    foreign = copy.copy(scratch.adapter)
    foreign.base_fingerprint = "0" * 16
    with pytest.raises(AdapterError, match="base model"):
        prepare_model(base, foreign, TINY)


def test_base_model_is_left_untouched(base, base_checksum, scratch):
    checksum, flags = base_checksum
    assert _checksum(base.model) == checksum
    assert {n: p.requires_grad for n, p in base.model.named_parameters()} == flags
    assert not any("lora" in name for name, _ in base.model.named_modules())
    assert not hasattr(base.model, "peft_config")


@pytest.mark.slow
def test_protocol_on_a_real_style(base):
    """Default config, 24 user samples: scratch finds its best, then its own adapter starts below the target."""
    roles = split_roles(load_corpus("builtin"), seed=0)
    train, test = roles["user"].styles["concise"][:24], roles["test"].styles["concise"][:8]
    cfg = FinetuneConfig(max_steps=30, threads=1)
    scratch = finetune(base, train, test, cfg, progress=False)
    assert scratch.best_test_loss < scratch.start_loss - 0.2 and scratch.best_step > 0
    target = target_from_scratch(scratch)
    assert 0 < with_target(scratch, target).steps_to_target <= scratch.best_step
    cached = finetune(
        base, train, test, FinetuneConfig(**{**cfg.to_json(), "target_loss": target}), start=scratch.adapter
    )
    assert cached.steps_to_target == 0 and cached.start_loss == pytest.approx(scratch.best_test_loss, abs=1e-5)


@torch.no_grad()
def test_row_nll_is_per_sample_and_sums_to_the_evaluation_loss(base, data):
    """Per-row losses of a padded batch equal each sample's loss alone (what a per-user loss needs)."""
    samples = [*data[0][:2], *data[1]]
    encoded = encode(base.tokenizer, samples, TINY.max_seq_len)
    pad = pad_token_id(base.tokenizer)
    nll, n = row_nll(base.model, collate(encoded, pad))
    alone = [row_nll(base.model, collate([e], pad)) for e in encoded]
    torch.testing.assert_close(nll, torch.cat([a for a, _ in alone]), rtol=1e-4, atol=1e-3)
    labelled = [sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in encoded]
    assert n.tolist() == [int(b) for _, b in alone] == labelled
    mean = evaluate_loss(base.model, base.tokenizer, samples, TINY)
    assert float(nll.sum() / n.sum()) == pytest.approx(mean, rel=1e-4)
