"""The ONNX Runtime device engine: artifacts, parity with the PyTorch engine, PEFT round trip, bad input,
and the ClientApp's ``trainer = "ort"`` path.

Default suite: a tiny random Llama (2 layers, hidden 32) with the real tokenizer, exported in seconds;
the same code paths as the 135M model. Slow: the embedded SmolLM2-135M (export ~minutes, once per
cache). Parity tolerance, stated: per-evaluation train and held-out losses agree within 1e-4 relative
(measured ~1e-7 on the tiny model: same fp32 math, other kernels and summation order), LoRA tensors
within 1e-4 absolute after the same steps; an ORT-trained adapter loaded into PEFT reproduces ORT's
held-out loss within 1e-5 relative.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from peft import LoraConfig, get_peft_model
from run_configs import run_config
from transformers import LlamaConfig, LlamaForCausalLM

import protocol
from clients import client_app
from xpert_fl.adapters import Adapter, AdapterError, base_linear_shapes, validate_adapter
from xpert_fl.data import load_corpus, split_roles
from xpert_fl.device import get_trainer
from xpert_fl.device.artifacts import BASE_WEIGHTS, ArtifactMismatch, Artifacts, LoraShape, artifacts_for
from xpert_fl.device.ort_trainer import OrtSession, OrtTrainer
from xpert_fl.finetune import FinetuneConfig, encode, eval_batches, evaluate_loss, finetune, shared_copy
from xpert_fl.models import LoadedModel
from xpert_fl.select import Choice

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = FinetuneConfig(
    max_seq_len=64, batch_size=2, eval_batch_size=2, max_steps=6, eval_every=2, patience=10, lr=3e-2, seed=0,
    threads=1, rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"),
)
REL = 1e-4


def tiny_model(base: LoadedModel, seed: int = 0) -> LoadedModel:
    """A 2-layer random Llama with the real tokenizer (vocabulary and chat template)."""
    cfg = LlamaConfig(
        vocab_size=len(base.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LoadedModel(f"tiny-{seed}", "random", LlamaForCausalLM(cfg).eval(), base.tokenizer, 0.0)


def random_adapter(loaded: LoadedModel, seed: int, rank: int = 2, targets=("q_proj", "v_proj")) -> Adapter:
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=4, target_modules=list(targets), init_lora_weights=False)
    return Adapter.from_peft(get_peft_model(shared_copy(loaded.model), lora), loaded.fingerprint)


def close(a: float | None, b: float | None) -> bool:
    return a is None and b is None or abs(a - b) <= REL * max(abs(a), abs(b))


@pytest.fixture(scope="module")
def tiny(base):
    return tiny_model(base)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ort-cache")


@pytest.fixture(scope="module")
def artifacts(tiny, cache) -> Artifacts:
    return OrtTrainer(cache_dir=cache).artifacts_for(tiny, None, CFG)


@pytest.fixture(scope="module")
def data():
    roles = split_roles(load_corpus("builtin"), seed=0)
    return roles["user"].styles["sarcastic"][:4], roles["test"].styles["sarcastic"][:2]


@pytest.fixture(scope="module")
def runs(tiny, artifacts, data):
    train, test = data
    start = random_adapter(tiny, 1)
    ort = OrtTrainer(artifacts)
    return {
        "scratch": (finetune(tiny, train, test, CFG, progress=False), ort(tiny, train, test, CFG, progress=False)),
        "start": (finetune(tiny, train, test, CFG, start=start, progress=False),
                  ort(tiny, train, test, CFG, start=start, progress=False)),
    }


# --- artifacts ---------------------------------------------------------------------------------------
def test_artifacts_split_base_once_lora_per_pllm(tiny, artifacts, cache):
    files = artifacts.sizes()
    m = artifacts.manifest
    assert files[BASE_WEIGHTS] == 4 * m["num_parameters"]
    assert m["num_parameters"] == sum(p.numel() for p in tiny.model.parameters()) + m["num_trainable"]
    lora = random_adapter(tiny, 0)
    assert m["num_trainable"] == sum(t.numel() for t in lora.tensors.values())
    assert files["nominal_checkpoint"] < 64 * 1024  # names and shapes only
    assert files["training_model.onnx"] < files[BASE_WEIGHTS] // 8  # graphs hold no weights
    assert {p["peft_name"] for p in artifacts.trainable} == set(lora.tensors)
    assert m["lora"] == {"r": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"], "use_rslora": False}
    # cached: the same set again, no rebuild; another LoRA shape is another key
    again = OrtTrainer(cache_dir=cache).artifacts_for(tiny, None, CFG)
    assert again.directory == artifacts.directory
    assert LoraShape(4, 4.0, ("q_proj", "v_proj")).key(tiny.fingerprint) != artifacts.directory.name
    # the trainable buffer round trip is exact
    assert all(torch.equal(lora.tensors[k], v) for k, v in artifacts.lora_tensors(artifacts.lora_buffer(lora)).items())


def test_optimizer_models_are_torch_adamw_one_per_setting(artifacts):
    import onnx

    a = artifacts.optimizer_model(0.0, 1.0)
    assert artifacts.optimizer_model(0.0, 1.0) == a and artifacts.optimizer_model(0.1, None) != a
    nodes = {n.op_type: n for n in onnx.load(str(a)).graph.node}
    assert "InplaceClipGradNorm" in nodes
    attrs = {x.name: onnx.helper.get_attribute_value(x) for x in nodes["AdamWOptimizer"].attribute}
    assert attrs["adam_mode"] == 0 and attrs["epsilon"] == pytest.approx(1e-8)


# --- parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["scratch", "start"])
def test_ort_and_torch_losses_agree(runs, kind):
    torch_run, ort_run = runs[kind]
    assert [p.step for p in ort_run.history] == [p.step for p in torch_run.history] == [0, 2, 4, 6]
    for pt, po in zip(torch_run.history, ort_run.history, strict=True):
        assert close(pt.train_loss, po.train_loss) and close(pt.test_loss, po.test_loss), (pt, po)
    assert ort_run.best_test_loss < ort_run.start_loss  # it learns
    assert ort_run.stop_reason == torch_run.stop_reason and ort_run.best_step == torch_run.best_step
    assert ort_run.adapter.config == torch_run.adapter.config
    for name, t in torch_run.adapter.tensors.items():
        assert torch.allclose(ort_run.adapter.tensors[name], t, atol=1e-4), name


def test_ort_result_has_the_finetune_contract(runs, tiny):
    _, ort_run = runs["start"]
    assert ort_run.start_adapter is not None and ort_run.samples_consumed == 12 and ort_run.n_train == 4
    assert ort_run.tokens_per_second > 0 and ort_run.peak_memory_mb > 0 and ort_run.energy_joules > 0
    assert ort_run.adapter.meta["xpert_parent"] == ort_run.start_adapter
    validate_adapter(ort_run.adapter, tiny.fingerprint, base_linear_shapes(tiny.model))  # what the server checks
    json.dumps(ort_run.to_json())


def test_ort_adapter_in_peft_reproduces_ort_loss(runs, tiny, data, tmp_path):
    _, ort_run = runs["scratch"]
    loaded = Adapter.load(ort_run.adapter.save(tmp_path / "a"))  # PEFT files on disk, as uploaded
    peft_model = loaded.to_peft(shared_copy(tiny.model))
    loss = evaluate_loss(peft_model, tiny.tokenizer, data[1], CFG)
    assert abs(loss - ort_run.best_test_loss) <= 1e-5 * loss


def test_ort_target_reached_at_zero_steps(tiny, artifacts, data):
    result = OrtTrainer(artifacts)(tiny, *data, replace(CFG, target_loss=100.0), progress=False)
    assert result.reached_target and result.steps_to_target == 0 and result.steps == 0


def test_session_eval_matches_batches_of_pytorch(tiny, artifacts, data):
    """One eval batch: ORT's mean loss equals PyTorch's on the same padded batch (pads masked)."""
    session = OrtSession(tiny, None, CFG, artifacts)
    enc = encode(tiny.tokenizer, data[0], CFG.max_seq_len)
    ref = evaluate_loss(shared_copy(tiny.model), tiny.tokenizer, data[0], CFG)
    assert abs(session.eval_loss(enc) - ref) <= REL * ref
    assert sum(1 for _ in eval_batches(enc, 0, 2)) == 2


# --- bad input ---------------------------------------------------------------------------------------
def test_adapter_not_matching_the_artifacts_is_rejected(tiny, artifacts, data):
    pinned = OrtTrainer(artifacts)
    with pytest.raises(ArtifactMismatch, match="does not match the ORT artifacts"):
        pinned(tiny, *data, CFG, start=random_adapter(tiny, 0, rank=4), progress=False)
    with pytest.raises(ArtifactMismatch, match="does not match the ORT artifacts"):
        pinned(tiny, *data, CFG, start=random_adapter(tiny, 0, targets=("k_proj",)), progress=False)
    with pytest.raises(ArtifactMismatch, match="does not match"):
        pinned(tiny, *data, replace(CFG, rank=8), progress=False)
    foreign = random_adapter(tiny, 0)
    foreign = Adapter(foreign.config, foreign.tensors, "another-base")
    with pytest.raises(AdapterError, match="another-base"):
        pinned(tiny, *data, CFG, start=foreign, progress=False)
    with pytest.raises(ArtifactMismatch, match="another-base"):
        artifacts.check(foreign)
    other = tiny_model(tiny, seed=1)  # same architecture, other weights: other fingerprint
    with pytest.raises(ArtifactMismatch, match="ORT artifacts .* are for base model"):
        pinned(other, *data, CFG, progress=False)
    with pytest.raises(ValueError, match="dropout 0 only"):
        pinned(tiny, *data, replace(CFG, dropout=0.1), progress=False)


def test_truncated_or_missing_artifacts_are_clear_errors(tiny, artifacts, tmp_path):
    import shutil

    copy = tmp_path / "set"
    shutil.copytree(artifacts.directory, copy)
    with open(copy / BASE_WEIGHTS, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="base_weights.bin has 1000 bytes"):
        Artifacts.open(copy)
    (copy / "eval_model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="lacks"):
        Artifacts.open(copy)
    with pytest.raises(FileNotFoundError, match="not an ORT artifact set"):
        Artifacts.open(tmp_path)

    damaged = tmp_path / "cache" / artifacts.directory.name
    shutil.copytree(copy, damaged)
    with pytest.raises(ValueError, match="delete .* to rebuild"):
        artifacts_for(tiny, artifacts.lora, tmp_path / "cache")


def test_trainer_names():
    assert get_trainer("torch") is finetune
    assert isinstance(get_trainer("ort"), OrtTrainer)
    with pytest.raises(ValueError, match="unknown trainer 'tf'"):
        get_trainer("tf")


# --- the ClientApp's ORT path --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, tmp_path_factory):
    """The tiny model as a checkpoint directory: a model spec the ClientApp loads like any other."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


