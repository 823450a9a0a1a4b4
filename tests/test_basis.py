"""Algorithm 1 on synthetic embedding spaces: invariants (property tests), Eq. 2, recovery, I/O, bad input."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from xpert_fl import basis as basis_mod
from xpert_fl.basis import META_KEY, Basis, BasisError, Decomposition, build_basis, parse_human_weight, report

D = 64


class World:
    """A toy summarizer space: near-orthogonal style words, correlated decoys, random filler words."""

    def __init__(self, seed: int, n_style: int = 16, n_decoy: int = 8, n_random: int = 8, d: int = D):
        rng = self.rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(d, n_style)))
        style = q.T * rng.uniform(0.5, 2.0, size=(n_style, 1)) + 0.003 * rng.normal(size=(n_style, d))
        self.style = [f"style{i}" for i in range(n_style)]
        self.vecs = dict(zip(self.style, style, strict=True))
        for i in range(n_decoy):  # cos ≈ 0.9 with the style word it imitates
            src = self.vecs[self.style[i % n_style]]
            v = src / np.linalg.norm(src) + 0.45 * rng.normal(size=d) / np.sqrt(d)
            self.vecs[f"decoy{i}"] = v * rng.uniform(0.5, 2.0)
        for i in range(n_random):
            self.vecs[f"random{i}"] = rng.normal(size=d)
        self.calls: Counter[str] = Counter()

    def subvector(self, word: str) -> np.ndarray:
        self.calls[word] += 1
        return self.vecs[word].astype(np.float32)

    def embedding(self, n_words: int = 3, noise: float = 0.01) -> tuple[np.ndarray, dict[str, float]]:
        words = self.rng.choice(self.style, size=n_words, replace=False)
        alpha = {str(w): float(a) for w, a in zip(words, self.rng.uniform(0.3, 1.5, n_words), strict=True)}
        e = sum(a * self.vecs[w] for w, a in alpha.items()) + noise * self.rng.normal(size=D)
        return e, alpha

    def ranking(self, e: np.ndarray, limit: int | None = None) -> list[str]:
        """Candidate words "by probability": similarity to e, blurred, so decoys and fillers interleave."""
        score = {w: abs(_cos(e, v)) + 0.3 * self.rng.uniform() for w, v in self.vecs.items()}
        return sorted(score, key=score.__getitem__, reverse=True)[:limit]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _snapshot(b: Basis) -> tuple[list[str], np.ndarray, set[str]]:
    return list(b.words), b.vectors.copy(), set(b.rejected)


def _assert_unchanged(b: Basis, snap: tuple[list[str], np.ndarray, set[str]]) -> None:
    assert b.words == snap[0]
    np.testing.assert_array_equal(b.vectors, snap[1])
    assert b.rejected == snap[2]


# --- invariants of Algorithm 1 ---------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_pllms=st.integers(1, 6),
    tau_orth=st.floats(0.05, 0.3),
    tau_res=st.floats(0.05, 0.6),
    limit=st.integers(1, 32),
    orthogonalize=st.booleans(),
)
def test_algorithm1_invariants(seed, n_pllms, tau_orth, tau_res, limit, orthogonalize):
    w = World(seed)
    b = Basis(dim=D, tau_orth=tau_orth, tau_res=tau_res, orthogonalize=orthogonalize)
    offered: set[str] = set()
    for _ in range(n_pllms):
        e, _alpha = w.embedding(n_words=int(w.rng.integers(1, 5)))
        cands = w.ranking(e, limit)
        offered |= set(cands)
        words_before, vectors_before = list(b.words), b.vectors.copy()
        calls_before = sum(w.calls.values())
        d = b.decompose(e, cands, w.subvector)

        # Eq. 3 met, or the candidates ran out (and then it is really not met).
        assert d.residual_ratio <= tau_res or d.exhausted
        assert d.exhausted == (d.residual_ratio > tau_res)
        assert d.residual_ratio == pytest.approx(b.residual_ratio(e), rel=1e-9)
        # Coordinates cover the whole basis after growth and are Eq. 2 on it.
        assert d.coords.shape == (b.size,)
        np.testing.assert_allclose(d.coords, b.coordinates(e), rtol=1e-12, atol=1e-12)
        # The basis only grows; earlier words keep their index and vector.
        assert b.words[: len(words_before)] == words_before
        np.testing.assert_array_equal(b.vectors[: len(words_before)], vectors_before)
        assert b.words[len(words_before) :] == d.added
        assert d.examined == sum(w.calls.values()) - calls_before

    # Sub-vectors are computed only for offered words, each at most once per basis.
    assert set(w.calls) <= offered
    assert max(w.calls.values(), default=1) == 1
    assert set(w.calls) == set(b.words) | b.rejected
    assert b.vectors.dtype == np.float32 and b.vectors.shape == (b.size, D)

    if b.size > 1:
        cos = basis_mod._cosines(b.vectors.astype(np.float64))
        off = np.abs(cos - np.eye(b.size))
        if orthogonalize:
            assert off.max() <= 1e-5
        else:
            assert off.max() <= tau_orth + 1e-9


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), orthogonalize=st.booleans())
def test_build_basis_and_reprojection(seed, orthogonalize):
    w = World(seed)
    embs = [w.embedding()[0] for _ in range(5)]
    b, decomps = build_basis(
        embs, lambda j: w.ranking(embs[j]), w.subvector, summarizer="toy", orthogonalize=orthogonalize
    )
    assert b.summarizer == "toy" and b.orthogonalize is orthogonalize
    r = report(decomps)
    assert r["n_pllms"] == 5 and r["n_subvectors"] == b.size
    assert r["n_examined"] == sum(w.calls.values()) == len(b.words) + len(b.rejected)
    assert r["n_exhausted"] == sum(d.exhausted for d in decomps)
    # Re-projection on the final basis keeps each decomposition's coordinates and fills in later words.
    final = b.project_all(embs)
    assert final.shape == (5, b.size)
    for row, d in zip(final, decomps, strict=True):
        np.testing.assert_allclose(row[: d.coords.size], d.coords, rtol=1e-12, atol=1e-12)


# --- Eq. 2 and least squares ------------------------------------------------------------------------
def test_coordinates_follow_eq2_exactly():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, D)).astype(np.float32)
    b = Basis(dim=D, words=["a", "b", "c"], vectors=v)
    e = rng.normal(size=D)
    v64 = v.astype(np.float64)
    manual = np.array([np.dot(e, vi) / np.dot(vi, vi) for vi in v64])
    np.testing.assert_allclose(b.coordinates(e), manual, rtol=1e-12)
    recon = sum(c * vi for c, vi in zip(manual, v64, strict=True))
    assert b.residual_ratio(e) == pytest.approx(np.linalg.norm(e - recon) / np.linalg.norm(e), rel=1e-12)
    empty = Basis(dim=D)
    assert empty.coordinates(e).shape == (0,)
    assert empty.residual_ratio(e) == 1.0
    assert empty.project_all([e, e]).shape == (2, 0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_orthogonalize_gives_least_squares(seed):
    """Correlated words (|cos| up to 0.3): Gram–Schmidt coordinates reconstruct the lstsq projection."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(6, D))
    raw[1] += 0.25 * raw[0]  # correlated pairs, still under tau_orth = 0.35
    raw[3] -= 0.2 * raw[2]
    vecs = {f"w{i}": v.astype(np.float32) for i, v in enumerate(raw)}
    e = raw[:4].T @ rng.uniform(0.3, 1.5, 4) + 0.3 * rng.normal(size=D)

    ortho = Basis(dim=D, tau_orth=0.35, tau_res=0.0, orthogonalize=True)
    d = ortho.decompose(e, list(vecs), lambda w: vecs[w])
    kept = np.array([vecs[w] for w in ortho.words], dtype=np.float64)
    lstsq_coef, *_ = np.linalg.lstsq(kept.T, e, rcond=None)
    lstsq_recon = kept.T @ lstsq_coef
    recon = d.coords @ ortho.vectors.astype(np.float64)
    np.testing.assert_allclose(recon, lstsq_recon, atol=1e-4 * np.linalg.norm(e))
    assert d.residual_ratio == pytest.approx(np.linalg.norm(e - lstsq_recon) / np.linalg.norm(e), abs=1e-4)
    # The paper's non-orthogonal projection on the same words fits no better than least squares.
    paper = Basis(dim=D, words=ortho.words, vectors=kept, tau_orth=0.35)
    assert d.residual_ratio <= paper.residual_ratio(e) + 1e-6


