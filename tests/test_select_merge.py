"""Selection over explanation coordinates (Eq. 1, NNLS merge weights) and exact LoRA merging (Eq. 4–5).

Selection tests are pure numpy. Merge tests use the real embedded base model (shared session fixture,
never wrapped in place): three random LoRA parents on one deepcopy, with different seeds, ranks,
targets and one rslora parent, checked module by module, by logits, and against PEFT's own "cat" merge.
"""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.func import functional_call

from xpert_fl.adapters import Adapter, AdapterError, base_linear_shapes, validate_adapter
from xpert_fl.merge import MERGE_META_KEY, merge_adapters
from xpert_fl.select import Choice, merge_weights, merged_coordinates, nearest, nnls, select

# --- nearest (Eq. 1) ----------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")

def test_nearest_is_l1_argmin_with_zero_padding():
    coords = {
        "a": np.array([1.0, 0.0, 0.0]),
        "b": np.array([0.0, 1.0]),  # older entry, basis had 2 words: padded to [0, 1, 0]
        "c": np.array([0.2, 0.9, 0.3]),
    }
    user = np.array([0.0, 1.0, 0.1])
    choice = nearest(user, coords)
    assert (choice.kind, choice.ids, choice.weights) == ("single", ("b",), (1.0,))
    assert choice.distance == pytest.approx(0.1)
    assert choice.distances == pytest.approx({"a": 2.1, "b": 0.1, "c": 0.2 + 0.1 + 0.2})
    # A user coordinate from an older (shorter) basis is padded too.
    assert nearest(np.array([1.0]), coords).ids == ("a",)


def test_nearest_ties_go_to_first_in_mapping_order():
    same = np.array([0.5, 0.5])
    assert nearest(np.zeros(2), {"x": same, "y": same.copy()}).ids == ("x",)
    assert nearest(np.zeros(2), {"y": same, "x": same.copy()}).ids == ("y",)
    # L1 tie between different vectors: still the first.
    assert nearest(np.zeros(2), {"p": np.array([1.0, 0.0]), "q": np.array([0.0, -1.0])}).ids == ("p",)


def test_nearest_empty_cache_and_bad_inputs():
    base = nearest(np.array([0.3, -0.2]), {})
    assert (base.kind, base.ids, base.weights, base.distances) == ("base", (), (), {})
    assert base.distance == pytest.approx(0.5)  # the base model's coordinate is 0 (no drift)
    coords = {"a": np.array([1.0, 0.0])}
    with pytest.raises(ValueError, match="user coordinate has 3 entries but the basis has 2"):
        nearest(np.zeros(3), coords)
    with pytest.raises(ValueError, match="NaN"):
        nearest(np.array([0.0, np.nan]), coords)
    with pytest.raises(ValueError, match="'a'.*NaN"):
        nearest(np.zeros(2), {"a": np.array([np.inf, 0.0])})
    with pytest.raises(ValueError, match="1-D"):
        nearest(np.zeros((2, 2)), coords)
    # An explicit basis size: every entry shorter, user as long as the basis.
    assert nearest(np.array([0.0, 0.0, 1.0]), coords, size=3).distance == pytest.approx(2.0)
    with pytest.raises(ValueError, match="more than the basis size"):
        nearest(np.zeros(1), coords, size=1)


# --- NNLS and merge weights ----------------------------------------------------------------------------


def _brute_force_nnls_residual(a: np.ndarray, b: np.ndarray) -> float:
    """Best residual over every support set whose unconstrained least-squares fit is non-negative."""
    best = math.inf
    for k in range(a.shape[1] + 1):
        for support in itertools.combinations(range(a.shape[1]), k):
            x = np.zeros(a.shape[1])
            if support:
                x[list(support)] = np.linalg.lstsq(a[:, list(support)], b, rcond=None)[0]
            if (x >= -1e-12).all():
                best = min(best, float(np.linalg.norm(a @ x - b)))
    return best


