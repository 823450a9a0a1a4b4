"""Selection methods (xpert_fl.baselines) on a tiny real cache: three random LoRA adapters of the
embedded base model at three perturbation scales, so their losses on user data are far apart.

Checked per method: a valid choice among the offered ids, the bytes the device paid (against the raw
tensor sizes, not against the accounting code itself), the loss evaluations; optuna really drives BO
and HyperBand (study, sampler, pruned trials); exhaustive picks the independently computed lowest
loss; the text encoder picks the pLLM whose outputs share the user's style.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import optuna
import pytest
import torch
from peft import LoraConfig, get_peft_model

from protocol import MessageSizes
from xpert_fl.adapters import Adapter
from xpert_fl.baselines import SELECTORS, SelectionTask, make_selector
from xpert_fl.baselines.core import ADAPTERS, BASIS_COORDS, EMBEDDINGS, selection_seed
from xpert_fl.baselines.text_encoder import TextEncoderSelector
from xpert_fl.basis import Basis
from xpert_fl.cache import BaseInfo, PLLMCache
from xpert_fl.data import load_corpus
from xpert_fl.encoder import PINNED_SHA256, WEIGHTS, default_encoder
from xpert_fl.explain import ProbeConfig
from xpert_fl.finetune import FinetuneConfig, evaluate_loss, finetune, shared_copy
from xpert_fl.select import Choice
from xpert_fl.summarizer import Summarizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Three pLLMs: random LoRA weights (scaled), and one briefly fine-tuned on other poetic samples than
# the user's: it has the lowest loss on the poetic user's data, and it is deliberately not first.
ADAPTER_SPECS = (("sarcastic", 2.0), ("poetic", None), ("expert", 1.0))
CONFIG = FinetuneConfig(max_seq_len=64, eval_batch_size=4)
TUNE = FinetuneConfig(
    rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"), lr=3e-3, batch_size=2, max_seq_len=64, max_steps=6,
    eval_every=6,
)
OVERHEAD = 4096  # bytes of record framing and JSON config allowed per payload on top of the raw arrays
PER_ARRAY = 1024  # ... and per array (Flower frames every array as objects of its own: ~520 bytes measured)


def _random_adapter(base, seed: int, scale: float) -> Adapter:
    torch.manual_seed(seed)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(shared_copy(base.model), lora)
    adapter = Adapter.from_peft(model, base.fingerprint)
    adapter.tensors = {k: v * scale for k, v in adapter.tensors.items()}
    return adapter


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("builtin")


@pytest.fixture(scope="module")
def cache(base, tmp_path_factory) -> PLLMCache:
    cache = PLLMCache(tmp_path_factory.mktemp("cache"), BaseInfo.from_loaded(base))
    poetic = load_corpus("builtin").styles["poetic"]
    for seed, (label, scale) in enumerate(ADAPTER_SPECS):
        if scale is None:
            adapter = finetune(base, poetic[:10], poetic[10:12], TUNE, progress=False).adapter
        else:
            adapter = _random_adapter(base, seed, scale)
        cache.add(adapter, label=label)
    return cache


@pytest.fixture(scope="module")
def ids(cache) -> list[str]:
    return [e.id for e in cache.entries()]


@pytest.fixture(scope="module")
def samples(corpus):
    return corpus.styles["poetic"][20:26]


@pytest.fixture(scope="module")
def task(base, cache, samples) -> SelectionTask:
    return SelectionTask(base, cache, samples, label="poetic", seed=0, config=CONFIG, sizes=MessageSizes())


@pytest.fixture(scope="module")
def losses(base, cache, ids, samples) -> dict[str, float]:
    """Each pLLM's loss on the user's samples, computed directly with finetune.evaluate_loss."""
    out = {}
    for i in ids:
        model = cache.load_adapter(i).to_peft(shared_copy(base.model))
        out[i] = evaluate_loss(model, base.tokenizer, samples, CONFIG)
    return out


def _adapter_bytes(cache, ids) -> tuple[int, int]:
    """Lower and upper bounds of the bytes of downloading these adapters: raw tensors, plus framing."""
    adapters = [cache.load_adapter(i) for i in ids]
    raw = sum(a.num_bytes for a in adapters)
    return raw, raw + sum(OVERHEAD + PER_ARRAY * len(a.tensors) for a in adapters)


def test_registry_names_every_method():
    assert set(SELECTORS) == {"xpert", "scratch", "random", "oracle", "exhaustive", "bo", "hyperband", "text-encoder"}
    assert all(make_selector(name).name == name for name in SELECTORS)
    assert make_selector("bo", trials=2).trials == 2
    with pytest.raises(ValueError, match="unknown selection method 'grid'"):
        make_selector("grid")


def test_free_methods_choose_without_downloading(task, ids):
    scratch = make_selector("scratch").select(task)
    assert scratch.choice == Choice("base") and scratch.chosen is None
    picks = {make_selector("random").select(task).chosen for _ in range(3)}
    assert len(picks) == 1 and picks <= set(ids)  # seeded by the task
    assert {make_selector("random").select(replace(task, seed=s)).chosen for s in range(12)} == set(ids)
    # per user, as the harness and the Flower round loop seed it: users differ, a rerun repeats
    per_user = [make_selector("random").select(replace(task, seed=selection_seed(0, 0, f"u{u}"))).chosen
                for u in range(12)]
    assert len(set(per_user)) > 1
    assert per_user == [make_selector("random").select(replace(task, seed=selection_seed(0, 0, f"u{u}"))).chosen
                        for u in range(12)]
    oracle = make_selector("oracle").select(task)
    assert oracle.chosen == ids[1] and oracle.details["style_available"]
    assert make_selector("oracle").select(replace(task, label="friendly")).chosen is None
    with pytest.raises(ValueError, match="label"):
        make_selector("oracle").select(replace(task, label=None))
    for sel in (scratch, oracle):
        assert (sel.bytes_down, sel.evaluations, sel.tokens, sel.seconds, sel.downloaded) == (0, 0, 0, 0.0, ())
    bare = replace(task, sizes=None)  # no payload sizes: free methods receive nothing, the others must count
    assert make_selector("random").select(bare).chosen in ids and make_selector("oracle").select(bare).bytes_down == 0
    with pytest.raises(ValueError, match="SelectionTask.sizes"):
        make_selector("exhaustive").select(bare)


def test_exhaustive_picks_the_lowest_loss_and_pays_every_adapter(base, task, cache, ids, losses):
    q_proj = dict(base.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"].clone()
    sel = make_selector("exhaustive").select(task)
    # adapters were applied to weight-sharing copies: the shared base model is still plain and unchanged
    assert not any(".lora_" in name for name, _ in base.model.named_parameters())
    assert torch.equal(dict(base.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"], q_proj)
    best = min(losses, key=losses.__getitem__)
    assert best == ids[1]  # the fixture's design: the fine-tuned pLLM
    assert sel.choice == Choice("single", (best,), (1.0,))
    assert sel.scores == pytest.approx(losses, rel=1e-5)
    assert sel.downloaded == tuple(ids)
    low, high = _adapter_bytes(cache, ids)
    assert set(sel.bytes) == {ADAPTERS} and low <= sel.bytes_down <= high
    assert sel.evaluations == len(ids) * 2  # 6 samples in batches of 4
    assert sel.tokens > 0 and sel.seconds > 0
    assert sel.to_json()["bytes_down"] == sel.bytes_down


def test_bayesian_optimization_runs_optuna_gp(task, cache, ids, losses):
    selector = make_selector("bo", trials=2)
    sel = selector.select(task)
    study = selector.last_study
    assert isinstance(study.sampler, optuna.samplers.GPSampler)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    tried = [t.params["pllm"] for t in study.trials]
    assert len(set(tried)) == 2 and sel.details["order"] == tried  # no pLLM proposed twice
    assert sel.chosen == min(tried, key=losses.__getitem__)
    assert set(sel.scores) == set(tried) and sel.downloaded == tuple(dict.fromkeys(tried))
    low, high = _adapter_bytes(cache, tried)
    assert low <= sel.bytes_down <= high and sel.evaluations == 2 * 2
    # with a budget of every pLLM it must find the best one
    assert make_selector("bo", trials=len(ids)).select(task).chosen == min(losses, key=losses.__getitem__)


def test_hyperband_prunes_with_optuna_and_keeps_the_best_completed(task, cache, ids, losses):
    selector = make_selector("hyperband", batch_size=1)
    sel = selector.select(task)
    study = selector.last_study
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    states = {t.params["pllm"]: t.state for t in study.trials}
    assert set(states) == set(ids)
    pruned = [i for i, s in states.items() if s == optuna.trial.TrialState.PRUNED]
    complete = [i for i, s in states.items() if s == optuna.trial.TrialState.COMPLETE]
    assert pruned and complete
    assert sel.chosen == min(complete, key=losses.__getitem__) == ids[1]
    for t in study.trials:  # intermediate values: running mean losses over the evaluation batches
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, len(steps) + 1)) and len(steps) == sel.details["steps"][t.params["pllm"]]
    done = study.trials[[t.params["pllm"] for t in study.trials].index(sel.chosen)]
    assert done.value == pytest.approx(losses[sel.chosen], rel=1e-5)  # a complete trial saw every sample
    assert sel.evaluations == sum(sel.details["steps"].values()) < len(ids) * len(task.samples)  # early stopping
    low, high = _adapter_bytes(cache, ids)
    assert low <= sel.bytes_down <= high  # pruned pLLMs were downloaded all the same


def test_text_encoder_picks_the_pllm_whose_outputs_share_the_users_style(task, cache, ids, corpus):
    selector = TextEncoderSelector()
    for entry_id, (label, _) in zip(ids, ADAPTER_SPECS, strict=True):
        selector.add_texts(entry_id, [s.response for s in corpus.styles[label][:10]])  # disjoint from users' data
    for label, _ in ADAPTER_SPECS:
        user = replace(task, samples=corpus.styles[label][20:26])
        sel = selector.select(user)
        assert cache.get(sel.chosen).label == label
        assert sel.scores[sel.chosen] == max(sel.scores.values())
    dim = default_encoder().model.config.hidden_size
    assert set(sel.bytes) == {EMBEDDINGS} and 4 * len(ids) * dim <= sel.bytes_down <= 4 * len(ids) * dim + OVERHEAD
    assert sel.downloaded == () and sel.evaluations == 0 and sel.seconds > 0
    assert sel.details["encoder"] == PINNED_SHA256[WEIGHTS] and sel.details["encoder_bytes"] == 90_868_376


def test_text_encoder_matches_sentence_transformers():
    """Our pooling re-implementation gives the packaged model's sentence-transformers vectors."""
    st = pytest.importorskip("sentence_transformers")
    encoder = default_encoder()
    texts = ["Oh great, another Monday.", "The mitochondrion makes ATP by oxidative phosphorylation."]
    reference = st.SentenceTransformer(str(encoder.path), device="cpu").encode(texts)
    np.testing.assert_allclose(encoder.encode(texts), reference, atol=1e-5)


