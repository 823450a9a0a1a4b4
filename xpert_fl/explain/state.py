"""The server's explanation state next to the cache: the basis, every pLLM's drift, the coordinates it offers.

Kept on disk so that a restarted server reloads its basis and explains only the entries it has not
explained yet (:func:`unexplained`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from xpert_fl.basis import Basis
from xpert_fl.cache import CacheEntry, PLLMCache
from xpert_fl.files import atomic_file
from xpert_fl.summarizer import Summarizer

BASIS_FILE = "basis.safetensors"
DRIFTS_FILE = "drifts.safetensors"


def load_drifts(path: Path) -> dict[str, np.ndarray]:
    return load_file(path) if path.is_file() else {}


def save_drifts(path: Path, drifts: dict[str, np.ndarray]) -> None:
    """Atomically rewrite the drift store (temp file + rename)."""
    with atomic_file(path) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in drifts.items()}, tmp)


def open_basis(
    root: Path, summarizer: Summarizer, tau_orth: float, tau_res: float, orthogonalize: bool, complete: bool = True
) -> Basis:
    """The cache's basis, or a new empty one for this summarizer and these settings (an existing one
    grown under other settings is refused: ``Basis.expect_settings``)."""
    path = root / BASIS_FILE
    if path.is_file():
        basis = Basis.load(path, expect_summarizer=summarizer.fingerprint)
        basis.expect_settings(tau_orth, tau_res, orthogonalize, complete, where=f"basis {path}")
        return basis
    return Basis(
        dim=summarizer.dim, tau_orth=tau_orth, tau_res=tau_res, summarizer=summarizer.fingerprint,
        orthogonalize=orthogonalize, complete=complete,
    )


def offered_coordinates(entries: Iterable[CacheEntry], size: int) -> tuple[list[str], np.ndarray]:
    """Ids of the explained entries (in the given order) and their coordinates zero-padded to ``size``
    words (n x size): what a device compares its own coordinate with."""
    ids, rows = [], []
    for e in entries:
        if e.coords is None:
            continue
        c = np.zeros(size)
        c[: len(e.coords)] = e.coords[:size]
        ids.append(e.id)
        rows.append(c)
    return ids, np.array(rows, dtype=np.float64).reshape(len(ids), size)


def unexplained(cache: PLLMCache) -> list[CacheEntry]:
    """The cache's entries that have no drift yet (what ``explain_cache`` will explain), in order."""
    drifts = load_drifts(Path(cache.root) / DRIFTS_FILE)
    return [e for e in cache.entries() if e.id not in drifts]