def test_drift_distance_is_the_distance_between_reconstructed_drifts():
    """With ``gram`` the distance is ||(c − u) V||₂ for any basis; on an orthogonal basis the nearest pLLM
    is then the one whose drift embedding is Euclidean-nearest, whatever the user's part outside the basis."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=(4, 12)) * rng.uniform(0.1, 5.0, size=(4, 1))  # near-orthogonal, unequal lengths
    coords = {f"p{i}": rng.normal(size=4) for i in range(6)}
    user = rng.normal(size=4)
    got = nearest(user, coords, gram=v @ v.T)
    want = {i: float(np.linalg.norm((c - user) @ v)) for i, c in coords.items()}
    assert got.distances == pytest.approx(want)
    assert got.ids == (min(want, key=want.get),)
    q, _ = np.linalg.qr(rng.normal(size=(12, 4)))
    vo = q.T * np.array([0.2, 1.0, 3.0, 7.0])[:, None]  # orthogonal rows of very different lengths
    drifts = {i: c @ vo for i, c in coords.items()}
    user_drift = user @ vo + 5.0 * (np.eye(12)[0] - q @ q[0])  # plus a part outside the span
    coefficient = vo @ user_drift / (vo**2).sum(1)  # Eq. 2
    euclid = {i: float(np.linalg.norm(d - user_drift)) for i, d in drifts.items()}
    assert nearest(coefficient, coords, gram=vo @ vo.T).ids == (min(euclid, key=euclid.get),)
    with pytest.raises(ValueError, match="pass basis.gram"):
        nearest(user, coords, gram=np.eye(3))
    # an empty basis (every drift zero): all distances 0, the first pLLM
    empty = nearest(np.zeros(0), {"x": np.zeros(0), "y": np.zeros(0)}, gram=np.zeros((0, 0)))
    assert empty.ids == ("x",) and empty.distances == {"x": 0.0, "y": 0.0}
    with pytest.raises(ValueError, match="symmetric"):
        nearest(user, coords, gram=np.triu(np.ones((4, 4))))


def test_merge_weights_in_the_drift_space_recover_a_mix():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(3, 8))
    coords = {"a": np.array([1.0, 0.0, 0.0]), "b": np.array([0.0, 2.0, 0.5]), "c": np.array([0.3, 0.3, 3.0])}
    user = 0.25 * coords["a"] + 0.75 * coords["b"]
    mix = select(user, coords, delta=0.0, gram=v @ v.T)
    assert mix.kind == "merge" and mix.ids == ("a", "b")
    assert mix.weights == pytest.approx((0.25, 0.75), abs=1e-8) and mix.distance == pytest.approx(0.0, abs=1e-8)


def test_nnls_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        m, n = int(rng.integers(1, 7)), int(rng.integers(1, 7))
        a = rng.normal(size=(m, n)) * rng.choice([1e-3, 1.0, 1e2])
        if n > 1 and rng.random() < 0.3:
            a[:, 0] = a[:, -1]  # duplicate candidates
        if rng.random() < 0.3:
            a = np.abs(a)  # style coordinates are often all positive
        b = rng.normal(size=m)
        x = nnls(a, b)
        assert x.shape == (n,) and (x >= 0).all()
        assert np.linalg.norm(a @ x - b) <= _brute_force_nnls_residual(a, b) + 1e-9 * (1 + np.linalg.norm(b))
    assert nnls(np.zeros((3, 0)), np.ones(3)).shape == (0,)
    with pytest.raises(ValueError, match="NaN"):
        nnls(np.array([[np.nan]]), np.ones(1))


def test_merge_weights_recover_an_exact_nonnegative_mix():
    rng = np.random.default_rng(1)
    coords = {f"p{i}": rng.uniform(0, 1, size=8) for i in range(6)}
    coords["short"] = rng.uniform(0, 1, size=5)  # padded; must not confuse the fit
    user = 0.6 * coords["p1"] + 0.3 * coords["p4"]
    choice = merge_weights(user, coords)
    assert (choice.kind, choice.ids) == ("merge", ("p1", "p4"))
    assert choice.weights == pytest.approx((0.6, 0.3), abs=1e-9)
    assert choice.distance == pytest.approx(0.0, abs=1e-9)
    assert set(choice.distances) == set(coords)
    np.testing.assert_allclose(merged_coordinates([coords[i] for i in choice.ids], choice.weights), user, atol=1e-9)


def test_merge_weights_keep_at_most_max_parents():
    rng = np.random.default_rng(2)
    coords = {f"p{i}": rng.uniform(0, 1, size=10) for i in range(8)}
    weights = {"p0": 0.1, "p2": 0.5, "p5": 0.3, "p7": 0.05}
    user = sum(w * coords[i] for i, w in weights.items())
    full = merge_weights(user, coords, max_parents=4)
    assert full.ids == ("p0", "p2", "p5", "p7") and full.distance < 1e-9
    two = merge_weights(user, coords, max_parents=2)
    assert two.kind == "merge" and set(two.ids) == {"p2", "p5"}  # the two largest weights, re-fitted
    assert two.distance > 0
    with pytest.raises(ValueError, match="max_parents"):
        merge_weights(user, coords, max_parents=0)
    # No non-negative mix beats the zero coordinate: the base model.
    assert merge_weights(np.array([-1.0, 0.0]), {"a": np.array([1.0, 0.0])}).kind == "base"
    assert merge_weights(np.zeros(2), {}).kind == "base"


def test_select_merges_only_above_delta_and_only_when_closer():
    coords = {"a": np.array([1.0, 0.0, 0.0]), "b": np.array([0.0, 1.0, 0.0]), "c": np.array([0.0, 0.0, 1.0])}
    user = np.array([0.5, 0.5, 0.0])  # nearest (a, tie with b -> a) is 1.0 away; the mix is exact
    near = nearest(user, coords)
    assert near.ids == ("a",) and near.distance == pytest.approx(1.0)
    assert select(user, coords, delta=1.0) == near  # within delta (<=): no merging
    assert select(user, coords, delta=math.inf) == near
    merged = select(user, coords, delta=0.99)
    assert (merged.kind, merged.ids) == ("merge", ("a", "b"))
    assert merged.weights == pytest.approx((0.5, 0.5)) and merged.distance == pytest.approx(0.0, abs=1e-12)
    # The L2 fit of one candidate [1, 1] to [1, 0] is 0.5 * [1, 1]: no closer in L1, so keep the nearest.
    only = {"x": np.array([1.0, 1.0])}
    assert select(np.array([1.0, 0.0]), only, delta=0.0) == nearest(np.array([1.0, 0.0]), only)
    assert select(np.ones(2), {}, delta=0.1).kind == "base"
    for bad in (-1.0, math.nan, "x"):
        with pytest.raises(ValueError, match="delta"):
            select(user, coords, delta=bad)


def test_merged_coordinates_weighted_union():
    out = merged_coordinates([np.array([1.0, 2.0]), np.array([0.0, 1.0, 4.0])], [0.5, 0.25])
    np.testing.assert_allclose(out, [0.5, 1.25, 1.0])
    with pytest.raises(ValueError, match=">= 0"):
        merged_coordinates([np.ones(2)], [-0.1])
    with pytest.raises(ValueError, match="weights"):
        merged_coordinates([np.ones(2)], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least one"):
        merged_coordinates([], [])


# --- Choice: the device's message ----------------------------------------------------------------------


def test_choice_json_round_trip_carries_no_user_coordinate():
    rng = np.random.default_rng(3)
    coords = {f"id{i}": rng.uniform(0, 1, size=4) for i in range(4)}
    user = np.array([0.123456789, 0.987654321, 0.55555, 0.31415926])
    for choice in (select(user, coords, delta=0.0), nearest(user, coords), nearest(user, {})):
        text = choice.to_json()
        assert Choice.from_json(text) == choice
        data = json.loads(text)
        assert set(data) == {"kind", "ids", "weights", "distance", "distances"}
        for value in user:
            assert repr(float(value))[:8] not in text
    with pytest.raises(ValueError, match="keys"):
        Choice.from_json(json.dumps({**json.loads(choice.to_json()), "coords": user.tolist()}))
    bad_messages = [
        "not json",
        "[]",
        '{"kind": "best", "ids": [], "weights": [], "distance": 0, "distances": {}}',
        '{"kind": "single", "ids": ["a"], "weights": [-1], "distance": 0, "distances": {}}',
        '{"kind": "single", "ids": ["a", "b"], "weights": [1, 1], "distance": 0, "distances": {}}',
        '{"kind": "merge", "ids": ["a"], "weights": [1, 2], "distance": 0, "distances": {}}',
        '{"kind": "merge", "ids": ["a"], "weights": [NaN], "distance": 0, "distances": {}}',
        '{"kind": "base", "ids": [], "weights": [], "distance": -1, "distances": {}}',
        '{"kind": "base", "ids": [], "weights": [], "distance": 0, "distances": {"a": "far"}}',
    ]
    for message in bad_messages:
        with pytest.raises(ValueError):
            Choice.from_json(message)


# --- merging real LoRA adapters ------------------------------------------------------------------------

WEIGHTS = (0.5, 0.3, 0.4)


@pytest.fixture(scope="module")
def peft_model(base):
    """One copy of the base with three random LoRA adapters: p0, p1 (r=4, q/v) and p2 (r=2, rslora, q/o)."""
    torch.manual_seed(0)
    qv = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base.model), qv, adapter_name="p0")
    torch.manual_seed(1)
    model.add_adapter("p1", qv)
    torch.manual_seed(2)
    qo = LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    model.add_adapter("p2", qo)
    model.eval()
    yield model
    del model


@pytest.fixture(scope="module")
def parents(peft_model, base) -> list[Adapter]:
    return [Adapter.from_peft(peft_model, base.fingerprint, adapter_name=name) for name in ("p0", "p1", "p2")]


@pytest.fixture(scope="module")
def merged(parents) -> Adapter:
    return merge_adapters(parents, WEIGHTS)


def _expected_delta(parents: list[Adapter], weights, module: str) -> torch.Tensor:
    total = None
    for parent, w in zip(parents, weights, strict=True):
        if module in parent.modules():
            term = w * parent.delta(module)
            total = term if total is None else total + term
    return total


def _manual_logits(model, deltas: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the base model with W + ΔW in the given modules (base weights untouched)."""
    params = dict(model.named_parameters())
    for module, delta in deltas.items():
        params[f"{module}.weight"] = params[f"{module}.weight"] + delta
    with torch.no_grad():
        return functional_call(model, params, (input_ids,)).logits