# --- recovery ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("orthogonalize", [False, True])
def test_recovers_true_words_and_coefficients(orthogonalize):
    w = World(seed=7)
    truths = [
        {"style0": 1.2, "style1": 0.6, "style2": 0.4},
        {"style1": 0.9, "style3": 0.5},
        {"style4": 1.0, "style0": 0.3},
    ]
    embs = [sum(a * w.vecs[k] for k, a in t.items()) + 0.005 * w.rng.normal(size=D) for t in truths]

    def candidates(j: int) -> Iterator[str]:
        # Each true word ranks just ahead of its decoy; fillers and other decoys follow.
        for k in sorted(truths[j], key=truths[j].get, reverse=True):
            yield k
            yield from (dw for dw in w.vecs if dw.startswith("decoy") and w.style[int(dw[5:]) % 16] == k)
        yield from (x for x in w.vecs if x.startswith(("random", "decoy")))

    b, decomps = build_basis(embs, candidates, w.subvector, tau_res=0.05, orthogonalize=orthogonalize)
    assert b.words == ["style0", "style1", "style2", "style3", "style4"]
    assert not any(d.exhausted for d in decomps)
    assert {"decoy0", "decoy1"} <= b.rejected  # the decoys of style0/style1 were examined and refused
    coords = b.project_all(embs)
    for row, truth in zip(coords, truths, strict=True):
        expected = [truth.get(k, 0.0) for k in b.words]
        np.testing.assert_allclose(row, expected, atol=0.05)
    assert [part.split()[1] for part in b.explain(coords[0]).split(" · ")] == ["style0", "style1", "style2"]


