"""Choosing a pLLM for a user from explanation coordinates (§4.3, Eq. 1) or a non-negative mix of several.

Everything here compares *coordinates* over the common basis of style words (``xpert_fl.basis``): the
server's coordinates ``c_j`` of each cached pLLM and the device's own ``c_u``. Pure numpy.

Lengths: the basis only grows, so an older coordinate may be shorter than a newer one. Shorter vectors
(cached entries and the user's alike) are zero-padded to the basis size, which is ``size`` when given,
else the longest cached coordinate. Zero-padding treats words added later as absent from that vector;
re-projecting every entry on the final basis (``Basis.project_all``) is better where possible.

Distance: the paper's Eq. 1 is the L1 distance of coordinates. Given the basis's Gram matrix
``G = V Vᵀ`` (``gram=basis.gram``), distances are instead Euclidean between the drifts the coordinates
reconstruct, ``||Σ_i (c_i − u_i) v_i||₂``. On an orthogonal basis that is exactly the Euclidean distance
of the drift embeddings themselves (minus the user's part outside the basis, the same for every pLLM),
so it does not depend on the order in which pLLMs built the basis, and it does not inflate words whose
sub-vector is short, as L1 on coefficients does. It selected better on the embedded summarizer
(benchmarks/selection_harness.py); the run config's ``distance`` chooses.

Selection rule (``select``), with ``n`` = nearest single pLLM (Eq. 1) and ``m`` = best merge:

1. empty cache: the base model (``kind="base"``);
2. ``dist(n) <= delta``: ``n`` (a close enough pLLM exists; merging is not tried);
3. otherwise ``m`` if ``dist(m) < dist(n)`` strictly, else ``n``.

``delta = inf`` therefore always returns the nearest pLLM. Merge weights are fitted in L2 (NNLS, in
the drift space when ``gram`` is given) but judged by the selection distance, so a merge that does
not actually get closer is never chosen. The base
model has no drift, i.e. coordinate 0; when the best non-negative mix is all zeros, ``merge_weights``
returns the base model (``kind="base"``), which rule 3 then picks only if it is closer than ``n``.

A device sends the server only a ``Choice`` (``to_json``): ids, weights and distances, never its
coordinate or its text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

KINDS = ("single", "merge", "base")
# "drift": Euclidean between the drifts coordinates reconstruct (pass gram=basis.gram); "l1": Eq. 1
DISTANCES = ("drift", "l1")


def check_distance(distance: str) -> str:
    """``distance`` if it names a selection distance, else a ValueError naming the choices."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    return distance