def _input_ids(base) -> torch.Tensor:
    return base.tokenizer("Write a short note about the sea, in your own style.", return_tensors="pt").input_ids


def test_merge_is_exact_module_by_module(parents, merged):
    assert merged.scaling == 1.0
    assert (merged.config["r"], merged.config["lora_alpha"], merged.config["use_rslora"]) == (10, 10, False)
    assert merged.config["target_modules"] == ["o_proj", "q_proj", "v_proj"]
    modules = set().union(*(p.modules() for p in parents))
    assert set(merged.modules()) == modules
    assert {m.rsplit(".", 1)[-1] for m in modules} == {"q_proj", "v_proj", "o_proj"}
    for module in sorted(modules):
        torch.testing.assert_close(
            merged.delta(module), _expected_delta(parents, WEIGHTS, module), atol=1e-6, rtol=0
        )
    assert json.loads(merged.meta[MERGE_META_KEY]) == {
        "parents": [p.content_hash for p in parents],
        "weights": list(WEIGHTS),
    }
    # One parent: plain scaling of its update; a zero weight contributes nothing.
    half = merge_adapters(parents[2:], [0.5])
    module = parents[2].modules()[0]
    torch.testing.assert_close(half.delta(module), 0.5 * parents[2].delta(module), atol=1e-6, rtol=0)
    zero = merge_adapters(parents[:2], [0.0, 1.0])
    module = parents[0].modules()[0]
    torch.testing.assert_close(zero.delta(module), parents[1].delta(module), atol=1e-6, rtol=0)