def test_candidates_consumed_lazily_and_stop_when_met():
    w = World(seed=1)
    e = 2.0 * w.vecs["style5"]
    pulled = []

    def stream() -> Iterator[str]:
        for word in ["style5", *[f"never{i}" for i in range(1000)]]:
            pulled.append(word)
            yield word

    b = Basis(dim=D)
    d = b.decompose(e, stream(), w.subvector)
    assert pulled == ["style5"] and d.added == ["style5"] and d.examined == 1
    assert d.coords == pytest.approx([2.0], rel=1e-5)
    # A pLLM already explained by the basis examines nothing.
    d2 = b.decompose(0.5 * e, ["style6"], w.subvector)
    assert d2.examined == 0 and d2.added == [] and not d2.exhausted
    assert list(w.calls) == ["style5"]


def test_exhausted_and_skipped_words():
    w = World(seed=2)
    e = w.vecs["style0"] + w.vecs["style1"]
    b = Basis(dim=D)
    d = b.decompose(e, ["style0", "decoy0", "unknown", "style0"], lambda x: w.vecs.get(x))
    assert d.exhausted and d.added == ["style0"] and d.examined == 3
    assert b.rejected == {"decoy0", "unknown"}  # non-orthogonal; no sub-vector (None)
    assert d.residual_ratio > b.tau_res
    d2 = b.decompose(e, ["decoy0", "unknown", "style1"], w.subvector)
    assert d2.added == ["style1"] and d2.examined == 1 and "decoy0" not in w.calls


