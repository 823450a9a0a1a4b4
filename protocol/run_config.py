"""The run config: the other contract the server and its devices share, besides their messages.

Flower hands both sides the same ``context.run_config``: pyproject.toml's ``[tool.flwr.app.config]``
with the run's ``--run-config`` overrides merged in (Flower refuses an override of a key that table
lacks). So pyproject holds the one default of every setting and every key is present at run time.
Each side reads the keys it needs through one *config tree*: a frozen dataclass of *sections*, each
a frozen dataclass whose fields are keys (field ``foo_bar`` is key ``foo-bar``). :func:`read` is the
one reader, with no fallback: a missing key, or a value of another type (``"false"`` for a boolean,
``1.5`` for a count), is a :class:`RunConfigError` naming the key, never a silent default.

The server's tree is ``strategies.config.XPerTConfig``, the device's ``clients.config.DeviceConfig``;
the sections both read (the models, the probe, what devices report) are defined here, once, so each
key is one field wherever it is read (tests/test_strategy.py checks pyproject against the trees).
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from xpert_fl.explain import ProbeConfig

T = TypeVar("T")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"  # in the repository checkout


class RunConfigError(ValueError):
    """A run-config key that is missing, of the wrong type or out of range (the message names it)."""


def key(field_name: str) -> str:
    """The run-config key of a section field: Flower's keys are kebab-case, Python's names snake_case."""
    return field_name.replace("_", "-")


def require(ok: bool, name: str, value: object, rule: str) -> None:
    """A section's range check: RunConfigError naming the key (``name`` is the field) and its value."""
    if not ok:
        raise RunConfigError(f"run config {key(name)} = {value!r}: {rule}")


def pyproject_defaults(path: str | Path = PYPROJECT) -> dict[str, Any]:
    """pyproject.toml's ``[tool.flwr.app.config]``: what Flower merges under every run's overrides.

    Only for code that starts runs or stands in for Flower (the simulation, tests, benchmarks): the
    ServerApp and the ClientApp read ``context.run_config``, where Flower has already merged it."""
    return tomllib.loads(Path(path).read_text())["tool"]["flwr"]["app"]["config"]


def read(cls: type[T], run_config: Mapping[str, object]) -> T:
    """A config tree (or one section) from the run config: sections recursively, fields by key.

    The dataclasses' own ``__post_init__`` then checks ranges (``require``)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        values[f.name] = read(kind, run_config) if dataclasses.is_dataclass(kind) else _value(run_config, f.name, kind)
    return cls(**values)


def _value(run_config: Mapping[str, object], name: str, kind: type) -> object:
    """One key's value, of exactly the field's type: a boolean is not a number, a string is not a boolean
    (``bool("false")`` is True), and only a float field widens an int (TOML ``lr = 1``)."""
    if kind not in (bool, int, float, str):
        raise TypeError(f"run-config field {name} is a {kind!r}, not bool, int, float or str")
    k = key(name)
    if k not in run_config:
        raise RunConfigError(f"run config has no key {k!r} (pyproject.toml's [tool.flwr.app.config] sets every "
                             "key; Flower merges it into each run, so a caller standing in for Flower must too)")
    raw = run_config[k]
    if isinstance(raw, bool) == (kind is bool):  # Python's bool is an int; here it is neither int nor float
        if kind is float and isinstance(raw, int | float):
            return float(raw)
        if isinstance(raw, kind):
            return raw
    raise RunConfigError(f"run config {k} = {raw!r} is not a {kind.__name__}")


def fields_by_key(cls: type) -> dict[str, tuple[type, str]]:
    """Every key a config tree reads -> (the section that holds it, its field): one owner per key."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[type, str]] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        found = fields_by_key(kind) if dataclasses.is_dataclass(kind) else {key(f.name): (cls, f.name)}
        for k, owner in found.items():
            if out.setdefault(k, owner) != owner:
                raise TypeError(f"{cls.__name__}: run-config key {k} is held by {out[k]} and {owner}")
    return out


class Section:
    """Base of the config dataclasses: ``from_run_config`` is :func:`read`, the one reader."""

    @classmethod
    def from_run_config(cls: type[T], run_config: Mapping[str, object]) -> T:
        return read(cls, run_config)


# --- the sections both sides read -------------------------------------------------------------------
@dataclass(frozen=True)
class Common(Section):
    """The models, the corpus and the seed: the server probes with them, devices select and train with them."""

    model: str
    summarizer: str
    corpus: str  # the server's probe prompts (test role), the devices' data (user role)
    seed: int


@dataclass(frozen=True)
class Probe(Section):
    """How pLLMs are probed (server); the devices embed their own data with the same settings."""

    num_probe_prompts: int
    probe_max_new_tokens: int
    probe_batch_size: int

    def probe_fields(self) -> dict[str, int]:
        """``xpert_fl.explain.ProbeConfig`` fields, as the select request carries them to devices."""
        return {"max_new_tokens": self.probe_max_new_tokens, "batch_size": self.probe_batch_size}

    def config(self) -> ProbeConfig:
        """The ``ProbeConfig`` (imported on use: it loads torch, which a device registering does without)."""
        from xpert_fl.explain import ProbeConfig

        return ProbeConfig(**self.probe_fields())


@dataclass(frozen=True)
class Reports(Section):
    """What devices report besides their adapter, and how far the server trusts it."""

    # devices upload one embedding of their training data (never text); trusted when it agrees with the probe
    self_reports: bool
    self_report_min_cosine: float  # the report's cosine with the pLLM's probe answers' embedding, at least
    report_labels: bool  # devices report their style label at registration (evaluation; the oracle baseline)

    def __post_init__(self) -> None:
        cos = self.self_report_min_cosine
        require(-1.0 <= cos <= 1.0, "self_report_min_cosine", cos, "a cosine in [-1, 1]")