def test_merged_adapter_is_a_normal_peft_adapter(base, parents, merged, tmp_path):
    validate_adapter(merged, base.fingerprint, base_linear_shapes(base.model))
    loaded = Adapter.load(merged.save(tmp_path / "merged"))
    assert loaded.content_hash == merged.content_hash
    assert loaded.meta == merged.meta and loaded.config == merged.config
    ids = _input_ids(base)
    deltas = {m: _expected_delta(parents, WEIGHTS, m) for m in merged.modules()}
    expected = _manual_logits(base.model, deltas, ids)
    wrapped = loaded.to_peft(copy.deepcopy(base.model))
    with torch.no_grad():
        got = wrapped(input_ids=ids).logits
    del wrapped
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with torch.no_grad():  # the merge changed the model
        assert (base.model(input_ids=ids).logits - expected).abs().max() > 1e-2


def test_merge_matches_peft_add_weighted_adapter_cat(base, peft_model, parents, merged):
    peft_model.add_weighted_adapter(["p0", "p1", "p2"], list(WEIGHTS), "cat", combination_type="cat")
    reference = Adapter.from_peft(peft_model, base.fingerprint, adapter_name="cat")
    assert set(reference.modules()) == set(merged.modules())
    assert reference.config["r"] == merged.config["r"]
    for module in merged.modules():
        torch.testing.assert_close(merged.delta(module), reference.delta(module), atol=1e-6, rtol=0)
    peft_model.set_adapter("cat")
    ids = _input_ids(base)
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    deltas = {m: merged.delta(m) for m in merged.modules()}
    torch.testing.assert_close(got, _manual_logits(base.model, deltas, ids), atol=1e-4, rtol=0)