@pytest.mark.parametrize("orthogonalize", [False, True])
def test_residual_completion_names_the_rest_of_the_drift(orthogonalize):
    """complete=True: when candidates run out, the part of e outside the basis becomes the next
    candidate word's vector (orthogonal to the basis), so the decomposition meets Eq. 3."""
    w = World(seed=3)
    e = w.vecs["style0"] + w.vecs["style1"] + 0.5 * w.vecs["random0"]
    b = Basis(dim=D, complete=True, orthogonalize=orthogonalize)
    d = b.decompose(e, ["style0", "decoy0", "poetic", "style9"], lambda x: w.vecs.get(x))
    assert d.exhausted and d.added[0] == "style0"
    # named by the most probable candidate not in the basis, even one whose own vector was rejected
    assert b.residual_words == {"decoy0"} and d.added[-1] == "decoy0" and b.rejected == {"poetic"}
    assert d.residual_ratio <= (1e-6 if orthogonalize else b.tau_res)
    r = b.vectors[b.words.index("decoy0")].astype(np.float64)
    assert all(abs(_cos(r, v)) < 1e-5 for word, v in zip(b.words, b.vectors, strict=True) if word != "decoy0")
    again = b.decompose(e, ["decoy0"], w.subvector)  # in the span now: nothing added, nothing examined
    assert again.added == [] and again.examined == 0 and not again.exhausted
    paper = Basis(dim=D)
    assert paper.decompose(e, ["style0", "decoy0"], w.subvector).residual_ratio > paper.tau_res


def test_residual_completion_without_free_candidate_uses_a_generic_name():
    b = Basis(dim=D, complete=True, words=["style1"], vectors=np.eye(D, dtype=np.float32)[:1])
    d = b.decompose(np.arange(1.0, D + 1), ["style1"], lambda x: None)
    assert d.added == ["style2"] and b.residual_words == {"style2"}


# --- explanation ------------------------------------------------------------------------------------
def test_explain_orders_by_magnitude_and_formats():
    b = Basis(dim=D, words=["sarcastic", "poetic", "concise", "formal"], vectors=np.eye(4, D))
    c = np.array([0.42, -0.08, 0.31, 0.004])
    assert b.explain(c) == "0.42 sarcastic · 0.31 concise · -0.08 poetic"
    assert b.explain(c, top=2) == "0.42 sarcastic · 0.31 concise"
    assert b.explain(c, min_abs=0.1) == "0.42 sarcastic · 0.31 concise"
    assert b.explain(np.array([-0.5, 0.5])) == "-0.50 sarcastic · 0.50 poetic"  # ties keep basis order
    assert b.explain(c[:2]) == "0.42 sarcastic · -0.08 poetic"  # coordinates from before later words
    assert b.explain(np.zeros(4)) == "(all |coef| < 0.01)"
    assert Basis(dim=D).explain(np.zeros(0)) == "(no basis words)"
    with pytest.raises(BasisError, match="5 coordinates"):
        b.explain(np.ones(5))


# --- persistence ------------------------------------------------------------------------------------
def _built(seed: int = 3, orthogonalize: bool = False) -> tuple[Basis, World]:
    w = World(seed)
    embs = [w.embedding()[0] for _ in range(3)]
    b, _ = build_basis(
        embs, lambda j: w.ranking(embs[j]), w.subvector, summarizer="smol@abc", orthogonalize=orthogonalize
    )
    return b, w


@pytest.mark.parametrize("orthogonalize", [False, True])
def test_save_load_round_trip(tmp_path, orthogonalize):
    b, w = _built(orthogonalize=orthogonalize)
    b.complete = True
    b.decompose(w.rng.normal(size=D), ["fresh"], lambda x: None)  # a residual word
    assert b.residual_words == {"fresh"}
    b.tau_orth, b.tau_res = 0.123456789, 0.1 + 0.2  # floats survive JSON exactly
    path = b.save(tmp_path / "sub" / "basis.safetensors")
    assert os.listdir(path.parent) == ["basis.safetensors"]  # no temp files left
    got = Basis.load(path, expect_summarizer="smol@abc")
    assert got.words == b.words and got.rejected == b.rejected and got.residual_words == b.residual_words
    assert got.vectors.dtype == np.float32
    np.testing.assert_array_equal(got.vectors, b.vectors)
    assert (got.dim, got.tau_orth, got.tau_res, got.summarizer, got.orthogonalize, got.complete) == (
        b.dim, b.tau_orth, b.tau_res, b.summarizer, b.orthogonalize, b.complete,
    )  # fmt: skip
    e = w.embedding()[0]
    np.testing.assert_array_equal(got.coordinates(e), b.coordinates(e))
    Basis(dim=8).save(tmp_path / "empty.safetensors")
    assert Basis.load(tmp_path / "empty.safetensors").vectors.shape == (0, 8)