def test_xpert_behind_the_same_interface_pays_basis_and_coordinates(base, task, cache, ids, tmp_path):
    summarizer = Summarizer(base)
    rng = np.random.default_rng(0)
    vectors = np.linalg.qr(rng.normal(size=(summarizer.dim, 2)))[0].T.astype(np.float32)
    words = ["lyrical", "technical"]
    basis = Basis(dim=summarizer.dim, words=words, vectors=vectors, summarizer=summarizer.fingerprint)
    explained = PLLMCache(tmp_path, cache.base)
    for i, coords in zip(ids, ([0.1, 0.0], [0.9, 0.1], [0.0, 0.8]), strict=True):
        explained.add(cache.load_adapter(i))
        explained.set_explanation(i, coords, basis.words, basis.explain(np.array(coords)))
    selector = make_selector("xpert", summarizer=summarizer, basis=basis, probe=ProbeConfig(max_new_tokens=8))
    sel = selector.select(replace(task, cache=explained, samples=task.samples[:3]))
    assert sel.choice.kind == "single" and sel.chosen in ids and set(sel.scores) == set(ids)
    raw = 4 * (basis.size * basis.dim + len(ids) * basis.size)
    assert set(sel.bytes) == {BASIS_COORDS} and raw <= sel.bytes_down <= raw + OVERHEAD
    assert sel.downloaded == () and sel.seconds > 0


@pytest.mark.parametrize("name", ["random", "exhaustive", "bo", "hyperband", "text-encoder"])
def test_nothing_offered_means_the_base_model(task, name):
    sel = make_selector(name).select(replace(task, ids=()))
    assert sel.choice == Choice("base") and sel.bytes_down == 0
