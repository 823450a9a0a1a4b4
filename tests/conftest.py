"""Shared fixtures: the real embedded model is loaded once per test session."""

from __future__ import annotations

import pytest

from xpert_fl.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def base() -> LoadedModel:
    return load_model()