def test_load_rejects_other_summarizer_and_corrupt_files(tmp_path):
    b, _ = _built()
    path = b.save(tmp_path / "basis.safetensors")
    with pytest.raises(BasisError, match="summarizer 'smol@abc', not 'llama'"):
        Basis.load(path, expect_summarizer="llama")
    data = path.read_bytes()
    for cut in (0, 7, 100, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(BasisError, match="unreadable or truncated"):
            Basis.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(BasisError):
        Basis.load(tmp_path / "junk.safetensors")
    with pytest.raises(BasisError):
        Basis.load(tmp_path / "missing.safetensors")


def test_open_basis_refuses_other_growth_settings_naming_both_values(tmp_path):
    """A cache's basis was grown under its own thresholds (its words and coordinates embody them): reopened
    under others it is a BasisError naming both values, not silently the old basis."""
    from types import SimpleNamespace

    from xpert_fl.explain import BASIS_FILE, open_basis

    summarizer = SimpleNamespace(fingerprint="s", dim=D)
    saved = Basis(dim=D, tau_orth=0.1, tau_res=0.2, summarizer="s", orthogonalize=True, complete=True)
    saved.save(tmp_path / BASIS_FILE)
    assert open_basis(tmp_path, summarizer, 0.1, 0.2, True, True).tau_res == 0.2  # its own settings: reopened
    with pytest.raises(BasisError, match=r"tau_res 0\.2 \(asked: 0\.3\)"):
        open_basis(tmp_path, summarizer, 0.1, 0.3, True, True)
    with pytest.raises(BasisError, match=r"tau_orth 0\.1 \(asked: 0\.25\), orthogonalize True \(asked: False\)"):
        open_basis(tmp_path, summarizer, 0.25, 0.2, False, True)
    with pytest.raises(BasisError, match=r"complete True \(asked: False\)"):
        open_basis(tmp_path, summarizer, 0.1, 0.2, True, False)


def test_load_rejects_inconsistent_metadata(tmp_path):
    import json

    from safetensors.numpy import save_file

    def write(meta: dict | None, vectors: np.ndarray) -> str:
        p = str(tmp_path / "x.safetensors")
        metadata = None if meta is None else {"xpert_basis": json.dumps(meta)}
        save_file({"vectors": vectors}, p, metadata=metadata)
        return p

    good = {"format": basis_mod.FORMAT_VERSION, "words": ["a", "b"], "dim": 4, "tau_orth": 0.1, "tau_res": 0.2,
            "summarizer": "s", "orthogonalize": False}  # fmt: skip
    assert Basis.load(write(good, np.eye(2, 4, dtype=np.float32))).words == ["a", "b"]
    with pytest.raises(BasisError, match="do not match"):
        Basis.load(write(good, np.eye(3, 4, dtype=np.float32)))
    with pytest.raises(BasisError, match="do not match"):
        Basis.load(write({**good, "dim": 5}, np.eye(2, 4, dtype=np.float32)))
    with pytest.raises(BasisError, match="format"):
        Basis.load(write({**good, "format": 99}, np.eye(2, 4, dtype=np.float32)))
    with pytest.raises(BasisError, match="bad metadata"):
        Basis.load(write({k: v for k, v in good.items() if k != "words"}, np.eye(2, 4, dtype=np.float32)))
    with pytest.raises(BasisError, match="not a basis file"):
        Basis.load(write(None, np.eye(2, 4, dtype=np.float32)))
    with pytest.raises(BasisError, match="zero vector"):
        Basis.load(write(good, np.zeros((2, 4), dtype=np.float32)))


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    b, _ = _built()
    path = b.save(tmp_path / "basis.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(basis_mod, "save_file", boom)
    b.words.append("x")  # would be inconsistent anyway; the write fails first
    with pytest.raises(OSError, match="disk full"):
        b.save(path)
    assert os.listdir(tmp_path) == ["basis.safetensors"] and path.read_bytes() == before


def test_zero_drift_sits_at_the_origin():
    """A pLLM whose probe outputs equal the base's has a zero drift: zero coordinates, nothing examined."""
    b, w = _built()
    snap, calls = _snapshot(b), Counter(w.calls)
    d = b.decompose(np.zeros(D), ["style9"], w.subvector)
    assert (d.added, d.examined, d.exhausted, d.residual_ratio) == ([], 0, False, 0.0)
    assert not np.any(b.coordinates(np.zeros(D))) and w.calls == calls
    _assert_unchanged(b, snap)


# --- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, match",
    [
        (np.full(D, np.nan), "NaN or Inf"),
        (np.r_[np.ones(D - 1), np.inf], "NaN or Inf"),
        (np.ones(D + 1), "shape"),
        (np.ones((1, D)), "shape"),
        (["x"] * D, "not numeric"),
    ],
)
def test_bad_embedding_raises_and_leaves_basis_unchanged(bad, match):
    b, w = _built()
    snap, calls = _snapshot(b), Counter(w.calls)
    for call in (b.coordinates, b.residual_ratio, lambda e: b.project_all([e])):
        with pytest.raises(BasisError, match=match):
            call(bad)
    with pytest.raises(BasisError, match=match):
        b.decompose(bad, ["style9"], w.subvector)
    _assert_unchanged(b, snap)
    assert w.calls == calls


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(D), "zero vector"),
        (np.full(D, np.nan), "NaN or Inf"),
        (np.full(D, 1e39), "NaN or Inf"),  # finite in float64, Inf once stored as float32
        (np.ones(D - 2), "shape"),
    ],
)
def test_bad_subvector_raises_and_rolls_back(bad, match):
    """A bad sub-vector after one good word: the whole decomposition is undone."""
    w = World(seed=4)
    b = Basis(dim=D)
    b.decompose(w.vecs["style0"], ["style0"], w.subvector)
    snap = _snapshot(b)
    e = w.vecs["style1"] + w.vecs["style2"]
    vecs = {**w.vecs, "broken": bad}
    with pytest.raises(BasisError, match=match):
        b.decompose(e, ["style1", "decoy0", "broken", "style2"], vecs.__getitem__)
    _assert_unchanged(b, snap)
    with pytest.raises(BasisError, match="non-empty strings"):
        b.decompose(e, ["style1", ""], vecs.__getitem__)
    _assert_unchanged(b, snap)


