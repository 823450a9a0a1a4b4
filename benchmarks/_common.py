"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this is importable)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def cached_json(path: Path, make: Callable[[], object]):
    """Load ``path`` if a previous run wrote it, else compute, write and return it (expensive generations)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.write_text(json.dumps(value))
    return value


def cached_answers(path: Path, keys: list[str], make: Callable[[list[str]], list[str]]) -> dict[str, str]:
    """A growing ``key -> generated text`` store: only keys a previous run did not cover are generated."""
    have = json.loads(path.read_text()) if path.is_file() else {}
    missing = [k for k in keys if k not in have]
    if missing:
        have.update(zip(missing, make(missing), strict=True))
        path.write_text(json.dumps(have))
    return have