def test_merge_rejects_bad_inputs(parents):
    foreign = Adapter(copy.deepcopy(parents[1].config), dict(parents[1].tensors), "0" * 16)
    with pytest.raises(AdapterError, match="different base models"):
        merge_adapters([parents[0], foreign], [0.5, 0.5])
    for weights in ([0.5, -0.1], [0.5, math.nan], [math.inf, 0.5], [0.5], [0.5, "x"], [True, 0.5]):
        with pytest.raises(ValueError, match="weights"):
            merge_adapters(parents[:2], weights)
    with pytest.raises(ValueError, match="at least one adapter"):
        merge_adapters([], [])
    dora = Adapter({**parents[0].config, "use_dora": True}, parents[0].tensors, parents[0].base_fingerprint)
    with pytest.raises(AdapterError, match="use_dora"):
        merge_adapters([parents[1], dora], [0.5, 0.5])
    pattern = Adapter(
        {**parents[0].config, "rank_pattern": {"q_proj": 8}}, parents[0].tensors, parents[0].base_fingerprint
    )
    with pytest.raises(AdapterError, match="rank_pattern"):
        merge_adapters([pattern], [1.0])
    regex = Adapter({**parents[0].config, "target_modules": ".*proj"}, parents[0].tensors, parents[0].base_fingerprint)
    with pytest.raises(AdapterError, match="list of module names"):
        merge_adapters([regex], [1.0])
    partial = {k: v for k, v in parents[0].tensors.items() if ".layers.0." not in k}
    subset = Adapter(copy.deepcopy(parents[0].config), partial, parents[0].base_fingerprint)
    with pytest.raises(AdapterError, match="different sets of 'q_proj' modules"):
        merge_adapters([parents[1], subset], [0.5, 0.5])