def test_constructor_validation():
    with pytest.raises(BasisError, match="2 words but 3 vectors"):
        Basis(dim=4, words=["a", "b"], vectors=np.eye(3, 4))
    with pytest.raises(BasisError, match=r"shape \(k, 4\)"):
        Basis(dim=4, words=["a"], vectors=np.ones((1, 5)))
    with pytest.raises(BasisError, match="unique"):
        Basis(dim=4, words=["a", "a"], vectors=np.eye(2, 4))
    with pytest.raises(BasisError, match="NaN"):
        Basis(dim=4, words=["a"], vectors=np.full((1, 4), np.nan))
    with pytest.raises(BasisError, match="orthogonalize=True"):
        Basis(dim=4, words=["a", "b"], vectors=[[1, 0, 0, 0], [1, 1, 0, 0]], orthogonalize=True)
    with pytest.raises(BasisError, match="tau_orth"):
        Basis(dim=4, tau_orth=1.5)
    with pytest.raises(BasisError, match="dim"):
        Basis(dim=0)
    with pytest.raises(BasisError, match="at least one"):
        build_basis([], lambda j: [], lambda w: None)
    assert isinstance(BasisError("x"), ValueError)
    assert Decomposition(np.zeros(0), 1.0, [], 0, True).exhausted


def test_selection_metric_of_a_basis():
    """``metric`` hands select() the Gram matrix for the drift distance, nothing for Eq. 1's L1."""
    rng = np.random.default_rng(3)
    v = rng.normal(size=(3, 8)).astype(np.float32)
    v[1] -= v[1] @ v[0] / (v[0] @ v[0]) * v[0]
    b = Basis(dim=8, words=["a", "b", "c"], vectors=v)
    assert b.metric("l1") is None
    np.testing.assert_allclose(b.metric("drift"), v.astype(np.float64) @ v.T.astype(np.float64), rtol=1e-12)
    with pytest.raises(ValueError, match="distance must be one of"):
        b.metric("cosine")