@pytest.mark.usefixtures("flower_task_identity")
def test_client_app_fit_with_ort_trainer(tiny, tiny_checkpoint, cache, monkeypatch):
    monkeypatch.setenv("XPERT_CACHE_DIR", str(cache.parent / "xpert-cache"))
    config = run_config(model=str(tiny_checkpoint), summarizer=str(tiny_checkpoint), user_styles="sarcastic",
                        user_samples=4, trainer="ort")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config=config)
    budget = {"max_steps": 2, "lr": 3e-2, "rank": 2, "alpha": 4.0, "batch_size": 2, "eval_batch_size": 2,
              "max_seq_len": 64, "eval_every": 1, "patience": 2, "target_loss": None, "seed": 0}
    start = random_adapter(tiny, 3, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    choice = Choice("single", (start.content_hash,), (1.0,), 0.1)
    msg = Message(protocol.train_request(choice, [start], budget, True), dst_node_id=7, message_type=protocol.TRAIN)
    upload = protocol.parse_upload(client_app.fit(msg, context).content)
    assert upload.report["start"] == "single" and upload.report["trainer"] == "ort"
    assert upload.metrics["scratch_steps"] == 2 and "target_loss" in upload.metrics
    validate_adapter(upload.adapter, tiny.fingerprint, base_linear_shapes(tiny.model))
    assert np.isfinite(upload.metrics["best_test_loss"])


# --- the embedded 135M model (slow: export ~1.5 min and ~5 GB once per cache) ---------------------------
@pytest.mark.slow
def test_real_model_parity_and_peft_round_trip(base, data):
    config = FinetuneConfig(max_seq_len=64, batch_size=2, eval_batch_size=2, max_steps=4, eval_every=2, patience=10,
                            lr=3e-3, seed=0, threads=1)
    torch_run = finetune(base, *data, config, progress=False)
    ort_run = OrtTrainer()(base, *data, config, progress=False)
    for pt, po in zip(torch_run.history, ort_run.history, strict=True):
        assert close(pt.train_loss, po.train_loss) and close(pt.test_loss, po.test_loss), (pt, po)
    assert ort_run.best_test_loss < ort_run.start_loss
    validate_adapter(ort_run.adapter, base.fingerprint, base_linear_shapes(base.model))
    loss = evaluate_loss(ort_run.adapter.to_peft(shared_copy(base.model)), base.tokenizer, data[1], config)
    assert abs(loss - ort_run.best_test_loss) <= 1e-5 * loss