@dataclass(frozen=True)
class Choice:
    """What a device picked: one pLLM, a weighted merge of several, or the base model.

    ``distance``: selection distance (module docstring: L1, or between drifts) between the user's
    coordinate and the chosen pLLM's (or the merged coordinate ``Σ α_j c_j``; 0 for the base model's
    coordinate). ``distances``: the distance to every candidate, by id (empty for an empty cache).
    """

    kind: str
    ids: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    distance: float = 0.0
    distances: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"choice kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.ids, str):
            raise ValueError(f"choice ids must be a sequence of ids, got the string {self.ids!r}")
        ids = tuple(self.ids)
        weights = tuple(_finite(w, "choice weight") for w in self.weights)
        if not all(isinstance(i, str) and i for i in ids):
            raise ValueError(f"choice ids must be non-empty strings, got {ids!r}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"choice ids must be distinct, got {ids!r}")
        if len(weights) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(weights)} weights")
        if any(w < 0 for w in weights):
            raise ValueError(f"choice weights must be >= 0, got {weights}")
        expected = {"base": 0, "single": 1}.get(self.kind)
        if expected is not None and len(ids) != expected:
            raise ValueError(f"a {self.kind!r} choice has {expected} id(s), got {len(ids)}")
        if self.kind == "merge" and not ids:
            raise ValueError("a 'merge' choice needs at least one id")
        if not isinstance(self.distances, Mapping):
            raise ValueError(f"choice distances must map ids to numbers, got {type(self.distances).__name__}")
        distances = {str(k): _finite(v, "choice distance") for k, v in self.distances.items()}
        distance = _finite(self.distance, "choice distance")
        if distance < 0 or any(d < 0 for d in distances.values()):
            raise ValueError("choice distances cannot be negative")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "distance", distance)
        object.__setattr__(self, "distances", distances)

    def to_json(self) -> str:
        """The message a device sends: kind, ids, weights, distances. No user coordinate, no text."""
        return json.dumps(
            {
                "kind": self.kind,
                "ids": list(self.ids),
                "weights": list(self.weights),
                "distance": self.distance,
                "distances": self.distances,
            },
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Choice:
        """Parse and validate a device's message (ValueError on anything malformed)."""
        try:
            data = json.loads(text)
        except (ValueError, TypeError, RecursionError) as err:  # bad JSON or encoding, > 4300 digits, deep nesting
            raise ValueError(f"choice is not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"choice must be a JSON object, got {type(data).__name__}")
        keys = {"kind", "ids", "weights", "distance", "distances"}
        if set(data) != keys:
            raise ValueError(f"choice must have exactly the keys {sorted(keys)}, got {sorted(data)}")
        if not isinstance(data["ids"], list) or not isinstance(data["weights"], list):
            raise ValueError("choice 'ids' and 'weights' must be lists")
        return cls(
            kind=data["kind"],
            ids=tuple(data["ids"]),
            weights=tuple(data["weights"]),
            distance=data["distance"],
            distances=data["distances"],
        )


# --- Eq. 1 ------------------------------------------------------------------------------------------
def nearest(
    user: np.ndarray, coords: Mapping[str, np.ndarray], *, size: int | None = None, gram: np.ndarray | None = None
) -> Choice:
    """Eq. 1: the cached pLLM nearest to the user's coordinate (L1; between drifts given ``gram``).

    Ties go to the first id in ``coords``' order (pass entries in creation order). An empty cache gives
    ``Choice(kind="base")`` with the distance to the base model's zero coordinate.
    """
    u, ids, c, norm = _prepare(user, coords, size, gram)
    if not ids:
        return Choice("base", distance=float(norm(u)))
    dist = norm(c - u)
    best = int(np.argmin(dist))  # first minimum: deterministic ties
    distances = dict(zip(ids, dist.tolist(), strict=True))
    return Choice("single", (ids[best],), (1.0,), float(dist[best]), distances)


def merge_weights(
    user: np.ndarray,
    coords: Mapping[str, np.ndarray],
    max_parents: int = 3,
    *,
    size: int | None = None,
    gram: np.ndarray | None = None,
) -> Choice:
    """A few parents and weights ``α_j >= 0`` minimising ``||Σ α_j c_j − c_u||_2``.

    NNLS over all candidates, keep the ``max_parents`` largest positive weights (ties: ``coords``
    order), re-fit NNLS on those and drop any that fall to zero (in the drift space given ``gram``).
    ``distance`` is the selection distance of the merged coordinate. All-zero weights (no non-negative
    mix beats the zero vector) give the base model.
    """
    if isinstance(max_parents, bool) or not isinstance(max_parents, int) or max_parents < 1:
        raise ValueError(f"max_parents must be a positive integer, got {max_parents!r}")
    u, ids, c, norm = _prepare(user, coords, size, gram)
    base = Choice("base", distance=float(norm(u)))
    if not ids:
        return base
    distances = dict(zip(ids, norm(c - u).tolist(), strict=True))
    alpha = nnls(c.T, u)
    order = sorted((i for i in range(len(ids)) if alpha[i] > 0), key=lambda i: -alpha[i])[:max_parents]
    keep = sorted(order)  # parents in coords order
    if not keep:
        return Choice("base", distance=base.distance, distances=distances)
    refit = nnls(c[keep].T, u)
    parents = [(i, float(a)) for i, a in zip(keep, refit, strict=True) if a > 0]
    if not parents:
        return Choice("base", distance=base.distance, distances=distances)
    merged = sum(a * c[i] for i, a in parents)
    return Choice(
        "merge",
        tuple(ids[i] for i, _ in parents),
        tuple(a for _, a in parents),
        float(norm(merged - u)),
        distances,
    )


def select(
    user: np.ndarray,
    coords: Mapping[str, np.ndarray],
    delta: float,
    max_parents: int = 3,
    *,
    size: int | None = None,
    gram: np.ndarray | None = None,
) -> Choice:
    """Nearest pLLM if within ``delta``, else a merge if strictly closer, else the nearest.

    See the module docstring for the full rule and the distance; ``delta=inf`` disables merging.
    """
    try:
        delta = float(delta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"delta must be a number, got {delta!r}") from err
    if math.isnan(delta) or delta < 0:
        raise ValueError(f"delta must be >= 0 (inf disables merging), got {delta}")
    best = nearest(user, coords, size=size, gram=gram)
    if best.kind == "base" or best.distance <= delta:
        return best
    mix = merge_weights(user, coords, max_parents, size=size, gram=gram)
    return mix if mix.distance < best.distance else best


def merged_coordinates(coords: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The merged pLLM's explanation: ``Σ α_j c_j`` (parents zero-padded to the longest)."""
    if isinstance(coords, Mapping) or isinstance(weights, Mapping):
        raise TypeError("merged_coordinates takes parallel sequences: [coords[i] for i in ids], weights")
    if len(coords) != len(weights):
        raise ValueError(f"{len(coords)} coordinates but {len(weights)} weights")
    if not coords:
        raise ValueError("merged_coordinates needs at least one parent")
    alphas = [_finite(w, "merge weight") for w in weights]
    if any(a < 0 for a in alphas):
        raise ValueError(f"merge weights must be >= 0, got {alphas}")
    vecs = [_vector(c, f"coordinate of parent {j}") for j, c in enumerate(coords)]
    out = np.zeros(max(v.size for v in vecs))
    for a, v in zip(alphas, vecs, strict=True):
        out[: v.size] += a * v
    return out


# --- NNLS ---------------------------------------------------------------------------------------------
def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """``argmin_{x >= 0} ||a x − b||_2`` by Lawson–Hanson's active-set method (numpy only).

    Works for any shape, including more columns than rows and dependent columns (then one of the
    minimisers is returned). Sub-problems are solved with ``lstsq`` on the passive columns.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.ndim != 2 or a.shape[0] != b.size:
        raise ValueError(f"nnls: matrix {a.shape} does not match vector of length {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("nnls: inputs contain NaN or Inf")
    m, n = a.shape
    x = np.zeros(n)
    if n == 0 or m == 0:
        return x
    tol = 10 * np.finfo(float).eps * max(m, n) * max(1.0, np.linalg.norm(a) * max(np.linalg.norm(b), 1.0))
    max_iter = 3 * n + 30 if max_iter is None else max_iter
    passive = np.zeros(n, dtype=bool)
    w = a.T @ (b - a @ x)
    it = 0
    while not passive.all() and (w[~passive] > tol).any() and it < max_iter:
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        s = _solve_passive(a, b, passive)
        while it < max_iter and (s[passive] <= 0).any():
            it += 1
            bad = passive & (s <= 0)
            denom = x[bad] - s[bad]
            ratios = np.divide(x[bad], denom, out=np.zeros_like(denom), where=denom > 0)
            x = x + min(1.0, float(ratios.min())) * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
            s = _solve_passive(a, b, passive)
        x = s
        it += 1
        w = a.T @ (b - a @ x)
    return np.clip(x, 0.0, None)


def _solve_passive(a: np.ndarray, b: np.ndarray, passive: np.ndarray) -> np.ndarray:
    s = np.zeros(a.shape[1])
    if passive.any():
        s[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
    return s


# --- input checks -----------------------------------------------------------------------------------
Norm = Callable[[np.ndarray], np.ndarray]


def _prepare(
    user: np.ndarray, coords: Mapping[str, np.ndarray], size: int | None, gram: np.ndarray | None = None
) -> tuple[np.ndarray, list[str], np.ndarray, Norm]:
    """Validated user vector and candidate matrix (n × k), all zero-padded to the basis size k, and the
    norm distances are taken in: L1, or (given ``gram``) L2 after mapping coordinates to the drift space."""
    if not isinstance(coords, Mapping):
        raise TypeError(f"coords must map pLLM ids to coordinates, got {type(coords).__name__}")
    ids = list(coords)
    vecs = [_vector(coords[i], f"coordinate of {i!r}") for i in ids]
    u = _vector(user, "user coordinate")
    longest = max((v.size for v in vecs), default=0)
    if size is None:
        k = longest if vecs else u.size
    else:
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
            raise ValueError(f"basis size must be a non-negative integer, got {size!r}")
        k = int(size)
        if longest > k:
            raise ValueError(f"a cached coordinate has {longest} entries, more than the basis size {k}")
    if u.size > k:
        raise ValueError(
            f"user coordinate has {u.size} entries but the basis has {k} words: "
            "the device's basis is newer than the server's (or from another summarizer)"
        )
    c = np.zeros((len(vecs), k))
    for row, v in zip(c, vecs, strict=True):
        row[: v.size] = v
    u = np.pad(u, (0, k - u.size))
    if gram is None:
        return u, ids, c, lambda x: np.abs(x).sum(axis=-1)
    f = _gram_factor(gram, k)
    return u @ f, ids, c @ f, lambda x: np.linalg.norm(x, axis=-1)


def _gram_factor(gram: np.ndarray, k: int) -> np.ndarray:
    """``F`` with ``x G xᵀ = ||x F||²``: coordinates times ``F`` are drifts in an orthonormal frame."""
    g = np.asarray(gram, dtype=np.float64)
    if g.shape != (k, k):
        raise ValueError(f"Gram matrix has shape {g.shape}, the basis has {k} words: pass basis.gram")
    if not np.isfinite(g).all() or not np.allclose(g, g.T, rtol=1e-6, atol=1e-9 * max(1.0, np.abs(g).max(initial=0.0))):
        raise ValueError("Gram matrix must be finite and symmetric (basis.gram)")
    w, q = np.linalg.eigh(g)
    return q * np.sqrt(np.clip(w, 0.0, None))


def _vector(x: object, what: str) -> np.ndarray:
    try:
        v = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is not numeric ({err})") from err
    if v.ndim != 1:
        raise ValueError(f"{what} must be a 1-D vector, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{what} contains NaN or Inf")
    return v


def _finite(x: object, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float | np.integer | np.floating):
        raise ValueError(f"{what} must be a number, got {x!r}")
    try:
        value = float(x)
    except OverflowError as err:  # an integer beyond float range
        raise ValueError(f"{what} must be finite, got an integer beyond float range") from err
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value
