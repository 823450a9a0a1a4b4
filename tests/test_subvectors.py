"""Sub-vector routes (paper §4.2, §4.3) on the real embedded model at toy sizes: the stylized-text
route, the prompt tuner's identity with the untuned direct route, a few tuning steps, persistence and
bad input. The shared ``base`` model is only read: no weight changes and no gradients on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xpert_fl.explain import ProbeConfig
from xpert_fl.probe import generate, probe_prompts
from xpert_fl.subvectors import (
    PromptTuner,
    cosine_distance,
    route_error,
    stylized_vectors,
)
from xpert_fl.summarizer import REFERENCE_WORDS, WORD_PROMPT, Summarizer, SummarizerConfig

PROBE = ProbeConfig(max_new_tokens=8, batch_size=8)
TINY = SummarizerConfig(max_text_tokens=24, n_candidates=8, embedding="slot")  # prompt tuning is slot-space
SMALL_REFS = ["formal", "casual", "poetic", "plain"]  # a cheap centring set for the training tests


@pytest.fixture(scope="module")
def summarizer(base):
    return Summarizer(base, TINY)


@pytest.fixture(scope="module")
def probe_set(base):
    prompts = probe_prompts(2)
    return prompts, generate(base.model, base.tokenizer, prompts, PROBE.max_new_tokens, PROBE.batch_size)


@pytest.fixture(scope="module")
def route_a(summarizer, probe_set):
    prompts, answers = probe_set
    words = ["sarcastic", "technical"]
    return dict(zip(words, stylized_vectors(words, summarizer, prompts, answers, PROBE), strict=True))


def _snapshot(model) -> dict[str, torch.Tensor]:
    names = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight")
    state = model.state_dict()
    return {n: state[n].detach().clone() for n in names}


def test_stylized_route_gives_distinct_finite_vectors(summarizer, route_a):
    a, b = route_a["sarcastic"], route_a["technical"]
    for v in (a, b):
        assert v.shape == (summarizer.dim,) and v.dtype == np.float32 and np.isfinite(v).all()
        assert np.linalg.norm(v) > 0.1
    assert cosine_distance(a, b) > 1e-3, "two different style words must give different vectors"


def test_untrained_tuner_is_the_direct_route(summarizer):
    tuner = PromptTuner(summarizer)  # soft tokens = embeddings of WORD_PROMPT's text around the word
    pre, suf = WORD_PROMPT.split("{word}")
    assert tuner.n_prefix == len(summarizer.tokenizer(pre, add_special_tokens=False)["input_ids"])
    assert tuner.n_suffix == len(summarizer.tokenizer(suf, add_special_tokens=False)["input_ids"])
    words = ["long-winded", "Poetic"]  # several tokens, and another case
    np.testing.assert_allclose(tuner.raw_vectors(words), summarizer.word_vectors(words), atol=1e-4)
    # Same centring as Summarizer.subvector: the mean over REFERENCE_WORDS (by default) of the same
    # prompt; checked on a small reference set to keep the test cheap.
    assert PromptTuner(summarizer).reference_words == list(REFERENCE_WORDS)
    small = PromptTuner(summarizer, reference_words=SMALL_REFS)
    center = summarizer.word_vectors(SMALL_REFS).mean(0)
    direct = summarizer.word_vectors(["formal"])[0] - center
    tuned = small.vector("formal")
    np.testing.assert_allclose(small.center(), center, atol=1e-4)
    np.testing.assert_allclose(tuned, direct, atol=1e-4)
    assert route_error(small, [("formal", direct)]) == pytest.approx(0.0, abs=1e-6)


def test_soft_token_counts_other_than_the_text(summarizer):
    tuner = PromptTuner(summarizer, n_prefix=3, n_suffix=20, reference_words=SMALL_REFS)
    ids = summarizer.tokenizer(tuner.prefix_text, add_special_tokens=False)["input_ids"]
    table = summarizer.model.get_input_embeddings().weight
    assert torch.equal(tuner.prefix.detach(), table[ids[-3:]].detach())  # the tokens nearest the word
    assert tuner.suffix.shape == (20, summarizer.dim)
    assert np.isfinite(tuner.vectors(["dry"])).all()
    # A learned offset starts at zero: the untrained route is unchanged.
    plain = PromptTuner(summarizer, reference_words=SMALL_REFS)
    with_offset = PromptTuner(summarizer, reference_words=SMALL_REFS, learn_offset=True)
    assert len(with_offset.parameters()) == 3 and not with_offset.offset.detach().any()
    np.testing.assert_allclose(with_offset.vector("dry"), plain.vector("dry"), atol=1e-6)


def test_tuning_reduces_the_loss_and_leaves_the_model_alone(base, summarizer, route_a):
    before = _snapshot(base.model)
    tuner = PromptTuner(summarizer, reference_words=SMALL_REFS)
    pairs = list(route_a.items())
    start = tuner.error(pairs)
    history = tuner.fit(pairs, steps=2, lr=1e-2, seed=0)
    assert len(history) == 2 and history[0] == pytest.approx(start, abs=1e-4)
    assert history[1] < history[0]
    assert tuner.error(pairs) < history[1]
    assert tuner.steps_trained == 2
    assert all(torch.equal(v, base.model.state_dict()[n]) for n, v in before.items())
    assert all(p.grad is None for p in base.model.parameters()), "no gradient may land on the model"
    # The detached-centre variant and mini-batches run too.
    assert len(tuner.fit(pairs, steps=1, lr=1e-2, batch_size=1, center_grad=False)) == 1


def test_save_load_round_trip(tmp_path, base, summarizer):
    tuner = PromptTuner(summarizer, n_prefix=4, n_suffix=2, reference_words=SMALL_REFS, learn_offset=True)
    before = tuner.vector("dry")
    with torch.no_grad():
        tuner.prefix.add_(0.01)  # something other than the initial text
        tuner.offset.add_(0.5)
    changed = tuner.vector("dry")
    assert not np.allclose(changed, before + 0.5, atol=1e-3)
    # The memoised centre follows in-place changes of the soft tokens.
    np.testing.assert_allclose(tuner.center(), tuner.raw_vectors(SMALL_REFS).mean(0), atol=1e-5)
    tuner.steps_trained = 7
    path = tuner.save(tmp_path / "sub" / "tuner.safetensors")
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    loaded = PromptTuner.load(path, summarizer)
    assert torch.equal(loaded.prefix, tuner.prefix) and torch.equal(loaded.suffix, tuner.suffix)
    assert torch.equal(loaded.offset, tuner.offset)
    assert (loaded.n_prefix, loaded.n_suffix, loaded.steps_trained) == (4, 2, 7)
    assert loaded.reference_words == SMALL_REFS
    np.testing.assert_allclose(loaded.vector("dry"), changed, atol=1e-6)
    other = Summarizer(base, SummarizerConfig(max_text_tokens=24, calibrate=False, embedding="slot"))
    with pytest.raises(ValueError, match="tuned for summarizer"):
        PromptTuner.load(path, other)
    with pytest.raises(FileNotFoundError):
        PromptTuner.load(tmp_path / "missing.safetensors", summarizer)


def test_bad_input(base, summarizer, probe_set, route_a):
    prompts, answers = probe_set
    with pytest.raises(ValueError, match="direct route of the adjective slot"):
        PromptTuner(Summarizer(base, SummarizerConfig(max_text_tokens=24)))
    tuner = PromptTuner(summarizer, reference_words=SMALL_REFS)
    good = route_a["sarcastic"]
    with pytest.raises(ValueError, match="words is empty"):
        stylized_vectors([], summarizer, prompts, answers, PROBE)
    with pytest.raises(ValueError, match="one base answer per prompt"):
        stylized_vectors(["dry"], summarizer, prompts, answers[:1], PROBE)
    with pytest.raises(ValueError, match="non-empty string"):
        stylized_vectors(["  "], summarizer, prompts, answers, PROBE)
    with pytest.raises(ValueError, match="words is empty"):
        tuner.vectors([])
    with pytest.raises(ValueError, match="pairs is empty"):
        tuner.fit([], steps=1)
    with pytest.raises(ValueError, match="pairs is empty"):
        tuner.error({})
    nan = good.copy()
    nan[3] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        tuner.fit([("dry", nan)], steps=1)
    with pytest.raises(ValueError, match=r"shape \(10,\), expected \(576,\)"):
        tuner.fit([("dry", np.ones(10))], steps=1)
    with pytest.raises(ValueError, match="is zero"):
        tuner.error([("dry", np.zeros(summarizer.dim))])
    with pytest.raises(ValueError, match="steps >= 1"):
        tuner.fit([("dry", good)], steps=0)
    with pytest.raises(ValueError, match="at least one soft token"):
        PromptTuner(summarizer, n_prefix=0, n_suffix=0)
    with pytest.raises(ValueError, match="reference_words is empty"):
        PromptTuner(summarizer, reference_words=[])
