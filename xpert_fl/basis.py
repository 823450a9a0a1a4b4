"""The common basis of style words (§4.2, Algorithm 1): sub-vectors, coordinates, explanations, I/O.

A pLLM's drift embedding ``e`` (summarizer space, ``R^d``) is written as ``e ≈ Σ c_i v_i`` over a
shared, growing set of word sub-vectors ``v_i``. The coordinate ``c`` is the pLLM's explanation
("0.42 sarcastic · 0.31 concise") and what devices compare (Eq. 1). Pure numpy: the summarizer is
reached only through two callables (a word's sub-vector; a pLLM's candidate words).

Two modes:
- paper (default): vectors are stored as computed; ``c_i = <e, v_i> / ||v_i||^2`` (Eq. 2). The
  vectors are only near-orthogonal (``|cos| <= tau_orth``), so ``Σ c_i v_i`` is not the best fit.
- ``orthogonalize=True`` (an improvement over the paper): each accepted vector is stored after
  Gram–Schmidt against the earlier ones (unit-free: not normalised, so coefficients keep the
  paper's scale, since a near-orthogonal ``v`` changes little). Eq. 2 on orthogonal vectors is the
  exact least-squares projection of ``e`` on the span of the accepted words' vectors.

Residual completion (``complete=True``, beyond the paper): when a pLLM's candidate words run out
before Eq. 3 holds, the part of ``e`` outside the basis's span becomes one more sub-vector, named by
the pLLM's most probable candidate word not yet in the basis. It is route (a) applied to the pLLM
itself: its outputs *are* texts in the style the summarizer names. The basis then spans every drift,
so coordinates keep what the drift embedding knows (a small summarizer's word vectors do not span
the drifts; measured in benchmarks/selection_harness.py). Such words are listed in
``residual_words``: their vectors are measured from data, not from the word.

Earlier pLLMs vs later words: a decomposition's coordinates cover the basis as it was then (implicitly
zero on words added later). The server should re-project every pLLM on the final basis with
``project_all``: it costs one k×d product per pLLM, and the device's coordinate is a projection on
every word, so zero-padding would make Eq. 1 distances inconsistent. Re-projection leaves earlier
entries unchanged (each ``c_i`` depends only on ``e`` and ``v_i``); it fills in the later ones.

Users' reference (beyond the paper): a pLLM's drift is how its texts differ from the base model's on
the probe prompts; a device's vector is where its own texts sit (``Summarizer.embed``). The basis
holds the same embedding of neutral human-written texts, ``h`` (measured once by the server on public
reference data), and devices remove ``α·h`` before projecting (``user_coordinates``), so a user's
drift is how its writing differs from neutral human writing. ``α`` is 1 by default; 0 projects the
raw embedding (an ablation).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from xpert_fl.files import atomic_file
from xpert_fl.select import check_distance

FORMAT_VERSION = 2  # 2: h is the embedding of neutral human texts (1: a paired drift)
META_KEY = "xpert_basis"
TENSOR_KEY = "vectors"
OFFSET_KEY = "human_offset"
_ZERO = 1e-12  # norms at or below this are "zero": hidden states are never that small
_ORTHO_TOL = 1e-4  # float32 Gram–Schmidt vectors are orthogonal to ~1e-7; anything worse is not

SubVector = Callable[[str], "np.ndarray | None"]


def parse_human_weight(value: str | float) -> float:
    """A configured human weight: a number >= 0. ValueError names the problem."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = math.nan
    if not (math.isfinite(weight) and weight >= 0.0):
        raise ValueError(f"human weight must be a finite number >= 0, got {value!r}")
    return weight


class BasisError(ValueError):
    """Bad input to the basis (dimension, non-finite or zero vector) or an unusable basis file."""


@dataclass(frozen=True, eq=False)
class Decomposition:
    """One pLLM through Algorithm 1: its coordinates over the basis as it stood after this step."""

    coords: np.ndarray  # (k,) over the full basis after this decomposition's growth
    residual_ratio: float  # ||e - Σ c_i v_i|| / ||e||
    added: list[str]  # words this decomposition added to the basis, in order
    examined: int  # candidate words whose sub-vector was computed here (Table 2's count)
    exhausted: bool  # candidates ran out before residual_ratio <= tau_res


