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
