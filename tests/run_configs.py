"""Run configs for tests that stand in for Flower: pyproject.toml's defaults with a test's overrides.

Flower merges pyproject's ``[tool.flwr.app.config]`` under every run's overrides, so the ServerApp and
the ClientApp read every key and fall back on none. A test calling them (or building their config
dataclasses) directly must do the same; this does it, and like Flower refuses an override of a key
pyproject lacks (a typo would otherwise be a silently ignored setting).
"""

from __future__ import annotations

from collections.abc import Mapping

from protocol.run_config import pyproject_defaults


def run_config(overrides: Mapping[str, object] | None = None, /, **kw: object) -> dict[str, object]:
    """pyproject's run config with ``overrides`` (run-config keys) and ``kw`` (``foo_bar`` for ``foo-bar``)."""
    defaults = pyproject_defaults()
    changes = {**(overrides or {}), **{k.replace("_", "-"): v for k, v in kw.items()}}
    unknown = sorted(set(changes) - set(defaults))
    if unknown:
        raise KeyError(f"not run-config keys of pyproject.toml: {unknown}")
    return {**defaults, **changes}