@dataclass(eq=False)
class Basis:
    """Words and their sub-vectors (k × dim, float32) in the summarizer's embedding space.

    ``rejected`` remembers words whose sub-vector failed the orthogonality test (or was unusable):
    the basis only grows, so a rejection is final and the expensive sub-vector is never recomputed.
    """

    dim: int
    words: list[str] = field(default_factory=list)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    tau_orth: float = 0.1
    tau_res: float = 0.2
    summarizer: str = ""  # fingerprint of the summarizer whose embedding space this is
    orthogonalize: bool = False
    complete: bool = False
    rejected: set[str] = field(default_factory=set, repr=False)
    residual_words: set[str] = field(default_factory=set)
    human_offset: np.ndarray | None = None  # h (dim,): the embedding of neutral human text (users' reference)
    human_weight: float = 0.0  # α: the share of h devices remove from their vectors (user_coordinates)

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int | np.integer) or self.dim < 1:
            raise BasisError(f"basis dim must be a positive integer, got {self.dim!r}")
        self.dim, self.tau_orth, self.tau_res = int(self.dim), float(self.tau_orth), float(self.tau_res)
        if not 0.0 <= self.tau_orth <= 1.0:
            raise BasisError(f"tau_orth must be in [0, 1], got {self.tau_orth}")
        if not self.tau_res >= 0.0:
            raise BasisError(f"tau_res must be >= 0, got {self.tau_res}")
        vectors = np.asarray(self.vectors, dtype=np.float32)
        if vectors.size == 0:
            vectors = vectors.reshape(0, self.dim)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise BasisError(f"basis vectors must have shape (k, {self.dim}), got {vectors.shape}")
        self.words = list(self.words)
        if vectors.shape[0] != len(self.words):
            raise BasisError(f"{len(self.words)} words but {vectors.shape[0]} vectors")
        if len(set(self.words)) != len(self.words):
            raise BasisError("basis words must be unique")
        for word, v in zip(self.words, vectors, strict=True):
            _check_word(word)
            _check_vector(v, self.dim, f"vector of {word!r}")
        if self.orthogonalize and len(self.words) > 1:
            cos = _cosines(vectors.astype(np.float64))
            worst = np.abs(cos - np.eye(len(cos))).max()
            if worst > _ORTHO_TOL:
                raise BasisError(f"orthogonalize=True but stored vectors have |cos| up to {worst:.2g}")
        self.vectors = np.ascontiguousarray(vectors)
        self.rejected = set(self.rejected)
        self.residual_words = set(self.residual_words)
        if not self.residual_words <= set(self.words):
            raise BasisError(f"residual words {sorted(self.residual_words - set(self.words))} are not basis words")
        self.set_human_offset(self.human_offset, self.human_weight)

    def set_human_offset(self, offset: np.ndarray | None, weight: float) -> None:
        """Set ``h`` and ``α`` (validated together: a weight needs an offset). All or nothing."""
        weight = float(weight)
        if not (np.isfinite(weight) and weight >= 0.0):
            raise BasisError(f"human_weight must be a finite number >= 0, got {weight}")
        if offset is not None:
            offset = _check_vector(offset, self.dim, "human offset", dtype=np.float32, allow_zero=True)
            offset = offset.astype(np.float32)
        elif weight > 0.0:
            raise BasisError(f"human_weight {weight} needs a human offset vector")
        self.human_offset, self.human_weight = offset, weight

    @property
    def size(self) -> int:
        """Number of words k (not ``__len__``: an empty basis should not be falsy)."""
        return len(self.words)

    @property
    def gram(self) -> np.ndarray:
        """``G = V Vᵀ`` (k × k, float64): with it, distances between coordinates are distances between the
        drifts they reconstruct (``select.nearest(..., gram=basis.gram)``)."""
        v = self._v64()
        return v @ v.T

    def metric(self, distance: str) -> np.ndarray | None:
        """What ``select`` takes as ``gram`` for a selection distance: the Gram matrix, or None (L1)."""
        return self.gram if check_distance(distance) == "drift" else None

    # --- Eq. 2 / Eq. 3 ---------------------------------------------------------------------
    def coordinates(self, e: np.ndarray) -> np.ndarray:
        """Eq. 2: ``c_i = <e, v_i> / ||v_i||^2`` (float64, shape (k,))."""
        return _coords(self._embedding(e), self._v64())

    def user_vector(self, e: np.ndarray) -> np.ndarray:
        """A device's vector (its data, or an uploader's self-report) as a drift from neutral human text:
        ``e - α·h`` (float64). ``e`` itself when the basis has no weighted reference."""
        e = self._embedding(e)
        return e - self.human_weight * self.human_offset.astype(np.float64) if self.human_weight else e

    def user_coordinates(self, e: np.ndarray) -> np.ndarray:
        """A device's coordinates: Eq. 2 of its drift moved onto the pLLMs' footing (``user_vector``)."""
        return _coords(self.user_vector(e), self._v64())

    def residual_ratio(self, e: np.ndarray) -> float:
        """``||e - Σ c_i v_i|| / ||e||``; Eq. 3 holds when this is <= tau_res."""
        e = self._embedding(e)
        return _ratio(e, _coords(e, v := self._v64()), v)

    def project_all(self, embeddings: Iterable[np.ndarray]) -> np.ndarray:
        """Coordinates of many embeddings on the current (final) basis, shape (n, k)."""
        v = self._v64()
        rows = [_coords(self._embedding(e), v) for e in embeddings]
        return np.stack(rows) if rows else np.zeros((0, self.size))

    # --- Algorithm 1 -----------------------------------------------------------------------
    def decompose(self, e: np.ndarray, candidates: Iterable[str], subvector: SubVector) -> Decomposition:
        """Algorithm 1 for one embedding; grows this basis in place.

        ``candidates`` are words in descending probability, consumed lazily; ``subvector(word)``
        (expensive) is called only for words actually examined, at most once per basis, and may
        return None to skip a word. All or nothing: on error the basis is left unchanged.
        """
        e = self._embedding(e)
        consumed: list[str] = []  # candidates read so far, in order (residual completion names one)
        words, rows, rejected = list(self.words), list(self._v64()), set(self.rejected)
        seen = set(words) | rejected
        c = _coords(e, np.array(rows).reshape(-1, self.dim))
        ratio = _ratio(e, c, np.array(rows).reshape(-1, self.dim))
        added: list[str] = []
        examined = 0
        pending = iter(candidates)
        while ratio > self.tau_res:
            word = _next_unseen(pending, seen, consumed)
            if word is None:
                break
            seen.add(word)
            examined += 1
            raw = subvector(word)
            # Stored as float32, so validate and test the float32 value (an overflow shows up as Inf).
            v = None if raw is None else _check_vector(raw, self.dim, f"sub-vector of {word!r}", np.float32)
            v = None if v is None else self._admit(v, rows)
            if v is None:
                rejected.add(word)
                continue
            words.append(word)
            rows.append(v)
            added.append(word)
            # Each c_i depends only on (e, v_i): the new word just appends one coordinate.
            c = np.append(c, _coords(e, v[None]))
            ratio = _ratio(e, c, np.array(rows))
        exhausted = ratio > self.tau_res
        residual_words = set(self.residual_words)
        if exhausted and self.complete:
            word = next((w for w in itertools.chain(consumed, pending) if w not in words), None) or _unnamed(words)
            r = _outside_span(e, np.array(rows).reshape(-1, self.dim))
            words.append(word)
            rows.append(r)
            added.append(word)
            residual_words.add(word)
            rejected.discard(word)
            c = np.append(c, _coords(e, r[None]))
            ratio = _ratio(e, c, np.array(rows))
        self.words, self.rejected, self.residual_words = words, rejected, residual_words
        self.vectors = np.array(rows, dtype=np.float32).reshape(-1, self.dim)
        return Decomposition(c, ratio, added, examined, exhausted=exhausted)

    def _admit(self, v: np.ndarray, rows: list[np.ndarray]) -> np.ndarray | None:
        """The vector to store for a candidate, or None if it fails the orthogonality test."""
        norm = np.linalg.norm(v)
        for r in rows:
            if abs(v @ r) > self.tau_orth * norm * np.linalg.norm(r):
                return None
        if not self.orthogonalize:
            return v
        u = v.copy()
        for _ in range(2):  # classical Gram–Schmidt twice ("twice is enough") for float stability
            for r in rows:
                u -= (u @ r) / (r @ r) * r
        if np.linalg.norm(u) <= 1e-6 * norm:  # numerically inside the span: nothing new
            return None
        return u.astype(np.float32).astype(np.float64)

    # --- explanation -----------------------------------------------------------------------
    def explain(self, coords: np.ndarray, top: int = 5, min_abs: float = 0.01) -> str:
        """Coordinates as text, by |coef| descending: ``"0.42 sarcastic · 0.31 concise · -0.08 poetic"``.

        ``coords`` may be shorter than the basis (a decomposition made before later words existed).
        """
        c = np.asarray(coords, dtype=np.float64).reshape(-1)
        if c.size > self.size:
            raise BasisError(f"{c.size} coordinates for a basis of {self.size} words")
        if c.size == 0:
            return "(no basis words)"
        order = sorted(range(c.size), key=lambda i: (-abs(c[i]), i))
        parts = [f"{c[i]:.2f} {self.words[i]}" for i in order[:top] if abs(c[i]) >= min_abs]
        return " · ".join(parts) if parts else f"(all |coef| < {min_abs:g})"

    # --- persistence -----------------------------------------------------------------------
    def expect_settings(
        self, tau_orth: float, tau_res: float, orthogonalize: bool, complete: bool, where: str = "basis"
    ) -> None:
        """BasisError naming both values where these growth settings differ from this basis's own.

        Why: a basis's words and every pLLM's coordinates on it embody the settings it was grown with;
        reopening it under others would silently keep its own and misreport what the run used."""
        asked = {"tau_orth": float(tau_orth), "tau_res": float(tau_res), "orthogonalize": bool(orthogonalize),
                 "complete": bool(complete)}
        differ = [f"{k} {getattr(self, k)!r} (asked: {v!r})" for k, v in asked.items() if getattr(self, k) != v]
        if differ:
            raise BasisError(f"{where} was grown with {', '.join(differ)}: open it with the settings it was grown "
                             "with, or explain into a new cache")

    def save(self, path: str | Path) -> Path:
        """One safetensors file: the vectors, plus the rest as JSON metadata. Atomic (temp + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT_VERSION,
            "words": self.words,
            "dim": self.dim,
            "tau_orth": self.tau_orth,
            "tau_res": self.tau_res,
            "summarizer": self.summarizer,
            "orthogonalize": self.orthogonalize,
            "complete": self.complete,
            "rejected": sorted(self.rejected),
            "residual_words": sorted(self.residual_words),
            "human_weight": self.human_weight,
        }
        tensors = {TENSOR_KEY: self.vectors}
        if self.human_offset is not None:
            tensors[OFFSET_KEY] = self.human_offset
        with atomic_file(path, fsync=True) as tmp:
            save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path, expect_summarizer: str | None = None) -> Basis:
        """Read a basis; BasisError if unreadable, inconsistent, or from another summarizer."""
        try:
            with safe_open(str(path), "numpy") as f:
                raw_meta = (f.metadata() or {}).get(META_KEY)
                vectors = f.get_tensor(TENSOR_KEY) if TENSOR_KEY in f.keys() else None
                offset = f.get_tensor(OFFSET_KEY) if OFFSET_KEY in f.keys() else None
        except (SafetensorError, OSError, ValueError) as err:
            raise BasisError(f"basis {path}: unreadable or truncated ({err})") from err
        if raw_meta is None or vectors is None:
            raise BasisError(f"basis {path}: not a basis file (no {META_KEY!r} metadata or {TENSOR_KEY!r})")
        try:
            meta = json.loads(raw_meta)
            if meta["format"] != FORMAT_VERSION:
                raise BasisError(f"basis {path}: format {meta['format']}, expected {FORMAT_VERSION}; its users' "
                                 "reference is of an older kind: delete it and drifts.safetensors beside it, and "
                                 "explain the cache again (xpert explain)")
            keys = ("words", "dim", "tau_orth", "tau_res", "summarizer", "orthogonalize")
            fields = {k: meta[k] for k in keys}
            rejected = meta.get("rejected", [])
            fields["complete"] = bool(meta.get("complete", False))
            fields["residual_words"] = set(meta.get("residual_words", []))
            fields["human_weight"] = float(meta.get("human_weight", 0.0))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise BasisError(f"basis {path}: bad metadata ({err!r})") from err
        if expect_summarizer is not None and fields["summarizer"] != expect_summarizer:
            raise BasisError(
                f"basis {path} was built with summarizer {fields['summarizer']!r}, not {expect_summarizer!r}"
            )
        if vectors.dtype != np.float32 or vectors.shape != (len(fields["words"]), fields["dim"]):
            raise BasisError(
                f"basis {path}: vectors {vectors.dtype}{vectors.shape} do not match "
                f"{len(fields['words'])} words of dim {fields['dim']}"
            )
        return cls(vectors=vectors, rejected=set(rejected), human_offset=offset, **fields)

    # --- validation helpers ----------------------------------------------------------------
    def _embedding(self, e: np.ndarray) -> np.ndarray:
        # A zero drift is no error: a pLLM whose outputs equal the base's sits at the origin.
        return _check_vector(e, self.dim, "embedding", allow_zero=True)

    def _v64(self) -> np.ndarray:
        return self.vectors.astype(np.float64)


def build_basis(
    embeddings: Sequence[np.ndarray],
    candidates_for: Callable[[int], Iterable[str]],
    subvector: SubVector,
    *,
    tau_orth: float = 0.1,
    tau_res: float = 0.2,
    summarizer: str = "",
    orthogonalize: bool = False,
    complete: bool = False,
) -> tuple[Basis, list[Decomposition]]:
    """Algorithm 1 sequentially over pLLMs ``j = 0..N-1`` (``candidates_for(j)`` lists pLLM j's words).

    Coordinates in the decompositions are as computed at each step; use ``basis.project_all`` for
    coordinates on the final basis (what the server should publish).
    """
    if len(embeddings) == 0:
        raise BasisError("build_basis needs at least one embedding")
    first = np.asarray(embeddings[0])
    if first.ndim != 1:
        raise BasisError(f"embeddings must be 1-D vectors, got shape {first.shape}")
    basis = Basis(
        dim=first.shape[0],
        tau_orth=tau_orth,
        tau_res=tau_res,
        summarizer=summarizer,
        orthogonalize=orthogonalize,
        complete=complete,
    )
    decomps = [basis.decompose(e, candidates_for(j), subvector) for j, e in enumerate(embeddings)]
    return basis, decomps


def report(decompositions: Sequence[Decomposition]) -> dict[str, float | int]:
    """Table 2's counts: sub-vectors added and candidate words examined, plus how many pLLMs fell short."""
    return {
        "n_pllms": len(decompositions),
        "n_subvectors": sum(len(d.added) for d in decompositions),
        "n_examined": sum(d.examined for d in decompositions),
        "n_exhausted": sum(d.exhausted for d in decompositions),
        "max_residual_ratio": max((d.residual_ratio for d in decompositions), default=0.0),
    }


def _check_word(word: object) -> str:
    if not isinstance(word, str) or not word.strip():
        raise BasisError(f"basis words must be non-empty strings, got {word!r}")
    return word


def _check_vector(
    x: object, dim: int, what: str, dtype: type = np.float64, allow_zero: bool = False
) -> np.ndarray:
    """A finite (non-zero unless allowed) 1-D vector of length ``dim`` (values of ``dtype``, as float64)."""
    try:
        with np.errstate(over="ignore"):
            v = np.asarray(x, dtype=dtype).astype(np.float64)
    except (TypeError, ValueError) as err:
        raise BasisError(f"{what} is not numeric ({err})") from err
    if v.shape != (dim,):
        raise BasisError(f"{what} has shape {v.shape}, expected ({dim},): wrong summarizer or dimension?")
    if not np.isfinite(v).all():
        raise BasisError(f"{what} contains NaN or Inf")
    if not allow_zero and np.linalg.norm(v) <= _ZERO:
        raise BasisError(f"{what} is a zero vector")
    return v


def _outside_span(e: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The component of ``e`` orthogonal to the span of the rows of ``v`` (least squares, twice for float)."""
    r = e.copy()
    for _ in range(2):
        if len(v):
            r = r - v.T @ np.linalg.lstsq(v.T, r, rcond=None)[0]
    return r


def _next_unseen(pending: Iterator[str], seen: set[str], consumed: list[str]) -> str | None:
    """The next candidate not yet seen; every candidate read is appended to ``consumed``."""
    for word in pending:
        consumed.append(_check_word(word))
        if word not in seen:
            return word
    return None


def _unnamed(words: Sequence[str]) -> str:
    i = 1
    while f"style{i}" in words:
        i += 1
    return f"style{i}"


def _coords(e: np.ndarray, v: np.ndarray) -> np.ndarray:
    if len(v) == 0:
        return np.zeros(0)
    return (v @ e) / np.einsum("ij,ij->i", v, v)


def _ratio(e: np.ndarray, c: np.ndarray, v: np.ndarray) -> float:
    norm = np.linalg.norm(e)
    if norm <= _ZERO:  # nothing to explain
        return 0.0
    recon = c @ v if len(c) else np.zeros_like(e)
    return float(np.linalg.norm(e - recon) / norm)


def _cosines(v: np.ndarray) -> np.ndarray:
    n = v / np.linalg.norm(v, axis=1, keepdims=True)
    return n @ n.T