def test_human_offset_moves_only_the_users_side_and_survives_save_load(tmp_path):
    """``user_coordinates`` is Eq. 2 of ``e - α·h`` (so, Eq. 2 being linear, ``c(e) - α·c(h)``); pLLM-side
    ``coordinates`` ignore it; h and α round-trip through the file; an offset at weight 0 shifts nothing."""
    b, w = _built(orthogonalize=True)
    e, h = w.embedding()[0], w.rng.normal(size=D).astype(np.float32)
    assert b.human_offset is None and b.human_weight == 0.0
    np.testing.assert_array_equal(b.user_coordinates(e), b.coordinates(e))
    plain = b.coordinates(e)
    b.set_human_offset(h, 0.4)
    np.testing.assert_array_equal(b.coordinates(e), plain)
    np.testing.assert_allclose(b.user_vector(e), e - 0.4 * h.astype(np.float64), rtol=1e-12)
    np.testing.assert_allclose(b.user_coordinates(e), plain - 0.4 * b.coordinates(h), rtol=1e-9, atol=1e-12)
    assert np.abs(b.user_coordinates(e) - plain).max() > 1e-3  # the shift is not negligible here
    got = Basis.load(b.save(tmp_path / "basis.safetensors"))
    assert got.human_weight == 0.4 and got.human_offset.dtype == np.float32
    np.testing.assert_array_equal(got.human_offset, h)
    np.testing.assert_array_equal(got.user_coordinates(e), b.user_coordinates(e))
    got.set_human_offset(got.human_offset, 0.0)  # kept, not applied
    np.testing.assert_array_equal(got.user_coordinates(e), plain)
    assert Basis.load(got.save(tmp_path / "basis.safetensors")).human_offset is not None


@pytest.mark.parametrize("offset, weight, match", [
    (np.ones(5), 0.4, r"human offset has shape \(5,\)"),
    (np.full(4, np.nan), 0.4, "human offset contains NaN"),
    (None, 0.4, "needs a human offset vector"),
    (np.ones(4), -0.1, "finite number >= 0"),
    (np.ones(4), np.nan, "finite number >= 0"),
])
def test_bad_human_offset_is_refused_and_changes_nothing(offset, weight, match):
    b = Basis(dim=4, words=["a"], vectors=np.eye(1, 4))
    b.set_human_offset(np.full(4, 0.5), 0.2)
    with pytest.raises(BasisError, match=match):
        b.set_human_offset(offset, weight)
    assert b.human_weight == 0.2 and np.array_equal(b.human_offset, np.full(4, 0.5, np.float32))
    with pytest.raises(BasisError, match=match):
        Basis(dim=4, human_offset=offset, human_weight=weight)


def test_a_basis_of_the_older_format_is_refused_with_what_to_do(tmp_path):
    """Format 1 held a paired drift as the users' reference; read as today's reference it would move every
    device silently, so it is refused, saying how to rebuild it."""
    path = Basis(dim=D, words=["w"], vectors=np.ones((1, D))).save(tmp_path / "basis.safetensors")
    with safe_open(str(path), "numpy") as f:
        meta = json.loads(f.metadata()[META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={META_KEY: json.dumps({**meta, "format": 1})})
    with pytest.raises(BasisError, match="format 1, expected 2.*explain the cache again"):
        Basis.load(path)


@pytest.mark.parametrize("value, want", [("0.4", 0.4), (0, 0.0), (1.5, 1.5), ("1", 1.0)])
def test_parse_human_weight(value, want):
    assert parse_human_weight(value) == want


@pytest.mark.parametrize("value", ["banana", "auto", "-0.1", "nan", "inf", None])
def test_bad_human_weight_is_named(value):
    with pytest.raises(ValueError, match="human weight must be a finite number >= 0"):
        parse_human_weight(value)
